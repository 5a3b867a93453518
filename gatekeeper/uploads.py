"""Request bodies that go upstream as they arrive: ``[server] upload_paths`` and ``max_upload_bytes``.

A file upload (the Files API takes files of up to 512 MB, an Uploads API part up to 64 MB, the
Containers API a file for a code interpreter) is a body no stage needs to read: it is never
cached, has no prompt to normalize and no usage to meter. Read whole first, it would be held in
memory and capped by `max_body_bytes`. Instead the forwarder sends it upstream chunk by chunk as
the client sends it, as nginx does with ``proxy_request_buffering off``. Such a flow has
``flow.body == b""`` and ``flow.upload`` set.

Its body can be sent once: once the first chunk has gone upstream it is never retried or failed
over (an upstream's 429 or 5xx is relayed as it came, for the client to decide).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import StreamReader
from aiohttp.web_protocol import RequestPayloadError

from gatekeeper.errors import GatewayError

__all__ = ["Upload", "upload_path_pattern"]


def upload_path_pattern(paths: Sequence[str]) -> re.Pattern[str] | None:
    """One pattern for the configured paths, matched against the normalized path; ``*`` stands
    for exactly one path segment (``/v1/uploads/*/parts``). None for an empty list."""
    if not paths:
        return None
    alternatives = ("/".join("[^/]+" if part == "*" else re.escape(part) for part in path.split("/"))
                    for path in paths)
    return re.compile("(?:" + "|".join(alternatives) + r")\Z")


class Upload:
    """The body of a flow that streams upstream; what the forwarder sends instead of `flow.body`.

    `error` is set when the body failed on the gateway's side (too large, silent too long, a
    broken encoding, part of it taken by a plugin): the forwarder answers with it instead of
    blaming the upstream. A client that hangs up cancels the flow, as on any route. A plugin that
    must see the body (the audit hashes the files in it) appends a callable to `observers` before
    `forward_request`: each gets every chunk, in order, as it goes upstream.
    """

    __slots__ = ("_content", "_limit", "_stall_s", "bytes_read", "started", "complete", "error", "observers")

    def __init__(self, content: StreamReader, limit: int, stall_s: float) -> None:
        self._content = content
        self._limit = limit
        self._stall_s = stall_s
        self.bytes_read = 0
        self.started = False  # its first chunk has been read for an upstream: it can't be sent again
        self.complete = False  # the client sent all of it
        self.error: GatewayError | None = None
        self.observers: list[Callable[[bytes], None]] = []

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Any number of these may be made, but only one read (the body
        runs at the first iteration): an attempt that never got to send (a refused connection)
        leaves the body for the next upstream."""
        if self.started:
            raise RuntimeError("a streamed upload can be sent only once")
        self.started = True
        content = self._content
        while True:
            try:
                async with asyncio.timeout(self._stall_s):
                    chunk = await content.readany()
            except TimeoutError:
                raise self._fail(GatewayError(408, f"No part of the request body arrived for {self._stall_s:g} "
                                                   "seconds.", code="request_timeout")) from None
            except RequestPayloadError:  # a broken chunked encoding, a Content-Encoding that won't decode
                raise self._fail(GatewayError(
                    400, "The request body could not be read: its chunked encoding or its Content-Encoding is broken.",
                    code="invalid_request_body")) from None
            if not chunk:
                if self.bytes_read != content.total_bytes:
                    # Someone else (a plugin calling request.read()) took part of the body: what
                    # went upstream is not what the client sent, so the upload must fail.
                    raise self._fail(GatewayError(
                        500, "The gateway could not forward the upload: a plugin read its body first.",
                        type="server_error", code="gateway_error"))
                self.complete = True
                return
            self.bytes_read += len(chunk)
            if self.bytes_read > self._limit:
                raise self._fail(GatewayError(413, f"Request body is larger than the gateway's limit of {self._limit} "
                                                   "bytes.", code="request_too_large"))
            for observe in self.observers:
                observe(chunk)
            yield chunk

    def _fail(self, error: GatewayError) -> GatewayError:
        self.error = error
        return error
