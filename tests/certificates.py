"""Self-signed certificates for the TLS tests (the gateway's own HTTPS, a TLS upstream, rediss://)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["self_signed"]


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate valid for 127.0.0.1 (subject `name`, one day) and its key, as PEM files."""
    certificate, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
                   check=True, capture_output=True)
    return certificate, key
