"""Registered preprocessing layers, so a saved model takes raw [0, 255] grayscale pixels and is self-contained.

Serving and batch scoring only know the artifact; if normalisation lived outside the graph, every door
would have to repeat it exactly. These layers are registered under the package "pneumonet", so
``keras.saving.load_model`` finds them once this module is imported.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

PACKAGE = "pneumonet"


def preprocess_module(backbone: str) -> str:
    """The ``keras.applications`` submodule whose ``preprocess_input`` matches a backbone class name.

    The public submodule that exports the class wins (``ResNet50V2`` -> ``resnet_v2``, ``ResNet50`` ->
    ``resnet``); classes no submodule re-exports (``MobileNetV3Small``) fall back to the module that defines
    them. A lookup instead of a hand-written table, so new Keras backbones need no code change.
    """
    apps = keras.applications
    constructor = getattr(apps, backbone, None)
    if not callable(constructor):  # also refuses submodule names such as 'resnet_v2'
        raise ValueError(f"unknown keras.applications model {backbone!r}")
    exporters = sorted(
        name
        for name in dir(apps)
        if isinstance(getattr(apps, name), types.ModuleType)
        and getattr(getattr(apps, name), backbone, None) is constructor
        and hasattr(getattr(apps, name), "preprocess_input")
    )
    if exporters:
        return exporters[0]
    defining = constructor.__module__.rsplit(".", 1)[-1]
    if not hasattr(getattr(apps, defining, None), "preprocess_input"):
        raise ValueError(f"no keras.applications preprocess_input found for backbone {backbone!r}")
    return defining


def _preprocess_fn(backbone: str) -> Callable[[Any], Any]:
    return getattr(keras.applications, preprocess_module(backbone)).preprocess_input


@keras.saving.register_keras_serializable(package=PACKAGE)
class GrayscaleToRGB(keras.layers.Layer):
    """Repeat the single grayscale channel three times, as ImageNet backbones expect RGB."""

    def call(self, inputs: Any) -> Any:
        return ops.repeat(inputs, 3, axis=-1)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], 3)


@keras.saving.register_keras_serializable(package=PACKAGE)
class BackbonePreprocess(keras.layers.Layer):
    """Apply the ``preprocess_input`` of a ``keras.applications`` backbone to RGB pixels in [0, 255].

    Some backbones (EfficientNet, ConvNeXt, MobileNetV3) normalise inside their own graph; their
    ``preprocess_input`` is the identity and so is this layer.
    """

    def __init__(self, backbone: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self._fn = _preprocess_fn(backbone)

    def call(self, inputs: Any) -> Any:
        return self._fn(inputs)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone}



@keras.saving.register_keras_serializable(package=PACKAGE)
class PerImageStandardization(keras.layers.Layer):
    """Scale each image to zero mean and unit variance over its own pixels.

    Scanners and their post-processing differ in exposure and contrast; standardising inside the
    graph takes that difference away from the model, and the saved model stays self-contained.
    """

    def call(self, inputs: Any) -> Any:
        mean = ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
        std = ops.std(inputs, axis=(1, 2, 3), keepdims=True)
        return (inputs - mean) / ops.maximum(std, 1e-3)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)
