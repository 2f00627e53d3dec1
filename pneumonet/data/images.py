"""The one image decoder shared by training, batch scoring and serving.

Every path that turns bytes into model input goes through :func:`load_image`, so a model sees
exactly the same pixels in training and in production: grayscale uint8, EXIF orientation applied,
plain bilinear resize to a square. Anything that cannot be decoded raises
:class:`~pneumonet.errors.ImageDecodeError` naming the source and the reason, never a raw Pillow
or pydicom exception.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from tqdm import tqdm

from pneumonet.errors import ImageDecodeError, StorageError
from pneumonet.storage import read_bytes

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 60_000_000

# Only formats decoded in-process; this also keeps e.g. EPS (which shells out to Ghostscript) away
# from untrusted uploads.
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
# Signatures of those formats: bytes that start like one but do not open are damaged, not foreign.
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
# Modes with more than 8 bits per sample: windowed to their own min..max instead of kept as is.
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# 8-bit modes Pillow converts to luma (alpha dropped); anything else (e.g. LAB) is refused.
_COLOR_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "YCbCr", "HSV", "CMYK"})

# Our own per-call limit (data.max_image_pixels) is checked on the header before any pixel is
# decoded. Pillow's process-wide limit would otherwise warn or refuse independently of the
# configured value (and cannot be changed per call in a thread-safe way), so it is switched off.
Image.MAX_IMAGE_PIXELS = None


def is_image_name(name: str) -> bool:
    """Whether a file name or URI has one of the :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return PurePosixPath(str(name)).suffix.lower() in IMAGE_SUFFIXES


def _check_pixels(source: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{source}: image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} (data.max_image_pixels)"
        )


def _window(arr: np.ndarray, source: str) -> np.ndarray:
    """Map an image's own min..max linearly onto 0..255 (a constant image becomes zeros)."""
    arr = arr.astype(np.float64, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageDecodeError(f"{source}: image has non-finite pixel values (NaN or infinity)")
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _is_dicom(data: bytes, source: str) -> bool:
    return data[128:132] == b"DICM" or source.lower().endswith(".dcm")


def _decode_dicom(data: bytes, source: str, max_pixels: int) -> Image.Image:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types on malformed files
        raise ImageDecodeError(f"{source}: not a readable DICOM file ({exc})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageDecodeError(f"{source}: DICOM file has no pixel data")
    try:
        _check_pixels(source, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), max_pixels)
        arr = pixel_array(ds, index=0)  # first frame only; colour comes back as RGB
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if arr.ndim == 3:
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        else:
            arr = apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0)
        out = _window(arr, source)
    except ImageDecodeError:
        raise
    except Exception as exc:  # missing codec plugins, bad lengths, odd bit depths
        raise ImageDecodeError(f"{source}: cannot decode DICOM pixel data ({exc})") from None
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
            f"{source}: not a recognised image format (expected JPEG, PNG, BMP, TIFF or DICOM)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # if someone re-enabled it
        raise ImageDecodeError(f"{source}: image is too large ({exc})") from None
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
        raise ImageDecodeError(f"{source}: unsupported pixel mode {img.mode!r}")
    return img if img.mode == "L" else img.convert("L")


def _decode(data: bytes, source: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{source}: empty file (0 bytes)")
    if _is_dicom(data, source):
        return _decode_dicom(data, source, max_pixels)
    return _decode_pil(data, source, max_pixels, draft_size)


def decode_grayscale(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an (H, W) uint8 grayscale array at full resolution.

    ``source`` is only used in error messages (a file name, URI or upload name); a ``.dcm``
    suffix or the DICM magic selects the DICOM decoder.
    """
    return np.array(_decode(data, source, max_pixels, None))  # a writable copy, unlike np.asarray


def load_image(data: bytes, source: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and bilinearly resize image bytes to the model input: (size, size, 1) uint8."""
    img = _decode(data, source, max_pixels, size)
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
) -> LoadResult:
    """Read and decode many images in threads (Pillow and pyarrow release the GIL), keeping order.

    An unreadable or undecodable file is recorded in ``failures`` and skipped; any other
    exception is a bug and propagates. ``progress`` is a tqdm description; None shows no bar.
    """
    uris = list(uris)

    def one(uri: str) -> np.ndarray | str:
        try:
            return load_image(read_bytes(uri), uri, size, max_pixels)
        except (StorageError, ImageDecodeError) as exc:
            return str(exc)

    images = np.empty((len(uris), size, size, 1), np.uint8)
    ok: list[int] = []
    failures: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pneumonet-decode")
    try:
        outcomes = pool.map(one, uris)
        bar = tqdm(outcomes, total=len(uris), desc=progress, unit="img", disable=progress is None)
        for index, outcome in enumerate(bar):
            if isinstance(outcome, str):
                failures[uris[index]] = outcome
            else:
                images[len(ok)] = outcome
                ok.append(index)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return LoadResult(images=images if len(ok) == len(uris) else images[: len(ok)].copy(), ok=ok, failures=failures)
