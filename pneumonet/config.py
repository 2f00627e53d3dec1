"""One typed configuration for every door: the CLI, the Ray jobs and the Kubernetes ConfigMaps.

A config is a YAML file plus ``dotted.key=value`` overrides. Unknown keys and bad values are
errors that name the key, so a typo in a ConfigMap fails at submit time, not after an hour.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pneumonet.errors import ConfigError

Variant = Literal["custom", "transfer", "finetune"]
VARIANTS: tuple[Variant, ...] = ("custom", "transfer", "finetune")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images are and how the validation split is drawn."""

    root: str | None = Field(None, description="Dataset root: a folder or s3://bucket/prefix in the Kaggle layout.")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="Share of patients held out for validation.")
    merge_val_folder: bool = Field(
        True, description="Pool the (tiny) official val/ folder with train/ before the patient-grouped split."
    )
    max_image_pixels: int = Field(60_000_000, gt=0, description="Refuse images with more pixels (decompression bombs).")
    max_image_bytes: int = Field(
        64 * 2**20, gt=0, description="Refuse image files larger than this many bytes, from their size, before reading them."
    )
    max_decode_seconds: float | None = Field(
        30.0, gt=0, description="Batch scoring and the endpoint decode each file in a child process, killed after this "
        "many seconds (the file is refused); null decodes in the calling process, without a time limit.",
    )
    decode_workers: int = Field(8, ge=1, description="Threads that decode images in parallel.")
    limit_per_class: int | None = Field(None, ge=1, description="Use at most this many images per class and split.")


class AugmentConfig(_Strict):
    """Training-time augmentation; anatomy is not left-right symmetric, so no flip by default."""

    rotation: float = Field(0.03, ge=0.0, le=0.5, description="Max rotation as a fraction of a full turn.")
    shift: float = Field(0.08, ge=0.0, le=0.5, description="Max translation as a fraction of the image side.")
    zoom: float = Field(0.10, ge=0.0, le=0.5, description="Max zoom out (and in, up to zoom_in) as a fraction.")
    zoom_in: float = Field(
        0.0, ge=0.0, le=0.5, description="Max zoom in: crops tighter than the archive's framing, as other sites frame."
    )
    stretch: float = Field(0.0, ge=0.0, le=0.5, description="Max change of the width alone (aspect ratio).")
    brightness: float = Field(0.10, ge=0.0, le=1.0)
    contrast: float = Field(0.15, ge=0.0, le=1.0)
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="Max |log gamma| of a random gamma curve (exposure).")
    blur: float = Field(0.0, ge=0.0, le=1.0, description="Max Gaussian blur sigma in pixels (detector sharpness; Keras caps it at 1).")
    horizontal_flip: bool = False


class ModelConfig(_Strict):
    """Architecture of each variant."""

    image_size: int = Field(224, ge=32, le=1024, description="Square input side in pixels.")
    backbone: str = Field("ResNet152V2", description="A keras.applications model name.")
    weights: str = Field(
        "imagenet", description="Backbone weights: 'imagenet', 'none', a local .h5/.weights.h5 file or an s3:// URI."
    )
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    head_units: int = Field(256, ge=0, description="Hidden units in the new head (0: none).")
    custom_filters: list[int] = Field([32, 64, 128, 256], min_length=1)
    custom_dense_units: int = Field(128, ge=8)
    input_norm: Literal["rescale", "per_image"] = Field(
        "rescale", description="custom CNN input scaling: /255, or each image to zero mean and unit variance."
    )
    center_crop: float = Field(
        1.0, gt=0.3, le=1.0, description="custom CNN: keep this central fraction of the image (drops borders and markers)."
    )
    members: int = Field(
        1, ge=1, le=8, description="custom CNN: independently trained networks averaged in one model (an ensemble)."
    )
    stem_stride: int = Field(
        1, ge=1, le=4, description="Stride of the custom CNN's first conv; 2 trains ~5x faster on CPU."
    )
    bn_momentum: float = Field(
        0.99, gt=0.0, lt=1.0, description="BatchNorm momentum of the custom CNN; 0.9 for runs under ~5 epochs."
    )
    l2: float = Field(1e-4, ge=0.0, description="L2 weight decay on the custom CNN's kernels.")
    finetune_layers: int = Field(30, ge=1, description="Unfreeze this many layers at the end of the backbone.")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        import keras

        if not callable(getattr(keras.applications, name, None)):
            raise ValueError(f"unknown keras.applications model {name!r}")
        return name


class ThresholdConfig(_Strict):
    """How the decision threshold is chosen on the validation split (never on test data)."""

    policy: Literal["youden", "min_sensitivity", "fixed"] = "min_sensitivity"
    min_sensitivity: float = Field(0.95, gt=0.0, le=1.0)
    fixed: float = Field(0.5, gt=0.0, lt=1.0)


class TrainConfig(_Strict):
    """Optimisation of one variant; ``finetune_*`` keys apply to the finetune stage."""

    epochs: int = Field(15, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    finetune_epochs: int = Field(8, ge=1)
    finetune_learning_rate: float = Field(1e-5, gt=0.0)
    patience: int = Field(4, ge=1, description="Epochs without a better validation ROC-AUC before stopping.")
    select: Literal["best_val_auc", "last"] = Field(
        "best_val_auc",
        description="Which epoch's weights become the model: the best validation ROC-AUC (early stopping with "
        "patience), or the last one (every epoch runs; validation patients saturate and its argmax is noise).",
    )
    class_weight: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    cache_features: bool = Field(True, description="transfer: run the frozen backbone once, train the head on features.")
    steps_per_epoch: int | None = Field(None, ge=1, description="Cap batches per epoch (smoke runs).")
    augment: AugmentConfig = AugmentConfig()
    threshold: ThresholdConfig = ThresholdConfig()


class AdaptConfig(_Strict):
    """``pneumonet adapt``: fine-tuning the custom CNN on a site's labelled sample (docs/quality.md)."""

    folds: int = Field(4, ge=2, description="Patient-grouped folds whose out-of-fold scores choose the threshold and judge the gain.")
    epochs: int = Field(6, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0, description="Start of the cosine decay: a tenth of training's, so the model moves, not restarts.")
    batch_size: int = Field(32, ge=1)
    repeat: int = Field(3, ge=1, description="Passes over the (small) sample per epoch.")
    augment: bool = Field(False, description="Use train.augment while adapting (it cost site ROC-AUC when measured).")


class DistributedConfig(_Strict):
    """Ray Train resources and fault tolerance."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto",
        description="CPUs each worker reserves and TensorFlow threads it runs; auto: a local cluster's cores shared by "
        "the workers, on a cluster the CPUs of its nodes (the worker pods' CPU limits).",
    )
    gpus_per_worker: float = Field(0.0, ge=0.0)
    storage: str | None = Field(None, description="Run storage: a folder or s3:// URI for checkpoints and models.")
    max_failures: int = Field(2, ge=0)
    mixed_precision: Literal["auto", "off", "mixed_float16", "mixed_bfloat16"] = "auto"

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if value != "auto" and value <= 0:
            raise ValueError("must be greater than 0 (or auto)")
        return value


class TrackingConfig(_Strict):
    """Weights & Biases. ``auto``: online when WANDB_API_KEY is set, offline otherwise."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "pneumonet"
    entity: str | None = None
    dir: str | None = Field(None, description="Where offline runs are written (default: WANDB_DIR, else the output folder).")


class ScoreConfig(_Strict):
    """Batch scoring of archives."""

    batch_size: int = Field(64, ge=1)
    workers: int = Field(1, ge=1, description="Inference actors.")
    gpus_per_worker: float = Field(0.0, ge=0.0)
    rows_per_file: int = Field(10_000, ge=1, description="Rows per output Parquet part, at most (rounded down to whole batches).")
    progress_seconds: float = Field(30.0, gt=0, description="Seconds between progress lines (job log and W&B).")
    wave_files: int = Field(
        500_000, ge=1, description="Files per pipeline execution (Ray Data keeps stats of every block of one on the driver)."
    )


class ServeConfig(_Strict):
    """Online scoring endpoint."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_batch_images: int = Field(32, ge=1)
    queue_timeout_s: float = Field(
        0.5, gt=0.0, description="A request whose image cannot start its model call this soon after reaching a replica gets 503."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) of every 503 the endpoint sends when overloaded.")
    request_timeout_s: float = Field(
        30.0, gt=0.0, description="A scoring request not answered this long after reaching a replica (a body sent too "
        "slowly, decoding, waiting, Grad-CAM) gets 408; the proxy's http_options.request_timeout_s backs it up.",
    )
    auth_token_env: str = Field("PNEUMONET_API_TOKEN", description="Env var holding the bearer token; unset: no auth.")
    decode_processes: int = Field(2, ge=1, description="Child processes per replica that decode uploads (data.max_decode_seconds).")


class DriftConfig(_Strict):
    """Drift and out-of-distribution alarms (``pneumonet.evaluation.drift``): how the reference is built
    (training, ``pneumonet drift-reference``) and how windows of new images are tested against it."""

    max_vectors: int = Field(2000, ge=20, description="Reference embeddings kept (a patient-grouped sample of the validation images).")
    pca_components: int = Field(32, ge=1, description="Principal components of the reference embeddings (the rest: one residual).")
    ood_quantile: float = Field(
        0.99, gt=0.5, lt=1.0, description="An image is out of distribution beyond this quantile of held-out reference distances."
    )
    alpha: float = Field(0.01, gt=0.0, lt=0.5, description="Family-wise error rate of the window tests (Holm-corrected).")
    permutations: int = Field(
        1000, ge=100, description="Resamples of the window tests' patient-grouped bootstrap (the smallest p-value is 1/(permutations+1))."
    )
    min_images: int = Field(50, ge=10, description="Fewer scored images in a window: no verdict ('insufficient data').")
    sample: int = Field(1000, ge=10, description="Batch scoring: the tests run on a uniform sample of at most this many images.")
    window: int = Field(500, ge=10, description="Endpoint: the most recent images each replica tests (a bounded window).")
    check_every: int = Field(50, ge=1, description="Endpoint: re-test the window after this many new images (log + metric on a turn).")

    @model_validator(mode="after")
    def _can_alarm(self) -> DriftConfig:
        """Holm over three tests needs a p-value of alpha/3; a bootstrap p-value is at least 1/(permutations+1)."""
        if (self.permutations + 1) * self.alpha < 3:
            raise ValueError(f"drift.permutations={self.permutations} can never give a p-value of alpha/3 = {self.alpha / 3:.4g} "
                             f"(Holm over three tests): at least {math.ceil(3 / self.alpha) - 1} are needed for alpha {self.alpha}")
        return self


class Config(_Strict):
    """The whole configuration; every command reads the parts it needs."""

    seed: int = 42
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    adapt: AdaptConfig = AdaptConfig()
    distributed: DistributedConfig = DistributedConfig()
    tracking: TrackingConfig = TrackingConfig()
    score: ScoreConfig = ScoreConfig()
    serve: ServeConfig = ServeConfig()
    drift: DriftConfig = DriftConfig()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as YAML so ``3``, ``1e-4``, ``true``, ``[1, 2]`` get their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        else:
            lines.append(f"bad value for {key!r}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict[str, Any] | None = None
) -> Config:
    """Read a YAML config (else ``base``, e.g. the config a model was trained with, else the defaults)
    and apply ``dotted.key=value`` overrides on top."""
    tree: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where}: {_describe(exc)}") from None


def dump_config(config: Config) -> str:
    """YAML text of a config, e.g. to log it or ship it in a ConfigMap."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
