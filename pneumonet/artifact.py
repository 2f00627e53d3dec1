"""The model artifact: the only thing scoring and serving know of training.

An artifact is a folder or ``s3://`` prefix with two files:

- ``model.keras``: the whole Keras model; it takes (N, S, S, 1) float32 pixels in [0, 255] and does its
  own normalisation, so nothing else is needed to score.
- ``pneumonet.json``: metadata (input contract, threshold, class names, metrics, config, versions).
- optionally ``drift_reference.npz``: what later inputs are compared with (:mod:`pneumonet.evaluation.drift`),
  described under ``drift_reference`` in ``pneumonet.json`` with its SHA-256; artifacts made before it
  existed have none and are scored without drift checks.

``pneumonet.json`` is written last and removed first when an artifact is overwritten, so a folder
whose upload was interrupted is never loadable. ``version`` is the first 12 hex digits of the
SHA-256 of ``model.keras`` and is checked on load, so a model swapped under its metadata is refused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import pneumonet
from pneumonet import storage
from pneumonet.artifact_meta import (  # noqa: F401  (re-exported: the artifact's file names and contract)
    CLASS_NAMES,
    DRIFT_FILE,
    DRIFT_KEY,
    FORMAT_VERSION,
    INPUT_CONTRACT,
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    SITE_KEY,
    check_artifact,
    operating_threshold,
    read_metadata,
)
from pneumonet.config import Config
from pneumonet.errors import ArtifactError, StorageError
from pneumonet.models.embedding import with_embedding
from pneumonet.models.layers import preprocess_module  # importing it also registers the layers load_model needs


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:12]


@dataclass
class Artifact:
    """A loaded artifact: the Keras model, its metadata and where it came from."""

    model: keras.Model
    meta: dict[str, Any]
    uri: str
    _forward: Any = field(init=False, repr=False)
    _forward_embedded: Any = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        size = self.image_size
        model = self.model

        # One traced graph for every batch size: no per-call overhead of model.predict, no retracing.
        @tf.function(input_signature=[tf.TensorSpec((None, size, size, 1), tf.uint8)])
        def forward(images: tf.Tensor) -> tf.Tensor:
            return tf.reshape(tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32), [-1])

        self._forward = forward

    @property
    def threshold(self) -> float:
        """The operating threshold: the site's when calibrated, else the validation one."""
        return operating_threshold(self.meta)[0]

    @property
    def threshold_source(self) -> str:
        return operating_threshold(self.meta)[1]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    def _batches(self, images: np.ndarray, batch_size: int) -> range:
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 1):
            raise ValueError(f"artifact {self.name} expects images of shape (N, {size}, {size}, 1), got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"artifact {self.name} expects uint8 images (from the shared decoder), got {images.dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return range(0, len(images), batch_size)

    def calibrated(self, raw: np.ndarray) -> np.ndarray:
        """The model's own probabilities as the artifact reports them (a site's Platt map applied, if any)."""
        platt = (self.meta.get(SITE_KEY) or {}).get("platt")
        return raw if platt is None else platt_scale(raw, platt["a"], platt["b"])

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """P(PNEUMONIA) for decoded images (N, S, S, 1) uint8, as a float32 array of shape (N,)."""
        images = np.asarray(images)
        parts = [self._forward(images[start : start + batch_size]).numpy() for start in self._batches(images, batch_size)]
        return self.calibrated(np.concatenate(parts) if parts else np.empty((0,), np.float32))

    def predict_with_embeddings(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """The model's raw P(PNEUMONIA) (N,) (no site map: the drift reference holds raw scores) and its
        penultimate-layer embeddings (N, D) float32, from one forward pass."""
        images = np.asarray(images)
        if self._forward_embedded is None:
            both = with_embedding(self.model)
            size = self.image_size

            @tf.function(input_signature=[tf.TensorSpec((None, size, size, 1), tf.uint8)])
            def forward(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                probs, embeddings = both(tf.cast(batch, tf.float32), training=False)
                return tf.reshape(tf.cast(probs, tf.float32), [-1]), tf.cast(embeddings, tf.float32)

            self._forward_embedded = forward
        parts = [self._forward_embedded(images[start : start + batch_size]) for start in self._batches(images, batch_size)]
        if not parts:
            return np.empty((0,), np.float32), np.empty((0, 0), np.float32)
        return np.concatenate([p.numpy() for p, _ in parts]), np.concatenate([e.numpy() for _, e in parts])


def platt_scale(probs: np.ndarray, a: float, b: float) -> np.ndarray:
    """``sigmoid(a * logit(p) + b)``: a site's recalibration of the model's probabilities (order kept when a > 0)."""
    clipped = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(clipped) - np.log1p(-clipped)
    return (1.0 / (1.0 + np.exp(-(a * logits + b)))).astype(np.float32)


def _absolute(uri: str) -> str:
    return str(uri) if storage.is_s3(str(uri)) else str(Path(uri).expanduser().absolute())


def elsewhere(source: Artifact, uri: str) -> str:
    """``uri`` made absolute; ArtifactError if it is ``source``'s own place (a derived artifact never replaces it)."""
    uri = _absolute(uri)
    if uri.rstrip("/") == _absolute(source.uri).rstrip("/"):
        raise ArtifactError(f"refusing to overwrite the source artifact {uri}: write the derived one elsewhere")
    return uri


def _write(uri: str, model_bytes: bytes, meta: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
    """``pneumonet.json`` removed first and written last, so an interrupted write is never loadable;
    ``files`` (name → bytes: the drift reference) are written before it too."""
    storage.delete(storage.join(uri, META_FILE))
    storage.write_bytes(storage.join(uri, MODEL_FILE), model_bytes)
    for name, data in (files or {}).items():
        storage.write_bytes(storage.join(uri, name), data)
    storage.write_text(storage.join(uri, META_FILE), json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_artifact(model: keras.Model, meta: dict[str, Any], uri: str, files: dict[str, bytes] | None = None) -> str:
    """Write ``model``, ``files`` and ``meta`` (plus ``version`` and, if absent, ``name``) to a folder or prefix.

    Returns the artifact URI (an absolute path when local).
    """
    uri = _absolute(uri)
    meta = dict(meta)
    with tempfile.TemporaryDirectory(prefix="pneumonet-artifact-") as tmp:
        model_path = Path(tmp) / MODEL_FILE
        model.save(model_path)
        meta["version"] = _digest(model_path)
        meta.setdefault("name", f"pneumonet-{meta.get('variant', model.name)}-{meta['version']}")
        _write(uri, model_path.read_bytes(), meta, files)
    return uri


def derive_artifact(artifact: Artifact, meta: dict[str, Any], uri: str, files: dict[str, bytes] | None = None) -> str:
    """A new artifact at ``uri`` with the very same ``model.keras`` bytes (so the same version) and ``meta``.

    Used by calibration and ``drift-reference``: the weights do not change, only what is known about
    them. A drift reference that ``meta`` keeps, and the training manifest, are copied along unless
    ``files`` replaces them. Returns the URI.
    """
    uri = elsewhere(artifact, uri)
    files = dict(files or {})
    if DRIFT_KEY in meta and DRIFT_FILE not in files:
        files[DRIFT_FILE] = storage.read_bytes(storage.join(artifact.uri, DRIFT_FILE))
    if MANIFEST_FILE not in files and storage.exists(manifest := storage.join(artifact.uri, MANIFEST_FILE)):
        files[MANIFEST_FILE] = storage.read_bytes(manifest)  # the lineage stays with the model
    _write(uri, storage.read_bytes(storage.join(artifact.uri, MODEL_FILE)), {**meta, "version": artifact.version}, files)
    return uri


def load_artifact(uri: str) -> Artifact:
    """Load and check an artifact; every defect is an :class:`ArtifactError` naming ``uri``."""
    uri = str(uri)
    meta = check_artifact(uri)
    try:
        with storage.local_path(storage.join(uri, MODEL_FILE)) as path:
            digest = _digest(path)
            if digest != meta["version"]:
                raise ArtifactError(
                    f"artifact {uri}: {MODEL_FILE} (sha256 {digest}…) does not match version {meta['version']} "
                    f"in {META_FILE}; the model was replaced or corrupted"
                )
            try:
                model = keras.saving.load_model(str(path), compile=False)
            except Exception as exc:  # Keras raises many types for a bad archive; all mean "unloadable".
                raise ArtifactError(
                    f"artifact {uri}: {MODEL_FILE} cannot be loaded ({type(exc).__name__}: {exc})"
                ) from exc
    except StorageError as exc:
        raise ArtifactError(f"artifact {uri} cannot be read: {exc}") from exc
    size = meta["image_size"]
    if tuple(model.input_shape) != (None, size, size, 1):
        raise ArtifactError(
            f"artifact {uri}: the model takes input {model.input_shape}, but {META_FILE} says image_size {size}"
        )
    return Artifact(model=model, meta=meta, uri=uri)


def _package_versions() -> dict[str, str]:
    versions = {
        "pneumonet": pneumonet.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        versions["ray"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


def build_metadata(
    *,
    variant: str,
    config: Config,
    threshold: float,
    val_metrics: dict[str, Any],
    manifest_digest: str | None,
    history: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``pneumonet.json`` content for a trained model (``version``/``name`` are added on save)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    model_cfg = config.model
    if variant == "custom":
        backbone = None
        preprocessing = "in-graph: Rescaling(1/255) of grayscale pixels"
    else:
        backbone = model_cfg.backbone
        preprocessing = (
            f"in-graph: GrayscaleToRGB, then keras.applications.{preprocess_module(backbone)}.preprocess_input "
            f"for {backbone}"
        )
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "backbone": backbone,
        "image_size": model_cfg.image_size,
        "input": dict(INPUT_CONTRACT),
        "preprocessing": preprocessing,
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "threshold": float(threshold),
        "threshold_policy": config.train.threshold.model_dump(mode="json"),
        "val_metrics": val_metrics,
        "manifest_digest": manifest_digest,
        "config": config.model_dump(mode="json"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "packages": _package_versions(),
        "history": history,
    }
    clashes = sorted(set(extra or {}) & set(meta))
    if clashes:
        raise ValueError(f"extra metadata may not replace standard keys: {', '.join(clashes)}")
    meta.update(extra or {})
    return meta
