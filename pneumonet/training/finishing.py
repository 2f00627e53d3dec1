"""Finishing a variant on the driver: the threshold on validation, the drift reference, the artifact, the test figures.

:func:`finish` takes the trained model and its state (the final checkpoint of a Ray Train run) and the
splits decoded on the driver (:class:`pneumonet.training.ingest.EvalData`), picks the decision
threshold on the validation patients, saves the artifact (``model.keras`` + ``pneumonet.json``, the
one contract between training and scoring) with its curves and drift reference, and evaluates it on
the test split. Only the driver imports this module: it brings plotting and evaluation with it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from pneumonet import storage
from pneumonet.artifact import DRIFT_KEY, build_metadata, save_artifact
from pneumonet.config import Config, Variant
from pneumonet.evaluation import evaluate_predictions
from pneumonet.evaluation.drift import build_reference, reference_files
from pneumonet.evaluation.metrics import choose_threshold
from pneumonet.evaluation.plots import plot_training_curves
from pneumonet.models.embedding import embedding_model
from pneumonet.training.loop import FitState, predict_batches, predict_probabilities

if TYPE_CHECKING:
    from pneumonet.data.pipeline import ImageSet
    from pneumonet.tracking import TrackingRun
    from pneumonet.training.ingest import EvalData

log = logging.getLogger(__name__)

# What pneumonet.json keeps of the validation metrics (the model card of the endpoint's page shows them).
VAL_METRIC_KEYS = ("n", "n_positive", "n_negative", "accuracy", "roc_auc", "pr_auc", "sensitivity", "specificity",
                   "precision", "f1", "ci95", "ci95_grouped_by")  # fmt: skip


def _write_png(render, uri: str, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(uri).name
        render(*args, path)
        storage.write_bytes(uri, path.read_bytes())


def drift_reference(model: keras.Model, probs: np.ndarray, images: ImageSet, config: Config) -> tuple[dict, dict[str, bytes]]:
    """The drift reference of ``images`` (the validation split) for ``pneumonet.json`` and its file; none
    (with a warning) when the split is too small to hold one out five ways."""
    embeddings = predict_batches(embedding_model(model), images.images, config.train.batch_size)
    try:
        ref, record = build_reference(probs, embeddings, images.rows["patient_id"].to_numpy(), config.drift, config.seed,
                                      images.images)
    except ValueError as exc:
        log.warning("no drift reference in this artifact: %s", exc)
        return {}, {}
    record, files = reference_files(ref, record)
    log.info("drift reference: %d images of %d patients, %d embeddings of %d dimensions in %d principal components",
             record["n_images"], record["n_patients"], record["n_vectors"], record["embedding_dim"], record["pca_components"])  # fmt: skip
    return {DRIFT_KEY: record}, files


def finish(
    variant: Variant,
    model: keras.Model,
    state: FitState,
    config: Config,
    data: EvalData,
    artifact_uri: str,
    run: TrackingRun | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Threshold and drift reference on validation, save the artifact with its curves, evaluate on test;
    return a summary.

    ``run`` (W&B) gets the final metrics, curves and plots; ``extra`` adds keys to ``pneumonet.json``.
    """
    val_probs = predict_probabilities(model, data.val.images, config.train.batch_size)
    threshold = choose_threshold(data.val.labels, val_probs, config.train.threshold)
    val_uri = storage.join(artifact_uri, "evaluation", "val")
    val_metrics = evaluate_predictions(
        data.val.labels, val_probs, threshold, val_uri,
        subtypes=data.val.rows["subtype"].tolist(), title=f"{variant} — validation",
    )  # fmt: skip
    reference, files = drift_reference(model, val_probs, data.val, config)
    meta = build_metadata(
        variant=variant,
        config=config,
        threshold=threshold,
        val_metrics={key: val_metrics[key] for key in VAL_METRIC_KEYS if key in val_metrics},
        manifest_digest=data.digest,
        history=state.history,
        extra={"best_epoch": state.best_epoch, "epochs_run": state.epoch, "data_root": data.root,
               "selected_epoch": state.epoch if config.train.select == "last" else state.best_epoch,
               "selection": config.train.select, **reference, **(extra or {})},  # fmt: skip
    )
    save_artifact(model, meta, artifact_uri, files)
    storage.write_text(storage.join(artifact_uri, "history.json"), json.dumps(state.history, indent=2))
    curves_uri = storage.join(artifact_uri, "training_curves.png")
    _write_png(plot_training_curves, curves_uri, state.history)
    summary = {"variant": variant, "artifact": artifact_uri, "threshold": threshold, "val": val_metrics}
    if run is not None:
        run.log_evaluation("val", data.val.labels, val_probs, threshold, val_metrics, val_uri)
        run.log_images({"training_curves": curves_uri})
    if data.test is not None and len(data.test):
        test_probs = predict_probabilities(model, data.test.images, config.train.batch_size)
        test_uri = storage.join(artifact_uri, "evaluation", "test")
        summary["test"] = evaluate_predictions(
            data.test.labels, test_probs, threshold, test_uri,
            subtypes=data.test.rows["subtype"].tolist(), title=f"{variant} — test",
            extra={"patients_also_in_train": data.shared_patients},
        )  # fmt: skip
        if run is not None:
            run.log_evaluation("test", data.test.labels, test_probs, threshold, summary["test"], test_uri)
    log.info("%s: artifact written to %s (threshold %.3f)", variant, artifact_uri, threshold)
    return summary
