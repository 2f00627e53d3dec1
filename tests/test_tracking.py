"""W&B tracking: mode resolution, fail-fast key checks, no-op when disabled, offline runs read back from disk."""

from __future__ import annotations

import socket
import time

import numpy as np
import pandas as pd
import pytest
from wandb_records import offline_runs

from pneumonet.config import load_config
from pneumonet.data.catalog import write_manifest
from pneumonet.errors import TrackingError
from pneumonet.tracking import preflight, resolve_mode, start_run

BAD_KEY = "local-" + "b4dk3y" * 8  # well-formed (40+ characters), unknown to any server


@pytest.fixture()
def wandb_env(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "5")
    return monkeypatch


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "mode, env, expected",
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": BAD_KEY}, "online"),
        ("auto", {"WANDB_API_KEY": BAD_KEY, "WANDB_MODE": "offline"}, "offline"),
        ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
        ("online", {"WANDB_MODE": "disabled"}, "disabled"),
        ("disabled", {"WANDB_API_KEY": BAD_KEY}, "disabled"),
        ("offline", {"WANDB_API_KEY": BAD_KEY}, "offline"),
    ],
)
def test_mode_comes_from_config_and_environment(wandb_env, mode, env, expected):
    for name, value in env.items():
        wandb_env.setenv(name, value)
    assert resolve_mode(load_config(None, [f"tracking.mode={mode}"])) == expected


def test_online_without_a_key_is_a_tracking_error(wandb_env):
    with pytest.raises(TrackingError, match="WANDB_API_KEY is not set"):
        preflight(load_config(None, ["tracking.mode=online"]))


def test_unreachable_server_fails_fast_without_leaking_the_key(wandb_env, capsys, caplog):
    wandb_env.setenv("WANDB_API_KEY", BAD_KEY)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    with pytest.raises(TrackingError) as error:
        preflight(load_config(None, []))  # auto + key = online
    assert time.monotonic() - started < 30
    assert "127.0.0.1" in str(error.value) and BAD_KEY not in str(error.value)
    captured = capsys.readouterr()
    assert BAD_KEY not in captured.out + captured.err + caplog.text


def test_rejected_and_malformed_keys_are_tracking_errors(wandb_env, rejecting_wandb):
    wandb_env.setenv("WANDB_BASE_URL", rejecting_wandb)
    wandb_env.setenv("WANDB_API_KEY", BAD_KEY)
    with pytest.raises(TrackingError, match="not accepted") as error:
        preflight(load_config(None, ["tracking.mode=online"]))
    assert BAD_KEY not in str(error.value)
    wandb_env.setenv("WANDB_API_KEY", "too-short")
    with pytest.raises(TrackingError, match="not accepted"):
        preflight(load_config(None, ["tracking.mode=online"]))


def test_disabled_run_is_a_no_op(wandb_env, tmp_path):
    config = load_config(None, ["tracking.mode=disabled", f"tracking.dir={tmp_path}"])
    with start_run(config, job_type="batch_score") as run:
        assert not run.enabled and run.id is None
        run.log({"a": 1})
        run.summary({"b": 2})
        run.log_images({"x": str(tmp_path / "missing.png")})
        run.log_evaluation("val", [0, 1], [0.2, 0.8], 0.5, {"plots": ["missing.png"]}, str(tmp_path))
        run.use_model_artifact(str(tmp_path), {"variant": "custom"})
        run.log_artifact_model(str(tmp_path), {"variant": "custom", "version": "x"}, str(tmp_path / "missing.parquet"))
        assert run.use_dataset(str(tmp_path / "missing.parquet"), "d") is None
    assert list(tmp_path.iterdir()) == []


def test_offline_run_holds_epochs_final_metrics_and_lineage(wandb_env, tmp_path):
    from pneumonet.evaluation import evaluate_predictions

    config = load_config(None, [f"tracking.dir={tmp_path / 'wandb'}"])
    manifest = tmp_path / "manifest.parquet"
    write_manifest(pd.DataFrame({"uri": ["a", "b"], "split": ["train", "val"], "label": ["NORMAL", "PNEUMONIA"]}), str(manifest))
    labels, probs = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    metrics = evaluate_predictions(labels, probs, 0.5, str(tmp_path / "eval"), n_bootstrap=0)
    model_uri = str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pneumonet.json").write_text("{}")
    meta = {"variant": "custom", "version": "abc123", "run_id": "r1", "manifest_digest": "f" * 64, "threshold": 0.5}
    with start_run(config, job_type="train", run_id="r1-custom", group="r1", extra_config={"variant": "custom"}) as run:
        assert run.mode == "offline" and run.enabled
        for epoch in (1, 2):
            run.log({"epoch": epoch, "loss": 1.0 / epoch, "val_roc_auc": 0.5 + epoch / 10})
        run.log_evaluation("test", labels, probs, 0.5, metrics, str(tmp_path / "eval"))
        run.log_artifact_model(model_uri, meta, manifest_uri=str(manifest))
    runs = offline_runs(tmp_path / "wandb")
    assert list(runs) == ["r1-custom"]
    recorded = runs["r1-custom"]
    assert recorded.job_type == "train" and {"variant", "model", "train"} <= recorded.config_keys
    epochs = [row for row in recorded.history if "epoch" in row]
    assert [row["epoch"] for row in epochs] == [1, 2] and epochs[1]["val_roc_auc"] == pytest.approx(0.7)
    assert recorded.summary["test/roc_auc"] == pytest.approx(metrics["roc_auc"])
    assert recorded.summary["test/plots/roc_curve/_type"] == "image-file"
    assert recorded.summary["test/confusion_matrix_table/_type"] == "table-file"
    by_type = {art["type"]: art for art in recorded.artifacts if art["type"] in ("dataset", "model")}
    assert by_type["dataset"]["metadata"]["manifest_digest"] == "f" * 64
    model = by_type["model"]
    assert model["name"] == "pneumonet-custom" and {"abc123", "r1", "latest"} <= set(model["aliases"])
    assert model["metadata"]["uri"] == model_uri and model["metadata"]["dataset_artifact"].startswith("pneumonet-dataset:")


def test_wandb_dir_of_the_user_wins_over_the_output_folder(wandb_env, tmp_path):
    from pneumonet.tracking import run_dir

    config = load_config(None, [])
    assert run_dir(config, str(tmp_path / "out")) == str(tmp_path / "out" / "wandb")
    wandb_env.setenv("WANDB_DIR", str(tmp_path / "mine"))
    assert run_dir(config, str(tmp_path / "out")) == str(tmp_path / "mine")
    assert run_dir(load_config(None, [f"tracking.dir={tmp_path / 'cfg'}"]), str(tmp_path / "out")) == str(tmp_path / "cfg")
