"""A from-scratch CNN in the style of keras-io's "Pneumonia classification" example.

Design, for 2 CPU cores at 224 px: the first block uses plain 3x3 convolutions (one input channel
makes a separable conv pointless, and fine edges matter at full resolution); every later block uses
depthwise-separable convolutions, which cost ~1/8 of a plain conv at these widths. With the default
filters [32, 64, 128, 256] that is 1.47 GFLOPs per 224 px image versus 5.1 GFLOPs for plain
convolutions everywhere (same depth and receptive field); measured on 2 shared CPU cores, training runs
at ~15 images/s versus ~5. Making block 1 separable too saves FLOPs but not time (depthwise convs on
CPU are memory-bound at 224x224x32). BatchNorm after every conv makes training with a 1e-3 learning
rate stable; global average pooling (not Flatten) keeps the head small and the model usable at any
``image_size``.

``model.stem_stride=2`` makes the first convolution stride 2, so block 1 runs at half resolution:
~5x faster training on 2 CPU cores at 128 px, with no loss on another site's patients
(``docs/quality.md``). ``model.input_norm=per_image`` standardises every image on its own instead
of dividing by 255 (exposure differs between sites); ``model.center_crop`` drops the borders;
``model.members`` averages several networks in one model.

BatchNorm momentum is ``model.bn_momentum`` (default 0.99, Keras' own). Its moving
statistics lag the weights for the first 2-3 epochs of ~140 steps (validation ROC-AUC ~0.6 after
2 epochs, against 0.98 with momentum 0.9), but after 5+ epochs of ~140 steps it matched 0.9 in ROC-AUC and was
better calibrated on the real images (``docs/quality.md``); model selection on validation ROC-AUC
skips the lagging early epochs.
"""

from __future__ import annotations

from itertools import count

import keras
from keras import layers

from pneumonet.config import ModelConfig
from pneumonet.models.layers import PerImageStandardization


def build_custom(cfg: ModelConfig, seed: int) -> keras.Model:
    """The uncompiled custom CNN, named "custom"; the same ``seed`` gives the same initial weights.

    With ``cfg.members`` > 1 it is an ensemble in one model: that many networks (``member0`` …) from
    different initial weights, whose probabilities are averaged by the ``probability`` layer. Training
    fits each member on its own loss (:func:`member_outputs`), so they stay independent models.
    """
    if cfg.members == 1:
        return _network(cfg, seed, "custom")
    image = keras.Input((cfg.image_size, cfg.image_size, 1), name="image")
    outputs = [_network(cfg, seed + 1000 * i, f"member{i}")(image) for i in range(cfg.members)]
    return keras.Model(image, layers.Average(name="probability")(outputs), name="custom")


def member_outputs(model: keras.Model) -> keras.Model:
    """The model to train: each member's probability as one column (N, members); shares every weight.

    A one-network model is returned as it is.
    """
    average = model.get_layer("probability")
    if not isinstance(average, layers.Average):
        return model
    return keras.Model(model.input, layers.Concatenate(name="members")(average.input), name=f"{model.name}_members")


def _network(cfg: ModelConfig, seed: int, name: str) -> keras.Model:
    """One CNN from pixels to P(PNEUMONIA)."""
    seeds = count(seed)
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None

    def he() -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=next(seeds))

    def conv_bn_relu(x, filters: int, name: str, separable: bool, strides: int = 1):
        if separable:
            # No L2 on depthwise kernels: 9 weights per channel, decaying them only hurts (MobileNet).
            x = layers.SeparableConv2D(
                filters, 3, padding="same", use_bias=False, depthwise_initializer=he(),
                pointwise_initializer=he(), pointwise_regularizer=reg, name=f"{name}_sepconv",
            )(x)
        else:
            x = layers.Conv2D(
                filters, 3, strides=strides, padding="same", use_bias=False, kernel_initializer=he(),
                kernel_regularizer=reg, name=f"{name}_conv",
            )(x)
        x = layers.BatchNormalization(momentum=cfg.bn_momentum, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    image = keras.Input((cfg.image_size, cfg.image_size, 1), name="image")
    x = image
    if cfg.center_crop < 1.0:
        side = max(8, round(cfg.image_size * cfg.center_crop))
        x = layers.CenterCrop(side, side, name="center_crop")(x)
    if cfg.input_norm == "per_image":
        x = PerImageStandardization(name="standardize")(x)
    else:
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for block, filters in enumerate(cfg.custom_filters, start=1):
        separable = block > 1
        x = conv_bn_relu(x, filters, f"block{block}a", separable, cfg.stem_stride if block == 1 else 1)
        x = conv_bn_relu(x, filters, f"block{block}b", separable)
        x = layers.MaxPooling2D(2, padding="same", name=f"block{block}_pool")(x)  # "same": odd sizes never reach 0
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(cfg.dropout, seed=next(seeds), name="dropout_features")(x)
    x = layers.Dense(
        cfg.custom_dense_units, activation="relu", kernel_initializer=he(), kernel_regularizer=reg, name="dense"
    )(x)
    x = layers.Dropout(cfg.dropout, seed=next(seeds), name="dropout_dense")(x)
    output = layers.Dense(
        1,
        activation="sigmoid",
        dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        name="probability",
    )(x)
    return keras.Model(image, output, name=name)
