"""Pyramid attention fusion module, `topdown = pafm` (paper §3.1.2, eqs. 4–9).

- T_j = CB(C_j→128, 1×1)(O_j), j = 2..n (`proj{j−1}`, shared with the LRF top-down).
- eq. 4: U_i = X_i^cat = concat_{j>i}(resize(T_j)) (bilinear, PyTorch semantics).
- eq. 5: z = global average pool of U_i. eq. 6: g = Conv1×1(ReLU(Conv1×1(z))) (`fc1`, `fc2`,
  with bias); choice: reduction 16, at least 8 hidden (docs/design.md, PAFM channel attention).
- eq. 7: X_att = sigmoid(g) ⊙ U_i (the weights are sown as `intermediates/.../attention_weights`).
- eq. 8: X_init = concat(C3(O_i), C4(U_i)); eq. 9: P_i = concat(C5(X_init), C6(X_att)).
  C3: CB(C_i→C_i/2, 1×1), C4: CB(U_i→C_i/2, 1×1), C5: CB(C_i→C_i/2, 1×1), C6: CB(U_i→C_i/2, 1×1)
  (the paper says 1×1 convs; choice: each with BN and ReLU). P_i has C_i channels.
Names: `proj{j}`, `level{i}/{c3,c4,c5,c6}`, `level{i}/attention/{fc1,fc2}`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import Array, ConvBN, Dtype, conv, wide_dtype
from daipnet_jax.models.lrf import TopDown

ATTENTION_REDUCTION = 16
ATTENTION_MIN_CHANNELS = 8


class ChannelAttention(nn.Module):
    """Eqs. 5–7: U [B, h, w, c] → sigmoid(g) [B, 1, 1, c], the channel weights in (0, 1)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, u: Array) -> Array:
        c = u.shape[-1]
        hidden = max(ATTENTION_MIN_CHANNELS, c // ATTENTION_REDUCTION)
        z = jnp.mean(u.astype(wide_dtype(u.dtype)), axis=(1, 2), keepdims=True).astype(self.dtype)
        g = conv(c, 1, dtype=self.dtype, name="fc2")(
            nn.relu(conv(hidden, 1, dtype=self.dtype, name="fc1")(z))
        )
        return nn.sigmoid(g.astype(wide_dtype(g.dtype))).astype(self.dtype)


class PAFMLevel(nn.Module):
    """Eqs. 7–9 for one level: (O_i [B,h,w,C_i], U_i [B,h,w,U]) → P_i [B,h,w,C_i]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, o: Array, u: Array, train: bool = False) -> Array:
        c = o.shape[-1]
        half = max(1, c // 2)

        def cb(name: str) -> ConvBN:
            return ConvBN(half, 1, dtype=self.dtype, name=name)

        weights = ChannelAttention(self.dtype, name="attention")(u)
        self.sow("intermediates", "attention_weights", weights)
        x_att = weights * u
        x_init = jnp.concatenate([cb("c3")(o, train), cb("c4")(u, train)], axis=-1)
        return jnp.concatenate([cb("c5")(x_init, train), cb("c6")(x_att, train)], axis=-1)


class PAFMTopDown(TopDown):
    """P_i = PAFMLevel_i(O_i, U_i)."""

    def level(self, i: int, o: Array, u: Array, train: bool) -> Array:
        return PAFMLevel(self.dtype, name=f"level{i + 1}")(o, u, train)
