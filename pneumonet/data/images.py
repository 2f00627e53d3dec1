"""The one image decoder shared by training, batch scoring and serving.

Every path that turns bytes into model input goes through :func:`load_image`, so a model sees
exactly the same pixels in training and in production: grayscale uint8, EXIF orientation applied,
plain bilinear resize to a square. Anything that cannot be decoded raises
:class:`~pneumonet.errors.ImageDecodeError` naming the source and the reason, never a raw Pillow
or pydicom exception.

Limits, so that one hostile file costs a bounded amount of memory: ``data.max_image_bytes``
(checked on the file size before it is read, and on bytes already in memory) and
``data.max_image_pixels`` (checked on the header before any pixel is decoded). Pillow's own
process-wide decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) stays on as a second line.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR
from tqdm import tqdm

from pneumonet import console
from pneumonet.errors import ImageDecodeError, StorageError
from pneumonet.storage import read_bytes

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MAX_BYTES = 64 * 2**20

# Only formats decoded in-process; this also keeps e.g. EPS (which shells out to Ghostscript) away
# from untrusted uploads.
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
# Signatures of those formats: bytes that start like one but do not open are damaged, not foreign.
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
# Modes with more than 8 bits per sample: windowed to their own range instead of kept as is.
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# 8-bit modes Pillow converts to luma (alpha dropped); anything else (e.g. LAB) is refused.
_COLOR_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "YCbCr", "HSV", "CMYK"})
# Deep images are windowed to these percentiles of their own values, so that a few hot or dead
# pixels (or burnt-in text at full scale) do not squeeze the anatomy into a few grey levels.
WINDOW_PERCENTILES = (0.5, 99.5)
# The percentiles are taken on a regular grid of about this many pixels (exact for smaller images).
_WINDOW_SAMPLE = 2**18
# Windowing converts this many rows at a time to float32, so memory stays ~1 byte per pixel above
# the decoded array instead of 8 bytes per pixel per float64 temporary.
_WINDOW_ROWS = 256
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_DICOM_VRS = frozenset(vr.value.encode("ascii") for vr in VR)
_NATIVE_SYNTAXES = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                    (False, False): ExplicitVRBigEndian}  # (implicit VR, little endian) → transfer syntax


def is_image_name(name: str) -> bool:
    """Whether a file name or URI has one of the :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return PurePosixPath(str(name)).suffix.lower() in IMAGE_SUFFIXES


# Suffixes that are certainly not images. Anything else is read and decoded, because DICOM files
# often have no suffix or a numeric one (``1.2.840.113619.2.55``); the decoder decides by content.
NOT_IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".txt", ".csv", ".tsv", ".json", ".xml", ".html", ".htm", ".md", ".yaml", ".yml", ".log", ".pdf",
     ".doc", ".docx", ".xls", ".xlsx", ".zip", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z", ".rar",
     ".parquet", ".py", ".sh", ".exe", ".bin", ".db", ".sqlite", ".mp4", ".avi", ".mov", ".mp3", ".wav"}
)  # fmt: skip


def not_image_reason(uri: str) -> str | None:
    """Why ``uri`` is skipped without reading it, or None when it should be decoded."""
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix in NOT_IMAGE_SUFFIXES:
        return f"{uri}: not an image file (suffix {suffix}); not read"
    return None


def _check_pixels(source: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{source}: image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} (data.max_image_pixels)",
            kind="over_pixel_limit",
        )


def _check_bytes(source: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageDecodeError(f"{source}: file is {size} bytes, over the limit of {max_bytes} (data.max_image_bytes)",
                               kind="over_byte_limit")  # fmt: skip


def _row_chunks(arr: np.ndarray):
    return (slice(start, start + _WINDOW_ROWS) for start in range(0, arr.shape[0], _WINDOW_ROWS))


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, >=3) colour → (H, W) float32 luma (ITU-R 601, as Pillow's ``convert("L")``)."""
    out = np.empty(rgb.shape[:2], np.float32)
    for rows in _row_chunks(rgb):
        out[rows] = rgb[rows, :, :3].astype(np.float32) @ _LUMA
    return out


def _window(arr: np.ndarray, source: str, robust: bool = True) -> np.ndarray:
    """Map an image linearly onto 0..255, clipping outside its range; a constant image becomes zeros.

    The range is the :data:`WINDOW_PERCENTILES` of its values (``robust``), or its min..max for
    values already windowed (a DICOM VOI window, whose bounds are the intended black and white).
    """
    if arr.dtype.kind == "f" and not all(np.isfinite(arr[rows]).all() for rows in _row_chunks(arr)):
        raise ImageDecodeError(f"{source}: image has non-finite pixel values (NaN or infinity)", kind="non_finite")
    if robust:
        step = max(1, int(np.ceil(np.sqrt(arr.size / _WINDOW_SAMPLE))))
        lo, hi = (float(v) for v in np.percentile(arr[::step, ::step], WINDOW_PERCENTILES))
    else:
        lo, hi = float(arr.min()), float(arr.max())
    out = np.zeros(arr.shape, np.uint8)
    if hi <= lo:
        return out
    scale = np.float32(255.0 / (hi - lo))
    for rows in _row_chunks(arr):
        chunk = arr[rows].astype(np.float32)  # a copy of a few rows, then everything in place
        chunk -= np.float32(lo)
        chunk *= scale
        np.clip(chunk, 0.0, 255.0, out=chunk)
        out[rows] = np.rint(chunk, out=chunk)
    return out


def _starts_like_dataset(data: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble and ``DICM``: its first element is a
    little-endian tag of group 0002 (file meta, explicit VR) or 0008 (explicit or implicit VR)."""
    if len(data) < 8:
        return False
    group, _ = struct.unpack_from("<HH", data)
    if group == 0x0002:
        return data[4:6] in _DICOM_VRS
    if group == 0x0008:
        return data[4:6] in _DICOM_VRS or struct.unpack_from("<I", data, 4)[0] <= len(data) - 8
    return False


def _is_dicom(data: bytes, source: str) -> bool:
    return (
        data[128:132] == b"DICM"
        or data.startswith(b"DICM")
        or source.lower().endswith(".dcm")
        or _starts_like_dataset(data)
    )


def _dicom_pixels(ds: pydicom.Dataset, source: str) -> np.ndarray:
    """The first frame windowed to uint8, before MONOCHROME1 inversion."""
    arr = pixel_array(ds, index=0)  # first frame only; colour comes back as RGB
    if arr.ndim == 3:
        return _window(_luma(arr), source)
    voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if voi or "ModalityLUTSequence" in ds:
        return _window(apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0), source, robust=not voi)
    # A linear rescale (slope, intercept) does not move a percentile window, except that a
    # negative slope inverts it; skipping it spares a float64 copy of the image.
    out = _window(arr, source)
    return 255 - out if float(ds.get("RescaleSlope") or 1) < 0 else out


def _dicom_failure(ds: pydicom.Dataset) -> str:
    """The error kind of pixel data that did not decode: ``unsupported`` when no installed codec reads
    its transfer syntax, else ``corrupt``."""
    try:
        return "corrupt" if get_decoder(ds.file_meta.TransferSyntaxUID).is_available else "unsupported"
    except Exception:  # no or an unknown transfer syntax
        return "unsupported"


def _decode_dicom(data: bytes, source: str, max_pixels: int) -> Image.Image:
    if data.startswith(b"DICM"):  # preamble stripped, magic kept: pydicom expects one or neither
        data = data[4:]
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types on malformed files
        raise ImageDecodeError(f"{source}: not a readable DICOM file ({exc})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageDecodeError(f"{source}: DICOM file has no pixel data", kind="unsupported")
    try:
        if "TransferSyntaxUID" not in ds.file_meta and ds.original_encoding in _NATIVE_SYNTAXES:
            # A bare data set (no file meta) holds native pixels, encoded as the data set was read.
            ds.file_meta.TransferSyntaxUID = _NATIVE_SYNTAXES[ds.original_encoding]
        _check_pixels(source, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), max_pixels)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        out = _dicom_pixels(ds, source)
    except ImageDecodeError:
        raise
    except Exception as exc:  # missing codec plugins, bad lengths, odd bit depths
        raise ImageDecodeError(f"{source}: cannot decode DICOM pixel data ({exc})", kind=_dicom_failure(ds)) from None
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark
        out = 255 - out
    return Image.fromarray(out)


def _decode_pil(data: bytes, source: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError:
        fmt = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
        if fmt:
            raise ImageDecodeError(f"{source}: truncated or corrupt image header (starts like a {fmt} file)") from None
        raise ImageDecodeError(
            f"{source}: not a recognised image format (expected JPEG, PNG, BMP, TIFF or DICOM)", kind="unknown_format"
        ) from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice PIL.Image.MAX_IMAGE_PIXELS
        raise ImageDecodeError(f"{source}: image is too large, over the limit of {max_pixels} "
                               f"(data.max_image_pixels) or Pillow's decompression-bomb guard ({exc})",
                               kind="over_pixel_limit") from None  # fmt: skip
    except Exception as exc:  # header parsers raise OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"{source}: truncated or corrupt image header ({exc})") from None
    _check_pixels(source, *img.size, max_pixels)
    try:
        # JPEG only (no-op elsewhere): decode straight to luma, at 1/2, 1/4 or 1/8 scale when
        # that still leaves at least draft_size pixels per side. Must precede any load().
        img.draft("L", (draft_size, draft_size) if draft_size else None)
        ImageOps.exif_transpose(img, in_place=True)
        img.load()  # truncated data raises here
    except Exception as exc:  # Pillow plugins raise a zoo of types on malformed pixel data
        raise ImageDecodeError(f"{source}: truncated or corrupt image data ({exc})") from None
    if img.mode in _DEEP_MODES:
        return Image.fromarray(_window(np.asarray(img), source))
    if img.mode not in _COLOR_MODES:
        raise ImageDecodeError(f"{source}: unsupported pixel mode {img.mode!r}", kind="unsupported")
    return img if img.mode == "L" else img.convert("L")


def _decode(data: bytes, source: str, max_pixels: int, max_bytes: int, draft_size: int | None) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{source}: empty file (0 bytes)", kind="empty")
    _check_bytes(source, len(data), max_bytes)
    if _is_dicom(data, source):
        return _decode_dicom(data, source, max_pixels)
    return _decode_pil(data, source, max_pixels, draft_size)


def decode_grayscale(
    data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Decode image bytes to an (H, W) uint8 grayscale array at full resolution.

    ``source`` is only used in error messages (a file name, URI or upload name); a ``.dcm``
    suffix, the DICM magic or a DICOM data set's first tag selects the DICOM decoder.
    """
    return np.array(_decode(data, source, max_pixels, max_bytes, None))  # a writable copy, unlike np.asarray


def load_image(
    data: bytes, source: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Decode and bilinearly resize image bytes to the model input: (size, size, 1) uint8."""
    img = _decode(data, source, max_pixels, max_bytes, size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(img)[:, :, None]


@dataclass(frozen=True)
class LoadResult:
    """Images that decoded, which input each came from, and why the others did not."""

    images: np.ndarray  # (n_ok, size, size, 1) uint8
    ok: list[int]  # indices into the input URIs, in input order
    failures: dict[str, str]  # uri -> reason


def load_many(
    uris: Sequence[str],
    size: int,
    workers: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoadResult:
    """Read and decode many images in threads (Pillow and pyarrow release the GIL), keeping order.

    An unreadable or undecodable file is recorded in ``failures`` and skipped; any other
    exception is a bug and propagates. ``progress`` is a tqdm description; None shows no bar.
    """
    uris = list(uris)

    def one(uri: str) -> np.ndarray | str:
        try:
            return load_image(read_bytes(uri, max_bytes), uri, size, max_pixels, max_bytes)
        except (StorageError, ImageDecodeError) as exc:
            return str(exc)

    images = np.empty((len(uris), size, size, 1), np.uint8)
    ok: list[int] = []
    failures: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pneumonet-decode")
    try:
        outcomes = pool.map(one, uris)
        bar = tqdm(outcomes, total=len(uris), desc=progress, unit="img", disable=progress is None, file=console.terminal())
        for index, outcome in enumerate(bar):
            if isinstance(outcome, str):
                failures[uris[index]] = outcome
            else:
                images[len(ok)] = outcome
                ok.append(index)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return LoadResult(images=images if len(ok) == len(uris) else images[: len(ok)].copy(), ok=ok, failures=failures)
