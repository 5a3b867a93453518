"""Exit 0 when the gateway in this container answers 200, else 1: Docker's HEALTHCHECK and
Kubernetes exec probes (which cannot reach a unix socket with an httpGet probe).

    gatekeeper-healthcheck                      # GET /health on $GATEKEEPER_UNIX_SOCKET, else 127.0.0.1:8080
    gatekeeper-healthcheck --path /ready        # readiness: 503 while starting or draining
    gatekeeper-healthcheck --socket /run/gatekeeper/gk.sock
    gatekeeper-healthcheck --port 9000
    gatekeeper-healthcheck --tls                # HTTPS (the default when $GATEKEEPER_TLS_CERT_FILE is set)

Standard library only, so a probe costs one short-lived interpreter and no imports of the gateway.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import ssl
import sys


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("gatekeeper", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatekeeper-healthcheck")
    parser.add_argument("--path", default="/health", help="/health (alive) or /ready (ready for traffic)")
    parser.add_argument("--socket", default=os.environ.get("GATEKEEPER_UNIX_SOCKET") or None)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--tls", action="store_true", default=bool(os.environ.get("GATEKEEPER_TLS_CERT_FILE")),
                        help="HTTPS; the certificate is not checked: this asks whether the gateway answers, not who it is")
    args = parser.parse_args(argv)
    if args.socket:
        connection: http.client.HTTPConnection = UnixHTTPConnection(args.socket, args.timeout)
    elif args.tls:
        unchecked = ssl.create_default_context()
        unchecked.check_hostname = False
        unchecked.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection("127.0.0.1", args.port, timeout=args.timeout, context=unchecked)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", args.port, timeout=args.timeout)
    try:
        connection.request("GET", args.path)
        status = connection.getresponse().status
    except OSError as error:
        print(f"{args.path}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"{args.path}: HTTP {status}", file=sys.stderr)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
