"""Extra layers after the backbone for the LRF skeleton, and ssd.pytorch's extras.

LRF / DAIPNet (`LRFExtras`), input ReLU(conv7):
- "OTC(a→b)" = CB(a→a/4, 1×1) then CB−(a/4→b, 3×3, stride 2, pad 1); a ReLU follows on the main
  path, the pre-ReLU output is the fused feature E_i.
- 300: OTC(1024→512) → E3 (10×10), OTC(512→256) → E4 (5×5), CB(256→128, 1×1),
  CB(128→256, 3×3, valid) → E5 (3×3), CB(256→128, 1×1), CB(128→256, 3×3, valid) → E6 (1×1).
- 512: OTC(1024→512) → E3 (16), OTC(512→256) → E4 (8), OTC(256→256) → E5 (4),
  OTC(256→256) → E6 (2, after its ReLU), CB(256→128, 1×1), CB(128→256, 4×4, pad 1) → E7 (1).
Submodule names carry the official `extras.N` index: `otc0`, `otc2`, (`otc4`, `otc6`), `cb4`…`cb7`
(300) / `cb8`, `cb9` (512); odd indices are the parameter-free ReLUs.

SSD (`SSDExtras`, ssd.pytorch layout): plain convs with bias, each followed by ReLU, names
`conv0`…`conv7` (= `extras.0`…`extras.7`); every second output is a head source.
300: 1×1 256, 3×3/2 512 (10), 1×1 128, 3×3/2 256 (5), 1×1 128, 3×3 valid 256 (3), 1×1 128,
3×3 valid 256 (1).
choice (ssd.pytorch has no 512 extras): the original Caffe SSD512 layout, 1×1 256, 3×3/2 512 (16),
then 1×1 128 + 3×3/2 256 three times (8, 4, 2), then 1×1 128 + 4×4 pad 1 256 (1): `conv0`…`conv9`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import Array, ConvBN, Dtype, channels, conv


class OneThreeConv(nn.Module):
    """OTC(a→b): CB(a→a/4, 1×1) → CB−(a/4→b, 3×3, stride 2, pad 1). [B,H,W,a] → [B,H/2,W/2,b]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        inter = max(1, x.shape[-1] // 4)
        x = ConvBN(inter, 1, dtype=self.dtype, name="single_branch_0")(x, train)
        return ConvBN(
            self.features,
            3,
            stride=2,
            padding=1,
            relu=False,
            dtype=self.dtype,
            name="single_branch_1",
        )(x, train)


class LRFExtras(nn.Module):
    """ReLU(conv7) [B, 19, 19, 1024] → (fused [E3, E4] (+E5 at 512), head-only [E5, E6] / [E6, E7])."""

    image_size: int = 300
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[list[Array], list[Array]]:
        def ch(n: int) -> int:
            return channels(n, self.width)

        def cb(n: int, k: int, name: str, padding: int = 0) -> ConvBN:
            return ConvBN(ch(n), k, padding=padding, dtype=self.dtype, name=name)

        fused: list[Array] = []
        outs = (512, 256) if self.image_size == 300 else (512, 256, 256)
        for j, n in enumerate(outs):
            e = OneThreeConv(ch(n), dtype=self.dtype, name=f"otc{2 * j}")(x, train)
            fused.append(e)
            x = nn.relu(e)
        if self.image_size == 300:
            e5 = cb(256, 3, "cb5")(cb(128, 1, "cb4")(x, train), train)
            e6 = cb(256, 3, "cb7")(cb(128, 1, "cb6")(e5, train), train)
            return fused, [e5, e6]
        e6 = nn.relu(OneThreeConv(ch(256), dtype=self.dtype, name="otc6")(x, train))
        e7 = cb(256, 4, "cb9", padding=1)(cb(128, 1, "cb8")(e6, train), train)
        return fused, [e6, e7]


class SSDExtras(nn.Module):
    """ssd.pytorch extras: ReLU(conv7) → head sources (4 at 300: 10, 5, 3, 1; 5 at 512)."""

    image_size: int = 300
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        if self.image_size == 300:
            # (features, kernel, stride, padding) per conv
            spec = [(256, 1, 1, 0), (512, 3, 2, 1), (128, 1, 1, 0), (256, 3, 2, 1)]
            spec += [(128, 1, 1, 0), (256, 3, 1, 0)] * 2
        else:
            spec = [(256, 1, 1, 0), (512, 3, 2, 1)] + [(128, 1, 1, 0), (256, 3, 2, 1)] * 3
            spec += [(128, 1, 1, 0), (256, 4, 1, 1)]
        sources = []
        for k, (n, kernel, stride, padding) in enumerate(spec):
            x = conv(
                channels(n, self.width),
                kernel,
                stride=stride,
                padding=padding,
                dtype=self.dtype,
                name=f"conv{k}",
            )(x)
            x = nn.relu(x)
            if k % 2 == 1:
                sources.append(x)
        return sources
