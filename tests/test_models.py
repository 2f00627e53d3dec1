"""Model builders: layers, custom CNN, backbones and their weights, transfer head, fine-tuning."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pneumonet import storage
from pneumonet.config import ModelConfig
from pneumonet.errors import ConfigError, WeightsError
from pneumonet.models import (
    build_backbone,
    build_custom,
    build_model,
    build_transfer,
    find_backbone,
    unfreeze_tail,
)
from pneumonet.models.layers import BackbonePreprocess, GrayscaleToRGB, preprocess_module

# ResNet50V2, not MobileNetV2: with random weights MobileNetV2's features are ~1e-13, too small to train on.
SMALL = dict(image_size=32, backbone="ResNet50V2", weights="none", head_units=8, custom_filters=[8, 16], custom_dense_units=8)


def small_cfg(**changes) -> ModelConfig:
    return ModelConfig(**{**SMALL, **changes})


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 1)).astype("float32")


def labels(n: int) -> np.ndarray:
    return (np.arange(n) % 2).astype("float32").reshape(-1, 1)


def layer_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# --- layers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, module",
    [
        ("ResNet152V2", "resnet_v2"),
        ("ResNet50V2", "resnet_v2"),
        ("ResNet50", "resnet"),
        ("ResNet152", "resnet"),
        ("MobileNetV2", "mobilenet_v2"),
        ("MobileNetV3Small", "mobilenet_v3"),
        ("EfficientNetB0", "efficientnet"),
        ("EfficientNetV2S", "efficientnet_v2"),
        ("DenseNet121", "densenet"),
        ("InceptionV3", "inception_v3"),
        ("InceptionResNetV2", "inception_resnet_v2"),
        ("Xception", "xception"),
        ("VGG16", "vgg16"),
        ("VGG19", "vgg19"),
        ("ConvNeXtTiny", "convnext"),
        ("NASNetMobile", "nasnet"),
    ],
)
def test_preprocess_module_maps_every_family(backbone: str, module: str) -> None:
    assert preprocess_module(backbone) == module


def test_preprocess_module_rejects_unknown_names() -> None:
    for name in ("ResNet999", "resnet_v2", "imagenet_utils"):
        with pytest.raises(ValueError, match=name):
            preprocess_module(name)


def test_grayscale_to_rgb_repeats_the_channel() -> None:
    x = images(2, 5)
    out = np.asarray(GrayscaleToRGB()(x))
    assert out.shape == (2, 5, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], x[..., 0])


@pytest.mark.parametrize("backbone, module", [("ResNet50V2", "resnet_v2"), ("ResNet50", "resnet"), ("DenseNet121", "densenet")])
def test_backbone_preprocess_matches_keras_and_round_trips(backbone: str, module: str) -> None:
    rgb = np.repeat(images(2, 4), 3, axis=-1)
    expected = getattr(keras.applications, module).preprocess_input(rgb.copy())
    layer = BackbonePreprocess(backbone)
    np.testing.assert_allclose(np.asarray(layer(rgb)), expected, rtol=1e-5, atol=1e-4)
    clone = BackbonePreprocess.from_config(layer.get_config())
    assert clone.backbone == backbone
    np.testing.assert_allclose(np.asarray(clone(rgb)), expected, rtol=1e-5, atol=1e-4)
    assert keras.saving.get_registered_name(BackbonePreprocess) == "pneumonet>BackbonePreprocess"


# --- custom -----------------------------------------------------------------------------------------------


def test_custom_is_deterministic_and_outputs_a_probability() -> None:
    cfg = small_cfg()
    a, b, c = build_custom(cfg, 3), build_custom(cfg, 3), build_custom(cfg, 4)
    assert a.name == "custom"
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
    assert not all(np.array_equal(x, y) for x, y in zip(a.get_weights(), c.get_weights()))
    out = np.asarray(a(images(3, 32), training=False))
    assert out.shape == (3, 1) and out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    assert a.input_shape == (None, 32, 32, 1)
    assert len(a.losses) > 0  # L2 on the kernels


def test_default_custom_model_is_cheap() -> None:
    model = build_custom(ModelConfig(), 0)
    assert model.count_params() < 500_000  # 1.47 GFLOPs per 224 px image, see custom.py
    assert model.output_shape == (None, 1)


@pytest.mark.parametrize("variant", ["custom", "transfer"])
def test_output_stays_float32_under_mixed_precision(variant: str) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(variant, small_cfg(backbone="ResNet50V2"), seed=0)
        out = model(images(2, 32), training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(np.asarray(out)))


def test_build_model_variants() -> None:
    assert build_model("custom", small_cfg(), 0).name == "custom"
    assert build_model("transfer", small_cfg(), 0).name == "transfer"
    with pytest.raises(ValueError, match="trained transfer model"):
        build_model("finetune", small_cfg(), 0)
    with pytest.raises(ValueError, match="unknown variant"):
        build_model("bogus", small_cfg(), 0)


# --- transfer ---------------------------------------------------------------------------------------------


def test_transfer_parts_share_layers_and_the_head_trains_alone() -> None:
    parts = build_transfer(small_cfg(), seed=0)
    x = images(4, 32)
    backbone = find_backbone(parts.model)
    assert backbone is find_backbone(parts.features)
    assert backbone.name == "backbone" and not backbone.trainable
    assert parts.model.trainable_weights and all(
        any(v is w for w in parts.head.trainable_weights) for v in parts.model.trainable_weights
    )
    before = np.asarray(parts.model(x, training=False))
    np.testing.assert_allclose(before, np.asarray(parts.head(parts.features(x, training=False), training=False)), atol=1e-6)
    backbone_before = [np.array(w) for w in backbone.weights]

    features = np.asarray(parts.features(x, training=False))
    assert features.shape == (4, backbone.output_shape[-1])
    parts.head.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    parts.head.train_on_batch(features, np.ones((4, 1), "float32"))

    after = np.asarray(parts.model(x, training=False))
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, np.asarray(parts.head(parts.features(x, training=False), training=False)), atol=1e-6)
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(backbone_before, backbone.weights))


def test_full_transfer_model_trains_only_its_head() -> None:
    model = build_model("transfer", small_cfg(), seed=0)
    backbone_before = layer_weights(find_backbone(model))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    model.train_on_batch(images(4, 32), labels(4))
    after = layer_weights(find_backbone(model))
    assert all(same(backbone_before[name], after[name]) for name in after)


def test_find_backbone_rejects_a_custom_model() -> None:
    with pytest.raises(ValueError, match="not a transfer model"):
        find_backbone(build_custom(small_cfg(), 0))


def _reloaded(model: keras.Model, tmp_path: Path) -> keras.Model:
    path = tmp_path / "model.keras"
    model.save(path)
    return keras.saving.load_model(path, compile=False)


def test_finetune_trains_only_the_tail_and_never_batchnorm(tmp_path: Path) -> None:
    # The training code fine-tunes a *reloaded* transfer model, so test exactly that.
    model = _reloaded(build_transfer(small_cfg(), seed=0).model, tmp_path)
    backbone = find_backbone(model)
    unfrozen = unfreeze_tail(model, 12)
    tail = backbone.layers[-12:]
    expected = [l.name for l in tail if l.weights and not isinstance(l, keras.layers.BatchNormalization)]
    assert unfrozen == expected and len(unfrozen) >= 2

    before = layer_weights(backbone)
    head_before = [np.array(w) for w in model.get_layer("head").weights]
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    model.train_on_batch(images(4, 32), labels(4))
    after = layer_weights(backbone)

    for name in before:
        if name in unfrozen:
            assert all(not np.array_equal(a, b) for a, b in zip(before[name], after[name])), name
        else:  # earlier layers and every BatchNormalization (gamma, beta, moving stats)
            assert same(before[name], after[name]), name
    assert not all(np.array_equal(a, np.array(b)) for a, b in zip(head_before, model.get_layer("head").weights))


def test_default_resnet152v2_builds_and_unfreezes_30_layers() -> None:
    cfg = ModelConfig(image_size=64, weights="none")
    assert cfg.backbone == "ResNet152V2"
    parts = build_transfer(cfg, seed=0)
    backbone = find_backbone(parts.model)
    assert parts.model.output_shape == (None, 1) and backbone.output_shape == (None, 2048)
    assert not parts.model.get_layer("features").trainable_weights

    unfrozen = unfreeze_tail(parts.model, cfg.finetune_layers)
    tail = backbone.layers[-30:]
    expected = [l.name for l in tail if l.weights and not isinstance(l, keras.layers.BatchNormalization)]
    assert unfrozen == expected
    assert "conv5_block3_3_conv" in unfrozen and "post_bn" not in unfrozen
    assert [l.name for l in backbone.layers if l.trainable_weights] == expected
    assert not any(l.trainable for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization))
    assert not any(l.trainable for l in backbone.layers[:-30])
    n_head = len(parts.head.trainable_weights)
    assert len(parts.model.trainable_weights) == n_head + sum(len(backbone.get_layer(n).trainable_weights) for n in unfrozen)


def test_unfreeze_tail_rejects_zero_layers() -> None:
    with pytest.raises(ValueError):
        unfreeze_tail(build_model("transfer", small_cfg(), 0), 0)


# --- backbone weights -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, dict[str, Path]]:
    """A MobileNetV2 at 32 px with random weights, saved in the new and in Keras's legacy no-top format."""
    from keras.src.legacy.saving import legacy_h5_format  # writes exactly the layout of Keras's download files

    folder = tmp_path_factory.mktemp("weights")
    model = build_backbone("MobileNetV2", 32, "none")
    files = {"new": folder / "mobilenetv2.weights.h5", "legacy": folder / "mobilenet_v2_notop.h5"}
    model.save_weights(files["new"])
    with h5py.File(files["legacy"], "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return model, files


@pytest.mark.parametrize("kind", ["new", "legacy"])
def test_weights_load_from_a_local_file(weight_files, kind: str) -> None:
    reference, files = weight_files
    loaded = build_backbone("MobileNetV2", 48, str(files[kind]))  # weights do not depend on the image size
    assert loaded.name == "backbone"
    assert same(reference.get_weights(), loaded.get_weights())


@pytest.mark.parametrize("kind", ["new", "legacy"])
def test_weights_load_from_s3(weight_files, s3_bucket: str, kind: str) -> None:
    reference, files = weight_files
    uri = f"{s3_bucket}/weights/{files[kind].name}"
    storage.write_bytes(uri, files[kind].read_bytes())
    assert same(reference.get_weights(), build_backbone("MobileNetV2", 32, uri).get_weights())


def test_random_weights_differ_from_a_loaded_file(weight_files) -> None:
    reference, _ = weight_files
    assert not same(reference.get_weights(), build_backbone("MobileNetV2", 32, "none").get_weights())


@pytest.mark.parametrize("kind", ["new", "legacy"])
def test_weights_for_another_backbone_are_refused(weight_files, kind: str) -> None:
    _, files = weight_files
    for other in ("MobileNet", "ResNet50V2"):
        with pytest.raises(WeightsError, match=rf"{files[kind].name}.*{other}"):
            build_backbone(other, 32, str(files[kind]))


def test_bad_weight_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    text = tmp_path / "weights.txt"
    text.write_text("x")
    cases = {
        str(tmp_path / "missing.h5"): "does not exist",
        str(garbage): "not an HDF5 file",
        str(text): r"\.h5",
    }
    for uri, why in cases.items():
        with pytest.raises(WeightsError, match=why) as info:
            build_backbone("MobileNetV2", 32, uri)
        assert uri in str(info.value) and "MobileNetV2" in str(info.value)


def test_missing_s3_weights_are_refused(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/nope/resnet.h5"
    with pytest.raises(WeightsError, match="nope/resnet.h5") as info:
        build_backbone("MobileNetV2", 32, uri)
    assert "MobileNetV2" in str(info.value)


def test_imagenet_download_failure_says_how_to_stage_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError, match="MobileNetV2") as info:
        build_backbone("MobileNetV2", 32, "imagenet")
    assert "model.weights=" in str(info.value) and "URL fetch failure" in str(info.value)


def test_an_image_size_too_small_for_the_backbone_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from keras.src.utils import file_utils

    monkeypatch.setattr(file_utils, "get_file", lambda *a, **k: pytest.fail("must fail before downloading"))
    for weights in ("imagenet", "none"):
        with pytest.raises(ConfigError, match="image_size=32.*InceptionV3"):
            build_backbone("InceptionV3", 32, weights)  # needs at least 75 px
