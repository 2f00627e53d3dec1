"""Online scoring: the Ray Serve application behind the viewers (``serve.app:app_builder``).

One ingress deployment, ``PneumonetModel`` (FastAPI), per replica one model:

- ``POST /v1/predict``: one image, as the raw body (``image/jpeg``, ``image/png``, ``image/bmp``,
  ``image/tiff``, ``application/dicom``, ``application/octet-stream``) or as the multipart field
  ``file``; ``?explain=gradcam`` adds a Grad-CAM overlay (``gradcam_png``, base64 PNG) and the image as
  the model saw it (``input_png``, what the overlay is drawn on).
- ``POST /v1/predict/batch``: several images as multipart fields ``files``; one result per image,
  in order. An image that cannot be decoded gets ``{"filename", "error"}`` in its place and the
  others are still scored (200 overall); refusing the whole request is for request-level faults.
  ``error_kind`` names the cause with the codes of :mod:`pneumonet.errors` (``corrupt``,
  ``over_pixel_limit``, ``decode_timeout``, …), as batch scoring's ``error_kind`` column does.
  Each scored image has ``in_distribution`` (null without a drift reference) and, when false,
  ``ood_reason``: an image unlike the validation images is scored anyway, and said to be.
- ``GET /v1/drift``: the drift verdict of this replica's window of recent images (the last
  ``drift.window``) against the artifact's drift reference, with the window tests of
  :mod:`pneumonet.evaluation.drift`; ``"not checked"`` for an artifact without a reference. Every
  ``drift.check_every`` images the replica tests its window itself: when the verdict turns it logs a
  line and sets the metric ``pneumonet_drift`` (1 drift, 0 not) and counts ``pneumonet_drift_turns``.
- ``GET /v1/model``: the artifact's metadata, and under ``registry`` what the app's ``model`` argument
  was resolved to at start-up (``ref``, ``uri``, ``version`` = ``<variant>/<run-id>``, ``alias``,
  ``digest``): every replica loads that one folder. ``GET /healthz``: liveness, never authenticated.
- ``GET /``: the clinicians' page (:mod:`pneumonet.web`), with its files under ``/static/``; it holds
  no data and is not authenticated itself: it calls the API above, on the same origin, with the token.

Every refusal is a 4xx or a 503 with ``{"error": "..."}``: 400 malformed request or empty body, 401 bad or
missing bearer token (when the env var named by ``serve.auth_token_env`` is set), 413 body over
``serve.max_request_bytes`` (checked on Content-Length and while reading) or more images than
``serve.max_batch_images``, 408 not answered within ``serve.request_timeout_s`` (a body sent too
slowly, say; a request header cannot lift it), 415 unsupported content type, 422 not a decodable
image (corrupt, unknown format, over ``data.max_image_bytes``, ``data.max_image_pixels`` or
``data.max_decode_seconds``; ``error_kind`` says which; a multipart part's own ``application/dicom`` type selects the DICOM
decoder). Images are decoded in the request handler (in ``serve.decode_processes`` child
processes, :mod:`pneumonet.data.sandbox`), before batching, so only good images ever reach the model; concurrent requests are then scored
together (``@serve.batch``, ``serve.max_batch_size``/``serve.batch_wait_timeout_s``) and each
response says in ``batch_size`` how many images shared its model call.

Overload is refused fast, with 503 and ``Retry-After: serve.retry_after_s``, never by making every
caller wait. A replica refuses on arrival, before reading the body, a request whose images would
not start their model call within ``serve.queue_timeout_s`` given the images already waiting and
the recent speed of the model (:mod:`pneumonet.scoring.admission`); an image still waiting at that
deadline anyway leaves the batch queue and its request gets 503. A replica holds at most
``max_ongoing_requests`` requests; while every replica is full, each proxy queues at most
``max_queued_requests`` more (Serve's own backpressure: one over gets Serve's 503, plain text, at
once). Time in the proxy's queue is bounded by its length, not by the clock, so
``max_ongoing_requests`` is set high enough that the replica, not the proxy, does the queueing.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type in the
# signatures of the methods @serve.ingress re-wraps, not a string it cannot resolve.
import asyncio
import base64
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException

from pneumonet import web
from pneumonet.artifact_meta import operating_threshold
from pneumonet.config import Config, load_config
from pneumonet.data.images import load_image
from pneumonet.data.sandbox import DecoderPool
from pneumonet.errors import ConfigError, ImageDecodeError
from pneumonet.evaluation.drift import NO_REFERENCE, read_reference, window_tests
from pneumonet.registry import ResolvedModel, resolve_model
from pneumonet.scoring.admission import Admission
from pneumonet.scoring.predict import decide
from pneumonet.scoring.uploads import (
    MULTIPART,
    RAW_TYPES,
    ApiError,
    Upload,
    check_bearer,
    check_content_length,
    decoder_source,
    media_type,
    parse_multipart,
    read_limited,
    token_from_env,
)

log = logging.getLogger(__name__)

DEPLOYMENT = "PneumonetModel"
APP_NAME = "pneumonet"
# Requests a replica holds (decoding, waiting, in a model call). Serve needs at least max_batch_size
# of them to ever fill a batch, and more than the replica admits (what it scores within
# serve.queue_timeout_s, plus a batch), so that requests queue in the replica, which refuses on
# arrival what would wait too long, and not in the proxy, which only counts them.
MIN_ONGOING_REQUESTS = 64
# Requests a proxy holds while every replica is full (serve/config.yaml and the RayService set it
# per environment). Serve counts a request as queued also while it picks a replica for it, so a
# burst of simultaneous arrivals counts in full: with 16, 64 clients got Serve's 503 from a proxy
# whose replica had room (benchmarks/RESULTS-serve.md).
MAX_QUEUED_REQUESTS = 64
# `pneumonet serve` sets the proxy's request timeout this much above serve.request_timeout_s (the
# serve/config.yaml and RayService copies state theirs: 40 s; tests/k8s_validation.py checks them).
PROXY_TIMEOUT_MARGIN_S = 10.0
# A replica whose model call failed this many times in a row reports unhealthy and is replaced.
MAX_MODEL_FAILURES = 3
_ACCEPTED = ", ".join(sorted(RAW_TYPES)) + f" or {MULTIPART}"
_META_KEYS = ("name", "version", "variant", "backbone", "image_size", "threshold", "threshold_policy", "class_names",
              "positive_class", "val_metrics", "input", "preprocessing", "data_root", "manifest_digest", "created_at",
              "site_calibration")  # fmt: skip

api = FastAPI(title="Pneumonet", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


@api.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.error("request failed: %s: %s", type(exc).__name__, exc)
    return JSONResponse({"error": "internal error while scoring; see the server log"}, status_code=500)


@dataclass
class _Scored:
    """What the model call gives one image."""

    probability: float
    batch_size: int
    in_distribution: bool | None = None
    ood_reason: str | None = None


class DriftWindow:
    """A replica's bounded window of recent images (raw score, projected embedding, gate) and its verdict.

    Re-tested every ``check_every`` images; a turn of the verdict is logged and exported as metrics.
    """

    def __init__(self, reference: Any, config: Any, model: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.reference, self.config, self.model = reference, config, model
        self.items: deque[tuple[float, np.ndarray, bool]] = deque(maxlen=config.window)
        self.verdict = "insufficient data"
        self._since, self._checking = 0, False
        tags = {"model": model}
        self._gauge = Gauge("pneumonet_drift", "1 while the replica's window of recent images shows drift", tag_keys=("model",))
        self._gauge.set_default_tags(tags)
        self._turns = Counter("pneumonet_drift_turns", "times the drift verdict of a replica's window turned", tag_keys=("model",))
        self._turns.set_default_tags(tags)
        self._gauge.set(0)

    def add(self, raw: np.ndarray, embeddings: np.ndarray, images: np.ndarray | None) -> tuple[np.ndarray, list[str | None]]:
        """Gate the images of one model call and put them in the window; re-test it when it is time."""
        inside, reasons = self.reference.gate(embeddings, images)
        for item in zip(raw.tolist(), self.reference.project(embeddings), inside.tolist()):
            self.items.append(item)
        self._since += len(raw)
        if self._since >= self.config.check_every and not self._checking:
            self._since, self._checking = 0, True
            asyncio.get_running_loop().create_task(self._check())
        return inside, reasons

    def test(self) -> dict[str, Any]:
        """The window tests on a snapshot of the window (run in a thread: a permutation test takes a moment)."""
        items = list(self.items)
        scores = np.array([item[0] for item in items])
        projections = np.array([item[1] for item in items]).reshape(len(items), self.reference.components.shape[0])
        result = window_tests(self.reference, scores, projections, np.array([item[2] for item in items], bool), self.config)
        return {**result, "window": {"images": len(items), "capacity": self.config.window}}

    async def _check(self) -> None:
        try:
            result = await asyncio.to_thread(self.test)
        finally:
            self._checking = False
        if result["verdict"] != self.verdict:
            tests = ", ".join(f"{name} p={test['p_adjusted']:.3g}" for name, test in result["tests"].items())
            log.log(logging.WARNING if result["verdict"] == "drift" else logging.INFO,
                    "drift: the window of the last %d images of %s turned from %r to %r (%s; Holm-adjusted, alpha %g)",
                    result["n"], self.model, self.verdict, result["verdict"], tests or "no test", result["alpha"])  # fmt: skip
            self.verdict = result["verdict"]
            self._gauge.set(1 if self.verdict == "drift" else 0)
            self._turns.inc()


@dataclass
class _Ticket:
    """One image in the batch queue; ``started`` tells a caller out of time whether it may still leave."""

    image: np.ndarray
    started: bool = False


@serve.deployment(
    name=DEPLOYMENT, max_ongoing_requests=MIN_ONGOING_REQUESTS, max_queued_requests=MAX_QUEUED_REQUESTS,
    health_check_period_s=10,
)  # fmt: skip
@serve.ingress(api)
class PneumonetModel:
    """One replica: the artifact, loaded and warmed up before the replica reports ready."""

    def __init__(self, model: ResolvedModel, config: Config) -> None:
        # TensorFlow is imported here, in the replica, not where serve.app is imported (the head).
        from pneumonet.artifact import load_artifact

        self._serve = config.serve
        self._max_pixels = config.data.max_image_pixels
        self._max_bytes = config.data.max_image_bytes
        seconds = config.data.max_decode_seconds
        self._decoder = DecoderPool(self._serve.decode_processes, seconds) if seconds else None
        self._artifact = load_artifact(model.uri)
        self._size = self._artifact.image_size
        self._token = token_from_env(self._serve.auth_token_env)
        self._score.set_max_batch_size(self._serve.max_batch_size)
        self._score.set_batch_wait_timeout_s(self._serve.batch_wait_timeout_s)
        self._model_failures = 0
        self._admission = Admission(self._serve.queue_timeout_s, self._serve.max_batch_size)
        meta = self._artifact.meta
        self._info = {key: meta.get(key) for key in _META_KEYS}
        self._info["operating_threshold"], self._info["threshold_source"] = operating_threshold(meta)
        self._info["registry"] = model.describe()
        self._model = {"name": self._artifact.name, "version": self._artifact.version, "registry_version": model.version}
        reference = read_reference(model.uri, meta)
        self._drift = None if reference is None else DriftWindow(reference, config.drift, model.label)
        if reference is None:
            log.warning("%s: %s", model.uri, NO_REFERENCE)
        # Trace the graph and start the decoder processes now: the first real request must not pay
        # for them, and a model that cannot run fails the replica's start instead of its first request.
        self._forward(np.zeros((1, self._size, self._size, 1), np.uint8))
        if self._decoder:
            self._decoder.warm()
        log.info(
            "serving %s (%s), max batch %d, bearer-token auth %s",
            model.label, model.uri, self._serve.max_batch_size,
            f"on (${self._serve.auth_token_env})" if self._token else "off",
        )  # fmt: skip

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self._model_failures >= MAX_MODEL_FAILURES:
            raise RuntimeError(f"the model failed on {self._model_failures} batches in a row")

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """Probabilities, and with a drift reference the raw scores and embeddings of the same forward pass."""
        if self._drift is None:
            return self._artifact.predict_proba(images, len(images)), None
        raw, embeddings = self._artifact.predict_with_embeddings(images, len(images))
        return self._artifact.calibrated(raw), (raw, embeddings)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # replaced from serve.* in __init__
    async def _score(self, tickets: list[_Ticket]) -> list[_Scored]:
        """P(PNEUMONIA) for images from concurrent requests, scored in one model call."""
        for ticket in tickets:
            ticket.started = True
        self._admission.started(len(tickets))
        images = np.stack([ticket.image for ticket in tickets])
        start = time.perf_counter()
        try:
            probs, drift = await asyncio.to_thread(self._forward, images)
        except Exception:
            self._model_failures += 1
            raise
        self._admission.timed(len(tickets), time.perf_counter() - start)
        self._model_failures = 0
        if drift is None:
            return [_Scored(float(p), len(tickets)) for p in probs]
        inside, reasons = self._drift.add(*drift, images)
        return [_Scored(float(p), len(tickets), bool(ok), why) for p, ok, why in zip(probs, inside, reasons)]

    def _overloaded(self, why: str) -> ApiError:
        return ApiError(503, f"overloaded: {why} within {self._serve.queue_timeout_s} s (serve.queue_timeout_s); retry later",
                        {"Retry-After": str(self._serve.retry_after_s)})  # fmt: skip

    def _admit(self, images: int = 1) -> None:
        """Refuse now (503) what would wait past serve.queue_timeout_s for its model call."""
        if not self._admission.admits(images):
            raise self._overloaded(f"{self._admission.waiting} images wait for the model, more than it takes")

    def _authorize(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self._token)

    async def _body(self, request: Request, allowed: frozenset[str]) -> tuple[str, bytes]:
        """The request's media type and body, within the size limit."""
        content_type = media_type(request.headers.get("content-type"))
        if content_type not in allowed:
            shown = content_type or "none"
            raise ApiError(415, f"unsupported Content-Type {shown!r}; send {', '.join(sorted(allowed))}")
        limit = self._serve.max_request_bytes
        check_content_length(request.headers, limit)
        body = await read_limited(request.stream(), limit)
        if not body:
            raise ApiError(400, "empty request body; send an image")
        return content_type, body

    async def _decode(self, data: bytes, source: str) -> np.ndarray:
        if not data:
            raise ApiError(400, f"{source}: empty file", kind="empty")
        try:
            decode = self._decoder.load_image if self._decoder else load_image
            return await asyncio.to_thread(decode, data, source, self._size, self._max_pixels, self._max_bytes)
        except ImageDecodeError as exc:
            raise ApiError(422, str(exc), kind=exc.kind) from None
        except Exception as exc:  # a decoder bug on odd input is still the input's fault, not a 500
            log.exception("unexpected decoder error on %s", source)
            raise ApiError(422, f"{source}: cannot decode image ({type(exc).__name__})", kind="decoder_crash") from None

    async def _scored(self, image: np.ndarray, deadline: float) -> dict[str, Any]:
        """Score one image, or refuse it (503) if its model call has not started by ``deadline``."""
        ticket = _Ticket(image)
        self._admission.queued()
        scoring = asyncio.ensure_future(self._score(ticket))
        try:
            await asyncio.wait({scoring}, timeout=max(0.0, deadline - time.monotonic()))
            if not scoring.done() and not ticket.started:
                raise self._overloaded("this image did not get a model call")
            scored = await scoring
        finally:  # out of time, or the caller went away: leave the queue, so no batch scores it for nobody
            if not ticket.started:
                scoring.cancel()
                self._admission.left()
        result = {
            "probability": scored.probability,
            "prediction": decide(scored.probability, self._artifact.threshold),
            "batch_size": scored.batch_size,
            "in_distribution": scored.in_distribution,
        }
        if scored.ood_reason is not None:
            result["ood_reason"] = scored.ood_reason
        return result

    @contextlib.asynccontextmanager
    async def _answered_in_time(self) -> AsyncIterator[None]:
        """Bound a whole request by serve.request_timeout_s (a client cannot lift it, unlike the proxy's
        timeout, which Serve lets a request header change): 408 when it runs out."""
        try:
            async with asyncio.timeout(self._serve.request_timeout_s):
                yield
        except TimeoutError:
            raise ApiError(408, f"request not answered within {self._serve.request_timeout_s} s (serve.request_timeout_s): "
                                "its body came too slowly or the server was too busy; retry") from None  # fmt: skip

    def _envelope(self, started: float, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "threshold": self._artifact.threshold, "threshold_source": self._artifact.threshold_source,
                "model": self._model,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2)}  # fmt: skip

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/")
    async def page(self) -> Response:
        return self._static(web.PAGE)

    @api.get("/static/{name}")
    async def static(self, name: str) -> Response:
        return self._static(name)

    def _static(self, name: str) -> Response:
        found = web.asset(name)
        if found is None:
            raise ApiError(404, f"no such file {name[:80]!r}")
        content, media = found
        return Response(content, media_type=media, headers=web.HEADERS)

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        limits = {key: getattr(self._serve, key) for key in ("max_batch_size", "batch_wait_timeout_s", "max_request_bytes",
                                                              "max_batch_images", "queue_timeout_s", "retry_after_s",
                                                              "request_timeout_s")}  # fmt: skip
        return {**self._info, "serving": limits}

    @api.get("/v1/drift")
    async def drift(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        if self._drift is None:
            return {"verdict": "not checked", "reason": NO_REFERENCE, "model": self._model}
        return {**(await asyncio.to_thread(self._drift.test)), "model": self._model}

    @api.post("/v1/predict")
    async def predict(self, request: Request, explain: str | None = None) -> dict[str, Any]:
        async with self._answered_in_time():
            return await self._predict(request, explain)

    @api.post("/v1/predict/batch")
    async def predict_batch(self, request: Request) -> dict[str, Any]:
        async with self._answered_in_time():
            return await self._predict_batch(request)

    async def _predict(self, request: Request, explain: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        deadline = time.monotonic() + self._serve.queue_timeout_s
        self._authorize(request)
        self._admit()
        if explain not in (None, "gradcam"):
            raise ApiError(400, f"unknown explain={explain!r}; the only explanation is 'gradcam'")
        content_type, body = await self._body(request, RAW_TYPES | {MULTIPART})
        if content_type == MULTIPART:
            files = [u for u in parse_multipart(body, request.headers["content-type"]) if u.field == "file"]
            if len(files) != 1:
                raise ApiError(400, f"send exactly one multipart field 'file' (got {len(files)})")
            upload = files[0]
        else:
            upload = Upload("body", None, body, content_type)
        image = await self._decode(upload.data, decoder_source(upload.filename, upload.content_type))
        result = await self._scored(image, deadline)
        if explain == "gradcam":
            from pneumonet.explain.gradcam import gradcam, image_png, overlay_png

            heatmap = await asyncio.to_thread(gradcam, self._artifact.model, image)
            png = await asyncio.to_thread(overlay_png, image, heatmap)
            result["gradcam_png"] = base64.b64encode(png).decode("ascii")
            result["gradcam_size"] = list(heatmap.shape)
            result["input_png"] = base64.b64encode(image_png(image)).decode("ascii")
        return self._envelope(started, result)

    async def _predict_batch(self, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        deadline = time.monotonic() + self._serve.queue_timeout_s
        self._authorize(request)
        _, body = await self._body(request, frozenset({MULTIPART}))
        files = [u for u in parse_multipart(body, request.headers["content-type"]) if u.field == "files"]
        if not files:
            raise ApiError(400, "no multipart fields 'files' in the request")
        if len(files) > self._serve.max_batch_images:
            raise ApiError(413, f"{len(files)} images is over the limit of {self._serve.max_batch_images} "
                                "per request (serve.max_batch_images)")  # fmt: skip
        self._admit(len(files))

        async def one(index: int, upload: Upload) -> dict[str, Any]:
            name = upload.filename or f"files[{index}]"
            try:
                image = await self._decode(upload.data, decoder_source(name, upload.content_type))
            except ApiError as exc:
                return {"filename": name, **exc.body()}
            return {"filename": name, **(await self._scored(image, deadline))}

        results = await asyncio.gather(*(one(i, upload) for i, upload in enumerate(files)))
        return self._envelope(started, {"results": list(results)})


class AppArgs(BaseModel):
    """The ``args`` of the application (serve config file, RayService serveConfigV2)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    config: str | None = None
    overrides: list[str] = []


def build_app(model: str | ResolvedModel, config: Config, **options: Any) -> Application:
    """The application for one model, resolved here once (an alias or ``latest`` pointer becomes its
    version folder, which every replica loads); ``options`` (tests, benchmarks) and Serve config files may
    still override the deployment options. Serve's own 503 (a full proxy queue) carries the same
    Retry-After as the replica's."""
    if isinstance(model, str):
        model = resolve_model(model)
    defaults = {
        "max_ongoing_requests": max(MIN_ONGOING_REQUESTS, 2 * config.serve.max_batch_size),
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=config.serve.retry_after_s),
    }
    return PneumonetModel.options(**{**defaults, **options}).bind(model, config)


def app_builder(args: dict[str, Any]) -> Application:
    """``serve.app:app_builder``: ``args`` = ``{model: URI, config: FILE?, overrides: [key=value, ...]?}``."""
    try:
        parsed = AppArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(f"bad application args {sorted(args or {})}: {exc.errors()[0]['msg']} "
                          f"at {'.'.join(map(str, exc.errors()[0]['loc']))}") from None  # fmt: skip
    config = load_config(parsed.config, parsed.overrides)
    # Serve builds the app on the head, then starts replicas that load the model: a bad URI must fail
    # the deploy here (resolve_model checks the artifact), not become replicas that crash and restart forever.
    return build_app(resolve_model(parsed.model), config)


def serve_locally(model_uri: str, config: Config, host: str | None = None, port: int | None = None) -> None:
    """``pneumonet serve``: a local Ray with the application on host:port, until Ctrl-C."""
    from pneumonet.scoring.cluster import init_ray, set_serve_env

    model = resolve_model(model_uri)  # a wrong path fails here, not as a replica that never starts
    host = host or config.serve.host
    port = port or config.serve.port
    set_serve_env()  # the local Ray's processes inherit it
    init_ray()
    # The proxy's own timeout is the backstop behind the replica's (which answers first, with its reason).
    proxy_timeout = config.serve.request_timeout_s + PROXY_TIMEOUT_MARGIN_S
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": proxy_timeout})
    try:
        serve.run(build_app(model, config), name=APP_NAME, route_prefix="/")
        log.info("Pneumonet endpoint on http://%s:%d (the page at /, POST /v1/predict); Ctrl-C stops it", host, port)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
