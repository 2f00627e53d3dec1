"""Hostile files shared by the decoder, batch-scoring and endpoint tests."""

from __future__ import annotations

import io

from PIL import Image


def many_scans_jpeg(side: int = 2000, scans: int = 100_000) -> bytes:
    """A small progressive JPEG that takes minutes to decode: its last scan header repeated ``scans``
    times. libjpeg walks the whole image for every scan (about 1 ms per scan at 2000x2000 here), and
    the file stays small (10 bytes per scan) and well under every byte and pixel limit."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 90).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rfind(b"\xff\xda")  # SOS marker; entropy-coded data never holds 0xFFDA (0xFF is stuffed)
    header = data[last : last + 2 + int.from_bytes(data[last + 2 : last + 4], "big")]
    return data[:-2] + header * scans + b"\xff\xd9"
