"""An artifact's ``pneumonet.json``, read and checked without TensorFlow.

The processes that only coordinate (the batch-scoring driver and the Serve app builder, both on the
Ray head pod) need the metadata, not the model; importing :mod:`pneumonet.artifact` would load
TensorFlow (~0.7 GB) into them for a JSON file. :func:`pneumonet.artifact.load_artifact` uses the
same reader and then checks the model itself.
"""

from __future__ import annotations

import json
from typing import Any

import pneumonet
from pneumonet import storage
from pneumonet.errors import ArtifactError, StorageError

MODEL_FILE = "model.keras"
META_FILE = "pneumonet.json"
FORMAT_VERSION = 1
CLASS_NAMES = ["NORMAL", "PNEUMONIA"]
REQUIRED_KEYS = ("format_version", "variant", "image_size", "threshold", "class_names", "version", "name")
SITE_KEY = "site_calibration"
# The drift reference (pneumonet.evaluation.drift): a file beside the model, described under this key.
DRIFT_KEY = "drift_reference"
DRIFT_FILE = "drift_reference.npz"
# The training data the model was fitted and validated on, kept with every version (evaluate --split val).
MANIFEST_FILE = "manifest.parquet"
INPUT_CONTRACT = {"channels": 1, "dtype": "uint8", "resize": "bilinear", "color": "grayscale", "range": [0, 255]}


def read_metadata(uri: str) -> dict[str, Any]:
    """The checked ``pneumonet.json`` of the artifact at ``uri``; ArtifactError naming it otherwise."""
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise ArtifactError(f"artifact {uri} is incomplete: {META_FILE} is missing (was the save interrupted?)")
    try:
        meta = json.loads(storage.read_text(meta_uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact {uri}: {META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"artifact {uri}: {META_FILE} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ArtifactError(f"artifact {uri}: {META_FILE} lacks required keys {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {uri} has format_version {meta['format_version']!r}; this pneumonet "
            f"{pneumonet.__version__} reads format_version {FORMAT_VERSION}"
        )
    if not isinstance(meta["image_size"], int) or meta["image_size"] < 1:
        raise ArtifactError(f"artifact {uri}: image_size must be a positive integer, got {meta['image_size']!r}")
    names = meta["class_names"]
    if not isinstance(names, list) or len(names) != 2 or not all(isinstance(name, str) for name in names):
        raise ArtifactError(f"artifact {uri}: class_names must be two strings, got {names!r}")
    _check_threshold(uri, "threshold", meta["threshold"])
    site = meta.get(SITE_KEY)
    if site is not None:
        if not isinstance(site, dict) or "threshold" not in site:
            raise ArtifactError(f"artifact {uri}: {SITE_KEY} must be an object with a threshold, got {site!r}")
        _check_threshold(uri, f"{SITE_KEY}.threshold", site["threshold"])
    return meta


def check_artifact(uri: str) -> dict[str, Any]:
    """The checked metadata of a complete artifact (folder, ``pneumonet.json``, ``model.keras`` present):
    what a process without TensorFlow can check before it starts replicas or actors that load the model."""
    try:
        if not storage.is_dir(uri):
            raise ArtifactError(f"artifact {uri} does not exist (no such folder or prefix)")
        meta = read_metadata(uri)
        if not storage.exists(storage.join(uri, MODEL_FILE)):
            raise ArtifactError(f"artifact {uri} is incomplete: {MODEL_FILE} is missing")
    except StorageError as exc:
        raise ArtifactError(f"artifact {uri} cannot be read: {exc}") from exc
    return meta


def _check_threshold(uri: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ArtifactError(f"artifact {uri}: {key} must be a number in [0, 1], got {value!r}")


def operating_threshold(meta: dict[str, Any]) -> tuple[float, str]:
    """The threshold scoring decides with, and where it came from: ``"site"`` or ``"validation"``.

    ``pneumonet calibrate`` records a threshold chosen on the site's own labelled sample; it wins over
    the training threshold (chosen on validation patients of the training distribution, which flatter
    a model) because it was chosen on the images the model will see.
    """
    site = meta.get(SITE_KEY)
    if site is not None:
        return float(site["threshold"]), "site"
    return float(meta["threshold"]), "validation"
