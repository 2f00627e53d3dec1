"""Two `pneumonet` commands at once on one machine: a training run and a scoring run, each on its own local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY_MODEL

from pneumonet.artifact import build_metadata, save_artifact
from pneumonet.config import load_config


def _start(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "pneumonet.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip


def test_a_training_run_and_a_scoring_run_at_once_both_finish(synthetic_root: Path, tmp_path: Path) -> None:
    from pneumonet.models import build_model

    config = load_config(None, TINY_MODEL)
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={}, manifest_digest=None)
    model_uri = save_artifact(build_model("custom", config.model, seed=1), meta, str(tmp_path / "model"))
    test_files = sorted(str(p) for p in (synthetic_root / "test").rglob("*.jpeg"))

    train = _start("train", "--variant", "custom", "--data", str(synthetic_root), "--out", str(tmp_path / "train"),
                   *TINY_MODEL, "train.epochs=2", "tracking.mode=disabled")  # fmt: skip
    score = _start("score", "--model", model_uri, "--input", str(synthetic_root / "test"), "--output",
                   str(tmp_path / "scores"), "tracking.mode=disabled")  # fmt: skip
    outputs = {name: proc.communicate(timeout=900)[0] for name, proc in (("train", train), ("score", score))}
    for name, proc in (("train", train), ("score", score)):
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-3000:]}"

    trained = json.loads((tmp_path / "train" / "custom" / "pneumonet.json").read_text())
    assert trained["epochs_run"] == 2
    summary = json.loads((tmp_path / "scores" / "_summary.json").read_text())
    assert (summary["files"], summary["scored"], summary["failures"]) == (len(test_files), len(test_files), 0)
    assert sum(summary["predictions"].values()) == len(test_files)
    for text in outputs.values():  # each found its own cluster: no log from the other one's
        assert "multiple active Ray instances" not in text
    for log in (tmp_path / "train" / "pneumonet.log", tmp_path / "scores" / "_pneumonet.log"):
        assert "multiple active Ray instances" not in log.read_text()
