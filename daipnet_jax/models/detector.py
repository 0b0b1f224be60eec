"""The detector: family `ssd` (ssd.pytorch SSD300/512) or `lrf` with switches `aux ∈ {lsn, ipn}`,
`fusion ∈ {lrf, affm}`, `topdown ∈ {lrf, pafm}` (`lsn/lrf/lrf` = LRF, `ipn/affm/pafm` = DAIPNet).

Forward (LRF skeleton, S = 300; 512 in brackets):
  x = (images − pixel_mean) / pixel_std                            [B, S, S, 3]
  E1, E2 = backbone(x)               (pre-ReLU taps, [B,38,38,512], [B,19,19,1024])   (§2)
  [E3, E4 (, E5)], head-only [E5, E6] ([E6, E7]) = extras(ReLU(E2))                  (§3.1)
  A = aux(x): LSN → [A1..A3] ([A1..A4]), IPN → [L1..L4]                               (§3.2)
  [O1..On] = fusion([E1..En], A), n = 4 (5)                                          (§3.3)
  [P1..P_{n−1}] = topdown([O1..On])                                                  (§3.4)
  loc [B,P,4], logits [B,P,C] = heads([P1..P_{n−1}, On, head-only extras])            (§3.5)

Top-level components: `backbone`, `l2norm` (ssd only), `extras`, `aux`, `fusion`, `topdown`,
`heads`. `model.dtype` is the conv / BatchNorm compute dtype; params, normalisation, L2Norm,
resize, attention pooling and outputs stay float32 (float64 for the float64 model).

Key maps from the official LRF-Net and ssd.pytorch state dicts: docs/design.md, Converted weights.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.affm import AFFMFusion
from daipnet_jax.models.extras import LRFExtras, SSDExtras
from daipnet_jax.models.heads import MultiboxHeads
from daipnet_jax.models.ipn import IPN
from daipnet_jax.models.layers import Array, Dtype, compute_dtype, normalize, wide_dtype
from daipnet_jax.models.lrf import LRFFusion, LRFTopDown
from daipnet_jax.models.lsn import LSN
from daipnet_jax.models.pafm import PAFMTopDown
from daipnet_jax.models.vgg import VGG16

FAMILIES = ("ssd", "lrf")
AUX = ("lsn", "ipn")
FUSION = ("lrf", "affm")
TOPDOWN = ("lrf", "pafm")
# The allowed values of every model switch: `ModelSpec` and config validation read this table.
SWITCHES: dict[str, tuple[object, ...]] = {
    "family": FAMILIES,
    "aux": AUX,
    "fusion": FUSION,
    "topdown": TOPDOWN,
    "image_size": (300, 512),
    # float64: reference runs only (needs jax_enable_x64; see docs/design.md)
    "dtype": ("float32", "bfloat16", "float64"),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The static (hashable) part of `config.model` and `config.priors` the module needs."""

    family: str = "lrf"
    aux: str = "ipn"
    fusion: str = "affm"
    topdown: str = "pafm"
    image_size: int = 300
    num_classes: int = 81
    width: float = 1.0
    dtype: str = "float32"
    align_corners: bool = False
    pixel_mean: tuple[float, ...] = (123.0, 117.0, 104.0)
    pixel_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    anchors: tuple[int, ...] = (6, 6, 6, 6, 4, 4)
    feature_maps: tuple[int, ...] = (38, 19, 10, 5, 3, 1)

    def __post_init__(self) -> None:
        for key, allowed in SWITCHES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"model.{key}={value!r}: expected one of {allowed}")
        if len(self.anchors) != len(self.feature_maps):
            raise ValueError("priors: anchors per location and feature maps differ in length")

    @property
    def num_priors(self) -> int:
        return sum(f * f * k for f, k in zip(self.feature_maps, self.anchors, strict=True))


class L2Norm(nn.Module):
    """ssd.pytorch `L2Norm(512, 20)`: x / (‖x‖₂ over channels + 1e-10) · scale, scale init 20."""

    init_scale: float = 20.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.initializers.constant(self.init_scale), (x.shape[-1],), jnp.float32
        )
        xf = x.astype(wide_dtype(x.dtype))
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True)) + 1e-10
        return (xf / norm * scale).astype(self.dtype)


class Detector(nn.Module):
    """images [B, S, S, 3] float32 RGB 0..255 → (loc [B, P, 4] f32, logits [B, P, C] f32)."""

    spec: ModelSpec

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, Array]:
        s = self.spec
        dt = compute_dtype(s.dtype)
        if images.shape[1:] != (s.image_size, s.image_size, 3):
            raise ValueError(f"images {images.shape}: expected [B, {s.image_size}, ...,  3]")
        x = normalize(images, s.pixel_mean, s.pixel_std).astype(dt)
        e1, e2 = VGG16(s.width, dt, name="backbone")(x)
        if s.family == "ssd":
            sources = [L2Norm(dtype=dt, name="l2norm")(nn.relu(e1)), nn.relu(e2)]
            sources += SSDExtras(s.image_size, s.width, dt, name="extras")(nn.relu(e2))
        else:
            fused, head_only = LRFExtras(s.image_size, s.width, dt, name="extras")(
                nn.relu(e2), train
            )
            aux_cls = LSN if s.aux == "lsn" else IPN
            aux = aux_cls(s.image_size, s.width, dt, name="aux")(x, train)
            fusion_cls = LRFFusion if s.fusion == "lrf" else AFFMFusion
            outs = fusion_cls(dt, name="fusion")([e1, e2, *fused], aux, train)
            topdown_cls = LRFTopDown if s.topdown == "lrf" else PAFMTopDown
            preds = topdown_cls(s.width, s.align_corners, dt, name="topdown")(outs, train)
            sources = [*preds, outs[-1], *head_only]
        sizes = tuple(int(f.shape[1]) for f in sources)
        if sizes != tuple(s.feature_maps):
            raise ValueError(f"head sources have sizes {sizes}, priors expect {s.feature_maps}")
        return MultiboxHeads(s.anchors, s.num_classes, dt, name="heads")(sources)


def official_lrf_modules(image_size: int) -> dict[str, tuple[str, ...]]:
    """Official LRF top-level module name → our module paths ('/'-joined) holding its weights."""
    n = 4 if image_size == 300 else 5
    sources = 6 if image_size == 300 else 7
    out: dict[str, tuple[str, ...]] = {"base": ("backbone",)}
    for i in range(1, n + 1):
        out[f"Norm{i}"] = (f"fusion/Norm{i}",)
    for i in range(1, n):
        out[f"icn{i}"] = (f"aux/icn{i}",)
    for i in range(1, n):
        out[f"dsc{i}"] = (f"fusion/dsc{i}",)
    for name in ("agent", "proj", "convert", "merge"):
        for i in range(1, n):
            out[f"{name}{i}"] = (f"topdown/{name}{i}",)
    out["ibn1"], out["ibn2"] = ("fusion/ibn1",), ("fusion/ibn2",)
    out["extras"] = ("extras",)
    out["loc"] = tuple(f"heads/loc{s}" for s in range(sources))
    out["conf"] = tuple(f"heads/conf{s}" for s in range(sources))
    return out
