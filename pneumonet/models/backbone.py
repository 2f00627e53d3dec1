"""ImageNet backbones from ``keras.applications``, with weights that work offline.

Clusters often cannot reach the Keras download server, so weights can also come from a staged file:
a local path or an ``s3://`` URI to Keras's own no-top ``.h5`` file (legacy format, loaded by layer
order, the same way ``keras.applications`` loads it) or a ``.weights.h5`` written by ``save_weights``.
Every failure becomes a :class:`WeightsError` naming the backbone and the file.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import h5py
import keras

from pneumonet import storage
from pneumonet.errors import ConfigError, StorageError, WeightsError

WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5")
STAGE_HINT = (
    "stage the no-top weights file (e.g. resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5 from "
    "https://storage.googleapis.com/tensorflow/keras-applications/) locally or in S3 and set "
    "model.weights=PATH or model.weights=s3://BUCKET/KEY"
)


def _constructor(name: str):
    constructor = getattr(keras.applications, name, None)
    if not callable(constructor):  # also refuses submodule names such as 'resnet_v2'
        raise ValueError(f"unknown keras.applications model {name!r}")
    return constructor


def build_backbone(name: str, image_size: int, weights: str) -> keras.Model:
    """A headless ``keras.applications`` model (global average pooling) named "backbone".

    ``weights``: "imagenet" (downloaded by Keras, cached in ~/.keras/models), "none" (random), or a
    local path / ``s3://`` URI to a ``.h5`` or ``.weights.h5`` file.
    """
    constructor = _constructor(name)
    common = dict(include_top=False, pooling="avg", input_shape=(image_size, image_size, 3), name="backbone")
    if weights == "none":
        return _construct(constructor, name, None, common)
    if weights == "imagenet":
        try:
            return _construct(constructor, name, "imagenet", common)
        except ConfigError:
            raise
        except Exception as exc:  # get_file raises bare Exception for network errors, ValueError for bad hashes
            raise WeightsError(
                f"cannot get the ImageNet weights for backbone {name} ({str(exc).splitlines()[0]}); if this "
                f"machine is offline, {STAGE_HINT}"
            ) from exc
    return _from_file(constructor, name, weights, common)


def _construct(constructor, name: str, weights: str | None, common: dict) -> keras.Model:
    """Call the application; its input-size check (``obtain_input_shape``) becomes a ConfigError."""
    try:
        return constructor(weights=weights, **common)
    except Exception as exc:
        if any(frame.name == "obtain_input_shape" for frame in traceback.extract_tb(exc.__traceback__)):
            raise ConfigError(
                f"model.image_size={common['input_shape'][0]} does not suit backbone {name}: {exc}"
            ) from exc
        raise


def _from_file(constructor, name: str, uri: str, common: dict) -> keras.Model:
    if not uri.lower().endswith(WEIGHT_SUFFIXES):
        raise WeightsError(
            f"weights file {uri} for backbone {name}: expected 'imagenet', 'none' or a .h5 / .weights.h5 file"
        )
    try:
        with storage.local_path(uri) as path:
            if not Path(path).is_file():
                raise WeightsError(f"weights file {uri} for backbone {name} does not exist")
            if not h5py.is_hdf5(path):
                raise WeightsError(f"weights file {uri} for backbone {name} is not an HDF5 file")
            try:
                # The documented way: keras.applications loads the file itself with model.load_weights,
                # i.e. Keras's format for *.weights.h5 and the legacy by-layer-order one for other .h5.
                model = _construct(constructor, name, str(path), common)
                _check_count(model, Path(path))
            except (ValueError, KeyError, OSError) as exc:
                raise WeightsError(
                    f"weights file {uri} does not fit backbone {name} at "
                    f"{common['input_shape'][0]} px: {str(exc).splitlines()[0]}"
                ) from exc
            return model
    except StorageError as exc:
        raise WeightsError(f"weights file {uri} for backbone {name} cannot be read: {exc}") from exc


def _check_count(model: keras.Model, path: Path) -> None:
    """Refuse a ``.weights.h5`` with more variables than the model.

    Keras matches such files by object path and ignores entries the model lacks, so e.g. ResNet152V2
    weights would load silently (and wrongly) into ResNet50V2. Keras itself checks legacy files' layer count.
    """
    if not path.name.endswith(".weights.h5"):
        return
    found = 0

    def count(_: str, item: object) -> None:
        nonlocal found
        found += isinstance(item, h5py.Dataset)

    with h5py.File(path, "r") as handle:
        handle.visititems(count)
    if found != len(model.weights):
        raise ValueError(f"the file holds {found} variables, the model has {len(model.weights)}")
