"""Model builders by variant name; every model maps (N, S, S, 1) float32 pixels in [0, 255] to P(PNEUMONIA)."""

from __future__ import annotations

import keras

from pneumonet.config import VARIANTS, ModelConfig
from pneumonet.models.backbone import build_backbone
from pneumonet.models.custom import build_custom, member_outputs
from pneumonet.models.transfer import TransferParts, build_transfer, find_backbone, unfreeze_tail

__all__ = [
    "TransferParts",
    "build_backbone",
    "build_custom",
    "build_model",
    "build_transfer",
    "find_backbone",
    "member_outputs",
    "unfreeze_tail",
]


def build_model(variant: str, cfg: ModelConfig, seed: int) -> keras.Model:
    """A fresh, uncompiled model for "custom" or "transfer".

    "finetune" has no fresh model: it continues a trained transfer model (load it, then call
    :func:`unfreeze_tail` with ``cfg.finetune_layers`` and recompile with a small learning rate).
    """
    if variant == "custom":
        return build_custom(cfg, seed)
    if variant == "transfer":
        return build_transfer(cfg, seed).model
    if variant == "finetune":
        raise ValueError(
            "variant 'finetune' starts from a trained transfer model: train 'transfer' first, load its "
            "artifact and call unfreeze_tail(model, cfg.finetune_layers)"
        )
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
