"""Turning HTTP requests into image bytes: content types, size limits, multipart bodies, bearer tokens.

Framework-free on purpose (the endpoint in :mod:`pneumonet.scoring.online` wires it to FastAPI),
so every refusal is a plain :class:`ApiError` with the status code and a message for the client.
Multipart bodies are parsed here with the standard library rather than python-multipart, which
is not a dependency; the body is already bounded by the size limit when it is parsed.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import HTTP
from itertools import pairwise

from pneumonet.errors import ConfigError

RAW_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/bmp", "image/tiff", "application/dicom", "application/octet-stream"}
)
MULTIPART = "multipart/form-data"


class ApiError(Exception):
    """A refused request: HTTP ``status``, a message that is safe to show the client, extra headers,
    and for an image that cannot be scored the ``kind`` of :mod:`pneumonet.errors` (``error_kind``
    in the answer, as in batch scoring's output, so a client can tell causes apart without parsing)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.kind = kind

    def body(self) -> dict[str, str]:
        """The JSON the client gets: the message and, for an image, its kind."""
        return {"error": self.message} if self.kind is None else {"error": self.message, "error_kind": self.kind}


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the form field it came in, its file name (if any), its bytes and its
    media type (a multipart part's own Content-Type; empty when the part has none)."""

    field: str
    filename: str | None
    data: bytes
    content_type: str = ""


def decoder_source(upload_name: str | None, content_type: str) -> str:
    """The name the decoder sees: the upload's file name (``upload`` without one), with ``.dcm``
    added when the client declared ``application/dicom``, which makes the decoder read DICOM."""
    name = os.path.basename(upload_name or "")[:200] or "upload"
    if content_type == "application/dicom" and not name.lower().endswith(".dcm"):
        return f"{name}.dcm"
    return name


def media_type(content_type: str | None) -> str:
    """``image/png; charset=x`` → ``image/png`` (lower case); empty when absent."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_length(headers: Mapping[str, str], limit: int) -> None:
    """Refuse a request whose declared length is over ``limit`` before reading any of it."""
    declared = headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise ApiError(400, f"invalid Content-Length header {declared[:40]!r}") from None
    if length > limit:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes (serve.max_request_bytes)")


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refusing it as soon as it grows past ``limit`` (a missing or lying Content-Length)."""
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes (serve.max_request_bytes)")
        parts.append(chunk)
    return b"".join(parts)


def _boundary(content_type: str) -> bytes:
    header = BytesHeaderParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1"))
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise ApiError(400, "multipart/form-data request without a valid boundary parameter")
    return boundary.encode("latin-1")


def _delimiters(data: bytes, delimiter: bytes) -> list[tuple[int, bool]]:
    """(offset, closing?) of each real delimiter: one followed by ``--``, whitespace or CRLF, so a
    part holding ``--boundaryX`` is not cut there."""
    found = []
    start = data.find(delimiter)
    while start >= 0:
        after = data[start + len(delimiter) : start + len(delimiter) + 2]
        if after == b"--" or after == b"\r\n" or after[:1] in (b" ", b"\t"):
            found.append((start, after == b"--"))
        start = data.find(delimiter, start + 1)
    return found


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), in order."""
    delimiter = b"\r\n--" + _boundary(content_type)
    data = b"\r\n" + body
    marks = _delimiters(data, delimiter)
    closing = next((i for i, (_, close) in enumerate(marks) if close), None)
    if closing is None:
        raise ApiError(400, "malformed multipart/form-data body (no closing boundary)")
    uploads = []
    for (start, _), (end, _) in pairwise(marks[: closing + 1]):
        section = data[start + len(delimiter) : end]
        line_end = section.find(b"\r\n")
        head, separator, content = section[line_end + 2 :].partition(b"\r\n\r\n")
        if line_end < 0 or not separator:
            raise ApiError(400, "malformed multipart/form-data body (a part without headers)")
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head + b"\r\n\r\n")
        disposition = headers.get("content-disposition", "")
        field = headers.get_param("name", header="content-disposition")
        if not disposition.lower().startswith("form-data") or not isinstance(field, str):
            raise ApiError(400, "malformed multipart/form-data body (a part without a form-data name)")
        filename = headers.get_param("filename", header="content-disposition")
        part_type = media_type(headers.get("content-type"))
        uploads.append(Upload(field, filename if isinstance(filename, str) else None, content, part_type))
    return uploads


def token_from_env(name: str) -> str | None:
    """The bearer token from env var ``name``; None (no auth) when unset. Set but blank is a mistake
    (an empty Secret, say) that must not silently open the endpoint, so it is refused."""
    token = os.environ.get(name)
    if token is None:
        return None
    if not token.strip():
        raise ConfigError(f"${name} is set but empty: put the bearer token in it, or unset it to serve without auth")
    return token.strip()


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Refuse (401) a request without the right ``Authorization: Bearer <token>``; no token configured: open."""
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip
