"""Turning HTTP requests into image bytes: content types, size limits, multipart bodies, bearer tokens.

Framework-free on purpose (the endpoint in :mod:`pneumonet.scoring.online` wires it to FastAPI),
so every refusal is a plain :class:`ApiError` with the status code and a message for the client.
Multipart bodies are parsed by python-multipart (the parser Starlette's own ``request.form()`` uses),
fed the body that is already bounded by the size limit; what it finds malformed is a 400.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

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
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise ApiError(400, "multipart/form-data request without a valid boundary parameter")
    return boundary


class _Parts:
    """python-multipart's callbacks, collecting each part's headers and bytes."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[bytes, bytes], bytes]] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value, self._data = bytearray(), bytearray(), bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin, "on_part_data": lambda d, s, e: self._data.extend(d[s:e]),
            "on_part_end": lambda: self.parts.append((self._headers, bytes(self._data))),
            "on_header_field": lambda d, s, e: self._name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end, "on_end": lambda: setattr(self, "ended", True),
        }  # fmt: skip

    def _begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._name).lower()] = bytes(self._value)
        self._name, self._value = bytearray(), bytearray()


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), in order."""
    found = _Parts()
    parser = MultipartParser(_boundary(content_type), found.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart/form-data body ({exc})") from None
    if not found.ended:
        raise ApiError(400, "malformed multipart/form-data body (no closing boundary)")
    uploads = []
    for headers, content in found.parts:
        disposition, params = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise ApiError(400, "malformed multipart/form-data body (a part without a form-data name)")
        filename = params.get(b"filename")
        part_type = media_type(headers.get(b"content-type", b"").decode("latin-1"))
        uploads.append(Upload(params[b"name"].decode("utf-8", "replace"),
                              None if filename is None else filename.decode("utf-8", "replace"), content, part_type))  # fmt: skip
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
