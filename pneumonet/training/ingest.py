"""Ingest: the images of a run's split plan, decoded once, for training and for the final evaluation.

The driver draws the patient split once (:func:`pneumonet.data.split.plan_splits`); :func:`decode_plan`
turns the rows of each split into a Ray Dataset whose ``map_batches`` tasks read the bytes through
:mod:`pneumonet.storage` (a folder or ``s3://``, ``AWS_ENDPOINT_URL`` honoured for MinIO) and decode
them with the one shared decoder (:func:`pneumonet.data.images.load_image`). Each
split is decoded once per job and materialized in the object store; every variant and every restart
after a failure reuses it. The decode tasks are batch scoring's (:func:`pneumonet.data.blocks.decode_batch`:
``data.max_decode_seconds`` per file, a decoder crash costs one file). Files that do not decode stay as
rows with an ``error`` (recorded in the manifest) and are filtered out before training. :func:`prepare_data` does the same in this process,
without Ray (tests, benchmarks, notebooks).

Resources: a decode task asks for :data:`DECODE_CPUS` CPU (it reads several files at once and decodes
one at a time). Every Ray Data task runs before
training starts (decoding, and :func:`usable`, materialized too), so the workers may reserve every CPU
of the cluster: their ingest only reads blocks from the object store, which needs no CPU (a task
waiting behind the workers' reservations would wait forever).

Sharding (:func:`trainer_datasets`): ``train`` is split by Ray Train into equal shards, because every
worker must run the same number of steps (at most ``workers - 1`` images of the split sit out);
``val`` is split here into one dataset per worker without dropping any row, because the predictions
of all shards are gathered and scored together (:func:`pneumonet.training.loop.global_validation`).
A worker reads its shards once per stage into memory (:func:`read_shard`) and reshuffles/augments
them every epoch with tf.data.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import ray
import ray.train

from pneumonet.data.catalog import SPLITS, labels_of, shared_patients
from pneumonet.data.blocks import decode_batch

if TYPE_CHECKING:  # TensorFlow stays out of the Ray Data processes that unpickle the functions below
    from pneumonet.config import Config
    from pneumonet.data.pipeline import ImageSet
    from pneumonet.data.split import SplitPlan

log = logging.getLogger(__name__)

DECODE_CPUS = 1.0
DECODE_BLOCK = 64  # images per decode task
MIN_BLOCKS = 8
MAX_BLOCKS = 256


def decode_split(rows: pd.DataFrame, config: Config) -> ray.data.Dataset:
    """The decoded images of ``rows`` as a materialized Dataset (columns index, label, image, error)."""
    frame = pd.DataFrame({"index": np.arange(len(rows), dtype="int64"), "uri": rows["uri"].to_numpy(), "label": labels_of(rows)})
    # Blocks of at most DECODE_BLOCK rows, at least MIN_BLOCKS of them when there are enough rows:
    # decode tasks run in parallel, and a small validation split still reaches every worker.
    step = max(min(DECODE_BLOCK, math.ceil(len(frame) / MIN_BLOCKS)), math.ceil(len(frame) / MAX_BLOCKS), 1)
    blocks = [frame.iloc[start : start + step] for start in range(0, len(frame), step)]  # one decode task each
    dataset = ray.data.from_pandas(blocks).map_batches(
        decode_batch,
        fn_kwargs={
            "size": config.model.image_size,
            "max_pixels": config.data.max_image_pixels,
            "max_bytes": config.data.max_image_bytes,
            "max_seconds": config.data.max_decode_seconds,
            "keep": ("index", "label"),
        },
        batch_size=None,  # one task per block
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
    )
    return dataset.materialize()


def _drop_failed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch["error"] == ""
    return {"image": batch["image"][keep], "label": batch["label"][keep].astype("int32")}


def usable(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """Only the rows that decoded, with the columns training needs: materialized now, while no worker holds a CPU."""
    return dataset.map_batches(_drop_failed, batch_format="numpy", batch_size=None, num_cpus=DECODE_CPUS).materialize()


def failures(dataset: ray.data.Dataset, rows: pd.DataFrame) -> dict[str, str]:
    """uri → reason for every row that did not decode."""
    status = dataset.select_columns(["index", "error"]).to_pandas()
    bad = status[status["error"] != ""]
    return dict(zip(rows["uri"].to_numpy()[bad["index"].to_numpy()], bad["error"], strict=True))


def collect(dataset: ray.data.Dataset, rows: pd.DataFrame, size: int) -> ImageSet:
    """Bring a decoded split to the driver as an :class:`ImageSet` in manifest order (for evaluation)."""
    from pneumonet.data.pipeline import ImageSet

    parts = list(dataset.iter_batches(batch_size=1024, batch_format="numpy"))
    if not parts:
        return ImageSet(np.zeros((0, size, size, 1), np.uint8), np.zeros(0, np.int32), rows.iloc[:0], {})
    index = np.concatenate([part["index"] for part in parts])
    error = np.concatenate([part["error"] for part in parts])
    order = np.argsort(index, kind="stable")
    ok = order[error[order] == ""]
    images = np.concatenate([part["image"] for part in parts])[ok]
    kept = rows.iloc[index[ok]].reset_index(drop=True)
    bad = dict(zip(rows["uri"].to_numpy()[index[error != ""]], error[error != ""], strict=True))
    return ImageSet(images, labels_of(kept), kept, bad)


def val_name(rank: int) -> str:
    """The name of worker ``rank``'s validation dataset."""
    return f"val-{rank}"


def trainer_datasets(train: ray.data.Dataset, val: ray.data.Dataset, workers: int) -> dict[str, ray.data.Dataset]:
    """The TensorflowTrainer's datasets: ``train`` (Ray Train splits it in equal shards, its default for a
    dataset named in ``DataConfig(datasets_to_split=["train"])``) and one validation dataset per worker
    holding every row once (a dataset not named there reaches each worker whole; each reads its own)."""
    parts = val.split(workers, equal=False)
    return {"train": train, **{val_name(rank): part for rank, part in enumerate(parts)}}


def read_shard(name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """This worker's shard of a dataset as (images uint8 (N, S, S, 1), labels int32), read once."""
    shard = ray.train.get_dataset_shard(name)
    images, labels = [], []
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    if not images:
        return np.zeros((0, size, size, 1), np.uint8), np.zeros(0, np.int32)
    return np.concatenate(images).astype(np.uint8, copy=False), np.concatenate(labels).astype(np.int32)


@dataclass
class EvalData:
    """What the final evaluation needs on the driver: the decoded validation and test splits and the data's identity."""

    root: str
    val: ImageSet
    test: ImageSet | None
    digest: str
    shared_patients: list[str]  # test/ patients also in the training pool: recorded with the test metrics


@dataclass
class Decoded:
    """A plan after decoding with Ray Data: the failures recorded in it, val/test on the driver, and
    the usable train/val rows in the object store for the workers."""

    plan: SplitPlan
    data: EvalData
    train: ray.data.Dataset
    val: ray.data.Dataset


def decode_plan(plan: SplitPlan, config: Config) -> Decoded:
    """Decode every split of ``plan`` once with Ray Data (DataError when failures leave train or val without a class)."""
    size = config.model.image_size
    log.info("decoding %s images with Ray Data", ", ".join(f"{len(getattr(plan, split))} {split}" for split in SPLITS))
    decoded = {split: decode_split(getattr(plan, split), config) for split in SPLITS if len(getattr(plan, split))}
    val = collect(decoded["val"], plan.val, size)
    test = collect(decoded["test"], plan.test, size) if "test" in decoded else None
    failed = {**failures(decoded["train"], plan.train), **val.failures, **(test.failures if test else {})}
    if failed:
        log.warning("%d images could not be decoded and are left out (listed in the manifest), e.g. %s", len(failed), next(iter(failed.values())))
    plan = plan.with_failures(failed)
    data = EvalData(plan.root, val, test, plan.digest, shared_patients(plan.manifest))
    return Decoded(plan, data, usable(decoded["train"]), usable(decoded["val"]))


@dataclass
class PreparedData(EvalData):
    """Every split decoded in this process."""

    manifest: pd.DataFrame
    train: ImageSet


def prepare_data(config: Config, root: str) -> PreparedData:
    """Catalog, split and decode every split once in this process, without Ray (tests, benchmarks, notebooks)."""
    from pneumonet.data.pipeline import load_image_set
    from pneumonet.data.split import plan_splits

    plan = plan_splits(config, root)
    sets = {split: load_image_set(getattr(plan, split), config.model.image_size, config.data, progress=f"decode {split}")
            for split in SPLITS if split != "test" or len(plan.test)}  # fmt: skip
    plan = plan.with_failures({uri: why for part in sets.values() for uri, why in part.failures.items()})
    return PreparedData(root, sets["val"], sets.get("test"), plan.digest, shared_patients(plan.manifest), plan.manifest, sets["train"])
