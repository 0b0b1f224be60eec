"""Compact PyTorch reference models with the exact state-dict key names of each weight source.

Written for the converter tests from the published architectures; nothing here is
copied from the reference repositories, only their layer shapes and key names are reproduced:

- torchvision VGG-16 (`features.N.*`, `classifier.{0,3,6}.*`): `TorchvisionVGG16`.
- ssd.pytorch's reduced-fc VGG (`vgg16_reducedfc.pth`: a bare `ModuleList`, keys `N.*`; inside
  SSD the same layers are `vgg.N.*`): `vgg_reduced_layers`, `SSD300`.
- ssd.pytorch SSD300 (`vgg.N`, `L2Norm.weight`, `extras.N`, `loc.N`, `conf.N`): `SSD300`.
- Official LRF300 / LRF512 COCO (`vaesl/LRF-Net`, `models/LRF_COCO_{300,512}.py`): `LRF`, with
  the keys `base.N`, `icnK.part_{a,b}`, `NormK.single_branch.0`, `dscK.single_branch.0`,
  `agentK`, `projK`, `convertK`, `mergeK`, `ibn{1,2}.bn`, `extras.N`, `loc.N`, `conf.N`.

Every model takes a `width` factor (channel counts scaled like our Flax model's
`config.model.width`, see `scaled`) so fast tests can run width-reduced networks, and `LRF`
takes `align_corners` (the official code ran under PyTorch 0.3.1, whose bilinear
upsample had `align_corners=True` semantics).

Inputs are NCHW in the source's own convention: caffe-style models (ssd.pytorch, LRF) read BGR
minus (104, 117, 123); torchvision reads RGB / 255 normalised by its mean and std.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)


def random_image(size: int, seed: int = 0) -> np.ndarray:
    """A random RGB image [1, S, S, 3] in [0, 255], float32."""
    return np.random.default_rng(seed).uniform(0, 255, (1, size, size, 3)).astype(np.float32)


def caffe_input(rgb: np.ndarray) -> torch.Tensor:
    """RGB [B,H,W,3] → caffe-style BGR minus mean, NCHW float32 (the references' input)."""
    bgr = rgb[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, np.float32)
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(0, 3, 1, 2)))


def rel_err(ours, theirs) -> float:
    """max |ours − theirs| / max |theirs|, in float64."""
    theirs = np.asarray(theirs, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def scaled(c: int, width: float) -> int:
    """Channel count `c` at width factor `width`: the rule of `daipnet_jax.models.layers.channels`."""
    return max(1, round(c * width))


# ------------------------------------------------------------------ VGG
def vgg_layers(width: float = 1.0, *, reduced_fc: bool = True) -> list[nn.Module]:
    """VGG-16 layer list (reduced fc, as SSD). Indices as in ssd.pytorch / LRF: conv1_1 = 0, conv4_3 = 21,
    ReLU(conv4_3) = 22, conv6 = 31, conv7 = 33, ReLU(conv7) = 34."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "C":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            cout = scaled(int(v), width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            cin = cout
    if reduced_fc:
        c6 = scaled(1024, width)
        layers += [
            nn.MaxPool2d(3, 1, padding=1),
            nn.Conv2d(cin, c6, 3, padding=6, dilation=6),
            nn.ReLU(),
            nn.Conv2d(c6, c6, 1),
            nn.ReLU(),
        ]
    return layers


class TorchvisionVGG16(nn.Module):
    """torchvision `vgg16` key layout: `features.N` (31 modules), `classifier.{0,3,6}`.

    `image_size` only sets the adaptive pool's role: torchvision pools to 7×7 before fc6.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        feats: list[nn.Module] = [*vgg_layers(reduced_fc=False), nn.MaxPool2d(2, 2)]
        # torchvision's pool after conv3_3 has no ceil mode; the converter never needs it.
        feats[16] = nn.MaxPool2d(2, 2)
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class ReducedVGG(nn.Module):
    """The reduced-fc VGG as a module list (`N.*` keys, ssd.pytorch `vgg16_reducedfc.pth`).

    `forward` returns (conv4_3 pre-ReLU, conv7 pre-ReLU), the taps E1 and E2.
    """

    def __init__(self, width: float = 1.0):
        super().__init__()
        self.layers = nn.ModuleList(vgg_layers(width))

    def state_dict_flat(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("layers."): v for k, v in self.state_dict().items()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for k in range(22):
            x = self.layers[k](x)
        e1 = x
        for k in range(22, 34):
            x = self.layers[k](x)
        return e1, x


# ------------------------------------------------------------------ SSD300 (ssd.pytorch)
class L2Norm(nn.Module):
    def __init__(self, channels: int, scale: float = 20.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return self.weight.view(1, -1, 1, 1) * (x / norm)


class SSD300(nn.Module):
    """ssd.pytorch SSD300: keys `vgg.N`, `L2Norm.weight`, `extras.0..7`, `loc.0..5`, `conf.0..5`."""

    def __init__(self, num_classes: int = 21, width: float = 1.0):
        super().__init__()
        w = lambda c: scaled(c, width)  # noqa: E731
        self.num_classes = num_classes
        self.vgg = nn.ModuleList(vgg_layers(width))
        self.L2Norm = L2Norm(w(512))
        # (cin, cout, kernel, stride, padding)
        spec = [
            (1024, 256, 1, 1, 0),
            (256, 512, 3, 2, 1),
            (512, 128, 1, 1, 0),
            (128, 256, 3, 2, 1),
            (256, 128, 1, 1, 0),
            (128, 256, 3, 1, 0),
            (256, 128, 1, 1, 0),
            (128, 256, 3, 1, 0),
        ]
        self.extras = nn.ModuleList(
            nn.Conv2d(w(a), w(b), k, stride=s, padding=p) for a, b, k, s, p in spec
        )
        sources = [512, 1024, 512, 256, 256, 256]
        anchors = [4, 6, 6, 6, 4, 4]
        self.loc = nn.ModuleList(
            nn.Conv2d(w(c), k * 4, 3, padding=1) for c, k in zip(sources, anchors, strict=True)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(w(c), k * num_classes, 3, padding=1)
            for c, k in zip(sources, anchors, strict=True)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sources = []
        for k in range(23):
            x = self.vgg[k](x)
        sources.append(self.L2Norm(x))
        for k in range(23, len(self.vgg)):
            x = self.vgg[k](x)
        sources.append(x)
        for k, layer in enumerate(self.extras):
            x = F.relu(layer(x))
            if k % 2 == 1:
                sources.append(x)
        return _heads(sources, self.loc, self.conf, self.num_classes)


def _heads(
    sources: list[torch.Tensor], loc: nn.ModuleList, conf: nn.ModuleList, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads in NHWC order (row, column, anchor), concatenated over sources: [B,P,4], [B,P,C]."""
    b = sources[0].shape[0]
    locs = [lay(s).permute(0, 2, 3, 1).reshape(b, -1) for s, lay in zip(sources, loc, strict=True)]
    confs = [
        lay(s).permute(0, 2, 3, 1).reshape(b, -1) for s, lay in zip(sources, conf, strict=True)
    ]
    return torch.cat(locs, 1).view(b, -1, 4), torch.cat(confs, 1).view(b, -1, num_classes)


# ------------------------------------------------------------------ LRF (vaesl/LRF-Net)
class ConvBlock(nn.Module):
    """CB / CB− of the paper (Fig. 2): conv (no bias) → BatchNorm(eps 1e-5, momentum 0.01) → optional ReLU.
    Keys `conv.weight`, `bn.{weight,bias,running_mean,running_var,num_batches_tracked}`."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.01)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class _Single(nn.Module):
    """A module whose one block sits at `single_branch.0` (`Relu_Conv`, `Ds_Conv` layouts)."""

    def __init__(self, block: nn.Module, pre_relu: bool):
        super().__init__()
        self.single_branch = nn.Sequential(block)
        self.pre_relu = pre_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single_branch(F.relu(x) if self.pre_relu else x)


class _OneThree(nn.Module):
    """LRF's OTC(a→b) extra block; keys `single_branch.{0,1}`."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cin // 4
        self.single_branch = nn.Sequential(
            ConvBlock(cin, mid, 1), ConvBlock(mid, cout, 3, 2, 1, relu=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single_branch(x)


class _LSNInit(nn.Module):
    """LRF's LSN level 1: `part_a.{0,1,2}` (skip), `part_b` (A1)."""

    def __init__(self, cout: int):
        super().__init__()
        mid = cout // 4
        self.part_a = nn.Sequential(
            ConvBlock(3, mid, 3, 1, 1), ConvBlock(mid, mid, 1), ConvBlock(mid, mid, 3, 1, 1)
        )
        self.part_b = ConvBlock(mid, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.part_a(x)
        return skip, self.part_b(skip)


class _LSNLater(nn.Module):
    """LSN level k ≥ 2: `part_a` (skip, stride 2), `part_b` (A_k)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 4
        self.part_a = ConvBlock(cin, mid, 3, 2, 1)
        self.part_b = ConvBlock(mid, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.part_a(x)
        return skip, self.part_b(skip)


class _IBN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def lrf_extras_and_heads(size: int, num_classes: int, w) -> tuple[nn.ModuleList, ...]:
    """LRF's extras (OTC blocks, then the valid 3×3 / 4×4 blocks) and its loc / conf heads."""
    extras: list[nn.Module] = []
    otc = [(1024, 512), (512, 256)] + ([(256, 256), (256, 256)] if size == 512 else [])
    for a, b in otc:
        extras += [_OneThree(w(a), w(b)), nn.ReLU()]
    if size == 300:
        extras += [
            ConvBlock(w(256), w(128), 1),
            ConvBlock(w(128), w(256), 3),
            ConvBlock(w(256), w(128), 1),
            ConvBlock(w(128), w(256), 3),
        ]
    else:
        extras += [ConvBlock(w(256), w(128), 1), ConvBlock(w(128), w(256), 4, 1, 1)]
    extras_list = nn.ModuleList(extras)
    if size == 300:
        sources, anchors = [512, 1024, 512, 256, 256, 256], [6, 6, 6, 6, 4, 4]
    else:
        sources, anchors = [512, 1024, 512, 256, 256, 256, 256], [6, 6, 6, 6, 6, 4, 4]
    loc = nn.ModuleList(
        nn.Conv2d(w(c), k * 4, 3, padding=1) for c, k in zip(sources, anchors, strict=True)
    )
    conf = nn.ModuleList(
        nn.Conv2d(w(c), k * num_classes, 3, padding=1)
        for c, k in zip(sources, anchors, strict=True)
    )
    return extras_list, loc, conf


class LRF(nn.Module):
    """Official LRF300 / LRF512 (COCO) with the `vaesl/LRF-Net` state-dict keys.

    `align_corners`: the bilinear formula of the top-down resize (True = PyTorch 0.3.1
    `F.upsample`, what the released weights were trained with).
    """

    def __init__(
        self,
        size: int = 300,
        num_classes: int = 81,
        width: float = 1.0,
        align_corners: bool = True,
    ):
        super().__init__()
        assert size in (300, 512)
        w: Callable[[int], int] = lambda c: scaled(c, width)  # noqa: E731
        self.size, self.num_classes, self.align_corners = size, num_classes, align_corners
        n = 4 if size == 300 else 5
        self.n = n
        chans = [512, 1024, 512, 256, 256][:n]  # C_1..C_n of the fused levels
        aux = [512, 1024, 512] if size == 300 else [512, 1024, 512, 256]
        self.base = nn.ModuleList(vgg_layers(width))
        for i in range(1, n + 1):
            c = w(chans[i - 1])
            setattr(self, f"Norm{i}", _Single(ConvBlock(c, c, 3, 1, 1), pre_relu=True))
        self.icn1 = _LSNInit(w(aux[0]))
        for i in range(2, len(aux) + 1):
            setattr(self, f"icn{i}", _LSNLater(w(aux[i - 2]) // 4, w(aux[i - 1])))
        for i in range(1, n):
            ds = ConvBlock(w(chans[i - 1]), w(chans[i]), 3, 2, 1, relu=False)
            setattr(self, f"dsc{i}", _Single(ds, pre_relu=False))
        t = w(128)
        for i in range(1, n):
            c = w(chans[i - 1])
            setattr(self, f"agent{i}", ConvBlock(c, c // 2, 1))
            setattr(self, f"proj{i}", ConvBlock(w(chans[i]), t, 1))
            setattr(self, f"convert{i}", ConvBlock((n - i) * t, c // 2, 1))
            setattr(self, f"merge{i}", ConvBlock(c, c, 3, 1, 1))
        self.ibn1 = _IBN(w(512))
        self.ibn2 = _IBN(w(1024))
        self.extras, self.loc, self.conf = lrf_extras_and_heads(size, num_classes, w)

    def _lds(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.max_pool2d(x, 2, 2), 2, 2)
        return F.max_pool2d(x, 2, 2, padding=1 if self.size == 300 else 0)

    def _up(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=self.align_corners
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._modules
        pooled = self._lds(x)
        for k in range(22):
            x = self.base[k](x)
        skip, a = self.icn1(pooled)
        fused = [m["Norm1"](self.ibn1(x) * a)]  # O1
        for k in range(22, 34):
            x = self.base[k](x)
        skip, a = self.icn2(skip)
        fused.append(m["Norm2"](self.dsc1(fused[0]) + self.ibn2(x) * a))  # O2
        x = self.base[34](x)
        tail = []  # head sources after the fused levels
        naux = 3 if self.size == 300 else 4
        for k, layer in enumerate(self.extras):
            x = layer(x)
            if k % 2 == 0 and k // 2 + 3 <= self.n:  # E3, E4 (, E5): fuse into O3..On
                i = k // 2 + 3
                e = x
                if i <= naux:
                    skip, a = m[f"icn{i}"](skip)
                    e = e * a
                fused.append(m[f"Norm{i}"](m[f"dsc{i - 1}"](fused[-1]) + e))
            elif (self.size == 300 and k in (5, 7)) or (self.size == 512 and k in (7, 9)):
                tail.append(x)
        sizes = [f.shape[-1] for f in fused]
        proj = [None] + [m[f"proj{j - 1}"](fused[j - 1]) for j in range(2, self.n + 1)]
        preds = []
        for i in range(1, self.n):
            u = torch.cat(
                [self._up(proj[j - 1], sizes[i - 1]) for j in range(i + 1, self.n + 1)], 1
            )
            cat = torch.cat([m[f"agent{i}"](fused[i - 1]), m[f"convert{i}"](u)], 1)
            preds.append(m[f"merge{i}"](cat))
        sources = [*preds, fused[-1], *tail]
        return _heads(sources, self.loc, self.conf, self.num_classes)


# ------------------------------------------------------------------ helpers
@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights with O(1) activations, and non-trivial BatchNorm statistics.

    Convs: He-normal (fan-in) weights, small random biases. BatchNorm: γ ∈ [0.5, 1.5],
    β ~ N(0, 0.1²), running mean ~ N(0, 0.1²), running var ∈ [0.5, 2]. L2Norm: ~20 ± 5.
    Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        elif isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.copy_(0.5 + torch.rand(c, generator=g))
            mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
            mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            mod.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            mod.num_batches_tracked.fill_(7)
        elif isinstance(mod, L2Norm):
            mod.weight.copy_(20.0 + 5.0 * torch.randn(mod.weight.shape, generator=g))
    return model.eval()


def random_torchvision_vgg16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision `vgg16` state dict (He-normal weights, small biases), built without
    running torchvision's (slow, 138 M parameter) default initialisation."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TorchvisionVGG16().state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("weight"):
            fan_in = int(torch.Size(shape[1:]).numel())
            out[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            out[k] = torch.randn(shape, generator=g) * 0.1
    return out
