"""Ray Data ingest: manifest rows in, decoded images out, one shard per Ray Train worker.

The driver catalogs the dataset and draws the patient split once (:mod:`pneumonet.training.variants`);
here the rows of each split become a Ray Dataset whose ``map_batches`` tasks read the bytes through
:mod:`pneumonet.storage` (a folder or ``s3://``, ``AWS_ENDPOINT_URL`` honoured for MinIO) and decode
them with the one shared decoder (:func:`pneumonet.data.images.load_many` → ``load_image``). Each
split is decoded once per job and materialized in the object store; every variant and every restart
after a failure reuses it. Files that do not decode stay as rows with an ``error`` (reported in the
manifest, as in a single-process run) and are filtered out before training.

Resources: a decode task asks for :data:`DECODE_CPUS` CPU and decodes its block with
``data.decode_workers`` threads (Pillow and pyarrow release the GIL). Every Ray Data task runs before
training starts (decoding, and :func:`usable`, materialized too), so the workers may reserve every CPU
of the cluster: their ingest only reads blocks from the object store, which needs no CPU (a task
waiting behind the workers' reservations would wait forever).

Sharding (:class:`IngestConfig`): ``train`` is split into equal shards, because every worker must run
the same number of steps (at most ``workers - 1`` images of the split sit out); ``val`` is split
without dropping any row, because the predictions of all shards are gathered and scored together
(:func:`pneumonet.training.loop.global_validation`). A worker reads its shards once per stage into
memory and reshuffles/augments them every epoch with tf.data.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import ray
import ray.train
from ray.train import DataConfig

from pneumonet.data.catalog import labels_of
from pneumonet.data.images import load_many

if TYPE_CHECKING:  # TensorFlow stays out of the Ray Data processes that unpickle the functions below
    from pneumonet.config import Config
    from pneumonet.data.pipeline import ImageSet

log = logging.getLogger(__name__)

DECODE_CPUS = 1.0
DECODE_BLOCK = 64  # images per decode task
MIN_BLOCKS = 8
MAX_BLOCKS = 256


def decode_batch(
    batch: dict[str, np.ndarray], size: int, max_pixels: int, max_bytes: int, threads: int
) -> dict[str, np.ndarray]:
    """Decode one block of rows; a failed file keeps its row, with a zero image and its ``error``."""
    uris = [str(uri) for uri in batch["uri"]]
    result = load_many(uris, size, workers=threads, max_pixels=max_pixels, max_bytes=max_bytes)
    images = np.zeros((len(uris), size, size, 1), np.uint8)
    images[result.ok] = result.images
    errors = np.array([result.failures.get(uri, "") for uri in uris], dtype=object)
    if result.failures:
        log.warning("%d of %d images could not be decoded, e.g. %s", len(result.failures), len(uris), next(iter(result.failures.values())))
    return {"index": batch["index"], "label": batch["label"], "image": images, "error": errors}


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
            "threads": config.data.decode_workers,
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


class IngestConfig(DataConfig):
    """``train``: equal shards (same step count everywhere); ``val``: every row exactly once."""

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["train"])

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        others = {name: dataset for name, dataset in datasets.items() if name != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.set_name(val.name or "val")
            val.context.execution_options = self._resolve_execution_options("val")
            hints = worker_node_ids if self._enable_shard_locality else None
            for rank, shard in enumerate(val.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank]["val"] = shard
        return output


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
