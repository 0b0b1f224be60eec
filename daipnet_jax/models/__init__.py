"""`build(config)`: images [B, S, S, 3] RGB 0..255 → (loc [B, P, 4], logits [B, P, C]) f32.

`train=True` needs `mutable=['batch_stats']` (CONTRIBUTING.md, Public API contracts).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from daipnet_jax.config import anchors_per_location
from daipnet_jax.models.detector import SWITCHES, Detector, ModelSpec, official_lrf_modules

__all__ = ["SWITCHES", "Detector", "ModelSpec", "build", "model_spec", "official_lrf_modules"]


def model_spec(config: Any) -> ModelSpec:
    """The `ModelSpec` of a full config (`config.model` and `config.priors`)."""
    m, p = config.model, config.priors
    return ModelSpec(
        family=str(m.family),
        aux=str(m.aux),
        fusion=str(m.fusion),
        topdown=str(m.topdown),
        image_size=int(m.image_size),
        num_classes=int(m.num_classes),
        width=float(m.width),
        dtype=str(m.dtype),
        align_corners=bool(m.get("align_corners", False)),
        pixel_mean=tuple(float(v) for v in m.pixel_mean),
        pixel_std=tuple(float(v) for v in m.pixel_std),
        anchors=tuple(anchors_per_location(p.aspect_ratios)),
        feature_maps=tuple(int(f) for f in p.feature_maps),
    )


def build(config: Any) -> nn.Module:
    """The detector for `config`: family `ssd` or the LRF skeleton with its switches."""
    return Detector(model_spec(config))
