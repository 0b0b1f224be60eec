"""LRF's bottom-up fusion (`fusion = lrf`) and top-down path (`topdown = lrf`).

Exact LRF (official `LRF_COCO_300.py` / `_512.py`); every name below is the official module name.

Bottom-up (`LRFFusion`), with Norm = ReLU → CB(c→c, 3×3, pad 1) (`Norm{i}`), Ds(a→b) =
CB−(a→b, 3×3, stride 2, pad 1) (`dsc{i}`), BN a standalone BatchNorm (`ibn1`, `ibn2`):
- O1 = Norm1(BN(E1) ⊙ A1)
- O2 = Norm2(dsc1(O1) + BN(E2) ⊙ A2)
- O3 = Norm3(dsc2(O2) + E3 ⊙ A3)                      (no BN on E3)
- 300: O4 = Norm4(dsc3(O3) + E4)
- 512: O4 = Norm4(dsc3(O3) + E4 ⊙ A4); O5 = Norm5(dsc4(O4) + E5)
choice (aux=ipn, fusion=lrf only): a level multiplies by the auxiliary feature whenever one exists
(IPN gives four), as official 512 level 4; levels ≥ 3 never get a BN.

Top-down (`LRFTopDown`), n = 4 (300) / 5 (512) fused levels:
- T_j = CB(C_j→128, 1×1)(O_j) for j = 2..n (`proj{j−1}`);
- U_i = concat_{j=i+1..n}(resize(T_j, size of level i)) (bilinear, PyTorch semantics,
  `align_corners` switch);
- P_i = CB(C_i→C_i, 3×3, pad 1)(concat(CB(C_i→C_i/2, 1×1)(O_i), CB(U_i→C_i/2, 1×1)(U_i)))
  (`merge{i}`, `agent{i}`, `convert{i}`), i = 1..n−1.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import (
    Array,
    ConvBN,
    Dtype,
    batch_norm,
    channels,
    resize_bilinear,
)

TOPDOWN_CHANNELS = 128  # T_j channels


class LRFFusion(nn.Module):
    """[E_1..E_n] backbone features (pre-ReLU), [A_1..A_m] auxiliary features → [O_1..O_n].

    Shapes at 300: E/O = [B,38,38,512], [B,19,19,1024], [B,10,10,512], [B,5,5,256].
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, es: Sequence[Array], aux: Sequence[Array], train: bool = False
    ) -> list[Array]:
        outs: list[Array] = []
        for i, e in enumerate(es):
            c = e.shape[-1]
            if i < 2:
                e = batch_norm(train, self.dtype, name=f"ibn{i + 1}")(e)
            if i < len(aux):
                e = e * aux[i]
            if i > 0:
                down = ConvBN(
                    c, 3, stride=2, padding=1, relu=False, dtype=self.dtype, name=f"dsc{i}"
                )(outs[-1], train)
                e = down + e
            norm = ConvBN(c, 3, padding=1, dtype=self.dtype, name=f"Norm{i + 1}")
            outs.append(norm(nn.relu(e), train))
        return outs


def project_levels(outs: Sequence[Array], width: float, dtype: Dtype, train: bool) -> list[Array]:
    """T_j = CB(C_j→128, 1×1)(O_j), j = 2..n, named `proj{j−1}` (call from a compact method)."""
    return [
        ConvBN(channels(TOPDOWN_CHANNELS, width), 1, dtype=dtype, name=f"proj{j}")(o, train)
        for j, o in enumerate(outs[1:], start=1)
    ]


def upsampled_context(
    ts: Sequence[Array], i: int, size: tuple[int, int], align_corners: bool
) -> Array:
    """U_i (0-based level i): concat over j > i of resize(T_j, size). [B, h, w, (n−1−i)·128]."""
    ups = [resize_bilinear(t, size, align_corners) for t in ts[i:]]
    return jnp.concatenate(ups, axis=-1) if len(ups) > 1 else ups[0]


class TopDown(nn.Module):
    """[O_1..O_n] → [P_1..P_{n−1}] (P_i with the shape of O_i); `level` makes P_i from O_i, U_i."""

    width: float = 1.0
    align_corners: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, outs: Sequence[Array], train: bool = False) -> list[Array]:
        ts = project_levels(outs, self.width, self.dtype, train)
        return [
            self.level(
                i, o, upsampled_context(ts, i, (o.shape[1], o.shape[2]), self.align_corners), train
            )
            for i, o in enumerate(outs[:-1])
        ]

    def level(self, i: int, o: Array, u: Array, train: bool) -> Array:
        raise NotImplementedError


class LRFTopDown(TopDown):
    """P_i = merge_i(concat(agent_i(O_i), convert_i(U_i)))."""

    def level(self, i: int, o: Array, u: Array, train: bool) -> Array:
        c = o.shape[-1]
        half = max(1, c // 2)
        agent = ConvBN(half, 1, dtype=self.dtype, name=f"agent{i + 1}")(o, train)
        convert = ConvBN(half, 1, dtype=self.dtype, name=f"convert{i + 1}")(u, train)
        merge = ConvBN(c, 3, padding=1, dtype=self.dtype, name=f"merge{i + 1}")
        return merge(jnp.concatenate([agent, convert], axis=-1), train)
