"""The online endpoint on Ray Serve: scoring, dynamic batching, every bad request, auth, Grad-CAM,
overload (503 + Retry-After), per-image answers under concurrency and a replica killed mid-flight.

One local Ray (2 CPUs) and one Serve instance on 127.0.0.1 for the module, with applications of
the same model: "open" at / (no token), "secure" at /secure (bearer token from an env var that is
set before Ray starts, so the replicas inherit it), and three with their own limits (see APPS).
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from hostile import many_scans_jpeg
from PIL import Image

from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.config import load_config
from pneumonet.data.images import load_image
from pneumonet.errors import ArtifactError, ConfigError, ImageDecodeError
from pneumonet.scoring.cluster import SERVE_ENV
from pneumonet.scoring.uploads import ApiError, decoder_source, parse_multipart, token_from_env

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
MODEL_OVERRIDES = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8"]
SERVE_OVERRIDES = ["serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.1", "serve.max_request_bytes=100000",
                   "serve.max_batch_images=4"]  # fmt: skip
TOKEN_ENV = "PNEUMONET_TEST_SERVE_TOKEN"
TOKEN = "t0ken-that-must-never-be-logged-5f3a9c"
TIMEOUT = 60
# Replicas share the module's 2 CPUs; the request paths (not the CPU count) are what is tested.
REPLICA = {"ray_actor_options": {"num_cpus": 0.1}}
# route prefix -> (serve overrides, deployment options)
APPS = {
    # A lone request waits 2 s for its batch to fill, far past queue_timeout_s: refused with 503.
    "hurried": (["serve.batch_wait_timeout_s=2.0", "serve.queue_timeout_s=0.3", "serve.retry_after_s=2"], {}),
    # One request in the replica, one queued at the proxy: the third is Serve's 503 at once.
    "narrow": (["serve.batch_wait_timeout_s=1.0", "serve.queue_timeout_s=10"],
               {"max_ongoing_requests": 1, "max_queued_requests": 1}),
    # Killed while requests are in flight.
    "restart": (["serve.batch_wait_timeout_s=0.2", "serve.queue_timeout_s=10"], {}),
    # Short time limits, and room for a hostile file of a few hundred KB.
    "strict": (["data.max_decode_seconds=3", "serve.request_timeout_s=8", "serve.max_request_bytes=2000000",
                "serve.queue_timeout_s=5"], {}),
}  # fmt: skip


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


def synthetic_chests(folder: Path, seed: int) -> list[bytes]:
    """JPEGs of synthetic chest X-rays (the kind the drift reference below holds)."""
    from pneumonet.data.synthetic import synthesize_dataset

    return [path.read_bytes() for path in sorted(synthesize_dataset(folder, n=160, size=48, seed=seed).rglob("*.jpeg"))]


@pytest.fixture(scope="module")
def drift_model_uri(model_uri: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The module's model with a drift reference of ~200 synthetic chest images."""
    from pneumonet.artifact import DRIFT_KEY, derive_artifact
    from pneumonet.evaluation.drift import build_reference, reference_files

    artifact = load_artifact(model_uri)
    images = np.stack([load_image(data, "x.jpeg", SIZE) for data in synthetic_chests(tmp_path_factory.mktemp("ref"), 31)])
    raw, embeddings = artifact.predict_with_embeddings(images)
    ref, record = build_reference(raw, embeddings, np.arange(len(images)), load_config().drift, images=images)
    record, files = reference_files(ref, record)
    return derive_artifact(artifact, {**artifact.meta, DRIFT_KEY: record}, str(tmp_path_factory.mktemp("m") / "drift"), files)


@pytest.fixture(scope="module")
def endpoint(model_uri: str, drift_model_uri: str) -> Iterator[str]:
    """Base URL of the Serve proxy; apps "open" at / and "secure" at /secure, "drift" (with a drift
    reference) at /drift."""
    import ray
    from ray import serve

    from pneumonet.scoring.online import build_app

    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)
    for key, value in SERVE_ENV.items():  # as `pneumonet serve` and the RayService set them
        mp.setenv(key, value)
    mp.delenv("PNEUMONET_API_TOKEN", raising=False)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = [*MODEL_OVERRIDES, *SERVE_OVERRIDES]
        serve.run(build_app(model_uri, load_config(None, base), **REPLICA), name="open", route_prefix="/")
        secure = load_config(None, [*base, f"serve.auth_token_env={TOKEN_ENV}"])
        serve.run(build_app(model_uri, secure, **REPLICA), name="secure", route_prefix="/secure")
        drift = load_config(None, [*base, "drift.window=40", "drift.check_every=10", "drift.min_images=20"])
        serve.run(build_app(drift_model_uri, drift, **REPLICA), name="drift", route_prefix="/drift")
        for name, (overrides, options) in APPS.items():
            app = build_app(model_uri, load_config(None, [*base, *overrides]), **REPLICA, **options)
            serve.run(app, name=name, route_prefix=f"/{name}")
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
    # registry_version: the <variant>/<run-id> the app resolved at start-up; none for a folder outside a registry.
    assert body["threshold"] == 0.5 and body["model"] == {"name": artifact.name, "version": artifact.version, "registry_version": None}
    assert body["threshold_source"] == "validation"  # not calibrated to a site
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
    assert results[1]["error_kind"] == "corrupt"  # the codes of batch scoring's error_kind column
    assert "error_kind" not in results[0]
    for result, seed in ((results[0], 2), (results[2], 4)):
        assert result["probability"] == pytest.approx(expected_probability(model_uri, png(seed)), abs=1e-5)


def test_batch_part_declared_application_dicom_is_read_as_dicom(endpoint: str, model_uri: str) -> None:
    data = patient_first_dicom()
    files = [("files", ("scan", data, "application/dicom")), ("files", ("same", data, "application/octet-stream"))]
    results = post(f"{endpoint}/v1/predict/batch", files=files).json()["results"]
    expected = float(load_artifact(model_uri).predict_proba(load_image(data, "x.dcm", SIZE)[None])[0])
    assert results[0]["filename"] == "scan" and results[0]["probability"] == pytest.approx(expected, abs=1e-5)
    assert "not a recognised image format" in results[1]["error"] and results[1]["error_kind"] == "unknown_format"


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
    kinds = {name: cases[name][0].json().get("error_kind") for name in ("empty body", "corrupt image", "not an image", "bomb", "text/plain")}
    assert kinds == {"empty body": None, "corrupt image": "corrupt", "not an image": "unknown_format",
                     "bomb": "over_pixel_limit", "text/plain": None}, kinds  # a request fault has no image kind
    assert "100000 bytes" in cases["streamed too big"][0].json()["error"]

    assert requests.get(f"{endpoint}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    assert post(predict, data=png(7), headers={"Content-Type": "image/png"}).status_code == 200
    deployment = serve.status().applications["open"].deployments["PneumonetModel"]
    assert deployment.status == "HEALTHY" and deployment.replica_states == {"RUNNING": 1}


def test_a_file_that_decodes_for_minutes_is_refused_at_data_max_decode_seconds(endpoint: str) -> None:
    slow = many_scans_jpeg()  # minutes in-process; stopped after 3 s in the replica's decoder process
    one = post(f"{endpoint}/strict/v1/predict", data=slow, headers={"Content-Type": "image/jpeg"})
    assert one.status_code == 422, one.text
    assert one.json() == {"error": "upload: decoding took longer than 3 s (data.max_decode_seconds); stopped",
                          "error_kind": "decode_timeout"}
    files = [("files", ("a.png", png(2), "image/png")), ("files", ("scans.jpeg", slow, "image/jpeg")),
             ("files", ("c.png", png(4), "image/png"))]  # fmt: skip
    batch = post(f"{endpoint}/strict/v1/predict/batch", files=files)
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert "probability" in results[0] and "probability" in results[2]
    assert results[1] == {"filename": "scans.jpeg", "error": "scans.jpeg: decoding took longer than 3 s (data.max_decode_seconds); stopped",
                          "error_kind": "decode_timeout"}


def test_fuzzed_multipart_bodies_over_http_end_as_4xx_or_one_answer_per_image_never_5xx(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fuzz"))
    import harness

    tally = harness.run_endpoint(f"{endpoint}/strict/v1/predict/batch", cases=150, seed=20261204, budget_s=60, max_seconds=TIMEOUT)
    assert not tally.failures, "\n".join(tally.failures[:10])
    assert tally.cases >= 2 * len(harness.make_seeds())  # each seed posted, even on a loaded machine
    outcomes = {outcome for counts in tally.outcomes.values() for outcome in counts}
    assert "400" in outcomes and any(o.startswith("200:") for o in outcomes), outcomes  # broken bodies and parsed ones
    assert post(f"{endpoint}/strict/v1/predict", data=png(7), headers={"Content-Type": "image/png"}).status_code == 200


def raw_exchange(endpoint: str, request: bytes) -> bytes:
    """Send ``request`` as is, never finish it, and read what comes back until the server closes
    the connection or a complete JSON body has arrived (at most TIMEOUT seconds)."""
    host, port = endpoint.removeprefix("http://").split(":")
    reply = b""
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        while not reply.rstrip().endswith(b"}"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            reply += chunk
    return reply


def test_a_request_whose_body_never_arrives_gets_408_at_serve_request_timeout_s(endpoint: str) -> None:
    # Serve lets a client lift the proxy's timeout with x-request-timeout-seconds: 0; the replica's holds.
    for extra in (b"", b"x-request-timeout-seconds: 0\r\n"):
        head = (b"POST /strict/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: 50000\r\n" + extra + b"\r\n")  # fmt: skip
        started = time.monotonic()
        reply = raw_exchange(endpoint, head + png(1)[:100])
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:300]
        assert b"not answered within 8.0 s (serve.request_timeout_s)" in reply, reply[-300:]
        assert time.monotonic() - started < TIMEOUT


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
    seen = Image.open(io.BytesIO(base64.b64decode(body["input_png"])))  # what the overlay is drawn on
    assert seen.mode == "L" and np.array_equal(np.asarray(seen), load_image(png(9), "x.png", SIZE)[..., 0])


def test_model_info(endpoint: str, model_uri: str) -> None:
    info = requests.get(f"{endpoint}/v1/model", timeout=TIMEOUT).json()
    artifact = load_artifact(model_uri)
    assert {k: info[k] for k in ("name", "version", "variant", "threshold", "image_size", "val_metrics")} == {
        "name": artifact.name, "version": artifact.version, "variant": "custom", "threshold": 0.5,
        "image_size": SIZE, "val_metrics": {"roc_auc": 0.5},
    }  # fmt: skip
    assert "config" not in info and info["serving"]["max_batch_size"] == 8
    assert (info["operating_threshold"], info["threshold_source"], info["site_calibration"]) == (0.5, "validation", None)
    assert info["threshold_policy"] == load_config().train.threshold.model_dump(mode="json")  # for the page's model card


def test_the_page_and_its_files_are_served_unauthenticated_under_a_same_origin_policy(endpoint: str) -> None:
    page = requests.get(f"{endpoint}/secure/", timeout=TIMEOUT)  # the page holds no data: no token needed
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "form-action 'none'" in policy
    assert '<script src="static/app.js"' in page.text and 'href="static/app.css"' in page.text
    for name, media in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = requests.get(f"{endpoint}/secure/static/{name}", timeout=TIMEOUT)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media), name
        assert asset.headers["x-content-type-options"] == "nosniff"
    moved = requests.get(f"{endpoint}/secure", timeout=TIMEOUT, allow_redirects=False)  # relative URLs need the slash
    assert moved.is_redirect and moved.headers["location"].endswith("/secure/"), (moved.status_code, moved.headers)
    for name in ("nothing.js", "..%2Fpneumonet.json", "%2E%2E%2F__init__.py"):
        missing = requests.get(f"{endpoint}/static/{name}", timeout=TIMEOUT)
        assert missing.status_code == 404 and "error" in missing.json(), name


def test_the_page_fetches_nothing_from_elsewhere() -> None:
    """Hospital networks are air-gapped: every URL in the shipped files is relative, data: or a fragment."""
    import re
    from importlib.resources import files

    from pneumonet import web

    for name in web.ASSETS:
        text = files("pneumonet.web").joinpath("static", name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9]", text, re.IGNORECASE), name
        assert "localStorage" not in text and "sessionStorage" not in text and "document.cookie" not in text, name
        for url in re.findall(r'(?:src|href)="([^"]*)"', text):
            assert url.startswith(("static/", "data:", "#")), (name, url)


def test_an_alias_is_resolved_once_at_start_up_and_reported(endpoint: str, model_uri: str, tmp_path: Path) -> None:
    from ray import serve

    from pneumonet.registry import Registry
    from pneumonet.scoring.online import build_app

    store = tmp_path / "store"
    for run_id in ("run-1", "run-2"):
        shutil.copytree(model_uri, store / "models" / "custom" / run_id)
    registry = Registry(str(store))
    registry.promote("custom/run-1", "production")
    alias = str(store / "models" / "aliases" / "production")
    serve.run(build_app(alias, load_config(None, [*MODEL_OVERRIDES, *SERVE_OVERRIDES]), **REPLICA), name="alias", route_prefix="/alias")
    try:
        registry.promote("custom/run-2", "production")  # moves the alias, not what the running app loaded
        info = requests.get(f"{endpoint}/alias/v1/model", timeout=TIMEOUT).json()
        digest = load_artifact(model_uri).version
        assert info["registry"] == {"ref": alias, "uri": str(store / "models" / "custom" / "run-1"), "version": "custom/run-1",
                                    "alias": "production", "digest": digest, "label": f"custom/run-1:{digest}"}  # fmt: skip
        body = post(f"{endpoint}/alias/v1/predict", data=png(3), headers={"Content-Type": "image/png"}).json()
        assert body["model"] == {"name": info["name"], "version": digest, "registry_version": "custom/run-1"}
    finally:
        serve.delete("alias")


def test_each_image_is_gated_and_the_window_of_recent_images_has_a_verdict(endpoint: str, drift_model_uri: str, tmp_path: Path) -> None:
    from pneumonet.evaluation.drift import read_reference

    # Without a reference: answered, unchecked, and said so.
    assert post(f"{endpoint}/v1/predict", data=png(1), headers={"Content-Type": "image/png"}).json()["in_distribution"] is None
    assert requests.get(f"{endpoint}/v1/drift", timeout=TIMEOUT).json()["verdict"] == "not checked"

    url = f"{endpoint}/drift"
    assert requests.get(f"{url}/v1/drift", timeout=TIMEOUT).json()["verdict"] == "insufficient data"
    ref = read_reference(drift_model_uri, load_artifact(drift_model_uri).meta)
    artifact = load_artifact(drift_model_uri)

    def batch(images: list[bytes]) -> list[dict]:
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        response = post(f"{url}/v1/predict/batch", files=files)
        assert "results" in response.json(), (response.status_code, response.text)
        return response.json()["results"]

    chests = synthetic_chests(tmp_path, 32)[:40]
    results = [r for start in range(0, 40, 4) for r in batch(chests[start : start + 4])]
    images = np.stack([load_image(d, "x.jpeg", SIZE) for d in chests])
    _, embeddings = artifact.predict_with_embeddings(images)
    assert [r["in_distribution"] for r in results] == ref.gate(embeddings, images)[0].tolist()
    assert all(("ood_reason" in r) == (not r["in_distribution"]) for r in results)
    calm = requests.get(f"{url}/v1/drift", timeout=TIMEOUT).json()
    assert calm["verdict"] == "no drift" and calm["window"] == {"images": 40, "capacity": 40}, calm

    noise = [r for seed in range(40) for r in batch([png(100 + seed)])]  # the window now holds noise only
    assert sum(not r["in_distribution"] for r in noise) >= 36 and "beyond" in noise[0]["ood_reason"]
    alarm = requests.get(f"{url}/v1/drift", timeout=TIMEOUT).json()
    assert alarm["verdict"] == "drift" and alarm["window"]["images"] == 40, alarm
    assert alarm["tests"]["ood_share"]["p_adjusted"] <= alarm["alpha"]


def test_multipart_parser() -> None:
    body = (b"--b0\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a b.png\"\r\nContent-Type: image/png\r\n\r\n"
            b"\x00\r\n--b0x\r\n--b0\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--b0--\r\n")  # fmt: skip
    uploads = parse_multipart(body, 'multipart/form-data; boundary="b0"')
    assert [(u.field, u.filename, u.data) for u in uploads] == [("files", "a b.png", b"\x00\r\n--b0x"), ("note", None, b"hi")]
    for bad, content_type in ((body[:-8], "multipart/form-data; boundary=b0"), (body, "multipart/form-data")):
        with pytest.raises(ApiError) as caught:
            parse_multipart(bad, content_type)
        assert caught.value.status == 400


def patient_first_dicom() -> bytes:
    """A DICOM data set the decoder cannot recognise by content (no preamble, no file meta, first
    element (0010,0010)): only the client's ``application/dicom`` says what it is."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.PatientName = "Anonymous"
    ds.set_pixel_data(np.tile(np.arange(0, 4000, 125, dtype=np.uint16), (32, 1)), "MONOCHROME2", bits_stored=12)
    del ds.SOPInstanceUID  # set_pixel_data adds one, in group 0008
    ds.file_meta = FileMetaDataset()
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def test_each_parts_own_content_type_reaches_the_decoder() -> None:
    body = (b"--b0\r\nContent-Disposition: form-data; name=\"files\"; filename=\"scan\"\r\n"
            b"Content-Type: Application/DICOM; x=1\r\n\r\nD\r\n"
            b"--b0\r\nContent-Disposition: form-data; name=\"files\"\r\n\r\nP\r\n--b0--\r\n")  # fmt: skip
    uploads = parse_multipart(body, "multipart/form-data; boundary=b0")
    assert [(u.filename, u.content_type) for u in uploads] == [("scan", "application/dicom"), (None, "")]
    assert decoder_source("scan", "application/dicom") == "scan.dcm"
    assert decoder_source("dir/x.DCM", "application/dicom") == "x.DCM"
    assert decoder_source(None, "application/dicom") == "upload.dcm"
    assert decoder_source("scan", "image/png") == "scan" and decoder_source(None, "") == "upload"
    data = patient_first_dicom()
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        load_image(data, "scan", SIZE)
    assert load_image(data, decoder_source("scan", "application/dicom"), SIZE).shape == (SIZE, SIZE, 1)


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
    assert not kv.overload_problems(deployment, load_config().serve.max_batch_size, "serve/config.yaml")
    assert not kv.request_timeout_problems(yaml.safe_load(text), load_config().serve.request_timeout_s, "serve/config.yaml")


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


def test_app_builder_refuses_a_bad_model_before_any_replica_starts(model_uri: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.syspath_prepend(str(REPO))
    from serve.app import app_builder

    with pytest.raises(ArtifactError, match=r"does not exist \(no such folder or prefix\)"):
        app_builder({"model": str(tmp_path / "typo")})
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "pneumonet.json").write_bytes((Path(model_uri) / "pneumonet.json").read_bytes())
    with pytest.raises(ArtifactError, match=r"is incomplete: model\.keras is missing"):
        app_builder({"model": str(incomplete)})
    (incomplete / "pneumonet.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"pneumonet\.json is not valid JSON"):
        app_builder({"model": str(incomplete)})


def distinct_images(count: int) -> list[bytes]:
    """PNGs of different brightness, so that the model scores them apart."""
    images = []
    for i in range(count):
        pixels = np.random.default_rng(100 + i).integers(0, 64, (40, 40)) + int(i * 190 / count)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def expected_probabilities(model_uri: str, images: list[bytes]) -> np.ndarray:
    decoded = np.stack([load_image(data, "x.png", SIZE) for data in images])
    return load_artifact(model_uri).predict_proba(decoded)


def test_each_response_carries_the_score_of_its_own_image_under_concurrent_load(endpoint: str, model_uri: str) -> None:
    images = distinct_images(32)
    expected = expected_probabilities(model_uri, images)
    gaps = np.diff(np.sort(expected))
    assert gaps.min() > 1e-4, "the test images must score apart, or a mix-up would go unseen"

    def one(index: int) -> tuple[int, requests.Response]:
        return index, post(f"{endpoint}/v1/predict", data=images[index], headers={"Content-Type": "image/png"})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, [i % 32 for i in range(64)]))
    assert all(r.status_code == 200 for _, r in answers), [r.text for _, r in answers if r.status_code != 200]
    got = np.array([r.json()["probability"] for _, r in answers])
    want = expected[[i for i, _ in answers]]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert max(r.json()["batch_size"] for _, r in answers) > 1  # images really shared model calls


def test_a_request_that_cannot_start_in_time_gets_503_with_retry_after(endpoint: str) -> None:
    start = time.perf_counter()
    response = post(f"{endpoint}/hurried/v1/predict", data=png(10), headers={"Content-Type": "image/png"})
    elapsed = time.perf_counter() - start
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "2"
    assert "serve.queue_timeout_s" in response.json()["error"]
    assert elapsed < 1.5, f"refused after {elapsed:.2f} s; the batch wait is 2 s and queue_timeout_s 0.3 s"


def test_a_full_queue_gets_serves_503_with_retry_after_at_once(endpoint: str, model_uri: str) -> None:
    url = f"{endpoint}/narrow/v1/predict"

    def one(seed: int) -> tuple[float, requests.Response]:
        start = time.perf_counter()
        response = post(url, data=png(seed), headers={"Content-Type": "image/png"})
        return time.perf_counter() - start, response

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(20, 24)))
    refused = [(t, r) for t, r in answers if r.status_code == 503]
    accepted = [(t, r) for t, r in answers if r.status_code == 200]
    assert len(accepted) + len(refused) == 4, [r.status_code for _, r in answers]
    assert refused and accepted, [r.status_code for _, r in answers]
    for elapsed, response in refused:
        assert response.headers["Retry-After"] == "1"  # serve.retry_after_s, through backpressure_config
        assert elapsed < 0.9, f"Serve's 503 took {elapsed:.2f} s; it must not wait for the 1 s batch"
    for _, response in accepted:
        seed = 20 + [r for _, r in answers].index(response)
        assert response.json()["probability"] == pytest.approx(expected_probability(model_uri, png(seed)), abs=1e-5)


def serve_replica(app: str):
    import ray

    prefix = f"SERVE_REPLICA::{app}#"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return ray.get_actor(name, namespace="serve")


def test_a_replica_killed_mid_flight_leaves_no_caller_hanging_or_misinformed(endpoint: str, model_uri: str) -> None:
    import ray
    from ray import serve

    url = f"{endpoint}/restart/v1/predict"
    images = distinct_images(12)
    expected = expected_probabilities(model_uri, images)

    def one(index: int) -> tuple[int, float, requests.Response]:
        start = time.perf_counter()
        response = post(url, data=images[index], headers={"Content-Type": "image/png"})
        return index, time.perf_counter() - start, response

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        time.sleep(0.1)  # the requests are in the replica's batch queue (batch wait 0.2 s)
        ray.kill(serve_replica("restart"), no_restart=True)
        answers = [f.result(timeout=TIMEOUT + 5) for f in futures]
    statuses = sorted(r.status_code for _, _, r in answers)
    print("statuses while killed:", statuses)
    assert set(statuses) <= {200, 503}, [r.text for _, _, r in answers if r.status_code not in (200, 503)]
    for index, _, response in answers:
        if response.status_code == 200:
            assert response.json()["probability"] == pytest.approx(float(expected[index]), abs=1e-5)
    deadline = time.monotonic() + 90  # Serve starts a new replica
    while serve.status().applications["restart"].deployments["PneumonetModel"].status != "HEALTHY":
        assert time.monotonic() < deadline, "no new replica within 90 s"
        time.sleep(1)
    assert post(url, data=images[0], headers={"Content-Type": "image/png"}).status_code == 200


def test_proxy_middleware_answers_only_requests_nobody_answered() -> None:
    import asyncio

    from pneumonet.scoring.proxy import AnswerUnanswered

    async def silent(scope, receive, send) -> None:  # the proxy when the replica died
        return None

    async def crashing(scope, receive, send) -> None:
        raise RuntimeError("replica died")

    async def answering(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(app) -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(AnswerUnanswered(app)({"type": "http", "method": "POST", "path": "/v1/predict"}, None, send))
        return sent

    for app in (silent, crashing):
        start, body = run(app)
        assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
        assert "retry" in body["body"].decode()
    assert [m.get("status") for m in run(answering)] == [200, None]


def test_admission_refuses_on_arrival_what_would_wait_past_the_queue_timeout() -> None:
    from pneumonet.scoring.admission import Admission

    admission = Admission(queue_timeout_s=0.5, max_batch_size=16)
    assert admission.admits(1000)  # no model call timed yet: nothing to judge by
    admission.timed(16, 0.32)  # 20 ms per image
    assert admission.expected_wait(16) == 0  # one batch, nothing ahead
    assert admission.expected_wait(32) == pytest.approx(0.32) and admission.admits(32)  # its second batch
    admission.queued(25)
    assert admission.expected_wait(1) == pytest.approx(0.5) and admission.admits(1)
    admission.queued(1)  # the 27th image would start after 0.52 s
    assert not admission.admits(1)
    admission.started(16)
    assert admission.admits(1) and admission.waiting == 10
    admission.left(100)
    assert admission.waiting == 0
    admission.timed(16, 0.96)  # a slower call moves the average, not all the way
    assert admission.seconds_per_image == pytest.approx(0.02 + 0.2 * (0.06 - 0.02))
