"""Multibox heads: per source 3×3 pad-1 convs for loc (k·4) and conf (k·num_classes), k anchors.

Flattened in (row, column, anchor) order = PyTorch's `permute(0, 2, 3, 1).view(B, -1, 4)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import Array, Dtype, conv, wide_dtype


class MultiboxHeads(nn.Module):
    """Sources [[B, f_s, f_s, C_s]] → (loc [B, P, 4] f32, logits [B, P, num_classes] f32)."""

    anchors: tuple[int, ...]
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sources: Sequence[Array]) -> tuple[Array, Array]:
        if len(sources) != len(self.anchors):
            raise ValueError(f"{len(sources)} head sources but {len(self.anchors)} prior levels")
        locs, confs = [], []
        for s, (x, k) in enumerate(zip(sources, self.anchors, strict=True)):
            b = x.shape[0]
            loc = conv(k * 4, 3, padding=1, dtype=self.dtype, name=f"loc{s}")(x)
            conf = conv(k * self.num_classes, 3, padding=1, dtype=self.dtype, name=f"conf{s}")(x)
            locs.append(loc.reshape(b, -1, 4))
            confs.append(conf.reshape(b, -1, self.num_classes))
        out = wide_dtype(self.dtype)
        loc_out = jnp.concatenate(locs, axis=1).astype(out)
        conf_out = jnp.concatenate(confs, axis=1).astype(out)
        return loc_out, conf_out
