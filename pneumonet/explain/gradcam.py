"""Grad-CAM heat maps for the PNEUMONIA output, and their overlay on the X-ray as a PNG.

Grad-CAM (Selvaraju et al. 2017; keras-io "Grad-CAM class activation visualization"): weight
the channels of the last spatial feature map by the mean gradient of the score with respect to
them, keep the positive part, normalise to [0, 1] and upsample to the image size.

Keras 3 cannot expose a layer's output that lives inside a nested model (the transfer models'
``backbone`` sits inside ``features``) as an output of the outer graph. So the forward pass is
re-run level by level: each enclosing functional model runs its own graph, with the nested
model on the path to the target layer replaced by a call that also returns the target
activation (at the innermost level a ``keras.Model(inner.inputs, [target.output, inner.output])``).
This works for any graph shape around the nested model, and layers, weights and
``training=False`` behaviour are exactly those of the model being explained. It relies on two
Keras internals, ``Functional._run_through_graph`` (what ``Functional.call`` itself runs) and
``Layer._call_context_args``; ``tests/test_gradcam.py`` breaks loudly if a Keras upgrade moves them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from matplotlib import colormaps
from PIL import Image

_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def _rank(layer: keras.layers.Layer) -> int | None:
    """Rank of a layer's (single) output, or None when it has none or several call sites."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def _is_default_target(layer: keras.layers.Layer) -> bool:
    """A 4-D (batch, h, w, c) feature map; pooling outputs are skipped: same evidence, coarser map."""
    return _rank(layer) == 4 and not isinstance(layer, _POOLING)


def _find_target(model: keras.Model, layer_name: str | None) -> tuple[list[keras.Model], keras.layers.Layer] | None:
    """The chain of nested models from ``model`` down to the one holding the target layer, and that layer.

    Without ``layer_name`` the target is the last non-pooling layer with a 4-D output, looking
    inside nested models first since a backbone holds the deepest feature maps.
    """
    for layer in reversed(model.layers):
        if isinstance(layer, keras.Model):
            found = _find_target(layer, layer_name)
            if found is not None:
                return [model, *found[0]], found[1]
        if (layer.name == layer_name) if layer_name else _is_default_target(layer):
            return [model], layer
    return None


def _forward(path: list[keras.Model], target: keras.layers.Layer, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Run ``path[0]`` on ``x`` in inference mode; returns (target activation, model output)."""
    outer = path[0]
    if len(path) == 1:
        probe = keras.Model(outer.inputs, [target.output, *outer.outputs])
        activation, output = probe(x, training=False)
        return activation, output
    inner = path[1]
    captured: list[tf.Tensor] = []

    def operation_fn(op: Any) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if op is inner:
                activation, output = _forward(path[1:], target, args[0])
                captured.append(activation)
                return output
            if "training" in getattr(op, "_call_context_args", ()):
                kwargs["training"] = False
            return op(*args, **kwargs)

        return call

    if len(outer.inputs) != 1 or len(outer.outputs) != 1:
        raise ValueError(f"Grad-CAM needs single-input, single-output models; {outer.name!r} is not")
    graph = getattr(outer, "_functional", outer)  # a keras.Sequential runs through its inner functional graph
    output = graph._run_through_graph([x], operation_fn=operation_fn)
    if len(captured) != 1:
        raise ValueError(f"nested model {inner.name!r} runs {len(captured)} times in {outer.name!r}; expected once")
    return captured[0], output


def gradcam(model: keras.Model, image: np.ndarray, layer_name: str | None = None) -> np.ndarray:
    """Grad-CAM heat map (S, S) float32 in [0, 1] of the PNEUMONIA output for one (S, S, 1) uint8 image.

    ``layer_name`` picks the feature map (searched in nested models too); by default the last
    4-D one. The gradient is taken of the sigmoid's logit when Keras exposes it, so confident
    predictions (probability rounding to 1.0) still get a map; where every gradient is zero the
    map is all zeros, never NaN.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 1 or image.shape[0] != image.shape[1]:
        raise ValueError(f"gradcam expects one (S, S, 1) grayscale image, got shape {image.shape}")
    found = _find_target(model, layer_name)
    if found is None:
        wanted = f"a layer named {layer_name!r}" if layer_name else "a layer with a 4-D (spatial) output"
        raise ValueError(f"model {model.name!r} has no {wanted} for Grad-CAM")
    path, target = found
    if _rank(target) != 4:
        raise ValueError(f"layer {target.name!r} has no 4-D (batch, h, w, c) output for Grad-CAM to weight")
    x = tf.convert_to_tensor(image[None].astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)  # record from the input on, whatever variables TF deems trainable (frozen backbones)
        activation, output = _forward(path, target, x)
        # Keras' TF backend keeps the pre-sigmoid tensor on the output; its gradient does not vanish at p≈1.
        score = getattr(output, "_keras_logits", output)[:, 0]
    grads = tape.gradient(score, activation)
    size = image.shape[0]
    if grads is None:
        raise ValueError(f"the output of {model.name!r} does not depend on layer {target.name!r}")
    # float64 on the host: maps are small, and mixed-precision (float16) activations must not overflow here.
    grads = grads.numpy().astype(np.float64)[0]
    weights = grads.mean(axis=(0, 1))
    cam = np.maximum(activation.numpy().astype(np.float64)[0] @ weights, 0.0)
    peak = cam.max()
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros((size, size), dtype=np.float32)
    upsampled = tf.image.resize((cam / peak)[None, :, :, None], (size, size), method="bilinear")
    return np.clip(upsampled.numpy()[0, :, :, 0], 0.0, 1.0).astype(np.float32)


def image_png(image: np.ndarray) -> bytes:
    """PNG bytes of one (S, S, 1) uint8 model input: the image the overlay is drawn on, as the model saw
    it (what a viewer shows for a file it cannot display itself, such as DICOM)."""
    gray = np.asarray(image)
    if gray.ndim != 3 or gray.shape[-1] != 1 or gray.dtype != np.uint8:
        raise ValueError(f"image_png expects one (S, S, 1) uint8 image, got {gray.dtype} {gray.shape}")
    buffer = io.BytesIO()
    Image.fromarray(gray[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> bytes:
    """PNG bytes of the heat map in the "jet" colour map blended over the grayscale image (RGB, S×S)."""
    gray = np.asarray(image)
    if gray.ndim == 3 and gray.shape[-1] == 1:
        gray = gray[..., 0]
    heat = np.asarray(heatmap, dtype=np.float32)
    if gray.ndim != 2 or heat.shape != gray.shape:
        raise ValueError(f"overlay needs an (S, S, 1) image and an (S, S) map; got {np.shape(image)}, {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = colormaps["jet"](np.clip(np.nan_to_num(heat), 0.0, 1.0))[..., :3]
    base = np.repeat(gray.astype(np.float32)[..., None] / 255.0, 3, axis=-1)
    blended = np.clip((1.0 - alpha) * base + alpha * colors, 0.0, 1.0)
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended * 255.0).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
