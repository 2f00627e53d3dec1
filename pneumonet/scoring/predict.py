"""Score a handful of image files with a model artifact (the ``pneumonet predict`` command)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pneumonet.config import DataConfig
from pneumonet.data.images import load_many

if TYPE_CHECKING:  # pneumonet.artifact imports TensorFlow; `decide` must stay importable without it
    from pneumonet.artifact import Artifact


def decide(probability: float, threshold: float) -> str:
    """The class name for a probability at the artifact's threshold."""
    return "PNEUMONIA" if probability >= threshold else "NORMAL"


def predict_files(model_uri: str, uris: list[str], artifact: Artifact | None = None, data: DataConfig | None = None) -> list[dict]:
    """One result per input, in order: probability and prediction, or the reason it could not be scored.

    ``data``: decode settings (limits, threads; default: the defaults of ``DataConfig``).
    """
    from pneumonet.artifact import load_artifact
    from pneumonet.registry import resolve_model

    model = resolve_model(model_uri)  # an alias pointer works too; rows name the version it resolved to
    artifact = artifact or load_artifact(model.uri)
    data = data or DataConfig()
    loaded = load_many(uris, artifact.image_size, workers=data.decode_workers, max_pixels=data.max_image_pixels,
                       max_bytes=data.max_image_bytes)  # fmt: skip
    probs = artifact.predict_proba(loaded.images) if len(loaded.ok) else []
    by_index = dict(zip(loaded.ok, probs, strict=True))
    results = []
    for i, uri in enumerate(uris):
        row = {"uri": uri, "probability": None, "prediction": None, "threshold": artifact.threshold,
               "threshold_source": artifact.threshold_source, "model": model.label, "error": loaded.failures.get(uri)}  # fmt: skip
        if i in by_index:
            row["probability"] = float(by_index[i])
            row["prediction"] = decide(row["probability"], artifact.threshold)
        results.append(row)
    return results
