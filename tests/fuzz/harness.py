"""A seeded mutation fuzzer for the shared decoder and the multipart parser.

Seeds are one real chest X-ray (``../shared/data/chest-xray-224``, or a synthetic one when the data
is absent) written as JPEG, PNG (8 and 16 bit), TIFF (8 bit, 16 bit deflate), BMP and DICOM (with
preamble, bare implicit-VR data set, RLE-compressed, MONOCHROME1 with a VOI window). Each case takes
a seed and applies one mutation: bit flips, byte stomps, truncation, a header size edit (width and
height set huge, zero or odd, with the checksum fixed so the edit reaches the decoder), a wrong magic,
a spliced or repeated block, or a nested compressed payload (a PNG text chunk or a DICOM element
that inflates far past its size). Multipart cases wrap a seed in a ``multipart/form-data`` body and
break its boundary, headers or lengths.

Every case must end as decoded pixels or a :class:`~pneumonet.errors.PneumonetError` whose message
starts with the source name (for multipart: the parsed parts, or an :class:`ApiError` with a 4xx);
anything else, a case slower than ``--max-seconds`` or a process over ``--max-rss-mb`` is a failure.

:func:`run_endpoint` sends the multipart cases over HTTP to a running endpoint instead, where each
must end as a 4xx or a 200 with one answer per image, never a 5xx or a hang: the default suite posts
a bounded sample to the real Serve application on 127.0.0.1 (tests/test_serve.py).

The default test suite runs a bounded sample (tests/fuzz/test_fuzz_inputs.py); the long run::

    PYTHONPATH=$PWD nice -n 19 python tests/fuzz/harness.py --cases 20000 --seed 1 --results tests/fuzz/RESULTS.md
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import random
import resource
import struct
import sys
import time
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

from pneumonet.data.images import load_image
from pneumonet.errors import PneumonetError
from pneumonet.scoring.uploads import ApiError, decoder_source, parse_multipart

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "chest-xray-224" / "train" / "NORMAL"
SIZE = 64  # model input side: small, the decoder's work before the resize is what is fuzzed
BOUNDARY = "fuzzb0undary"


def _xray() -> np.ndarray:
    """A real 224 px chest X-ray when the shared data is there, else a synthetic one."""
    files = sorted(REAL.glob("*.jpeg"))[:1]
    if files:
        return np.asarray(Image.open(files[0]).convert("L"))
    y, x = np.mgrid[0:224, 0:224]
    ribs = 60 * (np.sin(y / 6.0) > 0.6) * (np.abs(x - 112) > 20)
    return np.clip(40 + ribs + np.random.default_rng(0).normal(0, 12, (224, 224)), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, *, preamble: bool = True, bare: bool = False, rle: bool = False, **tags) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, tags.pop("photometric", "MONOCHROME2"), bits_stored=12)
    for key, value in tags.items():
        setattr(ds, key, value)
    if rle:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    if bare:
        ds.file_meta = FileMetaDataset()
    else:
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    if bare:
        ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def make_seeds() -> dict[str, bytes]:
    """name → bytes; the name's suffix is what the decoder is told (as an archive would)."""
    gray = _xray()
    deep = (gray.astype(np.uint16) * 16 + np.random.default_rng(1).integers(0, 16, gray.shape)).astype(np.uint16)
    deep_image = Image.fromarray(deep)  # 12-bit values in 16 bits, mode I;16
    return {
        "seed.jpeg": _encode(Image.fromarray(gray), "JPEG", quality=90),
        "progressive.jpeg": _encode(Image.fromarray(gray), "JPEG", quality=80, progressive=True),
        "seed.png": _encode(Image.fromarray(gray), "PNG"),
        "deep.png": _encode(deep_image, "PNG"),
        "seed.tif": _encode(Image.fromarray(gray), "TIFF"),
        "deep.tif": _encode(deep_image, "TIFF", compression="tiff_adobe_deflate"),
        "seed.bmp": _encode(Image.fromarray(gray), "BMP"),
        "seed.dcm": _dicom(deep),
        "bare-dicom": _dicom(deep, bare=True),
        "rle.dcm": _dicom(deep, rle=True),
        "voi.dcm": _dicom(deep, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000,
                          RescaleSlope=1, RescaleIntercept=-1024),  # fmt: skip
    }


# --- mutations: (rng, data) -> data ------------------------------------------------------------


def bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 4, 16, 64))):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def byte_stomp(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(out))
        value = rng.choice((b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80"))
        out[at : at + len(value)] = value
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.choice((0, 1, 4, 8, 16, 64, 128, 132, rng.randrange(len(data))))]


def _png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each chunk of a well-formed PNG."""
    chunks, at = [], 8
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        chunks.append((at, kind))
        at += 12 + length
    return chunks


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_SIDES = (0, 1, 3, 65_535, 2**31 - 1, 2**32 - 1, 9_000, 30_000)


def header_size(rng: random.Random, data: bytes) -> bytes:
    """Declared width and height edited where each format keeps them (checksums fixed)."""
    width, height = rng.choice(_SIDES), rng.choice(_SIDES)
    out = bytearray(data)
    if data.startswith(b"\x89PNG"):
        at = 8  # IHDR is the first chunk
        body = struct.pack(">II", width, height) + data[at + 16 : at + 8 + 13]
        out[at : at + 25] = _png_chunk(b"IHDR", body)
    elif data.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0:
                out[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif data.startswith((b"II*\x00", b"BM")):
        if data.startswith(b"BM"):
            out[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, -(height & 0x7FFFFFFF) if rng.random() < 0.5 else height & 0x7FFFFFFF)
        else:  # little-endian TIFF: first IFD, tags 256 (width) and 257 (height)
            ifd = struct.unpack_from("<I", data, 4)[0]
            for i in range(struct.unpack_from("<H", data, ifd)[0]):
                entry = ifd + 2 + 12 * i
                tag = struct.unpack_from("<H", data, entry)[0]
                if tag in (256, 257):
                    out[entry + 2 : entry + 12] = struct.pack("<HII", 4, 1, width if tag == 256 else height)
    else:  # DICOM: Rows (0028,0010) and Columns (0028,0011), explicit (US) or implicit VR
        for tag, value in ((b"\x28\x00\x10\x00", height), (b"\x28\x00\x11\x00", width)):
            at = data.find(tag)
            if at >= 0:
                # the value follows tag, VR and 2-byte length (explicit) or tag and 4-byte length (implicit)
                out[at + 8 : at + 10] = struct.pack("<H", value & 0xFFFF)
    return bytes(out)


_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"DICM", b"GIF89a", b"%PDF-", b"PK\x03\x04",
           b"\x08\x00\x05\x00", b"\x02\x00\x00\x00UL")  # fmt: skip


def wrong_magic(rng: random.Random, data: bytes) -> bytes:
    magic = rng.choice(_MAGICS)
    if rng.random() < 0.5:
        return magic + data[len(magic) :]
    return magic + data


def splice(rng: random.Random, data: bytes) -> bytes:
    """A block of the file moved, repeated or deleted."""
    start = rng.randrange(len(data))
    block = data[start : start + rng.choice((1, 16, 256, 4096))]
    at = rng.randrange(len(data))
    kind = rng.random()
    if kind < 0.4:
        return data[:at] + block * rng.choice((1, 8, 64)) + data[at:]
    if kind < 0.7:
        return data[:start] + data[start + len(block) :]
    return data[:at] + block + data[at + len(block) :]


@functools.cache
def _deflated_zeros(size: int) -> bytes:
    return zlib.compress(b"\x00" * size, 9)


def nested_bomb(rng: random.Random, data: bytes) -> bytes:
    """A compressed payload inside the file that inflates far past its size."""
    inflated = _deflated_zeros(rng.choice((2**20, 2**24, 2**26)))
    if data.startswith(b"\x89PNG"):
        kind = rng.choice((b"zTXt", b"iCCP", b"iTXt"))
        body = {b"zTXt": b"Comment\x00\x00", b"iCCP": b"icc\x00\x00", b"iTXt": b"Comment\x00\x01\x00\x00\x00"}[kind] + inflated
        at = _png_chunks(data)[1][0]  # right after IHDR
        return data[:at] + _png_chunk(kind, body) + data[at:]
    # Elsewhere: the payload where pixel data would start, or appended as trailing garbage.
    at = rng.choice((len(data) // 2, len(data)))
    return data[:at] + inflated + data[at:]


MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bit_flips": bit_flips,
    "byte_stomp": byte_stomp,
    "truncate": truncate,
    "header_size": header_size,
    "wrong_magic": wrong_magic,
    "splice": splice,
    "nested_bomb": nested_bomb,
}


# --- multipart bodies --------------------------------------------------------------------------


def multipart_case(rng: random.Random, data: bytes, name: str) -> tuple[bytes, str]:
    """A multipart body carrying ``data``, broken in one of several ways (or not at all)."""
    delimiter = f"--{BOUNDARY}".encode()
    part_type = rng.choice(("image/png", "application/dicom", "", "application/octet-stream"))
    head = f'Content-Disposition: form-data; name="files"; filename="{name}"\r\n'.encode()
    if part_type:
        head += f"Content-Type: {part_type}\r\n".encode()
    body = delimiter + b"\r\n" + head + b"\r\n" + data + b"\r\n" + delimiter + b"--\r\n"
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    kind = rng.randrange(9)
    if kind == 1:
        body = body[: rng.randrange(len(body))]  # cut anywhere, closing boundary lost
    elif kind == 2:
        body = body.replace(delimiter + b"--", delimiter[:-1] + b"--")  # closing boundary misspelt
    elif kind == 3:
        body = body.replace(b"\r\n\r\n", b"\r\n", 1)  # headers never end
    elif kind == 4:
        content_type = rng.choice(("multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=" + "x" * 300,
                                   'multipart/form-data; boundary="unterminated'))  # fmt: skip
    elif kind == 5:
        body = body.replace(b"form-data; name=", b"form-data; nom=", 1)
    elif kind == 6:
        body = (delimiter + b"\r\n" + head + b"\r\n" + b"x\r\n") * rng.choice((2, 50)) + body  # many parts
    elif kind == 7:
        body = delimiter + data[: rng.randrange(1, 64)] + body  # boundary followed by garbage
    elif kind == 8:
        body = body.replace(b"\r\n", b"\n")  # bare LF line endings
    return body, content_type


# --- running cases -----------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes by (format, mutation), the slowest cases and the failures."""

    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    by_mutation: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    slowest: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss_jumps: list[tuple[int, str]] = field(default_factory=list)
    cases: int = 0
    seconds: float = 0.0

    def add(self, group: str, mutation: str, outcome: str, seconds: float, label: str) -> None:
        self.cases += 1
        self.outcomes[group][outcome] += 1
        self.by_mutation[mutation][outcome] += 1
        self.slowest = sorted([*self.slowest, (seconds, label)], reverse=True)[:5]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_case(data: bytes, source: str) -> str:
    """'pixels' or 'refused'; raises AssertionError for anything else."""
    try:
        image = load_image(data, source, SIZE)
    except PneumonetError as exc:
        assert str(exc).startswith(f"{source}: "), f"message does not name the source: {exc}"
        return "refused"
    assert image.shape == (SIZE, SIZE, 1) and image.dtype == np.uint8, f"bad pixels {image.shape} {image.dtype}"
    return "pixels"


def multipart_case_outcome(body: bytes, content_type: str) -> str:
    try:
        uploads = parse_multipart(body, content_type)
    except ApiError as exc:
        assert 400 <= exc.status < 500, f"status {exc.status}"
        return "4xx"
    outcomes = {decode_case(u.data, decoder_source(u.filename, u.content_type)) for u in uploads if u.data}
    return "parts:" + ("+".join(sorted(outcomes)) or "empty")


def endpoint_outcome(response: Any) -> str:
    """A response of ``/v1/predict/batch`` to a fuzzed body: its status, and for a 200 the outcomes of
    its images; raises AssertionError for a 5xx or an answer that is not the endpoint's JSON."""
    assert response.status_code < 500, f"status {response.status_code}: {response.text[:300]}"
    body = response.json()
    if response.status_code != 200:
        assert 400 <= response.status_code < 500 and isinstance(body.get("error"), str), f"{response.status_code}: {body}"
        return str(response.status_code)
    results = body["results"]
    assert results and all(("probability" in r) != ("error" in r) for r in results), results
    return "200:" + "+".join(sorted({"pixels" if "probability" in r else "refused" for r in results}))


def _mutated(cases: int, seed: int, budget_s: float) -> Iterator[tuple[int, str, str, bytes, random.Random]]:
    """(index, seed name, mutation, mutated bytes, the run's generator) of each case, every format in
    turn, until ``budget_s`` has passed. The caller may draw more from the generator before the next
    case (the same seed, the same cases)."""
    seeds = make_seeds()
    names = sorted(seeds)
    rng = random.Random(seed)
    started = time.perf_counter()
    for index in range(cases):
        if time.perf_counter() - started > budget_s:
            return
        name = names[index % len(names)]
        mutation = rng.choice(sorted(MUTATIONS))
        yield index, name, mutation, MUTATIONS[mutation](rng, seeds[name]), rng


def _group(name: str) -> str:
    return name.rsplit(".", 1)[-1] if "." in name else name


def run_endpoint(url: str, cases: int, seed: int, budget_s: float, max_seconds: float) -> Tally:
    """Fuzzed multipart bodies POSTed over HTTP to a running endpoint's ``/v1/predict/batch`` (``url``):
    each must end as a 4xx or a 200 with one answer per image, within ``max_seconds``."""
    import requests

    tally = Tally()
    started = time.perf_counter()
    for index, name, mutation, data, rng in _mutated(cases, seed, budget_s):
        body, content_type = multipart_case(rng, data, name)
        label = f"case {index} (seed {seed}): {mutation} of {name} in multipart, posted"
        case_start = time.perf_counter()
        try:
            outcome = endpoint_outcome(requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=max_seconds))
        except Exception as exc:  # a 5xx, a malformed answer, a hang past max_seconds
            outcome = "FAILURE"
            tally.failures.append(f"{label}: {type(exc).__name__}: {exc}"[:500])
        tally.add(f"endpoint/{_group(name)}", mutation, outcome, time.perf_counter() - case_start, label)
    tally.seconds = time.perf_counter() - started
    return tally


def run(cases: int, seed: int, budget_s: float, max_seconds: float, max_rss_mb: float, log_every: int = 0) -> Tally:
    """Run up to ``cases`` cases (or until ``budget_s`` has passed), seeded: the same seed, the same cases."""
    tally = Tally()
    started = time.perf_counter()
    for index, name, mutation, data, rng in _mutated(cases, seed, budget_s):
        as_multipart = rng.random() < 0.15
        label = f"case {index} (seed {seed}): {mutation} of {name}{' in multipart' if as_multipart else ''}"
        group = ("multipart/" if as_multipart else "") + _group(name)
        before = peak_rss_mb()
        case_start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning and pydicom's own
                if as_multipart:
                    outcome = multipart_case_outcome(*multipart_case(rng, data, name))
                else:
                    outcome = decode_case(data, name)
        except Exception as exc:  # the harness exists to find these
            outcome = "FAILURE"
            tally.failures.append(f"{label}: {type(exc).__name__}: {exc}"[:500])
        seconds = time.perf_counter() - case_start
        if seconds > max_seconds:
            tally.failures.append(f"{label}: took {seconds:.1f} s, over {max_seconds} s")
        grown = peak_rss_mb() - before
        if grown > 50:
            tally.rss_jumps.append((int(grown), label))
        if peak_rss_mb() > max_rss_mb:
            tally.failures.append(f"{label}: peak RSS {peak_rss_mb():.0f} MB, over {max_rss_mb} MB")
            break
        tally.add(group, mutation, outcome, seconds, label)
        if log_every and tally.cases % log_every == 0:
            print(f"{tally.cases} cases, {len(tally.failures)} failures, peak RSS {peak_rss_mb():.0f} MB", flush=True)
    tally.seconds = time.perf_counter() - started
    return tally


def report(tally: Tally, seed: int, command: str) -> str:
    """Markdown figures of one run."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    outcomes = sorted({o for c in tally.outcomes.values() for o in c})
    lines = [
        f"## Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, seed {seed}",
        "",
        f"`{command}`",
        "",
        f"{tally.cases} cases in {tally.seconds:.0f} s ({tally.cases / max(tally.seconds, 1e-9):.0f} cases/s), "
        f"load average {load} on {os.cpu_count()} CPUs while it ran (shared machine); peak RSS {peak_rss_mb():.0f} MB; "
        f"**{len(tally.failures)} failures**.",
        "",
        "| input | " + " | ".join(outcomes) + " | total |",
        "|---|" + "---:|" * (len(outcomes) + 1),
    ]
    for group in sorted(tally.outcomes):
        counts = tally.outcomes[group]
        lines.append(f"| {group} | " + " | ".join(str(counts[o]) for o in outcomes) + f" | {sum(counts.values())} |")
    lines += ["", "| mutation | " + " | ".join(outcomes) + " |", "|---|" + "---:|" * len(outcomes)]
    for mutation in sorted(tally.by_mutation):
        lines.append(f"| {mutation} | " + " | ".join(str(tally.by_mutation[mutation][o]) for o in outcomes) + " |")
    lines += ["", "Slowest cases:", ""] + [f"- {s:.3f} s: {label}" for s, label in tally.slowest]
    if tally.rss_jumps:
        lines += ["", "Cases that raised the peak RSS by more than 50 MB:", ""]
        lines += [f"- +{mb} MB: {label}" for mb, label in sorted(tally.rss_jumps, reverse=True)[:5]]
    if tally.failures:
        lines += ["", "Failures:", ""] + [f"- {failure}" for failure in tally.failures[:20]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop after this many seconds")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="slowest a case may be (shared, loaded CPUs)")
    parser.add_argument("--max-rss-mb", type=float, default=2048.0)
    parser.add_argument("--results", type=Path, help="append the figures to this Markdown file")
    parser.add_argument("--endpoint", help="post the multipart cases to this running endpoint (http://127.0.0.1:8000) instead")
    args = parser.parse_args(argv)
    if args.endpoint:
        tally = run_endpoint(f"{args.endpoint.rstrip('/')}/v1/predict/batch", args.cases, args.seed, args.budget_s, args.max_seconds)
    else:
        tally = run(args.cases, args.seed, args.budget_s, args.max_seconds, args.max_rss_mb, log_every=1000)
    text = report(tally, args.seed, "python tests/fuzz/harness.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.results:
        with args.results.open("a") as out:
            out.write("\n" + text)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
