"""Training augmentation: the framing and exposure changes that other sites' images show."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonet.config import load_config
from pneumonet.data.pipeline import RandomGamma, augmentation, training_dataset

NONE = ["train.augment.rotation=0", "train.augment.shift=0", "train.augment.zoom=0",
        "train.augment.brightness=0", "train.augment.contrast=0"]  # fmt: skip


def augment(*overrides: str):
    return load_config(None, [*NONE, *overrides]).train.augment


def bordered(n: int, size: int = 64) -> np.ndarray:
    """Dark images with a bright 4-pixel left border: zooming in pushes the border out of the frame."""
    images = np.zeros((n, size, size, 1), np.uint8)
    images[:, :, :4] = 255
    return images


def one_batch(images: np.ndarray, labels: np.ndarray, cfg, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = next(iter(training_dataset(images, labels, len(labels), seed, cfg)))
    return x.numpy(), y.numpy()


def test_zoom_in_crops_without_black_margins_and_stretch_changes_width() -> None:
    images = np.full((16, 64, 64, 1), 200, np.uint8)
    x, _ = one_batch(images, np.zeros(16, np.int32), augment("train.augment.zoom_in=0.4"))
    assert np.all(x > 150)  # zooming in never shows the black fill
    stretched = augmentation(augment("train.augment.stretch=0.4"), seed=1)(bordered(16).astype("float32"), training=True)
    widths = (np.asarray(stretched)[:, 32, :, 0] > 127).sum(axis=1)
    assert len(set(widths.tolist())) > 1  # the border's width varies: the aspect ratio changed


def test_random_gamma_keeps_range_and_order_of_pixels() -> None:
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (8, 64, 1))[..., None]
    out = np.asarray(RandomGamma(0.5, seed=3)(ramp, training=True))
    assert out.min() >= 0.0 and out.max() <= 255.0 + 1e-3
    assert np.all(np.diff(out[:, 0, :, 0], axis=1) >= -1e-3)  # a gamma curve is monotonic
    assert not np.allclose(out[0], out[1])  # one curve per image
    np.testing.assert_array_equal(np.asarray(RandomGamma(0.5)(ramp, training=False)), ramp)


def test_blur_and_gamma_run_in_the_training_pipeline() -> None:
    x, _ = one_batch(bordered(8), np.zeros(8, np.int32), augment("train.augment.gamma=0.3", "train.augment.blur=1.0"))
    assert x.shape == (8, 64, 64, 1) and 0.0 <= x.min() and x.max() <= 255.0
    edge = x[:, 32, 3:6, 0]
    assert np.any((edge > 5) & (edge < 250))  # the sharp border was blurred


@pytest.mark.parametrize("key", ["zoom_in", "stretch", "gamma", "blur"])
def test_negative_strengths_are_refused_by_name(key: str) -> None:
    from pneumonet.errors import ConfigError

    with pytest.raises(ConfigError, match=f"train.augment.{key}"):
        load_config(None, [f"train.augment.{key}=-0.1"])
