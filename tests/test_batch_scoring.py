"""Batch scoring with Ray Data: every file exactly once, errors as rows, S3, manifests, kill + resume, summary.

One local Ray (2 CPUs) serves the whole module; it is started after the S3 test server so that its
workers inherit the S3 settings, and the killed job of the resume test joins it via RAY_ADDRESS.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile import many_scans_jpeg
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pneumonet import storage
from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.config import Config, load_config
from pneumonet.data.images import load_image
from pneumonet.errors import DataError
from pneumonet.scoring import parts
from pneumonet.scoring.batch import score_archive
from pneumonet.scoring.inputs import input_dataset
from pneumonet.scoring.plan import Digest, digest, reconcile, unchanged
from pneumonet.scoring.summary import HISTOGRAM_FILE, OUTPUT_KEYS, SUMMARY_FILE, summarize_output
from wandb_records import offline_runs

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
MODEL_OVERRIDES = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8"]
RUN_OVERRIDES = ["score.batch_size=8", "score.rows_per_file=16", "tracking.mode=disabled"]
BAD = {"truncated.jpg": "truncated", "zero.png": "empty file", "notes.txt": "not an image file", "fake.png": "not a recognised"}
BAD_KINDS = {"truncated.jpg": "corrupt", "zero.png": "empty", "notes.txt": "not_image", "fake.png": "unknown_format"}


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def dicom(arr: np.ndarray) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.set_pixel_data(arr, "MONOCHROME2", bits_stored=12)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def mixed_files(rng: np.random.Generator) -> dict[str, bytes]:
    """Every accepted format and mode, and every kind of bad file, by relative path."""
    gray = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    files = {
        "deep/a/b/rgb.jpg": encode(Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)), "JPEG"),
        "deep/gray16.png": encode(Image.fromarray(rng.integers(0, 4096, (36, 36), dtype=np.uint16)), "PNG"),
        "deep/rgba.png": encode(Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)), "PNG"),
        "deep/gray.png": encode(Image.fromarray(gray), "PNG"),
        # DICOM archives often have numeric names: decoded by content, not skipped by suffix.
        "dicom/1.2.840.113619.2.55": dicom(rng.integers(0, 4096, (40, 40), dtype=np.uint16)),
        "truncated.jpg": encode(Image.fromarray(gray), "JPEG")[:200],
        "zero.png": b"",
        "notes.txt": b"not an image",
        "fake.png": b"hello, I am text",
    }
    return files


def write_files(root: Path, files: dict[str, bytes]) -> list[str]:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return sorted(str(root / name) for name in files)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic Kaggle-layout images plus the mixed formats and bad files, in one folder tree."""
    from pneumonet.data.synthetic import synthesize_dataset

    root = synthesize_dataset(tmp_path_factory.mktemp("archive"), n=40, size=48, seed=3)
    write_files(root, mixed_files(np.random.default_rng(0)))
    return root


def decoded(uris: list[str]) -> np.ndarray:
    return np.stack([load_image(storage.read_bytes(uri), uri, SIZE) for uri in uris])


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory, archive: Path) -> str:
    """An untrained tiny CNN whose threshold is the median score of the archive, so both classes occur."""
    from pneumonet.models import build_model

    config = load_config(None, MODEL_OVERRIDES)
    model = build_model("custom", config.model, seed=1)
    good = [str(p) for p in sorted(archive.rglob("*.jpeg"))]
    threshold = float(np.median(model.predict(decoded(good).astype("float32"), verbose=0)))
    meta = build_metadata(variant="custom", config=config, threshold=threshold, val_metrics={}, manifest_digest=None)
    return save_artifact(model, meta, str(tmp_path_factory.mktemp("model") / "custom"))


@pytest.fixture(scope="module")
def ray_address(s3_server: str) -> Iterator[str]:
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def config(*extra: str) -> Config:
    return load_config(None, [*MODEL_OVERRIDES, *RUN_OVERRIDES, *extra])


def read_output(output: str) -> pd.DataFrame:
    columns = [field.name for field in parts.SCHEMA]
    tables = [parts.read_part(uri, columns) for uri in parts.list_parts(output)]
    return pa.concat_tables([parts.SCHEMA.empty_table(), *tables]).to_pandas()


def check_complete(frame: pd.DataFrame, inputs: list[str]) -> None:
    assert frame["uri"].is_unique, frame["uri"][frame["uri"].duplicated()].tolist()
    assert sorted(frame["uri"]) == sorted(inputs)


def test_every_file_scored_once_errors_recorded_probabilities_exact(archive: Path, model_uri: str, ray_address: str, tmp_path: Path) -> None:
    inputs = [entry.uri for entry in storage.list_files(str(archive))]
    output = str(tmp_path / "scores")
    summary = score_archive(model_uri, str(archive), output, config())

    frame = read_output(output).set_index("uri")
    check_complete(frame.reset_index(), inputs)
    artifact = load_artifact(model_uri)
    errors = frame["error"].dropna()
    assert sorted(Path(uri).name for uri in errors.index) == sorted(BAD)
    for uri, message in errors.items():
        assert BAD[Path(uri).name] in message and uri in message
        assert frame.loc[uri, "error_kind"] == BAD_KINDS[Path(uri).name]
        assert pd.isna(frame.loc[uri, "probability"]) and pd.isna(frame.loc[uri, "prediction"])
    assert frame.loc[frame["error"].isna(), "error_kind"].isna().all()
    good = frame[frame["error"].isna()]
    assert len(good) == len(inputs) - len(BAD)
    expected = artifact.predict_proba(decoded(list(good.index)))
    np.testing.assert_allclose(good["probability"].to_numpy(), expected, atol=1e-5)
    want = np.where(good["probability"] >= artifact.threshold, "PNEUMONIA", "NORMAL")
    assert (good["prediction"].to_numpy() == want).all() and set(want) == {"NORMAL", "PNEUMONIA"}
    assert (frame["model"] == f"{artifact.name}:{artifact.version}").all()
    assert frame["scored_at"].dt.tz is not None and frame["scored_at"].notna().all()
    sizes = [pq.read_metadata(uri).num_rows for uri in parts.list_parts(output)]
    assert max(sizes) == 16 and sum(sizes) == len(inputs)  # parts of score.rows_per_file rows at most

    on_disk = json.loads(Path(output, SUMMARY_FILE).read_text())
    assert on_disk["files"] == len(inputs) and on_disk["scored"] == len(good) and on_disk["failures"] == len(BAD)
    assert on_disk["missing"] == 0 and on_disk["duplicate_rows"] == 0 and len(on_disk["failure_examples"]) == len(BAD)
    assert on_disk["failures_by_kind"] == dict(sorted(Counter(BAD_KINDS.values()).items()))
    assert on_disk["predictions"] == good["prediction"].value_counts().to_dict()
    assert sum(on_disk["probability"]["histogram"]["counts"]) == len(good)
    for q in (0.05, 0.5, 0.95):  # from a histogram of 20,000 bins: within one bin width
        assert on_disk["probability"]["quantiles"][f"p{round(q * 100):02d}"] == pytest.approx(np.quantile(good["probability"], q), abs=5e-5)
    assert on_disk["probability"]["mean"] == pytest.approx(good["probability"].mean())
    assert on_disk["run"]["scored_this_run"] == len(good) and on_disk["run"]["images_per_second"] > 0
    assert on_disk["model"] == f"{artifact.name}:{artifact.version}" and on_disk["threshold"] == artifact.threshold
    assert summary["files"] == on_disk["files"]
    assert Path(output, HISTOGRAM_FILE).read_bytes().startswith(b"\x89PNG")

    # Run again, tracked offline: nothing left to do, nothing written, the same complete output,
    # the W&B run beside the parts, and the folder still reads as one Parquet dataset.
    again = score_archive(model_uri, str(archive), output, config("tracking.mode=offline"))
    assert again["run"]["already_scored"] == len(inputs) and again["run"]["parts_written"] == 0
    check_complete(read_output(output), inputs)
    runs = [p for p in Path(output, "_tracking").rglob("offline-run-*") if p.is_dir()]
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert len(pd.read_parquet(output)) == len(inputs)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares a huge image and carries no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def hostile_files(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    """Every kind of bad file an archive holds: relative path -> (bytes, the error_kind its row must have)."""
    gray = Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8))
    no_pixels = Dataset()
    no_pixels.file_meta = FileMetaDataset()
    no_pixels.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    no_pixels.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_pixels.Modality, no_pixels.PatientID = "SR", "P1"  # a structured report: no image in it
    buffer = io.BytesIO()
    no_pixels.save_as(buffer, enforce_file_format=True)
    return {
        "bad/truncated.jpeg": (encode(gray, "JPEG")[:300], "corrupt"),
        "bad/garbled.jpeg": (b"\xff\xd8\xff" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "corrupt"),
        "bad/empty.jpeg": (b"", "empty"),
        "bad/readme.txt": (b"not an image", "not_image"),
        "bad/text.png": (b"hello, I am text", "unknown_format"),
        "bad/scan.gif": (encode(gray, "GIF"), "unknown_format"),
        "bad/bomb.png": (header_only_png(100_000, 100_000), "over_pixel_limit"),
        "bad/huge.png": (encode(Image.fromarray(rng.integers(0, 256, (600, 600), dtype=np.uint8)), "PNG"), "over_byte_limit"),
        "bad/scans.jpeg": (many_scans_jpeg(scans=20_000), "decode_timeout"),  # 200 KB, 20-60 s to decode here
        "bad/report.dcm": (buffer.getvalue(), "unsupported"),
        "bad/lab.tif": (encode(Image.new("LAB", (20, 20)), "TIFF"), "unsupported"),
        "bad/nan.tif": (encode(Image.fromarray(np.full((20, 20), np.nan, np.float32)), "TIFF"), "non_finite"),
    }


def odd_good_files(rng: np.random.Generator) -> dict[str, bytes]:
    """Files that look wrong but are images: each must be scored."""
    gray = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    deep = rng.integers(0, 4096, (36, 36), dtype=np.uint16)
    return {
        "odd/gray16.png": encode(Image.fromarray(deep), "PNG"),
        "odd/rgba.png": encode(Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)), "PNG"),
        "odd/gray.png": encode(Image.fromarray(gray), "PNG"),
        "odd/rgb.jpg": encode(Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)), "JPEG"),
        "odd/png-named.jpeg": encode(Image.fromarray(gray), "PNG"),  # a wrong extension: decoded by content
        "odd/dicom-named.png": dicom(deep),
        "odd/1.2.840.113619.2.55.3": dicom(deep),  # DICOM archives often have numeric names
    }


@pytest.fixture(scope="module")
def hostile_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """About 5 % bad files among synthetic X-rays and odd-but-good ones; returns the root and the
    bad files' expected error kinds by path."""
    from pneumonet.data.synthetic import synthesize_dataset

    rng = np.random.default_rng(5)
    root = synthesize_dataset(tmp_path_factory.mktemp("hostile"), n=200, size=48, seed=4)
    bad = hostile_files(rng)
    write_files(root, {**odd_good_files(rng), **{name: data for name, (data, _) in bad.items()}})
    return root, {str(root / name): kind for name, (_, kind) in bad.items()}


def test_an_archive_seeded_with_every_bad_kind_scores_every_good_file_and_counts_failures_by_kind(
    hostile_archive: tuple[Path, dict[str, str]], model_uri: str, ray_address: str, tmp_path: Path
) -> None:
    from pneumonet.scoring.batch import describe

    root, bad = hostile_archive
    missing = str(root / "bad" / "deleted-after-listing.jpeg")  # in the manifest, gone from storage
    bad[missing] = "unreadable"
    inputs = [entry.uri for entry in storage.list_files(str(root))] + [missing]
    assert 0.04 <= len(bad) / len(inputs) <= 0.07
    pd.DataFrame({"uri": inputs}).to_csv(tmp_path / "manifest.csv", index=False)
    output = str(tmp_path / "scores")
    summary = score_archive(model_uri, str(tmp_path / "manifest.csv"), output, config("data.max_image_bytes=250000", "data.max_decode_seconds=5"))

    frame = read_output(output)
    check_complete(frame, inputs)  # exactly one row per file
    frame = frame.set_index("uri")
    failed = frame[frame["error"].notna()]
    assert dict(failed["error_kind"]) == bad
    for uri, message in failed["error"].items():
        assert message.startswith(f"{uri}: "), message
    good = frame[frame["error"].isna()]
    assert len(good) == len(inputs) - len(bad) and good["error_kind"].isna().all()
    assert good["probability"].notna().all() and good["prediction"].notna().all()
    odd = [str(root / name) for name in odd_good_files(np.random.default_rng(0))]
    assert set(odd) <= set(good.index)

    by_kind = dict(sorted(Counter(bad.values()).items()))
    on_disk = json.loads(Path(output, SUMMARY_FILE).read_text())
    assert on_disk["failures_by_kind"] == summary["failures_by_kind"] == by_kind
    assert (on_disk["files"], on_disk["scored"], on_disk["failures"]) == (len(inputs), len(good), len(bad))
    assert "failed (" + ", ".join(f"{kind} {count}" for kind, count in by_kind.items()) + ")" in describe(summary)


def test_an_alias_in_an_s3_registry_is_resolved_once_and_named_in_every_row(
    archive: Path, model_uri: str, ray_address: str, s3_bucket: str, tmp_path: Path
) -> None:
    from pneumonet.registry import Registry
    from pneumonet.scoring.batch import describe

    store = f"{s3_bucket}/store"
    storage.upload_dir(model_uri, f"{store}/models/custom/run-1")
    Registry(store).promote("custom/run-1", "production", who="test")
    output = str(tmp_path / "scores")

    summary = score_archive(f"{store}/models/aliases/production", str(archive), output, config())

    label = f"custom/run-1:{load_artifact(model_uri).version}"
    assert (read_output(output)["model"] == label).all()
    on_disk = json.loads(Path(output, SUMMARY_FILE).read_text())
    assert (on_disk["model"], on_disk["model_version"], on_disk["model_alias"]) == (label, "custom/run-1", "production")
    assert on_disk["model_uri"] == f"{store}/models/custom/run-1"
    assert describe(summary).splitlines()[0] == f"model {label} (alias production): {store}/models/custom/run-1"


def test_s3_prefix_in_s3_prefix_out(model_uri: str, ray_address: str, s3_bucket: str) -> None:
    files = mixed_files(np.random.default_rng(1))
    inputs = sorted(f"{s3_bucket}/archive/{name}" for name in files)
    for name, data in files.items():
        storage.write_bytes(f"{s3_bucket}/archive/{name}", data)
    output = f"{s3_bucket}/scores/run1"
    summary = score_archive(model_uri, f"{s3_bucket}/archive", output, config("score.rows_per_file=4"))

    frame = read_output(output)
    check_complete(frame, inputs)
    assert {Path(u).name for u in frame.loc[frame["error"].notna(), "uri"]} == set(BAD)
    assert summary["files"] == len(inputs) and summary["failures"] == len(BAD)
    assert json.loads(storage.read_text(f"{output}/{SUMMARY_FILE}"))["scored"] == len(inputs) - len(BAD)
    assert storage.exists(f"{output}/{HISTOGRAM_FILE}")


def test_manifest_inputs_csv_and_parquet(archive: Path, model_uri: str, ray_address: str, tmp_path: Path) -> None:
    chosen = sorted(str(p) for p in archive.rglob("*.jpeg"))[:6] + [str(archive / "zero.png")]
    # Relative entries are relative to the manifest; a repeated entry is scored once.
    rows = [os.path.relpath(chosen[0], tmp_path), *chosen, chosen[1]]
    pd.DataFrame({"uri": rows, "label": "x"}).to_csv(tmp_path / "list.csv", index=False)
    output = str(tmp_path / "out")
    summary = score_archive(model_uri, str(tmp_path / "list.csv"), output, config("score.wave_files=3"))
    check_complete(read_output(output), chosen)  # in three waves of whole hash partitions
    assert summary["failures"] == 1
    pd.DataFrame({"uri": chosen[::-1]}).to_parquet(tmp_path / "list.parquet")
    assert sorted(input_dataset(str(tmp_path / "list.parquet")).to_pandas()["uri"]) == sorted(chosen)
    pd.DataFrame({"uri": [chosen[0], " "]}).to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(DataError, match="1 rows have an empty 'uri'"):
        score_archive(model_uri, str(tmp_path / "blank.csv"), str(tmp_path / "out-blank"), config())

    pd.DataFrame({"path": chosen}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="'uri' column"):
        score_archive(model_uri, str(tmp_path / "bad.csv"), str(tmp_path / "out-bad"), config())


def test_output_of_another_model_is_not_mixed(archive: Path, model_uri: str, ray_address: str, tmp_path: Path) -> None:
    output = tmp_path / "scores"
    output.mkdir()
    frame = pd.DataFrame({"uri": ["x"], "probability": [0.5], "prediction": ["NORMAL"], "model": ["other:123"],
                          "scored_at": [pd.Timestamp.now(tz="UTC")], "error": [None]})  # fmt: skip
    frame.to_parquet(output / "part-old-00000.parquet")
    with pytest.raises(DataError, match="other:123"):
        score_archive(model_uri, str(archive), str(output), config())


def test_summary_and_anti_join_count_gaps_and_duplicates(ray_address: str, tmp_path: Path) -> None:
    import ray

    def rows(uris: list[str], probs: list[float | None], kind: str = "corrupt") -> pa.Table:
        return pa.table({"uri": uris, "probability": probs, "prediction": ["NORMAL" if p is not None else None for p in probs],
                         "model": ["m:1"] * len(uris), "scored_at": [pd.Timestamp.now(tz="UTC")] * len(uris),
                         "error": [None if p is not None else "bad" for p in probs],
                         "error_kind": [None if p is not None else kind for p in probs]})  # fmt: skip

    parts.write_part(str(tmp_path), "part-a-00000.parquet", rows(["a", "b"], [0.1, None]))
    parts.write_part(str(tmp_path), "part-b-00000.parquet", rows(["b", "x"], [0.9, 0.5]))
    # A part written before rows had error_kind: still read, its error counted as unclassified.
    pq.write_table(rows(["y", "z"], [None, 0.5]).drop_columns(["error_kind"]), tmp_path / "part-c-00000.parquet")
    summary = summarize_output(str(tmp_path))
    assert (summary["files"], summary["scored"], summary["failures"], summary["predictions"]) == (6, 4, 2, {"NORMAL": 4})
    assert summary["failures_by_kind"] == {"corrupt": 1, "unclassified": 1}
    assert summary["probability"]["histogram"]["counts"][2] == 1 and summary["failure_examples"] == ["bad", "bad"]
    assert summary["probability"]["quantiles"]["p50"] == pytest.approx(0.5, abs=5e-5)

    inputs = ray.data.from_items([{"uri": uri} for uri in ["c", "b", "a", "d", "c"]])
    plan = reconcile(inputs, parts.parts_dataset(str(tmp_path), ["uri", "model"], model="m:1"), partitions=3)
    assert (plan.inputs, plan.already, plan.todo, plan.repeated_inputs, plan.duplicate_rows, plan.other_rows) == (4, 2, 2, 1, 1, 3)
    waves = plan.todo_waves(1)
    assert len(waves) == 2 and sorted(pd.concat([wave.to_pandas() for wave in waves])["uri"]) == ["c", "d"]
    assert sorted(plan.inputs_dataset().to_pandas()["uri"]) == ["a", "b", "c", "d"]

    # The digest recorded from the grouped table (weighted by "listed") is the digest of the listing
    # itself, repeats included, in any order and any blocks; any other listing of as many URIs differs.
    resume = plan.resume_state("parts-fingerprint")
    listing = ray.data.from_items([{"uri": uri} for uri in ["a", "c", "d", "b", "c"]], override_num_blocks=3)
    assert Digest.from_dict(resume["listing"]) == digest(listing) == Digest(5, digest(listing).value)
    same = unchanged(listing, resume)
    assert same is not None and same.unchanged and (same.inputs, same.todo, same.repeated_inputs, same.other_rows) == (4, 0, 1, 3)
    for other in (["a", "b", "c", "d", "d"], ["a", "b", "c", "d", "e"], ["a", "b", "c", "d"]):
        assert unchanged(ray.data.from_items([{"uri": uri} for uri in other]), resume) is None, other


def rows_in_parts(output: Path) -> int:
    return sum(pq.read_metadata(path).num_rows for path in output.glob("part-*.parquet"))


def run_and_kill_at(command: list[str], env: dict[str, str], output: Path, rows: int) -> None:
    """Start the job, SIGKILL its process group once ``rows`` rows are in parts (within 300 s)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a job start loads TensorFlow in its actor: minutes on a busy machine
        while rows_in_parts(output) < rows and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it could be killed:\n{proc.stderr.read().decode()[-3000:]}"
        assert rows_in_parts(output) >= rows, f"fewer than {rows} rows in parts within 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.mark.slow  # 3-10 min on 2 busy cores: three job starts, each loading TensorFlow in its actor
def test_job_killed_twice_half_way_then_finished_scores_each_file_once(
    tmp_path_factory: pytest.TempPathFactory, model_uri: str, ray_address: str, tmp_path: Path
) -> None:
    from pneumonet.data.synthetic import synthesize_dataset

    root = synthesize_dataset(tmp_path_factory.mktemp("big"), n=240, size=SIZE, seed=5)
    (root / "broken.jpeg").write_bytes(b"\xff\xd8 not really")  # an error row must survive the kills too
    inputs = [entry.uri for entry in storage.list_files(str(root))]
    output = tmp_path / "scores"
    command = [sys.executable, str(REPO / "jobs" / "batch_score.py"), "--model", model_uri, "--input", str(root),
               "--output", str(output), "--batch-size", "2", *MODEL_OVERRIDES, "score.rows_per_file=4",
               "score.progress_seconds=1", "tracking.mode=disabled"]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    seen = [0]
    for share in (0.5, 0.75):  # about half of what is left, each time
        run_and_kill_at(command, env, output, round(share * len(inputs)))
        frame = read_output(str(output))
        assert seen[-1] < len(frame) < len(inputs) and frame["uri"].is_unique
        assert set(frame["uri"]) <= set(inputs) and not (output / SUMMARY_FILE).exists()
        seen.append(len(frame))

    summary = score_archive(model_uri, str(root), str(output), config("score.rows_per_file=4"))
    frame = read_output(str(output))
    check_complete(frame, inputs)
    assert frame.loc[frame["uri"].str.endswith("broken.jpeg"), "error"].notna().all()
    assert summary["run"]["already_scored"] >= seen[-1] and summary["missing"] == summary["duplicate_rows"] == 0
    assert summary["run"]["already_scored"] + summary["run"]["scored_this_run"] + summary["run"]["failed_this_run"] == len(inputs)
    runs = {Path(uri).name.rsplit("-", 1)[0] for uri in parts.list_parts(str(output))}
    assert len(runs) == 3
    assert not list(output.glob(".*"))


def test_a_finished_job_rerun_unchanged_is_skipped_by_digest_and_any_change_runs_the_anti_join(
    tmp_path_factory: pytest.TempPathFactory, model_uri: str, ray_address: str, tmp_path: Path
) -> None:
    from pneumonet.data.synthetic import synthesize_dataset

    root = synthesize_dataset(tmp_path_factory.mktemp("rerun"), n=24, size=SIZE, seed=8)
    (root / "broken.jpeg").write_bytes(b"\xff\xd8 not really")
    output = tmp_path / "scores"

    def parts_on_disk() -> dict[str, int]:
        return {path.name: path.stat().st_mtime_ns for path in output.glob("part-*.parquet")}

    def inputs() -> list[str]:
        return [entry.uri for entry in storage.list_files(str(root))]

    first = score_archive(model_uri, str(root), str(output), config())
    assert first["run"]["planned_by"] == "anti-join" and first["resume"]["inputs"] == len(inputs())
    written = parts_on_disk()

    # Unchanged: the digest of the listing matches; nothing is read, scored or written.
    again = score_archive(model_uri, str(root), str(output), config())
    assert again["run"]["planned_by"] == "digest" and again["run"]["parts_written"] == 0
    assert again["run"]["already_scored"] == len(inputs()) and parts_on_disk() == written
    assert {key: again[key] for key in OUTPUT_KEYS} == {key: first[key] for key in OUTPUT_KEYS}
    assert json.loads((output / SUMMARY_FILE).read_text())["resume"] == first["resume"]

    # A file renamed (as many files as before): the anti-join runs and scores the new name only;
    # the old name's row stays, not counted. Tracked offline: the progress counters reach W&B.
    old = next(path for path in sorted(root.rglob("*.jpeg")) if path.name != "broken.jpeg")
    old.rename(root / "renamed.jpeg")
    renamed = score_archive(model_uri, str(root), str(output), config("tracking.mode=offline", "score.progress_seconds=0.2"))
    run = renamed["run"]
    assert run["planned_by"] == "anti-join" and (run["already_scored"], run["scored_this_run"], run["failed_this_run"]) == (len(inputs()) - 1, 1, 0)
    frame = read_output(str(output))
    assert frame["uri"].is_unique and set(frame["uri"]) == {*inputs(), str(old)}
    assert renamed["files"] == len(inputs()) + 1 and renamed["resume"]["other_rows"] == 1
    (tracked,) = offline_runs(output / "_tracking").values()
    progress = [row for row in tracked.history if "files_done" in row]
    assert progress and (progress[-1]["files_done"], progress[-1]["files_total"], progress[-1]["failures"]) == (1, 1, 0)
    assert {"already_done", "images_per_second", "eta_seconds", "parts"} <= set(progress[-1])
    assert progress[-1]["already_done"] == len(inputs()) - 1
    assert score_archive(model_uri, str(root), str(output), config())["run"]["planned_by"] == "digest"

    # A part deleted (the archive unchanged): the fingerprint of the parts differs, its rows are scored again.
    gone = sorted(output.glob("part-*.parquet"))[0]
    lost = set(parts.read_part(str(gone), ["uri"]).column("uri").to_pylist()) - {str(old)}  # old: not an input now
    gone.unlink()
    rescored = score_archive(model_uri, str(root), str(output), config())
    run = rescored["run"]
    assert run["planned_by"] == "anti-join" and run["scored_this_run"] + run["failed_this_run"] == len(lost)
    assert run["already_scored"] == len(inputs()) - len(lost)
    frame = read_output(str(output))
    assert frame["uri"].is_unique and set(inputs()) <= set(frame["uri"]) <= {*inputs(), str(old)}
    assert rescored["missing"] == rescored["duplicate_rows"] == 0


def test_listing_by_sub_prefix_finds_every_visible_file_once(ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumonet.scoring import inputs

    names = ["top.png", "a/1.png", "a/b/2.png", "a/b/c/d/e/3.png", "f/4.dcm", "g/h/5", ".hidden/6.png", "a/.7.png",
             "out/part-x.parquet", *(f"wide/{i:03d}/x.jpg" for i in range(70))]  # fmt: skip
    write_files(tmp_path, dict.fromkeys(names, b"x"))
    want = sorted(str(tmp_path / n) for n in names if not n.startswith((".", "out/")) and "/." not in n)
    for depth in (1, 4):  # shallow walk (deep recursive units) and a walk that stops at 64 sub-prefixes
        monkeypatch.setattr(inputs, "MAX_DEPTH", depth)
        units = inputs.listing_units(str(tmp_path))
        assert len(units) == len(set(units)) and (str(tmp_path), False) in units
        listed = inputs.input_dataset(str(tmp_path), exclude_prefix=str(tmp_path / "out")).to_pandas()["uri"]
        assert sorted(listed) == want
    assert len(units) > inputs.LISTING_UNITS and (str(tmp_path / "wide" / "000"), True) in units


def test_progress_reports_counts_rate_failures_and_eta_at_an_interval(caplog: pytest.LogCaptureFixture) -> None:
    from pneumonet.scoring.progress import Progress

    class Run:
        def __init__(self) -> None:
            self.logged: list[dict] = []

        def log(self, values: dict) -> None:
            self.logged.append(dict(values))

    run = Run()
    caplog.set_level("INFO", logger="pneumonet.scoring.progress")
    with Progress(total=1000, already=50, run=run, interval=0.1) as progress:
        progress.add(200, 3)
        time.sleep(0.35)
        progress.add(300, 1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) >= 3 and len(run.logged) == len(lines)  # ticks while running, and one at the end
    assert lines[0].startswith("progress: 200/1,000 files this run (20.0%), 50 already done;") and "3 failed; ETA" in lines[0]
    assert "500/1,000" in lines[-1] and "4 failed" in lines[-1]
    last = run.logged[-1]
    assert (last["files_done"], last["files_total"], last["failures"], last["parts"]) == (500, 1000, 4, 2)
    assert last["images_per_second"] > 0 and last["eta_seconds"] == pytest.approx(500 / last["images_per_second_recent"])


def noise_and_gradients(root: Path, n: int) -> list[str]:
    """Images that are no chest X-ray at all: uniform noise and linear gradients."""
    rng = np.random.default_rng(9)
    ramp = np.linspace(0, 255, 48, dtype=np.float32)
    files = {f"ood/noise{i}.png": encode(Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)), "PNG") for i in range(n)}
    files |= {f"ood/ramp{i}.png": encode(Image.fromarray(np.uint8(np.outer(ramp, np.ones(48)) * (i + 1) / n)), "PNG") for i in range(n)}
    return write_files(root, files)


@pytest.fixture(scope="module")
def drift_model_uri(tmp_path_factory: pytest.TempPathFactory, model_uri: str) -> str:
    """The module's model with a drift reference of 240 synthetic chest images (another seed than the archive's)."""
    from pneumonet.artifact import DRIFT_KEY, derive_artifact
    from pneumonet.data.synthetic import synthesize_dataset
    from pneumonet.evaluation.drift import build_reference, reference_files

    root = synthesize_dataset(tmp_path_factory.mktemp("reference"), n=240, size=48, seed=21)
    uris = [str(p) for p in sorted(root.rglob("*.jpeg"))]
    artifact = load_artifact(model_uri)
    images = decoded(uris)
    raw, embeddings = artifact.predict_with_embeddings(images)
    ref, record = build_reference(raw, embeddings, np.arange(len(uris)) // 2, config().drift, images=images)
    record, files = reference_files(ref, record)
    return derive_artifact(artifact, {**artifact.meta, DRIFT_KEY: record}, str(tmp_path_factory.mktemp("m") / "drift"), files)


def test_every_row_is_gated_and_the_summary_tests_a_uniform_sample_against_the_reference(
    archive: Path, drift_model_uri: str, ray_address: str, tmp_path: Path
) -> None:
    from pneumonet.evaluation.drift import VERDICTS, read_reference, sample_key
    from pneumonet.scoring.summary import DRIFT_PLOT_FILE

    output = str(tmp_path / "scores")
    summary = score_archive(drift_model_uri, str(archive), output, config("drift.sample=12", "drift.min_images=10"))

    frame = read_output(output).set_index("uri")
    artifact, ref = load_artifact(drift_model_uri), read_reference(drift_model_uri, load_artifact(drift_model_uri).meta)
    good = frame[frame["error"].isna()]
    images = decoded(list(good.index))
    raw, embeddings = artifact.predict_with_embeddings(images)
    inside, _ = ref.gate(embeddings, images)
    assert good["in_distribution"].tolist() == inside.tolist()  # the gate of exactly these images
    assert (good["ood_reason"].notna() == ~good["in_distribution"].astype(bool)).all()
    assert frame.loc[frame["error"].notna(), "in_distribution"].isna().all()

    sample = parts.read_drift_sample(output, 12)
    keys = {uri: sample_key(uri) for uri in good.index}
    assert sample.column("uri").to_pylist() == sorted(keys, key=keys.get)[:12]  # the smallest keys: uniform, bounded
    np.testing.assert_allclose(sample.column("raw_probability").to_numpy(), raw[[list(good.index).index(u) for u in
                               sample.column("uri").to_pylist()]], atol=1e-5)  # fmt: skip
    drift = json.loads(Path(output, SUMMARY_FILE).read_text())["drift"]
    assert drift["verdict"] in VERDICTS and drift["n"] == 12 and set(drift["tests"]) == {"scores_ks", "embeddings_mmd", "ood_share"}
    assert summary["out_of_distribution"] == {"checked": len(good), "flagged": int((~inside).sum())}
    assert Path(output, DRIFT_PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert len(pd.read_parquet(output)) == len(frame)  # the sample's folder stays out of the dataset

    # An archive of noise and gradients is out of distribution as a whole, and the noise image by image
    # (this untrained model's features tell a dim gradient from a dark chest only in part).
    ood = tmp_path / "ood-archive"
    noise_and_gradients(ood, 15)
    flagged = score_archive(drift_model_uri, str(ood), str(tmp_path / "ood-scores"), config("drift.min_images=10"))
    assert flagged["drift"]["verdict"] == "drift" and flagged["drift"]["tests"]["ood_share"]["p_adjusted"] <= 0.01
    ood_frame = read_output(str(tmp_path / "ood-scores"))
    assert not ood_frame.loc[ood_frame["uri"].str.contains("noise"), "in_distribution"].any()


def test_a_model_without_a_reference_is_scored_with_a_notice(archive: Path, model_uri: str, ray_address: str,
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level("WARNING", logger="pneumonet.scoring.batch")
    summary = score_archive(model_uri, str(archive), str(tmp_path / "scores"), config())
    assert summary["drift"]["verdict"] == "not checked" and "drift-reference" in summary["drift"]["reason"]
    assert any("no drift reference" in record.getMessage() for record in caplog.records)
    assert read_output(str(tmp_path / "scores"))["in_distribution"].isna().all()
