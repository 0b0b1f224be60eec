"""PyTorch reference of the paper's new modules (IPN, AFFM, PAFM) and of every Table 2 row.

Written from the paper's Sections 3.1–3.2 and equations 1–13, not from
our Flax code: it is the independent side of `tests/test_model_parity.py`. The LRF parts (VGG,
extras, LSN, LRF fusion and top-down, heads) reuse the blocks of `tests/torch_reference.py` with
the official LRF key names, so `DAIPNetTorch(aux='lsn', fusion='lrf', topdown='lrf')` has exactly
the state-dict keys of `torch_reference.LRF` and computes the same function.

New modules and their state-dict keys (there is no official DAIPNet code; these names are ours):

- `ipn.G{i}.{0,1,2}.{conv,bn}` (eq. 11, i = 1..4): CB(3→m, 3×3, pad 1), CB(m→m, 3×3, pad 1),
  CB−(m→C_i, 1×1), m = C_i/4, C = (512, 1024, 512, 256).
- `ipn.M{k}.{conv,bn}` (eq. 12, k = 1..3): CB(3×3, stride 2, pad 1), 512→1024→512→256.
- `affm.level{i}.R_a.{0,1,2}`, `affm.level{i}.R_b.{0,1,2}` (eq. 2, bottleneck residual blocks),
  `affm.level{i}.down` (D_i, i ≥ 2), `affm.level{i}.omega` (eq. 1, a 0-d parameter, only on
  levels with an auxiliary feature).
- `proj{j}` (T_{j+1}, shared name with LRF), `pafm{i}.fc1`, `pafm{i}.fc2` (eq. 6, convs with
  bias), `pafm{i}.c3..c6` (eqs. 8–9, CB 1×1).

Input convention as `torch_reference.LRF`: NCHW, BGR minus (104, 117, 123) (caffe style), so every
conv that reads the image (`base.0`, `icn1.part_a.0`, `ipn.G{i}.0`) sees BGR channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import (
    _IBN,
    ConvBlock,
    _heads,
    _LSNInit,
    _LSNLater,
    _Single,
    lrf_extras_and_heads,
    scaled,
    vgg_layers,
)

LEVEL_CHANNELS = (512, 1024, 512, 256, 256)  # C_1..C_5 of the fused levels (paper Section 3.1.1)
IPN_CHANNELS = (512, 1024, 512, 256)  # paper Section 3.2
TOPDOWN_CHANNELS = 128  # T_j (paper Section 3.1.2)


def _pool(x: torch.Tensor, padding: int = 0, ceil: bool = False) -> torch.Tensor:
    return F.max_pool2d(x, 2, 2, padding=padding, ceil_mode=ceil)


class IPNTorch(nn.Module):
    """Image pyramid network (paper Section 3.2, eqs. 10–13): image [B,3,S,S] → [L_1..L_4]."""

    def __init__(self, size: int, width: float):
        super().__init__()
        self.size = size
        chans = [scaled(c, width) for c in IPN_CHANNELS]
        for i, c in enumerate(chans, start=1):
            group = nn.Sequential(
                ConvBlock(3, c // 4, 3, 1, 1),
                ConvBlock(c // 4, c // 4, 3, 1, 1),
                ConvBlock(c // 4, c, 1, relu=False),
            )
            setattr(self, f"G{i}", group)
        for k in range(1, 4):
            setattr(self, f"M{k}", ConvBlock(chans[k - 1], chans[k], 3, 2, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # eq. 10: I_p1 as LRF's LDS (three 2×2/2 pools, the last padded by 1 at 300),
        # then 2×2/2 ceil-mode pools: 38, 19, 10, 5 (512: 64, 32, 16, 8).
        p = _pool(_pool(_pool(x)), padding=1 if self.size == 300 else 0)
        pyramid = [p]
        for _ in range(3):
            pyramid.append(_pool(pyramid[-1], ceil=True))
        m = self._modules
        feats = [m[f"G{i}"](img) for i, img in enumerate(pyramid, start=1)]  # eq. 11
        out = [feats[0]]  # eq. 13, L_1 = F_p1
        mk = feats[0]
        for k in range(1, 4):
            mk = m[f"M{k}"](mk)  # eq. 12: M_1 = C_1(F_p1), M_k = C_k(M_{k-1})
            out.append(feats[k] + mk)  # eq. 13: L_{k+1} = F_p{k+1} + M_k
        return out


class Residual(nn.Sequential):
    """Bottleneck residual block R of AFFM (paper Section 3.1.1): ReLU(x + CB−(1×1)(CB(3×3)(CB(1×1)(x)))).

    [B, c, h, w] → [B, c, h, w]; keys `{0,1,2}.{conv,bn}` (c → c/4 → c/4 → c).
    """

    def __init__(self, c: int):
        m = c // 4
        super().__init__(
            ConvBlock(c, m, 1), ConvBlock(m, m, 3, 1, 1), ConvBlock(m, c, 1, relu=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.relu(x + super().forward(x))


class AFFMLevelTorch(nn.Module):
    """One AFFM level (eqs. 1–3): O_i = ω·L_i + (1 − ω)·B_i, B_i = R_b(D(E_{i−1}) + R_a(E_i)) + R_a(E_i)."""

    def __init__(self, c: int, c_prev: int | None, has_aux: bool):
        super().__init__()
        self.R_a = Residual(c)
        self.R_b = Residual(c)
        self.down = ConvBlock(c_prev, c, 3, 2, 1, relu=False) if c_prev is not None else None
        # eq. 1: ω_i initialised to 0, unconstrained.
        self.omega = nn.Parameter(torch.zeros(())) if has_aux else None

    def forward(
        self, e: torch.Tensor, e_prev: torch.Tensor | None, aux: torch.Tensor | None
    ) -> torch.Tensor:
        ra = self.R_a(e)
        inner = ra if self.down is None else self.down(e_prev) + ra
        b = self.R_b(inner) + ra
        if self.omega is None:
            return b
        return self.omega * aux + (1 - self.omega) * b


class AFFMTorch(nn.Module):
    """AFFM over the n levels: ([E_1..E_n] pre-ReLU backbone features, [L_1..L_m]) → [O_1..O_n]."""

    def __init__(self, chans: list[int], num_aux: int):
        super().__init__()
        self.n = len(chans)
        for i, c in enumerate(chans):
            level = AFFMLevelTorch(c, chans[i - 1] if i > 0 else None, i < num_aux)
            setattr(self, f"level{i + 1}", level)

    def forward(self, es: list[torch.Tensor], aux: list[torch.Tensor]) -> list[torch.Tensor]:
        m = self._modules
        return [
            m[f"level{i + 1}"](e, es[i - 1] if i > 0 else None, aux[i] if i < len(aux) else None)
            for i, e in enumerate(es)
        ]


class PAFMLevelTorch(nn.Module):
    """PAFM for one level (eqs. 5–9): (O_i [B,C,h,w], U_i [B,U,h,w]) → P_i [B,C,h,w]."""

    def __init__(self, c: int, u: int):
        super().__init__()
        hidden = max(8, u // 16)  # choice: reduction 16, at least 8 channels (docs/design.md)
        self.fc1 = nn.Conv2d(u, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, u, 1)
        self.c3 = ConvBlock(c, c // 2, 1)
        self.c4 = ConvBlock(u, c // 2, 1)
        self.c5 = ConvBlock(c, c // 2, 1)
        self.c6 = ConvBlock(u, c // 2, 1)

    def forward(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        z = u.mean(dim=(2, 3), keepdim=True)  # eq. 5
        g = self.fc2(F.relu(self.fc1(z)))  # eq. 6
        x_att = torch.sigmoid(g) * u  # eq. 7
        x_init = torch.cat([self.c3(o), self.c4(u)], 1)  # eq. 8
        return torch.cat([self.c5(x_init), self.c6(x_att)], 1)  # eq. 9


class DAIPNetTorch(nn.Module):
    """Every Table 2 row of the paper (`aux` lsn|ipn, `fusion` lrf|affm, `topdown` lrf|pafm).

    Input NCHW BGR minus (104, 117, 123); output (loc [B,P,4], conf [B,P,num_classes]).
    `fusion='lrf'` is supported only with `aux='lsn'` (exact LRF).
    """

    def __init__(
        self,
        size: int = 300,
        num_classes: int = 81,
        width: float = 1.0,
        aux: str = "ipn",
        fusion: str = "affm",
        topdown: str = "pafm",
        align_corners: bool = False,
    ):
        super().__init__()
        assert size in (300, 512) and aux in ("lsn", "ipn")
        assert fusion in ("lrf", "affm") and topdown in ("lrf", "pafm")
        if fusion == "lrf" and aux != "lsn":
            raise NotImplementedError("the reference builds fusion='lrf' only with aux='lsn'")
        w: Callable[[int], int] = lambda c: scaled(c, width)  # noqa: E731
        self.size, self.num_classes, self.align_corners = size, num_classes, align_corners
        self.aux_kind, self.fusion_kind, self.topdown_kind = aux, fusion, topdown
        n = 4 if size == 300 else 5
        self.n = n
        chans = [w(c) for c in LEVEL_CHANNELS[:n]]
        lsn_chans = [512, 1024, 512] if size == 300 else [512, 1024, 512, 256]
        self.base = nn.ModuleList(vgg_layers(width))
        # ---- auxiliary network (paper Section 3.2)
        if aux == "lsn":
            self.icn1 = _LSNInit(w(lsn_chans[0]))
            for i in range(2, len(lsn_chans) + 1):
                setattr(self, f"icn{i}", _LSNLater(w(lsn_chans[i - 2]) // 4, w(lsn_chans[i - 1])))
            num_aux = len(lsn_chans)
        else:
            self.ipn = IPNTorch(size, width)
            num_aux = 4
        # ---- fusion (paper Section 3.1.1)
        if fusion == "lrf":
            for i in range(1, n + 1):
                c = chans[i - 1]
                setattr(self, f"Norm{i}", _Single(ConvBlock(c, c, 3, 1, 1), pre_relu=True))
            for i in range(1, n):
                ds = ConvBlock(chans[i - 1], chans[i], 3, 2, 1, relu=False)
                setattr(self, f"dsc{i}", _Single(ds, pre_relu=False))
            self.ibn1 = _IBN(chans[0])
            self.ibn2 = _IBN(chans[1])
        else:
            self.affm = AFFMTorch(chans, num_aux)
        # ---- top-down (paper Section 3.1.2)
        t = w(TOPDOWN_CHANNELS)
        for j in range(1, n):
            setattr(self, f"proj{j}", ConvBlock(chans[j], t, 1))
        for i in range(1, n):
            c, u = chans[i - 1], (n - i) * t
            if topdown == "lrf":
                setattr(self, f"agent{i}", ConvBlock(c, c // 2, 1))
                setattr(self, f"convert{i}", ConvBlock(u, c // 2, 1))
                setattr(self, f"merge{i}", ConvBlock(c, c, 3, 1, 1))
            else:
                setattr(self, f"pafm{i}", PAFMLevelTorch(c, u))
        # ---- extras and heads (LRF / SSD)
        self.extras, self.loc, self.conf = lrf_extras_and_heads(size, num_classes, w)

    def _up(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=self.align_corners
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._modules
        img = x
        for k in range(22):
            x = self.base[k](x)
        e1 = x  # conv4_3, pre-ReLU
        for k in range(22, 34):
            x = self.base[k](x)
        e2 = x  # conv7, pre-ReLU
        x = self.base[34](x)
        es, tail = [e1, e2], []
        for k, layer in enumerate(self.extras):
            x = layer(x)
            if k % 2 == 0 and k // 2 + 3 <= self.n:  # E3.. En, pre-ReLU
                es.append(x)
            elif (self.size == 300 and k in (5, 7)) or (self.size == 512 and k in (7, 9)):
                tail.append(x)
        # auxiliary features
        if self.aux_kind == "lsn":
            p = _pool(_pool(_pool(img)), padding=1 if self.size == 300 else 0)
            aux = []
            skip, a = self.icn1(p)
            aux.append(a)
            k = 2
            while f"icn{k}" in m:
                skip, a = m[f"icn{k}"](skip)
                aux.append(a)
                k += 1
        else:
            aux = self.ipn(img)
        # fusion
        if self.fusion_kind == "affm":
            fused = self.affm(es, aux)
        else:
            fused = []
            for i, e in enumerate(es, start=1):
                if i == 1:
                    e = self.ibn1(e)
                elif i == 2:
                    e = self.ibn2(e)
                if i <= len(aux):
                    e = e * aux[i - 1]
                if i > 1:
                    e = m[f"dsc{i - 1}"](fused[-1]) + e
                fused.append(m[f"Norm{i}"](e))
        # top-down
        sizes = [f.shape[-1] for f in fused]
        proj = [m[f"proj{j - 1}"](fused[j - 1]) for j in range(2, self.n + 1)]  # T_2..T_n
        preds = []
        for i in range(1, self.n):
            u = torch.cat([self._up(t, sizes[i - 1]) for t in proj[i - 1 :]], 1)
            o = fused[i - 1]
            if self.topdown_kind == "lrf":
                cat = torch.cat([m[f"agent{i}"](o), m[f"convert{i}"](u)], 1)
                preds.append(m[f"merge{i}"](cat))
            else:
                preds.append(m[f"pafm{i}"](o, u))
        sources = [*preds, fused[-1], *tail]
        return _heads(sources, self.loc, self.conf, self.num_classes)
