"""OpenAI-shaped errors.

Every refusal the gateway makes, from any stage or plugin, is a `GatewayError`. The pipeline
turns it into the body the official SDK expects, ``{"error": {"message", "type", "param",
"code"}}``, with the right status and headers, so apps see the same exception classes they
would see from OpenAI itself. Beside it, what the gateway counts as malformed JSON
(`MALFORMED_JSON`, `is_json_object`), since a body that isn't JSON is where most refusals start.
"""

from __future__ import annotations

import msgspec

__all__ = ["MALFORMED_JSON", "GatewayError", "ListenError", "StartupError", "error_body", "is_json_object"]

# What msgspec raises for bytes that are not JSON. Invalid UTF-8 inside a string and nesting deeper
# than the interpreter's recursion limit arrive as UnicodeDecodeError and RecursionError, not as a
# msgspec.DecodeError: code that decodes what a client, an upstream or a file on disk sent catches all three.
MALFORMED_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class _AnyObject(msgspec.Struct):
    pass


_decode_object = msgspec.json.Decoder(_AnyObject).decode  # members skipped, not decoded


def is_json_object(data: bytes) -> bool:
    """Whether `data` is one well-formed JSON object: the whole text is checked (trailing bytes,
    numbers, escapes, UTF-8), its members are not decoded."""
    try:
        _decode_object(data)
    except MALFORMED_JSON:
        return False
    return True

_ENCODER = msgspec.json.Encoder()

# Default `type` per status, as OpenAI uses them (contract section 7.2).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "upstream_error",
    503: "server_error",
    504: "timeout",
}


class GatewayError(Exception):
    """A request the gateway answers itself with an OpenAI-shaped error.

    Raise it from any hook to end the request: the pipeline answers with ``status`` and the
    error body, and calls ``exchange_error`` for the flow. ``outcome`` names the audit outcome
    (``rejected``, ``auth_fail``, ``upstream_error`` ...). ``headers`` are added to the
    response, for example ``retry-after``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        outcome: str = "rejected",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.outcome = outcome
        # Tell the SDK plainly whether a retry can help (contract 9.3).
        self.headers.setdefault("x-should-retry", "true" if status in (408, 409, 429) or status >= 500 else "false")

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.message!r}, code={self.code!r})"


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error object."""
    return _ENCODER.encode({"error": {"message": message, "type": type, "param": param, "code": code}})


class StartupError(Exception):
    """A plugin's `startup` hook failed (a database that doesn't answer, a log it can't open): the
    gateway can't serve. `gatekeeper serve` says so in one log line, naming the plugin, and exits 1."""

    def __init__(self, plugin: str, error: BaseException) -> None:
        super().__init__(f"the {plugin} plugin could not start: {type(error).__name__}: {error}")
        self.plugin = plugin
        self.error = error


class ListenError(Exception):
    """The address ``[server]`` names can't be listened on (already in use, not permitted, a socket
    path that can't be made). `gatekeeper serve` says so in one log line and exits 1, once the
    plugins that had started have shut down: their threads would otherwise keep the process alive."""

    def __init__(self, address: str, error: OSError) -> None:
        super().__init__(f"cannot listen on {address}: {error.strerror or error}")
        self.address = address
        self.error = error
