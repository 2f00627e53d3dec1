"""Grad-CAM on flat and nested-backbone models, its localisation, and the PNG overlay."""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest
from PIL import Image

from pneumonet.explain import gradcam, image_png, overlay_png

S = 64


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (S, S, 1), dtype=np.uint8)


def _flat_cnn(bias: float = 0.0) -> keras.Model:
    keras.utils.set_random_seed(0)
    image = keras.Input((S, S, 1))
    x = keras.layers.Rescaling(1 / 255.0)(image)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", bias_initializer=keras.initializers.Constant(bias))(x)
    return keras.Model(image, out, name="flat")


def _nested_transfer() -> keras.Model:
    """The transfer models' shape: model = head(features(image)), backbone nested in features, frozen."""
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=(S, S, 3), alpha=0.35, name="backbone"
    )
    backbone.trainable = False
    image = keras.Input((S, S, 1))
    rgb = keras.layers.Concatenate()([image, image, image])  # not a chain: the graph runner must cope
    pooled = backbone(keras.layers.Rescaling(1 / 127.5, offset=-1.0)(rgb), training=False)
    features = keras.Model(image, pooled, name="features")
    feature_input = keras.Input((pooled.shape[-1],))
    x = keras.layers.Dropout(0.3)(keras.layers.Dense(8, activation="relu")(feature_input))
    head = keras.Model(feature_input, keras.layers.Dense(1, activation="sigmoid")(x), name="head")
    model_input = keras.Input((S, S, 1))
    return keras.Model(model_input, head(features(model_input)), name="transfer")


def _check_map(heat: np.ndarray) -> None:
    assert heat.shape == (S, S) and heat.dtype == np.float32
    assert np.isfinite(heat).all()
    assert heat.min() >= 0.0 and heat.max() <= 1.0


def test_flat_cnn() -> None:
    heat = gradcam(_flat_cnn(), _image())
    _check_map(heat)
    assert heat.max() > 0.5  # normalised by its peak (bilinear upsampling may shave the very top)


def test_confident_prediction_still_has_a_map() -> None:
    """p rounds to 1.0 in float32; the gradient of the logit, not of the probability, keeps the map alive."""
    model = _flat_cnn(bias=40.0)
    assert float(model(_image()[None].astype("float32"))[0, 0]) == 1.0
    assert gradcam(model, _image()).max() > 0.5


def test_zero_gradients_give_zeros_not_nan() -> None:
    model = _flat_cnn()
    dense = model.layers[-1]
    dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    heat = gradcam(model, _image())
    _check_map(heat)
    assert not heat.any()


def test_nested_backbone_model() -> None:
    model = _nested_transfer()
    heat = gradcam(model, _image(1))
    _check_map(heat)
    explicit = gradcam(model, _image(1), layer_name="out_relu")  # MobileNetV2's last feature map, found by name
    np.testing.assert_allclose(heat, explicit, atol=1e-6)


def test_left_half_model_is_explained_on_the_left() -> None:
    """A model that only sees the left half of the image must get a heat map on the left half."""
    keras.utils.set_random_seed(1)
    mask = np.zeros((1, S, S, 1), dtype="float32")
    mask[:, :, : S // 2] = 1.0
    image = keras.Input((S, S, 1))
    x = keras.layers.Rescaling(1 / 255.0)(image)
    x = keras.layers.Lambda(lambda t: t * keras.ops.convert_to_tensor(mask))(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.MaxPooling2D(4)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones")(x)
    model = keras.Model(image, out)

    img = _image(2)
    right_changed = img.copy()
    right_changed[:, S // 2 :] = 255 - right_changed[:, S // 2 :]
    probs = model(np.stack([img, right_changed]).astype("float32")).numpy()
    assert probs[0, 0] == pytest.approx(probs[1, 0])  # the construction really ignores the right half

    heat = gradcam(model, img)
    _check_map(heat)
    left, right = heat[:, : S // 2].sum(), heat[:, S // 2 :].sum()
    assert left > 0 and right / (left + right) < 0.05


def test_transfer_model_from_pneumonet_models(tmp_path) -> None:
    """The real builders, and a saved-and-reloaded transfer model (what serving explains) gives the same map."""
    from pneumonet import models
    from pneumonet.config import ModelConfig

    cfg = ModelConfig(image_size=S, backbone="MobileNetV2", weights="none", head_units=8)
    model = models.build_model("transfer", cfg, seed=0)
    heat = gradcam(model, _image(3))
    _check_map(heat)
    assert heat.max() > 0.5
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(gradcam(reloaded, _image(3)), heat, atol=1e-5)
    small = ModelConfig(image_size=S, custom_filters=[4, 8], custom_dense_units=8)
    custom = models.build_model("custom", small, seed=0)
    _check_map(gradcam(custom, _image(3)))


def test_bad_inputs() -> None:
    model = _flat_cnn()
    with pytest.raises(ValueError, match=r"\(S, S, 1\)"):
        gradcam(model, np.zeros((S, S), dtype=np.uint8))
    with pytest.raises(ValueError, match="no_such_layer"):
        gradcam(model, _image(), layer_name="no_such_layer")
    with pytest.raises(ValueError, match="4-D"):
        gradcam(model, _image(), layer_name=model.layers[-1].name)


def test_overlay_png() -> None:
    img = _image()
    heat = np.zeros((S, S), dtype=np.float32)
    heat[:, : S // 2] = 1.0
    data = overlay_png(img, heat)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (S, S)
        pixels = np.asarray(decoded).astype(int)
    # "jet" is dark red at 1 and dark blue at 0: the hot half is redder than blue, the cold half the reverse.
    assert (pixels[:, : S // 2, 0] - pixels[:, : S // 2, 2]).mean() > 30
    assert (pixels[:, S // 2 :, 2] - pixels[:, S // 2 :, 0]).mean() > 30
    with pytest.raises(ValueError, match=r"\(S, S\) map"):
        overlay_png(img, heat[:10])


def test_image_png_is_the_model_input_as_it_is() -> None:
    """The model's view the web page shows for a file the browser cannot display (DICOM)."""
    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 1), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(image_png(pixels))))
    assert decoded.shape == (24, 24) and np.array_equal(decoded, pixels[..., 0])
    for bad in (pixels[..., 0], pixels.astype(np.float32)):
        with pytest.raises(ValueError, match="uint8"):
            image_png(bad)
