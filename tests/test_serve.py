"""The online endpoint on Ray Serve: scoring, dynamic batching, every bad request, auth, Grad-CAM.

One local Ray (2 CPUs) and one Serve instance on 127.0.0.1 for the module, with two applications
of the same model: "open" at / (no token) and "secure" at /secure (bearer token from an env var
that is set before Ray starts, so the replicas inherit it).
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.config import load_config
from pneumonet.data.images import load_image
from pneumonet.errors import ConfigError
from pneumonet.scoring.uploads import ApiError, parse_multipart, token_from_env

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
MODEL_OVERRIDES = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8"]
SERVE_OVERRIDES = ["serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.1", "serve.max_request_bytes=100000",
                   "serve.max_batch_images=4"]  # fmt: skip
TOKEN_ENV = "PNEUMONET_TEST_SERVE_TOKEN"
TOKEN = "t0ken-that-must-never-be-logged-5f3a9c"
TIMEOUT = 60


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge image: a decompression bomb as far as the header goes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pneumonet.models import build_model

    config = load_config(None, MODEL_OVERRIDES)
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={"roc_auc": 0.5}, manifest_digest=None)
    return save_artifact(build_model("custom", config.model, seed=2), meta, str(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture(scope="module")
def endpoint(model_uri: str) -> Iterator[str]:
    """Base URL of the Serve proxy; apps "open" at / and "secure" at /secure."""
    import ray
    from ray import serve

    from pneumonet.scoring.online import build_app

    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)
    mp.delenv("PNEUMONET_API_TOKEN", raising=False)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = [*MODEL_OVERRIDES, *SERVE_OVERRIDES]
        serve.run(build_app(model_uri, load_config(None, base)), name="open", route_prefix="/")
        secure = load_config(None, [*base, f"serve.auth_token_env={TOKEN_ENV}"])
        serve.run(build_app(model_uri, secure), name="secure", route_prefix="/secure")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()


def post(url: str, **kwargs) -> requests.Response:
    return requests.post(url, timeout=TIMEOUT, **kwargs)


def expected_probability(model_uri: str, data: bytes) -> float:
    return float(load_artifact(model_uri).predict_proba(load_image(data, "x.png", SIZE)[None])[0])


def test_predict_raw_body_and_multipart(endpoint: str, model_uri: str) -> None:
    data = png(1)
    raw = post(f"{endpoint}/v1/predict", data=data, headers={"Content-Type": "image/png"})
    form = post(f"{endpoint}/v1/predict", files={"file": ("scan.png", data, "image/png")})
    assert raw.status_code == 200 and form.status_code == 200, (raw.text, form.text)
    body = raw.json()
    artifact = load_artifact(model_uri)
    assert body["probability"] == pytest.approx(expected_probability(model_uri, data), abs=1e-5)
    assert form.json()["probability"] == pytest.approx(body["probability"], abs=1e-6)
    assert body["prediction"] == ("PNEUMONIA" if body["probability"] >= 0.5 else "NORMAL")
    assert body["threshold"] == 0.5 and body["model"] == {"name": artifact.name, "version": artifact.version}
    assert body["latency_ms"] > 0 and body["batch_size"] >= 1
    octet = post(f"{endpoint}/v1/predict", data=data, headers={"Content-Type": "application/octet-stream"})
    assert octet.json()["probability"] == pytest.approx(body["probability"], abs=1e-6)


def test_batch_endpoint_scores_in_order_and_marks_bad_items(endpoint: str, model_uri: str) -> None:
    files = [("files", ("a.png", png(2), "image/png")), ("files", ("broken.png", png(3)[:60], "image/png")),
             ("files", ("c.png", png(4), "image/png"))]  # fmt: skip
    response = post(f"{endpoint}/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "broken.png", "c.png"]
    assert "error" in results[1] and "probability" not in results[1]
    for result, seed in ((results[0], 2), (results[2], 4)):
        assert result["probability"] == pytest.approx(expected_probability(model_uri, png(seed)), abs=1e-5)


def test_concurrent_requests_are_batched(endpoint: str) -> None:
    data = png(5)

    def one(_: int) -> requests.Response:
        return post(f"{endpoint}/v1/predict", data=data, headers={"Content-Type": "image/png"})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    assert len({round(r.json()["probability"], 5) for r in responses}) == 1


def test_bad_requests_get_json_4xx_and_do_not_hurt_the_replica(endpoint: str) -> None:
    from ray import serve

    predict, batch = f"{endpoint}/v1/predict", f"{endpoint}/v1/predict/batch"
    too_big = b"\x89PNG" + b"\0" * 100_001
    chunked = iter([too_big[:60_000], too_big[60_000:]])  # no Content-Length: the limit holds while reading
    cases = {
        "empty body": (post(predict, data=b"", headers={"Content-Type": "image/png"}), 400),
        "text/plain": (post(predict, data=png(6), headers={"Content-Type": "text/plain"}), 415),
        "no content type": (post(predict, data=png(6), headers={"Content-Type": ""}), 415),
        "corrupt image": (post(predict, data=png(6)[:80], headers={"Content-Type": "image/png"}), 422),
        "not an image": (post(predict, data=b"hello world", headers={"Content-Type": "image/jpeg"}), 422),
        "bomb": (post(predict, data=png_header_only(100_000, 100_000), headers={"Content-Type": "image/png"}), 422),
        "declared too big": (post(predict, data=too_big, headers={"Content-Type": "image/png"}), 413),
        "streamed too big": (post(predict, data=chunked, headers={"Content-Type": "image/png"}), 413),
        "no file field": (post(predict, files={"other": ("a.png", png(6))}), 400),
        "bad multipart": (post(predict, data=b"--x\r\nnot closed", headers={"Content-Type": "multipart/form-data; boundary=x"}), 400),
        "bad explain": (post(f"{predict}?explain=lime", data=png(6), headers={"Content-Type": "image/png"}), 400),
        "batch not multipart": (post(batch, data=png(6), headers={"Content-Type": "image/png"}), 415),
        "batch without files": (post(batch, files={"file": ("a.png", png(6))}), 400),
        "batch too many": (post(batch, files=[("files", (f"{i}.png", png(i))) for i in range(5)]), 413),
        "unknown route": (requests.get(f"{endpoint}/v2/nothing", timeout=TIMEOUT), 404),
        "wrong method": (requests.get(predict, timeout=TIMEOUT), 405),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert isinstance(response.json().get("error"), str) and response.json()["error"], name
    assert "over the limit" in cases["bomb"][0].json()["error"]
    assert "100000 bytes" in cases["streamed too big"][0].json()["error"]

    assert requests.get(f"{endpoint}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    assert post(predict, data=png(7), headers={"Content-Type": "image/png"}).status_code == 200
    deployment = serve.status().applications["open"].deployments["PneumonetModel"]
    assert deployment.status == "HEALTHY" and deployment.replica_states == {"RUNNING": 1}


def test_bearer_token_auth(endpoint: str) -> None:
    import ray

    secure = f"{endpoint}/secure"
    image = {"data": png(8)}
    no_token = post(f"{secure}/v1/predict", **image, headers={"Content-Type": "image/png"})
    wrong = post(f"{secure}/v1/predict", **image, headers={"Content-Type": "image/png", "Authorization": "Bearer nope"})
    basic = post(f"{secure}/v1/predict", **image, headers={"Content-Type": "image/png", "Authorization": f"Basic {TOKEN}"})
    good = post(f"{secure}/v1/predict", **image, headers={"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"})
    for response in (no_token, wrong, basic):
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in response.json()["error"]
    assert good.status_code == 200, good.text
    assert requests.get(f"{secure}/v1/model", timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{secure}/healthz", timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{endpoint}/v1/model", timeout=TIMEOUT).status_code == 200  # the open app

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"the token appears in {leaked}"


def test_gradcam_overlay(endpoint: str) -> None:
    response = post(f"{endpoint}/v1/predict?explain=gradcam", data=png(9), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["gradcam_png"])))
    assert overlay.format == "PNG" and overlay.size == (SIZE, SIZE) and body["gradcam_size"] == [SIZE, SIZE]
    assert 0.0 <= body["probability"] <= 1.0


def test_model_info(endpoint: str, model_uri: str) -> None:
    info = requests.get(f"{endpoint}/v1/model", timeout=TIMEOUT).json()
    artifact = load_artifact(model_uri)
    assert {k: info[k] for k in ("name", "version", "variant", "threshold", "image_size", "val_metrics")} == {
        "name": artifact.name, "version": artifact.version, "variant": "custom", "threshold": 0.5,
        "image_size": SIZE, "val_metrics": {"roc_auc": 0.5},
    }  # fmt: skip
    assert "config" not in info and info["serving"]["max_batch_size"] == 8


def test_multipart_parser() -> None:
    body = (b"--b0\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a b.png\"\r\nContent-Type: image/png\r\n\r\n"
            b"\x00\r\n--b0x\r\n--b0\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--b0--\r\n")  # fmt: skip
    uploads = parse_multipart(body, 'multipart/form-data; boundary="b0"')
    assert [(u.field, u.filename, u.data) for u in uploads] == [("files", "a b.png", b"\x00\r\n--b0x"), ("note", None, b"hi")]
    for bad, content_type in ((body[:-8], "multipart/form-data; boundary=b0"), (body, "multipart/form-data")):
        with pytest.raises(ApiError) as caught:
            parse_multipart(bad, content_type)
        assert caught.value.status == 400


def test_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PNEUMONET_T", raising=False)
    assert token_from_env("PNEUMONET_T") is None
    monkeypatch.setenv("PNEUMONET_T", " abc ")
    assert token_from_env("PNEUMONET_T") == "abc"
    monkeypatch.setenv("PNEUMONET_T", "  ")
    with pytest.raises(ConfigError, match="PNEUMONET_T is set but empty"):
        token_from_env("PNEUMONET_T")


def test_serve_config_file_is_valid_and_fills_batches() -> None:
    import k8s_validation as kv
    import yaml

    text = (REPO / "serve" / "config.yaml").read_text()
    assert not kv.serve_config_problems(text, "serve/config.yaml")
    (app,) = yaml.safe_load(text)["applications"]
    assert app["import_path"] == "serve.app:app_builder" and app["route_prefix"] == "/"
    (deployment,) = app["deployments"]
    assert deployment["name"] == "PneumonetModel"
    assert deployment["max_ongoing_requests"] >= load_config().serve.max_batch_size


def test_app_builder_checks_its_args(model_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from serve.app import app_builder

    with pytest.raises(ConfigError, match="model"):
        app_builder({})
    with pytest.raises(ConfigError, match="bad application args"):
        app_builder({"model": model_uri, "modle": "typo"})
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        app_builder({"model": model_uri, "overrides": ["serve.max_batch_size=0"]})
    assert app_builder({"model": model_uri, "overrides": ["serve.max_batch_size=4"]}) is not None
