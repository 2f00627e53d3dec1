"""Weights & Biases tracking behind one small run object whose methods do nothing when tracking is off.

Mode (``tracking.mode``):

- ``auto`` (default): ``WANDB_MODE`` when it is set, else ``online`` when ``WANDB_API_KEY`` is set,
  else ``offline`` (no account needed; runs land under ``tracking.dir``, ``WANDB_DIR`` or ``<output>/wandb``, to be
  uploaded later with ``wandb sync``);
- ``online`` / ``offline`` / ``disabled``: as said. ``WANDB_MODE=disabled`` turns tracking off whatever
  the config says.

Online runs need a valid key: :func:`preflight` verifies it against ``WANDB_BASE_URL`` (default
``https://api.wandb.ai``) with a short timeout (``WANDB_HTTP_TIMEOUT``, 10 s), so a missing, malformed
or rejected key, or an unreachable server, is a :class:`~pneumonet.errors.TrackingError` before any
data is read or any training starts. The key is only ever read from the environment by wandb itself;
it is never put into a message, the run config or a log line.

Lineage: a run *uses* the dataset artifact (type ``dataset``, holding ``manifest.parquet``) and
*logs* the model artifact (type ``model``, a reference to the artifact URI plus its ``pneumonet.json``).
wandb refuses ``use_artifact`` in offline mode, so offline runs log the dataset artifact as an output
and the model's metadata names it; synced later, both show up on the run.

Usage (training, batch scoring)::

    with start_run(config, job_type="score", name="score-2024-06") as run:
        run.use_model_artifact(model_uri, artifact.meta)
        run.log({"images_per_second": 120.0})
        run.summary({"n_scored": 10_000})
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumonet import storage
from pneumonet.config import Config, TrackingConfig
from pneumonet.errors import StorageError, TrackingError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
CLASS_NAMES = ["NORMAL", "PNEUMONIA"]
REGISTERED_MODEL = "pneumonet"  # the W&B collection that mirrors the registry's aliases
_SCALAR_METRICS = ("n", "accuracy", "roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "f1", "brier", "threshold")


def _tracking_config(config: Config | TrackingConfig) -> TrackingConfig:
    return config.tracking if isinstance(config, Config) else config


def resolve_mode(config: Config | TrackingConfig) -> str:
    """``online``, ``offline`` or ``disabled`` from the config and the environment (see the module doc)."""
    mode = _tracking_config(config).mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode == "disabled" or mode == "disabled":
        return "disabled"
    if mode != "auto":
        return mode
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _redact(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "<WANDB_API_KEY>") if key else text


def verify_api_key() -> None:
    """Check ``WANDB_API_KEY`` with the W&B server (``WANDB_BASE_URL``); TrackingError when it fails."""
    key = os.environ.get("WANDB_API_KEY", "").strip()
    host = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
    if not key:
        raise TrackingError(
            "W&B tracking is online but WANDB_API_KEY is not set: set it, or run with tracking.mode=offline "
            "(or WANDB_MODE=offline) to keep runs locally"
        )
    os.environ.setdefault("WANDB_HTTP_TIMEOUT", "10")
    from wandb.errors import AuthenticationError
    from wandb.sdk.lib.wbauth.auth import AuthApiKey

    try:
        AuthApiKey(host=host, api_key=key).verify()
    except AuthenticationError as exc:
        raise TrackingError(
            f"W&B online mode: WANDB_API_KEY was not accepted by {host} ({_redact(str(exc))}); fix the key or "
            "WANDB_BASE_URL, or use tracking.mode=offline"
        ) from None
    except ValueError as exc:  # a malformed WANDB_BASE_URL
        raise TrackingError(f"W&B online mode: bad WANDB_BASE_URL {host!r}: {_redact(str(exc))}") from None


def preflight(config: Config | TrackingConfig) -> str:
    """Resolve the mode and, when online, verify the API key; call before any long work. Returns the mode."""
    mode = resolve_mode(config)
    if mode == "online":
        verify_api_key()
    return mode


def run_dir(config: Config | TrackingConfig, out: str | None) -> str | None:
    """Where runs are written locally: ``tracking.dir``, else the user's ``WANDB_DIR``, else ``<out>/wandb``
    for a local ``out``, else wandb's default (its current folder)."""
    tracking = _tracking_config(config)
    if tracking.dir:
        return tracking.dir
    if os.environ.get("WANDB_DIR"):
        return os.environ["WANDB_DIR"]
    if out and not storage.is_s3(out):
        return str(Path(out).expanduser().absolute() / "wandb")
    return None


class TrackingRun:
    """One W&B run; with tracking disabled every method is a no-op (``enabled`` is False)."""

    def __init__(self, run: Any | None, mode: str) -> None:
        self._run = run
        self.mode = mode

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def dir(self) -> str | None:
        """The run's local folder (offline runs: what ``wandb sync`` uploads)."""
        return str(Path(self._run.dir).parent) if self._run is not None else None

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(dict(values), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(values))

    def log_images(self, images: Mapping[str, str], prefix: str = "") -> None:
        """Log PNG files (local paths or s3:// URIs) as ``wandb.Image`` under their keys."""
        if self._run is None:
            return
        import wandb
        from PIL import Image

        logged = {}
        for key, uri in images.items():
            try:
                logged[prefix + key] = wandb.Image(Image.open(io.BytesIO(storage.read_bytes(uri))), caption=Path(uri).name)
            except StorageError as exc:
                log.warning("W&B: image %s not logged: %s", uri, exc)
        if logged:
            self._run.log(logged)

    def log_evaluation(
        self,
        split: str,
        y_true: Sequence[int] | np.ndarray,
        y_prob: Sequence[float] | np.ndarray,
        threshold: float,
        metrics: Mapping[str, Any],
        plots_uri: str | None = None,
    ) -> None:
        """Final metrics of one split as summary values, plus W&B's confusion matrix, ROC and PR charts
        and the evaluation PNGs (``metrics["plots"]`` under ``plots_uri``)."""
        if self._run is None:
            return
        import wandb

        labels = np.asarray(y_true).astype(int)
        probs = np.asarray(y_prob, dtype="float64")
        self.summary({f"{split}/{key}": metrics[key] for key in _SCALAR_METRICS if metrics.get(key) is not None})
        charts: dict[str, Any] = {
            f"{split}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=labels.tolist(), preds=(probs >= threshold).astype(int).tolist(), class_names=CLASS_NAMES,
                title=f"{split} confusion matrix",
            ),
        }
        if len(np.unique(labels)) == 2:
            scores = np.stack([1.0 - probs, probs], axis=1)
            charts[f"{split}/roc"] = wandb.plot.roc_curve(labels, scores, labels=CLASS_NAMES, classes_to_plot=[1], title=f"{split} ROC")
            charts[f"{split}/pr"] = wandb.plot.pr_curve(labels, scores, labels=CLASS_NAMES, classes_to_plot=[1], title=f"{split} precision-recall")
        self._run.log(charts)
        if plots_uri:
            self.log_images({Path(name).stem: storage.join(plots_uri, name) for name in metrics.get("plots", [])}, f"{split}/plots/")

    def _add(self, artifact: Any, as_input: bool) -> None:
        """Use (online) or log (offline: wandb forbids use_artifact) an artifact."""
        if as_input and self.mode == "online":
            self._run.use_artifact(artifact)
        else:
            self._run.log_artifact(artifact)

    def use_dataset(self, manifest_uri: str, digest: str, metadata: Mapping[str, Any] | None = None) -> str | None:
        """The dataset artifact (type "dataset", holding manifest.parquet) as an input of this run; returns its name."""
        if self._run is None:
            return None
        import wandb

        name = "pneumonet-dataset"
        artifact = wandb.Artifact(name, type="dataset", metadata={"manifest_digest": digest, "manifest": manifest_uri, **(metadata or {})})
        with tempfile.TemporaryDirectory(prefix="pneumonet-wandb-") as tmp:
            path = Path(tmp) / "manifest.parquet"
            storage.copy(manifest_uri, path)
            artifact.add_file(str(path))
            self._add(artifact, as_input=True)
        return f"{name}:{digest[:12]}"

    def _model_artifact(self, uri: str, meta: Mapping[str, Any], dataset: str | None, name: str | None = None):
        import wandb

        name = name or f"pneumonet-{meta.get('variant', 'model')}"
        fields = ("variant", "version", "backbone", "image_size", "threshold", "val_metrics", "manifest_digest", "run_id")
        metadata = {key: meta[key] for key in fields if key in meta} | {"uri": uri}
        if dataset:
            metadata["dataset_artifact"] = dataset
        artifact = wandb.Artifact(name, type="model", metadata=metadata)
        # A reference, not an upload: the artifact lives in the run storage. checksum=False keeps the
        # digest a function of the URI, so scoring's use_model_artifact() names the same version.
        artifact.add_reference(_reference(uri), name="model", checksum=False)
        return artifact

    def log_artifact_model(self, uri: str, meta: Mapping[str, Any], manifest_uri: str | None = None) -> None:
        """Log a trained model artifact (type "model"); with ``manifest_uri`` the run first uses the dataset."""
        if self._run is None:
            return
        dataset = self.use_dataset(manifest_uri, str(meta.get("manifest_digest") or "")) if manifest_uri else None
        aliases = ["latest", str(meta["version"])] + ([str(meta["run_id"])] if meta.get("run_id") else [])
        self._run.log_artifact(self._model_artifact(uri, meta, dataset), aliases=aliases)

    def log_alias(self, uri: str, meta: Mapping[str, Any], alias: str) -> None:
        """Mirror a registry alias: the version (by reference) in the collection :data:`REGISTERED_MODEL`,
        one for every variant, so W&B moves ``alias`` there as the registry did (a W&B alias names one
        version of a collection)."""
        if self._run is not None:
            self._run.log_artifact(self._model_artifact(uri, meta, None, name=REGISTERED_MODEL), aliases=[alias])

    def use_model_artifact(self, uri: str, meta: Mapping[str, Any]) -> None:
        """Record the model a run scores with: used as an input online; its name/version/URI in the config offline."""
        if self._run is None:
            return
        self._run.config.update(
            {"model": {"uri": uri, "name": meta.get("name"), "version": meta.get("version"), "variant": meta.get("variant")}},
            allow_val_change=True,
        )
        if self.mode == "online":
            self._run.use_artifact(self._model_artifact(uri, meta, None))


def _reference(uri: str) -> str:
    return uri if storage.is_s3(uri) else Path(uri).expanduser().absolute().as_uri()


@contextlib.contextmanager
def start_run(
    config: Config | TrackingConfig,
    *,
    job_type: str,
    name: str | None = None,
    run_id: str | None = None,
    group: str | None = None,
    out: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Iterator[TrackingRun]:
    """A W&B run for the block (finished, also on error); a no-op run when tracking is disabled.

    ``config`` is the whole Config (logged as the run config) or just its ``tracking`` section.
    ``run_id`` makes the W&B id stable (a resumed job continues the same run online); ``out`` is the
    job's output root (offline runs go to ``<out>/wandb`` when ``tracking.dir`` is unset). ``mode``:
    an already resolved mode (from :func:`preflight`); otherwise it is resolved and, online, verified here.
    """
    mode = mode or preflight(config)
    if mode == "disabled":
        yield TrackingRun(None, mode)
        return
    import wandb

    tracking = _tracking_config(config)
    directory = run_dir(config, out)
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    run_config = dict(extra_config or {})
    if isinstance(config, Config):
        run_config = {**config.model_dump(mode="json"), **run_config}
    try:
        run = wandb.init(
            project=tracking.project,
            entity=tracking.entity,
            dir=directory,
            mode=mode,
            id=run_id,
            name=name or run_id,
            group=group,
            job_type=job_type,
            config=run_config,
            resume="allow" if run_id else None,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
    except Exception as exc:  # noqa: BLE001 - wandb raises its own errors and plain ones for a bad setup
        raise TrackingError(f"W&B {mode} run could not start ({type(exc).__name__}: {_redact(str(exc))})") from None
    log.info("W&B %s run %s (%s) in %s", mode, run.id, job_type, Path(run.dir).parent)
    failed = False
    try:
        yield TrackingRun(run, mode)
    except BaseException:
        failed = True
        raise
    finally:
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as exc:  # noqa: BLE001 - never let tracking hide the real outcome
            log.warning("W&B run %s did not finish cleanly: %s", run.id, _redact(str(exc)))


__all__ = ["TrackingRun", "preflight", "resolve_mode", "run_dir", "start_run", "verify_api_key"]
