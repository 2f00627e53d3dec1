"""From manifest rows to model-ready tensors.

Images are decoded once (by the shared decoder, in parallel threads) into a compact uint8 array:
a grayscale 224 px image is 50 KB, so the 5,216 training images fit in 260 MB and every epoch
after the first costs no decoding at all. Augmentation runs in tf.data on the fly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from pneumonet.config import AugmentConfig, DataConfig
from pneumonet.data.catalog import labels_of
from pneumonet.data.images import load_many

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Decoded images of one split with their labels; ``failures`` lists files that could not be used."""

    images: np.ndarray  # (N, S, S, 1) uint8
    labels: np.ndarray  # (N,) int32, 1 = PNEUMONIA
    rows: pd.DataFrame  # the manifest rows of the images, in order
    failures: dict[str, str]

    def __len__(self) -> int:
        return len(self.labels)


def load_image_set(rows: pd.DataFrame, size: int, data: DataConfig, progress: str | None = None) -> ImageSet:
    """Decode the images of ``rows``; unreadable files are skipped with one warning that lists them."""
    result = load_many(
        rows["uri"].tolist(),
        size,
        workers=data.decode_workers,
        max_pixels=data.max_image_pixels,
        progress=progress,
        max_bytes=data.max_image_bytes,
    )
    if result.failures:
        listing = "; ".join(f"{uri}: {why}" for uri, why in list(result.failures.items())[:10])
        more = f" (and {len(result.failures) - 10} more)" if len(result.failures) > 10 else ""
        log.warning("skipped %d unreadable images: %s%s", len(result.failures), listing, more)
    kept = rows.iloc[result.ok].reset_index(drop=True)
    return ImageSet(result.images, labels_of(kept), kept, dict(result.failures))


class RandomGamma(keras.layers.Layer):
    """A random gamma curve per image, ``255 * (x / 255) ** g`` with ``log g`` uniform in ±``factor``.

    Scanners and their post-processing differ in exposure curve more than in plain brightness; Keras
    has no gamma layer.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = (keras.ops.shape(images)[0], 1, 1, 1)
        log_gamma = keras.random.uniform(shape, -self.factor, self.factor, seed=self.generator)
        scaled = keras.ops.clip(images / 255.0, 1e-6, 1.0)
        return 255.0 * keras.ops.power(scaled, keras.ops.exp(log_gamma))

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}


def augmentation(cfg: AugmentConfig, seed: int) -> keras.Sequential:
    """Geometric and photometric changes a radiograph from another site can plausibly show.

    Values stay in [0, 255]. ``zoom_in`` and ``stretch`` vary the framing: the training archive frames
    normal chests wider than pneumonia ones, a shortcut that does not transfer to other sites.
    """
    steps: list[keras.layers.Layer] = []
    if cfg.rotation:
        steps.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="constant", seed=seed))
    if cfg.shift:
        steps.append(keras.layers.RandomTranslation(cfg.shift, cfg.shift, fill_mode="constant", seed=seed + 1))
    if cfg.zoom or cfg.zoom_in:
        # Keras: a negative factor zooms in.
        steps.append(keras.layers.RandomZoom((-cfg.zoom_in or -cfg.zoom, cfg.zoom), fill_mode="constant", seed=seed + 2))
    if cfg.stretch:
        steps.append(keras.layers.RandomZoom(0.0, (-cfg.stretch, cfg.stretch), fill_mode="constant", seed=seed + 6))
    if cfg.brightness:
        steps.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0.0, 255.0), seed=seed + 3))
    if cfg.contrast:
        steps.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0.0, 255.0), seed=seed + 4))
    if cfg.gamma:
        steps.append(RandomGamma(cfg.gamma, seed=seed + 7))
    if cfg.blur:
        steps.append(keras.layers.RandomGaussianBlur(factor=1.0, kernel_size=5, sigma=cfg.blur, value_range=(0.0, 255.0), seed=seed + 8))
    if cfg.horizontal_flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed + 5))
    return keras.Sequential(steps, name="augmentation")


def training_dataset(
    inputs: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, augment: AugmentConfig | None = None
) -> tf.data.Dataset:
    """Shuffled batches of (float32 inputs, float32 labels), augmented when ``augment`` is given.

    ``inputs`` are images (N, S, S, 1) or cached backbone features (N, D).
    """
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels.astype("float32")))
    # Dropping the ragged last batch keeps one traced step shape and spares BatchNorm a batch of one.
    drop = len(labels) > batch_size
    dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).batch(batch_size, drop_remainder=drop)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        layers = augmentation(augment, seed)
        if layers.layers:
            dataset = dataset.map(
                lambda x, y: (tf.clip_by_value(layers(x, training=True), 0.0, 255.0), y),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
    return dataset.prefetch(tf.data.AUTOTUNE)


def inference_batches(inputs: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Ordered float32 batches for prediction."""
    dataset = tf.data.Dataset.from_tensor_slices(inputs).batch(batch_size)
    return dataset.map(lambda x: tf.cast(x, tf.float32)).prefetch(tf.data.AUTOTUNE)
