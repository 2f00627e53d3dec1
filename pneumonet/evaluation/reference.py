"""``pneumonet drift-reference``: give an artifact made without a drift reference one, as a new artifact.

Training stores the reference itself (:func:`pneumonet.training.finishing.finish`). An older artifact,
or one trained by code without it, gets the same reference afterwards from the same images: its run's
validation patients, re-derived from the manifest saved with it and checked against ``--data`` as
``pneumonet evaluate --split val`` does. The new artifact has the very same ``model.keras`` (same
version), its ``pneumonet.json`` plus ``drift_reference``, and a copy of the manifest.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pneumonet.artifact import DRIFT_KEY, derive_artifact, load_artifact
from pneumonet.config import Config
from pneumonet.evaluation.drift import build_reference, reference_files
from pneumonet.evaluation.run import decode_split
from pneumonet.registry import resolve_model

log = logging.getLogger(__name__)


def add_reference(model_uri: str, data_root: str, out_uri: str, config: Config | None = None) -> dict[str, Any]:
    """Build the drift reference of ``model_uri`` on its validation images under ``data_root`` and write
    the artifact with it to ``out_uri``; returns the ``drift_reference`` record.

    ``config``: its ``data`` section decodes and its ``drift`` section builds (default: the artifact's
    own config, so the images are decoded as in training).
    """
    artifact = load_artifact(resolve_model(model_uri).uri)
    config = config or Config.model_validate(artifact.meta["config"])
    images = decode_split(artifact, data_root, "val", config.data)
    raw, embeddings = artifact.predict_with_embeddings(images.images)
    ref, record = build_reference(raw, embeddings, images.rows["patient_id"].to_numpy(), config.drift, config.seed, images.images)
    record, files = reference_files(ref, record)
    record.update(source={"uri": str(model_uri), "name": artifact.name, "version": artifact.version},
                  data_root=data_root, unreadable=len(images.failures), added_at=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip
    derive_artifact(artifact, {**artifact.meta, DRIFT_KEY: record}, out_uri, files)
    log.info("drift reference of %s (%d validation images) → %s", artifact.name, record["n_images"], out_uri)
    return record
