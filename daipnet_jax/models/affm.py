"""Adaptive feature fusion module, `fusion = affm` (paper §3.1.1, eqs. 1–3).

- eq. 1: O_i = ω_i · L_i + (1 − ω_i) · B_i; ω_i one unconstrained scalar parameter per level
  (`level{i}/omega`), initialised to 0 (so training starts from the backbone branch B_i).
- eq. 2: B_i = R_b(D_i(E_{i−1}) + R_a(E_i)) + R_a(E_i); R_a(E_i) computed once, used twice.
  E_{i−1} is the previous BACKBONE feature (the paper's wording), not the previous fused output.
  D_i = Ds(C_{i−1}→C_i) = CB−(3×3, stride 2, pad 1) (`level{i}/down`).
  choice: for i = 1 (no E_0) B_1 = R_b(R_a(E_1)) + R_a(E_1).
- R = bottleneck residual block (choice; the paper only says "a residual block"):
  y = ReLU(x + CB−(c/4→c, 1×1)(CB(c/4→c/4, 3×3)(CB(c→c/4, 1×1)(x)))) (`R_a`, `R_b`, each
  `cb0..cb2`).
- Levels with an auxiliary feature L_i (1..4 for ipn; 1..3 at 300 / 1..4 at 512 for lsn, L_i = A_i)
  use eq. 1; a level without one uses O_i = B_i and has no ω (choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import Array, ConvBN, Dtype


class ResidualBlock(nn.Module):
    """Bottleneck residual block R: [B, H, W, c] → [B, H, W, c]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        m = max(1, c // 4)
        y = ConvBN(m, 1, dtype=self.dtype, name="cb0")(x, train)
        y = ConvBN(m, 3, padding=1, dtype=self.dtype, name="cb1")(y, train)
        y = ConvBN(c, 1, relu=False, dtype=self.dtype, name="cb2")(y, train)
        return nn.relu(x + y)


class AFFMLevel(nn.Module):
    """One level: (E_i [B,h,w,C_i], E_{i−1} [B,2h',2w',C_{i−1}] or None, L_i or None) → O_i."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, e: Array, e_prev: Array | None, aux: Array | None, train: bool = False
    ) -> Array:
        ra = ResidualBlock(self.dtype, name="R_a")(e, train)
        t = ra
        if e_prev is not None:
            down = ConvBN(
                e.shape[-1], 3, stride=2, padding=1, relu=False, dtype=self.dtype, name="down"
            )
            t = down(e_prev, train) + ra
        b = ResidualBlock(self.dtype, name="R_b")(t, train) + ra  # B_i, eq. 2
        self.sow("intermediates", "backbone_branch", b)
        if aux is None:
            return b
        omega = self.param("omega", nn.initializers.zeros, (), jnp.float32).astype(b.dtype)
        return omega * aux + (1 - omega) * b


class AFFMFusion(nn.Module):
    """[E_1..E_n] (pre-ReLU backbone features), [L_1..L_m] → [O_1..O_n] (eqs. 1–3)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, es: Sequence[Array], aux: Sequence[Array], train: bool = False
    ) -> list[Array]:
        outs = []
        for i, e in enumerate(es):
            level = AFFMLevel(self.dtype, name=f"level{i + 1}")
            prev = es[i - 1] if i > 0 else None
            outs.append(level(e, prev, aux[i] if i < len(aux) else None, train))
        return outs
