"""The image pyramid network, `aux = ipn` (paper §3.2, eqs. 10–13).

- eq. 10, image pyramid (`image_pyramid`): I_p1 is the normalised image pooled to the first
  detection scale exactly as LRF's scratch network does it (38 at 300, 64 at 512), then
  I_p{i+1} = maxpool 2×2/2 ceil mode (I_pi): 38/19/10/5 at 300, 64/32/16/8 at 512.
- eq. 11, F_pi = G_i(I_pi), G_i = CB(3→m, 3×3, pad 1), CB(m→m, 3×3, pad 1), CB−(m→C_i, 1×1),
  m = C_i/4, C = (512, 1024, 512, 256). choice: one G per level, weights not shared (the channel
  counts differ). Names `G{i}/cb0..cb2`.
- eq. 12, M_1 = CB(F_p1: 512→1024, 3×3, stride 2, pad 1), M_2 = CB(M_1: 1024→512),
  M_3 = CB(M_2: 512→256), n = 3 as the paper sets it. Names `M1..M3`.
- eq. 13, L_1 = F_p1, L_i = F_pi + M_{i−1} (i = 2..4).

Output: [L_1, L_2, L_3, L_4] with C_i channels at the four pyramid sizes.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import Array, ConvBN, Dtype, channels, max_pool
from daipnet_jax.models.lsn import lsn_downsample

IPN_CHANNELS = (512, 1024, 512, 256)
IPN_LEVELS = 4


def image_pyramid(x: Array, image_size: int, levels: int = IPN_LEVELS) -> list[Array]:
    """Eq. 10: [B, S, S, 3] → [I_p1, …, I_p4] ([B, 38, 38, 3], …, [B, 5, 5, 3] at 300)."""
    out = [lsn_downsample(x, image_size)]
    for _ in range(levels - 1):
        out.append(max_pool(out[-1], 2, 2, ceil_mode=True))
    return out


class ConvGroup(nn.Module):
    """Eq. 11's G: two 3×3 CB and one 1×1 CB−. [B, H, W, 3] → [B, H, W, features]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        m = max(1, self.features // 4)
        x = ConvBN(m, 3, padding=1, dtype=self.dtype, name="cb0")(x, train)
        x = ConvBN(m, 3, padding=1, dtype=self.dtype, name="cb1")(x, train)
        return ConvBN(self.features, 1, relu=False, dtype=self.dtype, name="cb2")(x, train)


class IPN(nn.Module):
    """Normalised image [B, S, S, 3] → [L_1, …, L_4] (eqs. 10–13)."""

    image_size: int = 300
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> list[Array]:
        chans = [channels(c, self.width) for c in IPN_CHANNELS]
        pyramid = image_pyramid(x, self.image_size)
        f = [
            ConvGroup(c, dtype=self.dtype, name=f"G{i + 1}")(img, train)
            for i, (c, img) in enumerate(zip(chans, pyramid, strict=True))
        ]
        outs = [f[0]]
        m = f[0]
        for i in range(1, IPN_LEVELS):
            m = ConvBN(chans[i], 3, stride=2, padding=1, dtype=self.dtype, name=f"M{i}")(m, train)
            outs.append(f[i] + m)
        return outs
