"""`pneumonet demo` as a new user meets it: a console they can read, and the artifacts where the report says.

The command runs in a child process, so the test sees the real console (both streams, C libraries
and Ray's relayed worker output included), not what pytest's capture would let through.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import REPO

# The demo's code path on a small problem: 32 px, one epoch each, a small backbone.
SMALL = ["model.image_size=32", "model.backbone=MobileNet", "model.finetune_layers=4", "train.epochs=2",
         "train.finetune_epochs=1", "tracking.mode=offline"]  # fmt: skip
RAY_DATA_PLAN = re.compile(r"Execution plan|Starting execution of Dataset|Running Dataset|streaming_executor|InputDataBuffer")
TF_CPP = re.compile(r"^\S*[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+|absl::InitializeLog|oneDNN|cuInit|cuda_|cudart")
EPOCH = re.compile(r"\b(custom|transfer|finetune) epoch (\d+)/(\d+):")


def run_cli(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``pneumonet ARGV`` in a child process with the repository first on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the command must quieten TensorFlow itself
    return subprocess.run([sys.executable, "-m", "pneumonet.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def test_the_demo_console_holds_our_lines_only_and_the_models_sit_under_models(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = run_cli("demo", "--out", str(out), *SMALL)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    lines = console.splitlines()

    assert not [line for line in lines if RAY_DATA_PLAN.search(line)]
    assert not [line for line in lines if TF_CPP.search(line)]
    assert "Dataset job will hang" not in console and "Found multiple active Ray instances" not in console
    epochs = Counter(EPOCH.search(line).group(1, 2, 3) for line in lines if EPOCH.search(line))
    assert set(epochs.values()) == {1}, epochs  # no line twice (a worker's own and the relayed one)
    assert set(epochs) == {("custom", "1", "2"), ("custom", "2", "2"), ("transfer", "1", "2"), ("transfer", "2", "2"),
                           ("finetune", "1", "1")}  # fmt: skip
    assert all("ETA" in line and "img/s" in line and "val ROC-AUC" in line for line in lines if EPOCH.search(line))

    # The log file is named first, and holds what the console does not.
    log_line = done.stderr.splitlines()[0]
    assert " INFO pneumonet: log: " in log_line
    log = Path(log_line.split("log: ")[1].split(" (")[0])
    assert log == out / "pneumonet.log" and log.is_file()
    assert RAY_DATA_PLAN.search(log.read_text())  # Ray Data's plans were there to hide

    for variant in ("custom", "transfer", "finetune"):
        latest = (out / "models" / variant / "latest").read_text().strip()
        assert (out / "models" / variant / latest / "pneumonet.json").is_file()
    assert not (out / "models" / "models").exists()
    report = (out / "report.md").read_text()
    assert "What these figures mean" in report and "models/custom/" in report
    assert f"demo report: {out / 'report.md'}" in done.stdout
