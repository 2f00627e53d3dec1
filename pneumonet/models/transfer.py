"""Transfer learning: a frozen ImageNet backbone plus a small new head, and the fine-tuning switch.

The model is built from two sub-models that share layer objects with it: ``features`` (image ->
pooled backbone features) and ``head`` (features -> probability). Training can therefore run the frozen
backbone once over the dataset, train ``head`` on the cached features, and the full ``model`` has the
trained head, with no weight copying.

BatchNormalization statistics of the backbone never move (keras-io's transfer-learning guide: updating
them on a small dataset wrecks the pretrained features). The backbone is called with
``training=False`` as the guide does, but the pinned Keras 3.15 lets ``fit``'s ``training=True``
override that inside a functional model (addressed upstream in keras-team/keras#23364). What holds
the statistics is that every BatchNormalization layer stays frozen, here and in :func:`unfreeze_tail`,
and a frozen BN layer always runs in inference mode in Keras 3. (Dropout inside a backbone, e.g.
EfficientNet's, is active while the full model trains; ResNet, DenseNet and MobileNet have none.)
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from pneumonet.config import ModelConfig
from pneumonet.models.backbone import build_backbone
from pneumonet.models.layers import BackbonePreprocess, GrayscaleToRGB

BACKBONE_NAME = "backbone"


@dataclass(frozen=True)
class TransferParts:
    """The full model and its two halves; all three share the same layers and weights."""

    model: keras.Model
    features: keras.Model
    head: keras.Model


def build_transfer(cfg: ModelConfig, seed: int) -> TransferParts:
    """Backbone ``cfg.backbone`` (weights ``cfg.weights``, frozen) and a new head; models are uncompiled."""
    size = cfg.image_size
    backbone = build_backbone(cfg.backbone, size, cfg.weights)
    backbone.trainable = False

    image = keras.Input((size, size, 1), name="image")
    rgb = GrayscaleToRGB(name="to_rgb")(image)
    normalised = BackbonePreprocess(cfg.backbone, name="preprocess")(rgb)
    pooled = backbone(normalised, training=False)
    features = keras.Model(image, pooled, name="features")

    feature_input = keras.Input((pooled.shape[-1],), name="pooled")
    x = feature_input
    if cfg.head_units > 0:
        x = layers.Dense(
            cfg.head_units, activation="relu", kernel_initializer=keras.initializers.HeNormal(seed=seed),
            name="head_dense",
        )(x)
    x = layers.Dropout(cfg.dropout, seed=seed + 1, name="head_dropout")(x)
    probability = layers.Dense(
        1, activation="sigmoid", dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
        name="probability",
    )(x)
    head = keras.Model(feature_input, probability, name="head")

    model_input = keras.Input((size, size, 1), name="image")
    model = keras.Model(model_input, head(features(model_input)), name="transfer")
    return TransferParts(model=model, features=features, head=head)


def _search(model: keras.Model) -> keras.Model | None:
    if model.name == BACKBONE_NAME:
        return model
    for layer in model.layers:
        found = _search(layer) if isinstance(layer, keras.Model) else None
        if found is not None:
            return found
    return None


def find_backbone(model: keras.Model) -> keras.Model:
    """The nested model named "backbone", searched depth-first (works on built and reloaded models)."""
    found = _search(model)
    if found is None:
        raise ValueError(f"model {model.name!r} has no sub-model named {BACKBONE_NAME!r}: it is not a transfer model")
    return found


def unfreeze_tail(model: keras.Model, n_layers: int) -> list[str]:
    """Make the last ``n_layers`` backbone layers trainable, BatchNormalization excepted (see module doc).

    "Layers" are counted as in keras-io's fine-tuning guide (``base.layers[-n:]``), i.e. including
    layers without weights (activations, adds, pooling), so numbers from tutorials mean the same here.
    Returns the names of the layers that now have trainable weights. Recompile the model afterwards.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    backbone = find_backbone(model)
    backbone.trainable = True
    tail = {id(layer) for layer in backbone.layers[-n_layers:]}
    unfrozen = []
    for layer in backbone.layers:
        layer.trainable = id(layer) in tail and not isinstance(layer, layers.BatchNormalization)
        if layer.trainable and layer.trainable_weights:
            unfrozen.append(layer.name)
    return unfrozen
