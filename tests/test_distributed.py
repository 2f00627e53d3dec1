"""The training job on Ray Train: 2 workers on one local Ray cluster, S3 on 127.0.0.1 (moto), W&B offline.

The errors come first: they need no Ray. Then one local Ray for the rest of the module.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import time

import pytest
import ray
from conftest import TINY_MODEL
from wandb_records import offline_runs

from pneumonet import storage
from pneumonet.artifact import load_artifact
from pneumonet.config import VARIANTS, load_config
from pneumonet.data.catalog import read_manifest
from pneumonet.data.pipeline import load_image_set
from pneumonet.errors import StorageError, TrackingError
from pneumonet.training import driver
from pneumonet.training.args import add_train_arguments, run_job, train_from_args
from pneumonet.training.checkpoint import WEIGHTS_FILE, _load_arrays
from pneumonet.training.driver import TrainingRunError, ensure_ray, run_training
from pneumonet.training.loop import validation_scores
from pneumonet.registry import load_latest_artifact
from pneumonet.training.worker import CRASH_AT_EPOCH_ENV, CRASH_MARKER_ENV

TINY = [
    *TINY_MODEL,
    "train.epochs=2",
    "train.finetune_epochs=1",
    "data.decode_workers=2",
    "distributed.workers=2",
    "distributed.cpus_per_worker=0.5",
    "tracking.mode=offline",
]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def no_training(monkeypatch):
    """Fail the test if the job gets as far as starting Ray."""
    monkeypatch.setattr(driver, "ensure_ray", lambda *_: pytest.fail("training started despite the error"))


@pytest.fixture()
def s3_env(monkeypatch):
    """AWS settings for a test that points S3 somewhere of its own."""
    for name, value in (("AWS_ACCESS_KEY_ID", "wrong"), ("AWS_SECRET_ACCESS_KEY", "wrong"), ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_unreachable_storage_fails_before_training(no_training, s3_env, synthetic_root, capsys):
    s3_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    code = run_job(["--data", str(synthetic_root), "--storage", "s3://pneumonet/runs", "--variant", "custom", *TINY],
                   prog="jobs/train.py")  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert err.startswith("jobs/train.py: error: s3://pneumonet/runs") and "cannot reach" in err


@pytest.fixture(scope="module")
def s3_with_auth():
    """A moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys are denied."""
    port = _closed_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto did not start"
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_wrong_credentials_fail_before_training(no_training, s3_env, s3_with_auth, synthetic_root):
    s3_env.setenv("AWS_ENDPOINT_URL", s3_with_auth)
    with pytest.raises(StorageError, match=r"^s3://pneumonet/runs: .*(access denied|ACCESS_DENIED)"):
        run_training(load_config(None, TINY), ["custom"], str(synthetic_root), "s3://pneumonet/runs")


def test_bad_wandb_key_fails_before_training(no_training, monkeypatch, rejecting_wandb, synthetic_root, tmp_path, capsys):
    key = "local-" + "0123456789" * 5
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", rejecting_wandb)  # a server that answers, and refuses the key
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "5")
    config = load_config(None, [*TINY, "tracking.mode=auto"])
    with pytest.raises(TrackingError, match="WANDB_API_KEY was not accepted") as error:
        run_training(config, ["custom"], str(synthetic_root), str(tmp_path / "store"))
    captured = capsys.readouterr()
    assert key not in str(error.value) + captured.out + captured.err
    assert not (tmp_path / "store").exists()  # nothing was written either


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray for the training tests, started after the S3 settings are in the environment
    (the cluster's processes inherit them), sized like the job would size it."""
    started = ensure_ray(load_config(None, TINY))
    yield
    if started:
        ray.shutdown()


def _val_images(store: str, run_id: str):
    manifest = read_manifest(storage.join(store, "runs", run_id, "manifest.parquet"))
    rows = manifest[(manifest["split"] == "val") & manifest["error"].isna()].reset_index(drop=True)
    return load_image_set(rows, 32, load_config(None, TINY).data)


def test_two_workers_train_every_variant_on_s3_and_survive_a_worker_crash(
    ray_cluster, s3_bucket, synthetic_root, tmp_path, monkeypatch
):
    data, store = f"{s3_bucket}/data", f"{s3_bucket}/store"
    storage.upload_dir(synthetic_root, data)
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_AT_EPOCH_ENV, "2")  # rank 1 exits hard once, in custom's epoch 2
    monkeypatch.setenv(CRASH_MARKER_ENV, str(marker))
    config = load_config(None, [*TINY, "distributed.max_failures=1", f"tracking.dir={tmp_path / 'wandb'}"])

    summaries = run_training(config, list(VARIANTS), data, store)

    assert list(summaries) == list(VARIANTS) and marker.exists()
    run_id = summaries["custom"]["run_id"]
    val = _val_images(store, run_id)
    for variant, summary in summaries.items():
        # the artifact landed in the bucket, loads, and `latest` points at it
        assert summary["model_uri"] == f"{store}/models/{variant}/{run_id}"
        artifact = load_artifact(summary["model_uri"])
        assert load_latest_artifact(store, variant).version == artifact.version
        assert artifact.meta["workers"] == 2 and artifact.meta["run_id"] == run_id
        # every epoch was reported once by both ranks, with bit-identical weights and identical global figures
        epochs = summary["epochs"]
        expected = config.train.finetune_epochs if variant == "finetune" else config.train.epochs
        assert [ranks[0]["epoch"] for ranks in epochs] == list(range(1, expected + 1))
        for ranks in epochs:
            assert [r["rank"] for r in ranks] == [0, 1]
            assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"]
            assert ranks[0]["val_roc_auc"] == ranks[1]["val_roc_auc"] and ranks[0]["loss"] == ranks[1]["loss"]
            assert all(r["shard_val_images"] > 0 for r in ranks)  # validation is spread over both workers...
            assert sum(r["shard_val_images"] for r in ranks) == len(val)  # ...and covers all of it once
            assert ranks[0]["images"] == 2 * (min(r["shard_images"] for r in ranks) // 8) * 8
        # the reported validation figures of the best epoch are those of a single-process evaluation
        scores = validation_scores(val.labels, artifact.predict_proba(val.images))
        best = summary["best_epoch"] - 1
        assert summary["history"]["val_loss"][best] == pytest.approx(scores["val_loss"], rel=1e-4)
        if variant == "custom":  # (the random-backbone variants give near-ties, which float noise may reorder)
            assert summary["history"]["val_roc_auc"][best] == pytest.approx(scores["val_roc_auc"], abs=1e-9)

    # the crash: custom resumed after epoch 1 instead of starting over
    custom = summaries["custom"]
    assert custom["resumed_from"] == [1] and len(custom["history"]["loss"]) == config.train.epochs
    checkpoints = {entry.uri.split("/")[-2] for entry in storage.list_files(f"{store}/runs/{run_id}/custom")}
    assert {"epoch-0002-1", "final-1"} <= checkpoints and "epoch-0001-1" not in checkpoints
    assert summaries["transfer"]["resumed_from"] == []

    # W&B: exactly one offline run per variant with the epochs, the final metrics and the model's lineage
    runs = offline_runs(tmp_path / "wandb")
    assert sorted(runs) == sorted(f"{run_id}-{variant}" for variant in VARIANTS)
    for variant in VARIANTS:
        recorded = runs[f"{run_id}-{variant}"]
        epochs = [row for row in recorded.history if "epoch" in row]
        assert [row["epoch"] for row in epochs] == [ranks[0]["epoch"] for ranks in summaries[variant]["epochs"]]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_roc_auc", "learning_rate", "epoch_seconds",
                    "images_per_second"):  # fmt: skip
            assert key in epochs[-1]
        assert recorded.summary["test/roc_auc"] == pytest.approx(summaries[variant]["test"]["roc_auc"])
        assert recorded.summary["best_epoch"] == summaries[variant]["best_epoch"]
        kinds = {art["type"]: art for art in recorded.artifacts}
        assert kinds["dataset"]["name"] == "pneumonet-dataset"
        assert kinds["model"]["metadata"]["uri"] == summaries[variant]["model_uri"]
        assert kinds["model"]["metadata"]["dataset_artifact"].startswith("pneumonet-dataset:")


@pytest.mark.slow  # two more Ray Train runs (~2 min on 2 cores): `pytest -m slow tests/test_distributed.py`
def test_resume_continues_a_stopped_run_from_its_last_checkpoint(ray_cluster, synthetic_root, tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    monkeypatch.setenv(CRASH_AT_EPOCH_ENV, "2")
    monkeypatch.setenv(CRASH_MARKER_ENV, str(tmp_path / "crashed"))
    args = ["--data", str(synthetic_root), "--storage", store, "--variant", "custom", *TINY, "distributed.workers=1",
            "distributed.max_failures=0", f"tracking.dir={tmp_path / 'wandb'}"]  # fmt: skip
    with pytest.raises(TrainingRunError, match="--resume --run-id") as stopped:
        run_training(load_config(None, args[6:]), ["custom"], str(synthetic_root), store, run_id="stopped-run")
    assert "stopped-run" in str(stopped.value) and not storage.exists(f"{store}/models/custom/stopped-run")

    assert run_job(["--resume", *args]) == 0  # the latest run under the storage: stopped-run

    artifact = load_artifact(f"{store}/models/custom/stopped-run")
    assert artifact.meta["resumed_from"] == [1] and artifact.meta["epochs_run"] == 2
    assert len(artifact.meta["history"]["loss"]) == 2
    names = {path.name for path in (tmp_path / "store" / "runs" / "stopped-run" / "custom").iterdir()}
    assert {"epoch-0002-1", "final-1"} <= names and "epoch-0001-1" not in names


@pytest.mark.slow  # two Ray Train runs (~2 min on 2 cores): `pytest -m slow tests/test_distributed.py`
def test_a_retry_runs_the_same_command_line_and_continues_from_the_saved_weights(ray_cluster, synthetic_root, tmp_path, monkeypatch):
    """What a RayJob retry does: the same entrypoint again (k8s: --run-id in the manifest + --resume-if-exists)."""
    store = str(tmp_path / "store")
    monkeypatch.setenv(CRASH_AT_EPOCH_ENV, "2")  # the first attempt dies in epoch 2, after epoch 1's checkpoint
    monkeypatch.setenv(CRASH_MARKER_ENV, str(tmp_path / "crashed"))
    argv = ["--data", str(synthetic_root), "--storage", store, "--variant", "custom", "--run-id", "rayjob-7",
            "--resume-if-exists", *TINY, "distributed.workers=1", "distributed.max_failures=0",
            f"tracking.dir={tmp_path / 'wandb'}"]  # fmt: skip
    parse = add_train_arguments(argparse.ArgumentParser()).parse_args

    with pytest.raises(TrainingRunError):
        train_from_args(parse(argv))  # attempt 1
    saved = tmp_path / "store" / "runs" / "rayjob-7" / "custom" / "epoch-0001-0" / WEIGHTS_FILE
    digest = hashlib.sha256()
    for array in _load_arrays(saved):
        digest.update(array.tobytes())

    summary = train_from_args(parse(argv))["custom"]  # attempt 2: the retry

    first = summary["epochs"][0][0]
    assert first["epoch"] == 2 and first["resumed_from"] == [1]
    assert first["restored_weights_digest"] == digest.hexdigest()[:16]  # the weights the stopped run saved
    artifact = load_artifact(f"{store}/models/custom/rayjob-7")
    assert artifact.meta["run_id"] == "rayjob-7" and artifact.meta["resumed_from"] == [1] and artifact.meta["epochs_run"] == 2
    assert len(artifact.meta["history"]["loss"]) == 2
    again = train_from_args(parse(argv))["custom"]  # a third start (e.g. re-applied): nothing left to train
    assert again["model_uri"] == f"{store}/models/custom/rayjob-7" and "epochs" not in again
