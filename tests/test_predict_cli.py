"""The scoring doors on the command line: ``pneumonet predict``, ``score``, ``serve`` and ``jobs/batch_score.py``."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.config import load_config
from pneumonet.data.images import load_image

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
MODEL_OVERRIDES = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pneumonet.cli", *args]
    return subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pneumonet.models import build_model

    config = load_config(None, MODEL_OVERRIDES)
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={}, manifest_digest=None)
    return save_artifact(build_model("custom", config.model, seed=3), meta, str(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40), dtype=np.uint8)).save(buffer, format="JPEG")
    good, bad = folder / "good.jpg", folder / "bad.jpg"
    good.write_bytes(buffer.getvalue())
    bad.write_bytes(buffer.getvalue()[:100])
    return good, bad


def test_predict_through_an_alias_scores_with_the_version_it_names(model_uri: str, images: tuple[Path, Path], tmp_path: Path) -> None:
    from pneumonet.registry import Registry

    shutil.copytree(model_uri, tmp_path / "models" / "custom" / "run-1")
    Registry(str(tmp_path)).promote("custom/run-1", "production")
    result = cli("predict", "--model", str(tmp_path / "models" / "aliases" / "production"), str(images[0]), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(result.stdout)
    assert row["model"] == f"custom/run-1:{load_artifact(model_uri).version}" and 0.0 <= row["probability"] <= 1.0


def test_predict_json_and_exit_code(model_uri: str, images: tuple[Path, Path]) -> None:
    good, bad = images
    result = cli("predict", "--model", model_uri, str(good), str(bad), "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [row["uri"] for row in rows] == [str(good), str(bad)]
    artifact = load_artifact(model_uri)
    expected = float(artifact.predict_proba(load_image(good.read_bytes(), str(good), SIZE)[None])[0])
    assert rows[0]["probability"] == pytest.approx(expected, abs=1e-5) and rows[0]["error"] is None
    assert rows[0]["prediction"] == ("PNEUMONIA" if expected >= 0.5 else "NORMAL")
    assert rows[0]["model"] == f"{artifact.name}:{artifact.version}"
    assert rows[1]["probability"] is None and "truncated" in rows[1]["error"]

    ok = cli("predict", "--model", model_uri, str(good))
    assert ok.returncode == 0 and "p(PNEUMONIA)=" in ok.stdout


def test_predict_takes_config_overrides_among_the_images(model_uri: str, images: tuple[Path, Path]) -> None:
    good, _ = images  # 50 x 40 = 2,000 pixels
    refused = cli("predict", "--model", model_uri, "data.max_image_pixels=1000", str(good), "--json")
    assert refused.returncode == 1 and "data.max_image_pixels" in json.loads(refused.stdout)[0]["error"]
    allowed = cli("predict", "--model", model_uri, str(good), "data.max_image_pixels=2000")
    assert allowed.returncode == 0 and "p(PNEUMONIA)=" in allowed.stdout


def test_score_help_and_job_help_share_their_options() -> None:
    texts = []
    for command in ([sys.executable, "-m", "pneumonet.cli", "score", "--help"],
                    [sys.executable, str(REPO / "jobs" / "batch_score.py"), "--help"]):  # fmt: skip
        result = subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode == 0, result.stderr[-2000:]
        texts.append(result.stdout)
    for flag in ("--model", "--input", "--output", "--workers", "--gpus-per-worker", "--batch-size", "--config", "KEY=VALUE"):
        assert flag in texts[0], flag

    def options(text: str) -> str:  # the usage line is wrapped after the program name, which differs
        usage, _, rest = text.partition("positional arguments:")
        rest = rest.partition("examples:")[0]  # pneumonet's help adds examples of its own
        return " ".join(usage[usage.index("--model") :].split()) + " ".join(rest.split())

    assert options(texts[0]) == options(texts[1])


def test_coordinating_processes_do_not_load_tensorflow() -> None:
    """The scoring driver and the Serve app builder run on the Ray head (1 GiB in dev): no TensorFlow there."""
    code = "import sys, serve.app, pneumonet.scoring.batch; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], check=False, env=ENV, capture_output=True, text=True,
                            timeout=120, cwd=REPO)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr[-2000:])


def test_score_errors_are_one_line(model_uri: str, tmp_path: Path) -> None:
    missing = cli("score", "--model", str(tmp_path / "nope"), "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("pneumonet: error: artifact")
    bad = cli("score", "--model", model_uri, "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--workers", "0")
    assert bad.returncode == 1 and "score.workers" in bad.stderr
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "batch_score.py"), "--model", model_uri, "--input",
                          str(tmp_path / "none"), "--output", str(tmp_path / "o"), "tracking.mode=disabled"],
                         check=False, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert job.returncode == 1 and "batch_score: error:" in job.stderr and "no such" in job.stderr


def test_serve_command_runs_until_interrupted(model_uri: str, images: tuple[Path, Path]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumonet.cli", "serve", "--model", model_uri, "--port", str(port), *MODEL_OVERRIDES],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy waits for the app
                time.sleep(1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        response = requests.post(f"{url}/v1/predict", data=images[0].read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200 and 0.0 <= response.json()["probability"] <= 1.0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()
