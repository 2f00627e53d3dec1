"""The shared decoder: every format and mode we accept, and every way a file can be bad."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pneumonet import storage
from pneumonet.data import images
from pneumonet.data.images import IMAGE_SUFFIXES, decode_grayscale, is_image_name, load_image, load_many
from pneumonet.errors import ImageDecodeError


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def gradient(width: int = 48, height: int = 40) -> np.ndarray:
    """A smooth uint8 test pattern: horizontal ramp plus a vertical ramp."""
    x = np.linspace(0, 200, width)[None, :]
    y = np.linspace(0, 55, height)[:, None]
    return np.rint(x + y).astype(np.uint8)


def dicom_bytes(arr: np.ndarray | None, photometric: str = "MONOCHROME2", preamble: bool = True, **tags) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if arr is not None:
        ds.set_pixel_data(arr, photometric, bits_stored=12 if arr.dtype == np.uint16 else 8)
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge grayscale image but carries no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_image_names():
    assert {".jpeg", ".jpg", ".png", ".dcm", ".bmp", ".tif", ".tiff"} == IMAGE_SUFFIXES
    assert is_image_name("train/NORMAL/IM-0115-0001.JPEG")
    assert is_image_name("s3://bucket/archive/scan.dcm")
    assert not is_image_name("notes.txt")
    assert not is_image_name("README")
    assert not is_image_name("archive.jpeg.zip")


def test_png_round_trip_is_exact_and_resize_is_plain_bilinear():
    pixels = gradient()
    data = encode(Image.fromarray(pixels), "PNG")
    decoded = decode_grayscale(data, "scan.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (40, 48)
    np.testing.assert_array_equal(decoded, pixels)

    resized = load_image(data, "scan.png", 32)
    assert resized.dtype == np.uint8 and resized.shape == (32, 32, 1)
    assert resized.flags.writeable and decoded.flags.writeable  # callers may normalise in place
    expected = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resized[:, :, 0], expected)


def test_jpeg_round_trip():
    pixels = gradient()
    data = encode(Image.fromarray(pixels), "JPEG", quality=95)
    decoded = decode_grayscale(data, "scan.jpeg")
    assert decoded.shape == pixels.shape
    assert np.abs(decoded.astype(int) - pixels).mean() < 2
    assert load_image(data, "scan.jpeg", 24).shape == (24, 24, 1)


def test_large_jpeg_decoded_at_reduced_scale_matches_full_decode():
    big = np.asarray(Image.fromarray(gradient(64, 64)).resize((1600, 1600), Image.Resampling.BILINEAR))
    data = encode(Image.fromarray(big), "JPEG", quality=90)
    fast = load_image(data, "big.jpeg", 32)[:, :, 0].astype(int)
    slow = np.asarray(Image.fromarray(decode_grayscale(data, "big.jpeg")).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(fast - slow).max() <= 4


@pytest.mark.parametrize(
    ("mode", "fmt", "values"),
    [
        ("I;16", "PNG", np.array([[100, 2000], [4000, 3000]], np.uint16)),  # 12-bit range in 16 bits
        ("I", "TIFF", np.array([[-500, 0], [1500, 700]], np.int32)),
        ("F", "TIFF", np.array([[-1.5, 0.0], [2.5, 1.0]], np.float32)),
    ],
)
def test_deep_images_are_windowed_to_their_own_range(mode, fmt, values):
    tiled = np.kron(values, np.ones((8, 8), values.dtype))  # 16x16
    data = encode(Image.fromarray(tiled), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    decoded = decode_grayscale(data, f"deep.{fmt.lower()}")
    assert decoded.dtype == np.uint8
    assert decoded.min() == 0 and decoded.max() == 255
    assert decoded[tiled == tiled.min()].max() == 0 and decoded[tiled == tiled.max()].min() == 255
    lo, hi = float(values.min()), float(values.max())
    expected = np.rint((tiled.astype(float) - lo) * 255 / (hi - lo))
    np.testing.assert_array_equal(decoded, expected)


def test_constant_deep_image_becomes_zeros():
    data = encode(Image.fromarray(np.full((8, 8), 1234, np.uint16)), "PNG")
    np.testing.assert_array_equal(decode_grayscale(data, "flat.png"), np.zeros((8, 8), np.uint8))


def test_eight_bit_values_are_kept_not_stretched():
    pixels = np.array([[90, 100], [110, 120]], np.uint8)
    np.testing.assert_array_equal(decode_grayscale(encode(Image.fromarray(pixels), "PNG"), "x.png"), pixels)


def test_non_finite_float_image_is_refused():
    data = encode(Image.fromarray(np.array([[0.0, np.nan], [1.0, 2.0]], np.float32)), "TIFF")
    with pytest.raises(ImageDecodeError, match=r"^nan\.tif: .*non-finite"):
        decode_grayscale(data, "nan.tif")


def _palette_image() -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
    return img


LUMA_200_100_50 = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # 124


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        (Image.new("RGB", (8, 8), (200, 100, 50)), "PNG", LUMA_200_100_50),
        (Image.new("RGBA", (8, 8), (200, 100, 50, 0)), "PNG", LUMA_200_100_50),  # alpha dropped, not composited
        (Image.new("LA", (8, 8), (77, 10)), "PNG", 77),
        (_palette_image(), "PNG", LUMA_200_100_50),
        (Image.new("RGB", (8, 8), (200, 100, 50)), "BMP", LUMA_200_100_50),
        (Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", 255),
        (Image.new("CMYK", (16, 16), (0, 0, 0, 255)), "JPEG", 0),
    ],
    ids=["rgb", "rgba", "la", "p", "bmp", "cmyk-white", "cmyk-black"],
)
def test_colour_modes_become_luma(img, fmt, expected):
    data = encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == img.mode
    decoded = decode_grayscale(data, f"colour.{fmt.lower()}")
    assert decoded.shape == (img.height, img.width)
    assert np.abs(decoded.astype(int) - expected).max() <= 2


def test_one_bit_image():
    bits = np.indices((8, 8)).sum(axis=0) % 2 == 0
    data = encode(Image.fromarray(bits), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    np.testing.assert_array_equal(decode_grayscale(data, "bits.png"), np.where(bits, 255, 0))


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, 20:] = 255  # left half black, right half white
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_grayscale(data, "rotated.jpeg")
    assert decoded.shape == (40, 20)
    assert decoded[:20].mean() < 10 and decoded[20:].mean() > 245  # the left half is now on top
    assert load_image(data, "rotated.jpeg", 16)[:8].mean() < 10


def test_multi_frame_files_use_the_first_frame():
    first, second = Image.new("L", (8, 8), 30), Image.new("L", (8, 8), 220)
    for fmt in ("PNG", "TIFF"):
        data = encode(first, fmt, save_all=True, append_images=[second])
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
        np.testing.assert_array_equal(decode_grayscale(data, f"anim.{fmt.lower()}"), np.full((8, 8), 30))


def test_dicom_monochrome2_and_monochrome1():
    ramp = np.tile(np.linspace(100, 3000, 32).astype(np.uint16), (24, 1))
    mono2 = decode_grayscale(dicom_bytes(ramp), "scan.dcm")
    assert mono2.shape == (24, 32) and mono2.dtype == np.uint8
    assert mono2[:, 0].max() == 0 and mono2[:, -1].min() == 255
    assert (np.diff(mono2[0].astype(int)) >= 0).all()

    mono1 = decode_grayscale(dicom_bytes(ramp, "MONOCHROME1"), "inverted.dcm")
    np.testing.assert_array_equal(mono1, 255 - mono2)

    # Detected by the DICM magic, whatever the name says; resized like any other image.
    assert load_image(dicom_bytes(ramp), "upload", 16).shape == (16, 16, 1)


def test_dicom_luts_are_applied():
    ramp = np.tile(np.arange(0, 4000, 125, dtype=np.uint16), (4, 1))  # 0..3875
    data = dicom_bytes(ramp, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=1000)
    decoded = decode_grayscale(data, "windowed.dcm")
    hu = ramp[0].astype(int) - 1000
    assert decoded[0][hu <= 500].max() == 0  # below the window: black
    assert decoded[0][hu >= 1500].min() == 255  # above the window: white
    inside = decoded[0][(hu > 560) & (hu < 1440)]
    assert 0 < inside.min() and inside.max() < 255 and (np.diff(inside.astype(int)) > 0).all()


def test_dicom_without_preamble_is_read_by_suffix():
    ramp = np.tile(np.linspace(0, 4000, 16).astype(np.uint16), (16, 1))
    data = dicom_bytes(ramp, preamble=False)
    assert data[128:132] != b"DICM"
    assert decode_grayscale(data, "raw.dcm")[0, -1] == 255


def test_colour_dicom_becomes_luma():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, 4:] = (200, 100, 50)
    decoded = decode_grayscale(dicom_bytes(rgb, "RGB"), "colour.dcm")
    assert decoded[:, :4].max() == 0 and decoded[:, 4:].min() == 255


def test_dicom_without_pixel_data():
    with pytest.raises(ImageDecodeError, match=r"^report\.dcm: DICOM file has no pixel data"):
        decode_grayscale(dicom_bytes(None), "report.dcm")


def test_dicom_over_the_pixel_limit():
    data = dicom_bytes(np.zeros((64, 64), np.uint16))
    with pytest.raises(ImageDecodeError, match=r"^big\.dcm: image is 64x64 = 4096 pixels, over the limit of 1000"):
        decode_grayscale(data, "big.dcm", max_pixels=1000)


def _jpeg() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)), "JPEG")


def _png() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8)), "PNG")


def _png_bad_crc() -> bytes:
    data = bytearray(_png())
    data[len(data) // 2] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "source", "reason", "kind"),
    [
        (lambda: b"", "empty.png", "empty file", "empty"),
        (lambda: _jpeg()[: len(_jpeg()) // 2], "cut.jpeg", "truncated or corrupt image data", "corrupt"),
        (lambda: _png()[: len(_png()) // 2], "cut.png", "truncated or corrupt image data", "corrupt"),
        (lambda: _png()[:30], "header.png", "truncated or corrupt image", "corrupt"),
        (_png_bad_crc, "crc.png", "corrupt image", "corrupt"),
        (lambda: np.random.default_rng(2).integers(0, 256, 4000, np.uint8).tobytes(), "noise.jpeg", "not a recognised", "unknown_format"),
        (lambda: b"patient,label\n1,PNEUMONIA\n", "labels.csv", "not a recognised image", "unknown_format"),
        (lambda: b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "report.pdf", "not a recognised image", "unknown_format"),
        (lambda: encode(Image.new("L", (8, 8)), "GIF"), "anim.gif", "not a recognised image", "unknown_format"),
        (lambda: encode(Image.new("LAB", (8, 8)), "TIFF"), "lab.tif", "unsupported pixel mode 'LAB'", "unsupported"),
        (lambda: b"\x00" * 200, "junk.dcm", "no pixel data", "unsupported"),
    ],
    ids=["empty", "cut-jpeg", "cut-png", "header-only", "bad-crc", "random", "text", "pdf", "gif", "lab", "junk-dcm"],
)
def test_bad_inputs_raise_image_decode_error_naming_the_source(make, source, reason, kind):
    data = make()
    with pytest.raises(ImageDecodeError) as caught:
        load_image(data, source, 16)
    message = str(caught.value)
    assert message.startswith(f"{source}: ") and reason in message
    assert caught.value.kind == kind


def test_too_many_pixels_is_refused_before_decoding():
    data = encode(Image.new("L", (2000, 2000), 128), "PNG")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(data, "big.png", 32, max_pixels=1_000_000)
    assert str(caught.value) == (
        "big.png: image is 2000x2000 = 4000000 pixels, over the limit of 1000000 (data.max_image_pixels)"
    )
    assert caught.value.kind == "over_pixel_limit"
    assert load_image(data, "big.png", 32, max_pixels=4_000_000).shape == (32, 32, 1)


def png_bomb(side: int) -> bytes:
    """A real decompression bomb: a side x side grayscale PNG of zeros, its IDAT really compressed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_header_past_pillows_guard_is_refused_naming_our_limit():
    # 900 Mpx is past Pillow's own bomb limit, which refuses it before our check sees the header.
    expected = r"^bomb\.png: image is too large, over the limit of 60000000 \(data\.max_image_pixels\) or Pillow's"
    with pytest.raises(ImageDecodeError, match=expected):
        load_image(png_header_only(30000, 30000), "bomb.png", 32)


def test_pillows_decompression_bomb_guard_stays_on_for_the_whole_process(monkeypatch):
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a real 4,096-pixel PNG is past 2 x 1000
    with pytest.raises(ImageDecodeError, match=r"^small\.png: image is too large, .*decompression-bomb guard"):
        load_image(encode(Image.new("L", (64, 64)), "PNG"), "small.png", 16, max_pixels=10**9)


def test_a_real_decompression_bomb_is_refused_before_any_pixel_is_inflated(monkeypatch):
    bomb = png_bomb(8000)  # 64 Mpx of zeros in ~70 kB
    assert len(bomb) < 200_000
    inflated = []
    monkeypatch.setattr(Image.Image, "load", lambda image: inflated.append(image.size))  # pixels are inflated here
    with pytest.raises(ImageDecodeError, match=r"^bomb\.png: image is 8000x8000 = 64000000 pixels, over the limit"):
        load_image(bomb, "bomb.png", 32)
    assert inflated == []  # refused from the header alone


def test_files_over_the_byte_limit_are_refused_before_reading(tmp_path):
    data = encode(Image.fromarray(gradient()), "PNG")
    with pytest.raises(ImageDecodeError, match=rf"^x\.png: file is {len(data)} bytes, over the limit of 100 \(data\.max_image_bytes\)$"):
        load_image(data, "x.png", 16, max_bytes=100)
    assert load_image(data, "x.png", 16, max_bytes=len(data)).shape == (16, 16, 1)
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:  # sparse: 2 GB declared, no disk used, never read
        file.write(data)
        file.truncate(2 * 2**30)
    tracemalloc.start()
    try:
        result = load_many([str(huge), str(tmp_path / "ok.png")], 16, max_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # reading the file would have allocated its 2 GB
    assert result.failures[str(huge)] == f"{huge}: file is {2 * 2**30} bytes, over the limit of {2**20} (data.max_image_bytes); not read"


def test_a_few_outlier_pixels_do_not_squeeze_a_deep_image_into_a_few_grey_levels():
    body = np.tile(np.linspace(1000, 2000, 64), (64, 1)).astype(np.uint16)
    hot = body.copy()
    hot[0, :5] = 4095  # hot pixels, or burnt-in text at full (12-bit) scale
    hot[-1, :3] = 0  # dead pixels
    for name, data in (("hot.png", encode(Image.fromarray(hot), "PNG")), ("hot.dcm", dicom_bytes(hot))):
        decoded = decode_grayscale(data, name).astype(int)
        clean = decoded[1:-1]
        assert clean.min() <= 3 and clean.max() >= 252, name  # min..max would give 62..124 here
        assert (np.diff(clean[0]) >= 0).all() and decoded[0, :5].min() == 255 and decoded[-1, :3].max() == 0


def test_windowing_holds_float32_rows_not_float64_copies_of_the_image():
    arr = np.tile(np.arange(2048, dtype=np.uint16), (2048, 1))  # 8 MB; a float64 copy is 32 MB
    tracemalloc.start()
    try:
        out = images._window(arr, "big")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[0, -1] == 255
    # The uint8 result (4 MB), two float32 row chunks (2 MB each), the percentile sample: ~9 MB;
    # windowing in float64 peaked at 96 MB.
    assert peak < 12 * 2**20


def _bare_dicom(arr: np.ndarray) -> bytes:
    """A DICOM data set as some archives store it: no preamble, no DICM, no file meta, implicit VR."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "CR"
    ds.set_pixel_data(arr, "MONOCHROME2", bits_stored=12)
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


def test_dicom_without_preamble_or_suffix_is_recognised_by_its_content():
    ramp = np.tile(np.linspace(0, 4000, 16).astype(np.uint16), (16, 1))
    expected = decode_grayscale(dicom_bytes(ramp), "scan.dcm")
    no_preamble = dicom_bytes(ramp, preamble=False)
    for data in (no_preamble, b"DICM" + no_preamble, _bare_dicom(ramp)):
        np.testing.assert_array_equal(decode_grayscale(data, "1.2.840.113619.2.55"), expected)
    # Bytes that merely start with group 0008 but no plausible element are not taken for DICOM.
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_grayscale(b"\x08\x00\x05\x00\xff\xff\xff\x7f" + b"x" * 100, "upload")


@pytest.fixture()
def mixed_files(tmp_path):
    """Good and bad local files; returns (uris, indices of the good ones)."""
    good = [gradient(), gradient()[::-1], 255 - gradient()]
    files = [
        ("a.png", encode(Image.fromarray(good[0]), "PNG")),
        ("empty.jpeg", b""),
        ("b.png", encode(Image.fromarray(good[1]), "PNG")),
        ("cut.jpeg", _jpeg()[:300]),
        ("notes.txt", b"not an image"),
        ("c.png", encode(Image.fromarray(good[2]), "PNG")),
    ]
    uris = []
    for name, data in files:
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    uris.insert(3, str(tmp_path / "missing.png"))
    return uris, [0, 2, 6]


def test_load_many_keeps_order_and_collects_failures(mixed_files):
    uris, good = mixed_files
    result = load_many(uris, 16, workers=3, progress="decoding")
    assert result.ok == good
    assert result.images.shape == (3, 16, 16, 1) and result.images.dtype == np.uint8
    for row, index in enumerate(good):
        np.testing.assert_array_equal(result.images[row], load_image(storage.read_bytes(uris[index]), uris[index], 16))
    assert set(result.failures) == {uri for i, uri in enumerate(uris) if i not in good}
    for uri, reason in result.failures.items():
        assert reason.startswith(f"{uri}: ")
    assert "no such file" in result.failures[uris[3]]
    assert "empty file" in result.failures[uris[1]]


def test_load_many_edge_cases(tmp_path):
    empty = load_many([], 8)
    assert empty.images.shape == (0, 8, 8, 1) and empty.ok == [] and empty.failures == {}
    (tmp_path / "bad.png").write_bytes(b"nope")
    none_ok = load_many([str(tmp_path / "bad.png")], 8, workers=1)
    assert none_ok.images.shape == (0, 8, 8, 1) and list(none_ok.failures) == [str(tmp_path / "bad.png")]


def test_load_many_lets_unexpected_errors_through(mixed_files, monkeypatch):
    uris, _ = mixed_files

    def broken(uri: str, max_bytes: int) -> bytes:
        raise RuntimeError(f"bug while reading {uri}")

    monkeypatch.setattr(images, "read_bytes", broken)
    with pytest.raises(RuntimeError, match="bug while reading"):
        load_many(uris, 16, workers=2)


def test_load_many_from_s3(s3_bucket):
    good = encode(Image.fromarray(gradient()), "PNG")
    uris = [f"{s3_bucket}/scans/{name}" for name in ("one.png", "broken.png", "missing.png", "two.jpeg")]
    storage.write_bytes(uris[0], good)
    storage.write_bytes(uris[1], good[:40])
    storage.write_bytes(uris[3], encode(Image.fromarray(gradient()), "JPEG"))
    result = load_many(uris, 16, workers=4)
    assert result.ok == [0, 3]
    np.testing.assert_array_equal(result.images[0], load_image(good, "x", 16))
    assert set(result.failures) == {uris[1], uris[2]}
    assert "truncated or corrupt" in result.failures[uris[1]]
    assert result.failures[uris[2]].startswith(uris[2])

