"""Shared fixtures: a synthetic dataset made on the fly and an S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PNEUMONET_SHARED", REPO.parent / "shared"))
REAL_DATA = SHARED / "data" / "chest-xray-224"

# The smallest models that still exercise every variant (random MobileNet: plumbing, not learning).
TINY_MODEL = [
    "model.image_size=32",
    "model.custom_filters=[8,16]",
    "model.custom_dense_units=8",
    "model.backbone=MobileNet",
    "model.weights=none",
    "model.head_units=8",
    "model.finetune_layers=4",
    "train.batch_size=8",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Kaggle-layout dataset (both naming conventions), made once per test session."""
    from pneumonet.data.synthetic import synthesize_dataset

    return synthesize_dataset(tmp_path_factory.mktemp("synthetic"), n=96, size=64, seed=7)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with fake credentials in the environment; yields the endpoint URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto S3 server did not start on 127.0.0.1 within 30 s")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1"
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the local S3 server; returns ``s3://name``."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    name = f"{name}-{time.monotonic_ns() % 100000}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


class _RejectingWandb(http.server.BaseHTTPRequestHandler):
    """Answers every W&B API call as a server that does not know the key: 401."""

    def do_POST(self) -> None:
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

    do_GET = do_POST

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def rejecting_wandb() -> Iterator[str]:
    """A W&B server on 127.0.0.1 that rejects every API key; yields its base URL."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _RejectingWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
