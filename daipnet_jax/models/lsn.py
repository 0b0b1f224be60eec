"""LRF's light-weight scratch network, `aux = lsn` (official `LDS` + `icn{k}`).

- Downsample the normalised image with max pools 2×2/2: 300 → 150 → 75 → 38 (the last pool pads 1
  on every side, PyTorch `MaxPool2d(2, 2, padding=1)`), 512 → 256 → 128 → 64.
- Level 1 (`icn1`, official `LSN_init`): `part_a_0` CB(3→128, 3×3, pad 1), `part_a_1`
  CB(128→128, 1×1), `part_a_2` CB(128→128, 3×3, pad 1) → skip1; `part_b` CB−(128→512, 1×1) → A1.
- Level k ≥ 2 (`icn{k}`, official `LSN_later`): `part_a` CB(skip_{k−1} → C_k/4, 3×3, stride 2,
  pad 1) → skip_k; `part_b` CB−(C_k/4 → C_k, 1×1) → A_k.
- C = (512, 1024, 512) at 300 and (512, 1024, 512, 256) at 512.

Output: [A_1, …, A_{n−1}], A_1 [B, 38, 38, 512], A_2 [B, 19, 19, 1024], A_3 [B, 10, 10, 512]
(+ A_4 [B, 8, 8, 256] at 512).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import Array, ConvBN, Dtype, channels, max_pool

LSN_CHANNELS = {300: (512, 1024, 512), 512: (512, 1024, 512, 256)}


def lsn_downsample(x: Array, image_size: int) -> Array:
    """The official `LDS`: three 2×2/2 max pools, the last with padding 1 at 300 (75 → 38)."""
    x = max_pool(x, 2, 2)
    x = max_pool(x, 2, 2)
    return max_pool(x, 2, 2, padding=1 if image_size == 300 else 0)


class LSNInit(nn.Module):
    """Level 1: [B, 38, 38, 3] → (skip1 [B, 38, 38, C/4], A1 [B, 38, 38, C])."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        m = max(1, self.features // 4)
        x = ConvBN(m, 3, padding=1, dtype=self.dtype, name="part_a_0")(x, train)
        x = ConvBN(m, 1, dtype=self.dtype, name="part_a_1")(x, train)
        skip = ConvBN(m, 3, padding=1, dtype=self.dtype, name="part_a_2")(x, train)
        out = ConvBN(self.features, 1, relu=False, dtype=self.dtype, name="part_b")(skip, train)
        return skip, out


class LSNLater(nn.Module):
    """Level k ≥ 2: skip_{k−1} [B, H, W, ·] → (skip_k [B, H/2, W/2, C/4], A_k [B, H/2, W/2, C])."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        m = max(1, self.features // 4)
        skip = ConvBN(m, 3, stride=2, padding=1, dtype=self.dtype, name="part_a")(x, train)
        out = ConvBN(self.features, 1, relu=False, dtype=self.dtype, name="part_b")(skip, train)
        return skip, out


class LSN(nn.Module):
    """Normalised image [B, S, S, 3] → [A_1, …, A_{n−1}] (`lsn`)."""

    image_size: int = 300
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> list[Array]:
        chans = [channels(c, self.width) for c in LSN_CHANNELS[self.image_size]]
        x = lsn_downsample(x, self.image_size)
        skip, a = LSNInit(chans[0], dtype=self.dtype, name="icn1")(x, train)
        outs = [a]
        for k, c in enumerate(chans[1:], start=2):
            skip, a = LSNLater(c, dtype=self.dtype, name=f"icn{k}")(skip, train)
            outs.append(a)
        return outs
