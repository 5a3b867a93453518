"""The files an upload carries, hashed as they stream upstream: the audit's `input_file_sha256`.

An upload (`[server] upload_paths`) is never held in memory, so its files are hashed chunk by
chunk on their way through (`Upload.observers`). For a multipart/form-data body (the Files API's
`file`, an Uploads API part's `data`) each part with a filename is one file, and its digest is
`sha256sum` of that file as the client had it; any other body is one file as a whole.
"""

from __future__ import annotations

import hashlib

from gatekeeper.multipart import boundary_of, part_head

__all__ = ["UploadFileHasher"]

_MAX_HEAD_BYTES = 16 * 1024  # a part's header lines; past this the body is not multipart as we know it

_BEFORE_FIRST, _HEAD, _CONTENT, _DONE = range(4)


class UploadFileHasher:
    """Fed every chunk of an upload in order; `files` then has one (sha256 hex, bytes) per file.

    A multipart body is followed across chunk edges: the last bytes of a chunk that could begin a
    delimiter wait for the next chunk. A body that stops following multipart's rules is marked
    `malformed` (the upstream will say what it thinks of it; the audit records no file digests).
    """

    __slots__ = ("files", "malformed", "_delimiter", "_state", "_carry", "_digest", "_size", "_whole")

    def __init__(self, content_type: str) -> None:
        self.files: list[tuple[str, int]] = []
        self.malformed = False
        boundary = boundary_of(content_type) if content_type.lower().startswith("multipart/") else None
        self._whole = boundary is None
        # Every delimiter but the first follows a CRLF; the carry starts with one so that the
        # first is found the same way.
        self._delimiter = b"\r\n--" + boundary if boundary else b""
        self._state = _BEFORE_FIRST
        self._carry = b"\r\n"
        self._digest = hashlib.sha256() if self._whole else None
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._whole:
            self._digest.update(chunk)  # type: ignore[union-attr]
            self._size += len(chunk)
        elif self._state != _DONE and not self.malformed:
            self._parse(self._carry + chunk if self._carry else chunk)

    def finish(self) -> list[tuple[str, int]] | None:
        """The files, once the whole body has been fed; None if it was not multipart as declared."""
        if self._whole:
            return [(self._digest.hexdigest(), self._size)]  # type: ignore[union-attr]
        if self.malformed or self._state != _DONE:
            return None
        return self.files

    def _parse(self, data: bytes) -> None:
        delimiter = self._delimiter
        position = 0
        while True:
            if self._state == _HEAD:
                if len(data) - position < 2:
                    break
                if data.startswith(b"--", position):  # the closing delimiter: the epilogue is ignored
                    self._state = _DONE
                    return
                end = data.find(b"\r\n\r\n", position)
                if end < 0:
                    if len(data) - position > _MAX_HEAD_BYTES:
                        self.malformed = True
                    break
                _, filename, _ = part_head(data[position + 2:end])  # past the CRLF after the delimiter
                self._digest = hashlib.sha256() if filename is not None else None
                self._size = 0
                self._state = _CONTENT
                position = end + 4
                continue
            found = data.find(delimiter, position)
            if found < 0:
                # Keep what could be the start of a delimiter for the next chunk.
                keep_from = max(position, len(data) - len(delimiter) + 1)
                self._take(data, position, keep_from)
                position = keep_from
                break
            self._take(data, position, found)
            if self._state == _CONTENT and self._digest is not None:
                self.files.append((self._digest.hexdigest(), self._size))
            self._state = _HEAD
            position = found + len(delimiter)
        self._carry = data[position:]

    def _take(self, data: bytes, start: int, end: int) -> None:
        """Content of the current part (or the preamble, which is skipped)."""
        if self._state == _CONTENT and self._digest is not None and end > start:
            self._digest.update(memoryview(data)[start:end])
            self._size += end - start
