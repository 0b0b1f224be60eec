"""Tests of `daipnet_jax.models`: layouts, parameter counts, shapes, numerics.

Expected values come from independent sources: the per-module counts (docs/design.md, reference counts) of the
official LRF300, hand counts of the official LRF512 / ssd.pytorch SSD300 architectures written out
below, NumPy / PyTorch references of bilinear resize, pooling, conv + BatchNorm and the PAFM gate.
Shape and parameter tests trace with `jax.eval_shape` (no compilation); the numeric full-model
tests (marked slow: they compile a whole detector) share one width-0.125 DAIPNet300
(module-scoped fixture).
"""

from __future__ import annotations

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daipnet_jax.config import VARIANTS, base_config
from daipnet_jax.models import build, model_spec, official_lrf_modules
from daipnet_jax.models.affm import AFFMLevel, ResidualBlock
from daipnet_jax.models.ipn import IPN, image_pyramid
from daipnet_jax.models.layers import (
    ConvBN,
    channels,
    conv,
    max_pool,
    resize_bilinear,
)
from daipnet_jax.models.pafm import PAFMLevel


# ----------------------------------------------------------------------------- helpers
def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_variables(config, batch: int = 1):
    model = build(config)
    s = config.model.image_size
    images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    outputs, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x), images
    )
    return model, variables, outputs


def subtree(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def cb(cin: int, cout: int, k: int) -> int:
    """Parameters of CB(cin→cout, k×k): conv without bias + BN (γ, β)."""
    return cin * cout * k * k + 2 * cout


def plain(cin: int, cout: int, k: int) -> int:
    """Parameters of a conv with bias."""
    return cin * cout * k * k + cout


VGG_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
VGG_CONVS += [(256, 512), (512, 512), (512, 512)] + [(512, 512)] * 3
VGG_PARAMS = sum(plain(a, b, 3) for a, b in VGG_CONVS) + plain(512, 1024, 3) + plain(1024, 1024, 1)


def heads_params(in_channels, ks, classes) -> int:
    return sum(
        plain(c, k * 4, 3) + plain(c, k * classes, 3) for c, k in zip(in_channels, ks, strict=True)
    )


def priors_from_table(table) -> int:
    """Σ f_k² · k_k from the prior table (k = 2 + 2·len(ratios))."""
    return sum(
        f * f * (2 + 2 * len(r))
        for f, r in zip(table["feature_maps"], table["aspect_ratios"], strict=True)
    )


# ----------------------------------------------------------------------------- resize
def resize_reference(x: np.ndarray, out_h: int, out_w: int, align_corners: bool) -> np.ndarray:
    """Loop-based NumPy reference of PyTorch's bilinear formula on [H, W] (float64)."""

    def taps(n_in: int, n_out: int):
        res = []
        for d in range(n_out):
            if align_corners:
                s = d * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            else:
                s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(s)), n_in - 1)
            res.append((i0, min(i0 + 1, n_in - 1), s - i0))
        return res

    out = np.zeros((out_h, out_w))
    for i, (y0, y1, ly) in enumerate(taps(x.shape[0], out_h)):
        for j, (x0, x1, lx) in enumerate(taps(x.shape[1], out_w)):
            top = (1 - lx) * x[y0, x0] + lx * x[y0, x1]
            bottom = (1 - lx) * x[y1, x0] + lx * x[y1, x1]
            out[i, j] = (1 - ly) * top + ly * bottom
    return out


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "src,dst",
    [((5, 5), (38, 38)), ((10, 10), (38, 38)), ((19, 19), (38, 38)), ((3, 7), (10, 19)),
     ((32, 32), (64, 64)), ((4, 4), (64, 64)), ((1, 1), (5, 5))],
)  # fmt: skip
def test_resize_matches_numpy_and_torch(src, dst, align_corners):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *src, 3)).astype(np.float32)
    got = np.asarray(resize_bilinear(jnp.asarray(x), dst, align_corners))
    assert got.shape == (2, *dst, 3)
    for b in range(2):
        for c in range(3):
            ref = resize_reference(x[b, :, :, c].astype(np.float64), *dst, align_corners)
            np.testing.assert_allclose(got[b, :, :, c], ref, rtol=1e-5, atol=1e-5)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)
    want = F.interpolate(tx, size=dst, mode="bilinear", align_corners=align_corners)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_resize_formulas_differ_on_5_to_38():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 5, 1)).astype(np.float32))
    a = resize_bilinear(x, (38, 38), False)
    b = resize_bilinear(x, (38, 38), True)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2


# ----------------------------------------------------------------------------- pools, conv+BN
@pytest.mark.parametrize(
    "size,window,stride,padding,ceil",
    [(75, 2, 2, 0, True), (75, 2, 2, 1, False), (38, 2, 2, 0, True), (19, 2, 2, 0, True),
     (10, 2, 2, 0, True), (19, 3, 1, 1, False), (128, 2, 2, 0, False)],
)  # fmt: skip
def test_max_pool_matches_torch(size, window, stride, padding, ceil):
    """Values and input gradients equal PyTorch's (no ties in normal draws)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    got, vjp = jax.vjp(lambda v: max_pool(v, window, stride, padding, ceil), jnp.asarray(x))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    want = F.max_pool2d(xt, window, stride, padding, ceil_mode=ceil)
    np.testing.assert_array_equal(np.asarray(got), want.permute(0, 2, 3, 1).detach().numpy())
    g = rng.normal(size=got.shape).astype(np.float32)
    want.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(
        np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.permute(0, 2, 3, 1).numpy()
    )


def test_convbn_stride2_train_matches_torch():
    """CB−(3→4, 3×3, s2, p1) in train mode: PyTorch padding, batch statistics, momentum 0.01."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
    layer = ConvBN(4, 3, stride=2, padding=1, relu=False)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    params = {"conv": {"kernel": jnp.asarray(kernel)}, "bn": {"scale": scale, "bias": bias}}
    out, updates = layer.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        jnp.asarray(x),
        train=True,
        mutable=["batch_stats"],
    )
    y = F.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(kernel).permute(3, 2, 0, 1),
        stride=2,
        padding=1,
    ).permute(0, 2, 3, 1).numpy().astype(np.float64)  # fmt: skip
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    want = (y - mean) / np.sqrt(var + 1e-5) * scale + bias
    assert out.shape == (2, 5, 5, 4)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)
    stats = updates["batch_stats"]["bn"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.01 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.99 + 0.01 * var, rtol=1e-4)
    # eval mode uses the running statistics, not the batch's
    out_eval = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    want_eval = y / np.sqrt(1 + 1e-5) * scale + bias
    np.testing.assert_allclose(np.asarray(out_eval), want_eval, rtol=1e-4, atol=1e-4)


def test_conv_init_is_he_normal_fan_out():
    layer = conv(256, 3, padding=1)
    params = layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))["params"]
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (3, 3, 8, 256)
    assert abs(kernel.std() / math.sqrt(2.0 / (256 * 9)) - 1) < 0.05
    assert abs(kernel.mean()) < 0.002
    assert not np.any(np.asarray(params["bias"]))
    # A pure function of the key: same key, same draw (under jit up to float rounding: XLA
    # fuses the normal transform differently); another key, another draw.
    same = layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))["params"]["kernel"]
    again = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))["params"]["kernel"]
    other = layer.init(jax.random.key(1), jnp.zeros((1, 4, 4, 8)))["params"]["kernel"]
    np.testing.assert_array_equal(np.asarray(same), kernel)
    np.testing.assert_allclose(np.asarray(again), kernel, rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(other), kernel)


def test_channels_width_rounding():
    assert channels(512, 1.0) == 512
    assert channels(512, 0.125) == 64
    assert channels(3, 0.1) == 1
    assert channels(100, 0.25) == 25


# ----------------------------------------------------------------------------- LRF layout
# The official LRF300 COCO model (docs/design.md, reference counts), parameters per top-level module.
OFFICIAL_LRF300 = {
    "base": 20_483_904, "Norm1": 2_360_320, "Norm2": 9_439_232, "Norm3": 2_360_320,
    "Norm4": 590_336, "icn1": 234_624, "icn2": 559_616, "icn3": 361_728, "dsc1": 4_720_640,
    "dsc2": 4_719_616, "dsc3": 1_180_160, "agent1": 131_584, "agent2": 525_312,
    "agent3": 131_584, "proj1": 131_328, "proj2": 65_792, "proj3": 33_024, "convert1": 98_816,
    "convert2": 132_096, "convert3": 33_280, "merge1": 2_360_320, "merge2": 9_439_232,
    "merge3": 2_360_320, "ibn1": 1_024, "ibn2": 2_048, "extras": 2_461_440, "loc": 571_520,
    "conf": 11_573_280,
}  # fmt: skip
OUR_COMPONENT = {  # official module name prefix -> our top-level component
    "base": "backbone", "Norm": "fusion", "dsc": "fusion", "ibn": "fusion", "icn": "aux",
    "agent": "topdown", "proj": "topdown", "convert": "topdown", "merge": "topdown",
    "extras": "extras", "loc": "heads", "conf": "heads",
}  # fmt: skip


@pytest.fixture(scope="module")
def lrf300_abstract():
    return abstract_variables(base_config("lrf300", "coco"))


def test_lrf300_parameters_match_official(lrf300_abstract):
    _, variables, _ = lrf300_abstract
    params = variables["params"]
    assert sum(OFFICIAL_LRF300.values()) == 77_062_496
    assert n_params(params) == 77_062_496
    mapping = official_lrf_modules(300)
    assert set(mapping) == set(OFFICIAL_LRF300)
    for name, want in OFFICIAL_LRF300.items():
        got = sum(n_params(subtree(params, p)) for p in mapping[name])
        assert got == want, name
    # our top-level components are exactly unions of official modules
    totals: dict[str, int] = {}
    for name, want in OFFICIAL_LRF300.items():
        comp = next(v for k, v in OUR_COMPONENT.items() if name.startswith(k))
        totals[comp] = totals.get(comp, 0) + want
    assert totals == {k: n_params(v) for k, v in params.items()}


def test_lrf300_state_dict_structure(lrf300_abstract):
    """37 BatchNorms; 274 official tensors = our leaves + one num_batches_tracked per BN."""
    _, variables, _ = lrf300_abstract
    stats = variables["batch_stats"]
    n_bn = len([p for p in jax.tree_util.tree_leaves_with_path(stats) if p[0][-1].key == "mean"])
    assert n_bn == 37
    n_leaves = len(jax.tree.leaves(variables["params"])) + len(jax.tree.leaves(stats))
    assert n_leaves + n_bn == 274
    # every conv that is not a VGG / head conv is bias-free (official ConvBlock bias=False)
    for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"]):
        keys = [k.key for k in path]
        if keys[-1] == "bias" and keys[0] not in ("backbone", "heads"):
            assert keys[-2] == "bn" or keys[-2].startswith("ibn"), keys
    kernel = subtree(variables["params"], "aux/icn2/part_a/conv/kernel")
    assert kernel.shape == (3, 3, 128, 256)  # icn2 = LSN_later(128, 1024): 128 → 256, 3×3
    kernel = subtree(variables["params"], "topdown/convert1/conv/kernel")
    assert kernel.shape == (1, 1, 384, 256)


def test_lrf512_parameters_match_official_architecture():
    """Hand count of the official LRF_COCO_512.py (81 classes)."""
    expected = VGG_PARAMS
    expected += sum(cb(c, c, 3) for c in (512, 1024, 512, 256, 256))  # Norm1..5
    expected += cb(3, 128, 3) + cb(128, 128, 1) + cb(128, 128, 3) + cb(128, 512, 1)  # icn1
    expected += cb(128, 256, 3) + cb(256, 1024, 1)  # icn2
    expected += cb(256, 128, 3) + cb(128, 512, 1)  # icn3
    expected += cb(128, 64, 3) + cb(64, 256, 1)  # icn4
    expected += cb(512, 1024, 3) + cb(1024, 512, 3) + cb(512, 256, 3) + cb(256, 256, 3)  # dsc
    expected += cb(512, 256, 1) + cb(1024, 512, 1) + cb(512, 256, 1) + cb(256, 128, 1)  # agent
    expected += cb(1024, 128, 1) + cb(512, 128, 1) + 2 * cb(256, 128, 1)  # proj
    expected += cb(512, 256, 1) + cb(384, 512, 1) + cb(256, 256, 1) + cb(128, 128, 1)  # convert
    expected += cb(512, 512, 3) + cb(1024, 1024, 3) + cb(512, 512, 3) + cb(256, 256, 3)  # merge
    expected += 2 * 512 + 2 * 1024  # ibn1, ibn2
    expected += cb(1024, 256, 1) + cb(256, 512, 3) + cb(512, 128, 1) + cb(128, 256, 3)
    expected += 2 * (cb(256, 64, 1) + cb(64, 256, 3)) + cb(256, 128, 1) + cb(128, 256, 4)
    expected += heads_params((512, 1024, 512, 256, 256, 256, 256), (6, 6, 6, 6, 6, 4, 4), 81)
    _, variables, outputs = abstract_variables(base_config("lrf512", "coco"))
    assert n_params(variables["params"]) == expected
    mapping = official_lrf_modules(512)
    for name, paths in mapping.items():  # every official module has a home
        assert all(n_params(subtree(variables["params"], p)) > 0 for p in paths), name
    assert outputs[0].shape == (1, 32756, 4)


def test_ssd300_parameters_match_ssd_pytorch():
    """Hand count of ssd.pytorch's SSD300 for VOC (21 classes): the well-known 26,285,486."""
    extras = plain(1024, 256, 1) + plain(256, 512, 3) + plain(512, 128, 1) + plain(128, 256, 3)
    extras += 2 * (plain(256, 128, 1) + plain(128, 256, 3))
    expected = VGG_PARAMS + 512 + extras
    expected += heads_params((512, 1024, 512, 256, 256, 256), (4, 6, 6, 6, 4, 4), 21)
    assert expected == 26_285_486
    _, variables, outputs = abstract_variables(base_config("ssd300", "voc"))
    assert n_params(variables["params"]) == expected
    assert variables["params"]["l2norm"]["scale"].shape == (512,)
    assert "batch_stats" not in variables or not jax.tree.leaves(variables["batch_stats"])
    assert outputs[1].shape == (1, 8732, 21)


# ----------------------------------------------------------------------------- shapes
ALL_COMBOS = [
    (aux, fusion, topdown)
    for aux in ("lsn", "ipn")
    for fusion in ("lrf", "affm")
    for topdown in ("lrf", "pafm")
]


@pytest.mark.parametrize("size", [300, 512])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shapes_every_table2_row(variant, size):
    config = base_config(f"{variant}{size}", "coco", width=0.125)
    _, variables, (loc, logits) = abstract_variables(config, batch=2)
    priors = priors_from_table(config.priors)
    if size == 300 and variant != "ssd":
        assert priors == 11620
    assert loc.shape == (2, priors, 4) and loc.dtype == jnp.float32
    assert logits.shape == (2, priors, 81) and logits.dtype == jnp.float32
    # width scales every channel count, the VGG included
    assert variables["params"]["backbone"]["conv1_1"]["kernel"].shape == (3, 3, 3, 8)
    assert variables["params"]["backbone"]["conv7"]["kernel"].shape == (1, 1, 128, 128)


@pytest.mark.parametrize("combo", ALL_COMBOS)
def test_every_switch_combination_builds(combo):
    """All 8 combinations build at 512 for VOC (21 classes), with the expected components."""
    config = base_config("daipnet512", "voc", width=0.125)
    config.model.aux, config.model.fusion, config.model.topdown = combo
    _, variables, (_, logits) = abstract_variables(config)
    assert logits.shape == (1, priors_from_table(config.priors), 21)
    p = variables["params"]
    assert ("icn1" in p["aux"]) == (combo[0] == "lsn")
    assert ("G1" in p["aux"]) == (combo[0] == "ipn")
    assert ("Norm1" in p["fusion"]) == (combo[1] == "lrf")
    assert ("level5" in p["fusion"]) == (combo[1] == "affm")
    assert ("merge1" in p["topdown"]) == (combo[2] == "lrf")
    assert ("level4" in p["topdown"]) == (combo[2] == "pafm")
    if combo[1] == "affm":  # ω only where an auxiliary feature exists (level 5 has none)
        assert all("omega" in p["fusion"][f"level{i}"] for i in range(1, 5))
        assert "omega" not in p["fusion"]["level5"]


def test_affm_lsn300_level4_has_no_omega():
    _, variables, _ = abstract_variables(base_config("lrf_affm300", "coco", width=0.125))
    fusion = variables["params"]["fusion"]
    assert [("omega" in fusion[f"level{i}"]) for i in range(1, 5)] == [True, True, True, False]


def test_bfloat16_compute_float32_params_and_outputs():
    config = base_config("daipnet300", "coco", width=0.125)
    config.model.dtype = "bfloat16"
    model = build(config)
    images = jax.ShapeDtypeStruct((1, 300, 300, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images)
    conv_dtypes = {
        e.outvars[0].aval.dtype for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"
    }
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
    assert [v.aval.dtype for v in jaxpr.jaxpr.outvars] == [jnp.float32, jnp.float32]


def test_model_spec_from_config():
    spec = model_spec(base_config("daipnet512", "voc"))
    assert spec.anchors == (6, 6, 6, 6, 6, 4, 4)
    assert spec.feature_maps == (64, 32, 16, 8, 4, 2, 1)
    assert spec.num_priors == 32756
    with pytest.raises(ValueError):
        bad = base_config("daipnet300", "coco")
        bad.model.aux = "fpn"
        build(bad)


# ----------------------------------------------------------------------------- IPN
@pytest.mark.parametrize("size,want", [(300, [38, 19, 10, 5]), (512, [64, 32, 16, 8])])
def test_ipn_pyramid_sizes(size, want):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, size, size, 3)), jnp.float32)
    pyramid = image_pyramid(x, size)
    assert [int(p.shape[1]) for p in pyramid] == want
    assert all(p.shape[2] == p.shape[1] and p.shape[3] == 3 for p in pyramid)
    # each level is a 2×2 max pool (ceil mode) of the one before
    torch_next = F.max_pool2d(
        torch.from_numpy(np.array(pyramid[1])).permute(0, 3, 1, 2), 2, 2, ceil_mode=True
    )
    np.testing.assert_array_equal(np.asarray(pyramid[2]), torch_next.permute(0, 2, 3, 1).numpy())
    ipn = IPN(size, width=0.125)
    outs = jax.eval_shape(lambda x: ipn.init_with_output(jax.random.key(0), x)[0], x)
    assert [o.shape for o in outs] == [
        (1, s, s, c) for s, c in zip(want, (64, 128, 64, 32), strict=True)
    ]


# ----------------------------------------------------------------------------- AFFM
def test_affm_omega_selects_backbone_or_auxiliary_branch():
    rng = np.random.default_rng(5)
    e = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
    e_prev = jnp.asarray(rng.normal(size=(2, 16, 16, 32)), jnp.float32)
    aux = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
    level = AFFMLevel()
    variables = level.init(jax.random.key(0), e, e_prev, aux)
    params, stats = variables["params"], variables["batch_stats"]
    assert float(params["omega"]) == 0.0  # initialised to 0

    # B_i = R_b(D(E_{i−1}) + R_a(E_i)) + R_a(E_i), composed here from the parts (eq. 2)
    def part(module, name, x):
        return module.apply({"params": params[name], "batch_stats": stats[name]}, x)

    ra = part(ResidualBlock(), "R_a", e)
    down = part(ConvBN(16, 3, stride=2, padding=1, relu=False), "down", e_prev)
    b = part(ResidualBlock(), "R_b", down + ra) + ra

    def run(omega, aux_in):
        p = {**params, "omega": jnp.float32(omega)}
        return level.apply({"params": p, "batch_stats": stats}, e, e_prev, aux_in)

    np.testing.assert_allclose(np.asarray(run(0.0, aux)), np.asarray(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(run(0.0, aux)), np.asarray(run(0.0, 2 * aux)))
    np.testing.assert_array_equal(np.asarray(run(1.0, aux)), np.asarray(aux))
    np.testing.assert_allclose(
        np.asarray(run(0.25, aux)), np.asarray(0.25 * aux + 0.75 * b), rtol=1e-5, atol=1e-5
    )
    assert float(jnp.max(jnp.abs(b - aux))) > 0.1  # the two branches really differ


def test_residual_block_is_identity_plus_relu_when_branch_is_zero():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 6, 6, 8)), jnp.float32)
    block = ResidualBlock()
    variables = block.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a, variables["params"])
    params["cb2"]["bn"] = {"scale": jnp.zeros(8), "bias": jnp.zeros(8)}
    out = block.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    np.testing.assert_allclose(np.asarray(out), np.maximum(np.asarray(x), 0), atol=1e-6)
    out_full = block.apply(variables, x)
    assert float(jnp.max(jnp.abs(out_full - jnp.maximum(x, 0)))) > 1e-2


# ----------------------------------------------------------------------------- PAFM
def test_pafm_attention_in_unit_interval_and_input_dependent():
    rng = np.random.default_rng(7)
    o = jnp.asarray(rng.normal(size=(2, 8, 8, 32)), jnp.float32)
    u = jnp.asarray(rng.normal(size=(2, 8, 8, 48)) + rng.normal(size=(2, 1, 1, 48)), jnp.float32)
    level = PAFMLevel()
    variables = level.init(jax.random.key(0), o, u)
    out, state = level.apply(variables, o, u, mutable=["intermediates"])
    assert out.shape == (2, 8, 8, 32)
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (2, 1, 1, 48)
    w = np.asarray(weights)
    assert np.all(w > 0) and np.all(w < 1)
    assert np.abs(w[0] - w[1]).max() > 1e-3  # differs between the two inputs
    # independent NumPy gate: sigmoid(W2 ReLU(W1 GAP(U) + b1) + b2), hidden = max(8, 48 // 16)
    att = variables["params"]["attention"]
    w1, b1 = np.asarray(att["fc1"]["kernel"])[0, 0], np.asarray(att["fc1"]["bias"])
    w2, b2 = np.asarray(att["fc2"]["kernel"])[0, 0], np.asarray(att["fc2"]["bias"])
    assert w1.shape == (48, 8)
    z = np.asarray(u, np.float64).mean(axis=(1, 2))
    want = 1 / (1 + np.exp(-(np.maximum(z @ w1 + b1, 0) @ w2 + b2)))
    np.testing.assert_allclose(w[:, 0, 0], want, rtol=1e-5, atol=1e-6)
    _, state2 = level.apply(variables, o, 3.0 * u, mutable=["intermediates"])
    assert np.abs(np.asarray(state2["intermediates"]["attention_weights"][0]) - w).max() > 1e-3


# ----------------------------------------------------------------------------- LRF vs PyTorch formulas
def randomize(variables, seed: int):
    """Random params and BatchNorm statistics (var > 0), so that no term hides behind an init."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), jnp.float32), variables["params"]
    )
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(
            rng.uniform(0.5, 2, a.shape) if path[-1].key == "var" else rng.normal(0, 0.3, a.shape),
            jnp.float32,
        ),
        variables["batch_stats"],
    )
    return {"params": params, "batch_stats": stats}


def t(a) -> torch.Tensor:
    """NHWC array → NCHW float64 torch tensor."""
    return torch.from_numpy(np.array(a, np.float64)).permute(0, 3, 1, 2)


def t_bn(x, params, stats):
    return F.batch_norm(
        x, t_vec(stats["mean"]), t_vec(stats["var"]), t_vec(params["scale"]),
        t_vec(params["bias"]), training=False, eps=1e-5,
    )  # fmt: skip


def t_vec(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float64))


def t_cb(x, variables, path, *, stride=1, padding=0, relu=True):
    """CB in PyTorch (float64) with the weights at `path` (HWIO kernel → OIHW)."""
    p, s = subtree(variables["params"], path), subtree(variables["batch_stats"], path)
    w = t_vec(p["conv"]["kernel"]).permute(3, 2, 0, 1)
    y = t_bn(F.conv2d(x, w, stride=stride, padding=padding), p["bn"], s["bn"])
    return F.relu(y) if relu else y


def test_lrf_fusion_matches_official_formulas():
    """O1 = Norm1(ibn1(E1)·A1), O2 = Norm2(dsc1(O1) + ibn2(E2)·A2), O3 = Norm3(dsc2(O2) + E3·A3),
    O4 = Norm4(dsc3(O3) + E4), written in PyTorch from the official forward."""
    from daipnet_jax.models.lrf import LRFFusion

    rng = np.random.default_rng(8)
    shapes = [(38, 16), (19, 32), (10, 16), (5, 8)]
    es = [jnp.asarray(rng.normal(size=(1, h, h, c)), jnp.float32) for h, c in shapes]
    aux = [jnp.asarray(rng.normal(size=(1, h, h, c)), jnp.float32) for h, c in shapes[:3]]
    module = LRFFusion()
    variables = randomize(module.init(jax.random.key(0), es, aux), 9)
    outs = module.apply(variables, es, aux)

    def bn(x, name):
        return t_bn(x, variables["params"][name], variables["batch_stats"][name])

    def norm(x, i):
        return t_cb(F.relu(x), variables, f"Norm{i}", padding=1)

    def dsc(x, i):
        return t_cb(x, variables, f"dsc{i}", stride=2, padding=1, relu=False)

    te, ta = [t(e) for e in es], [t(a) for a in aux]
    o1 = norm(bn(te[0], "ibn1") * ta[0], 1)
    o2 = norm(dsc(o1, 1) + bn(te[1], "ibn2") * ta[1], 2)
    o3 = norm(dsc(o2, 2) + te[2] * ta[2], 3)
    o4 = norm(dsc(o3, 3) + te[3], 4)
    for got, want in zip(outs, (o1, o2, o3, o4), strict=True):
        want_np = want.permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(
            np.asarray(got), want_np, rtol=2e-4, atol=2e-4 * np.abs(want_np).max()
        )


@pytest.mark.parametrize("align_corners", [False, True])
def test_lrf_topdown_matches_official_formulas(align_corners):
    """P_i = merge_i(cat(agent_i(O_i), convert_i(cat_j upsample(proj_{j−1}(O_j))))), PyTorch."""
    from daipnet_jax.models.lrf import LRFTopDown

    rng = np.random.default_rng(10)
    shapes = [(38, 16), (19, 32), (10, 16), (5, 8)]
    outs = [jnp.asarray(rng.normal(size=(1, h, h, c)), jnp.float32) for h, c in shapes]
    module = LRFTopDown(width=0.0625, align_corners=align_corners)
    variables = randomize(module.init(jax.random.key(0), outs), 11)
    preds = module.apply(variables, outs)
    to = [t(o) for o in outs]
    tmp = [t_cb(to[j], variables, f"proj{j}") for j in (1, 2, 3)]
    for i, got in enumerate(preds):
        size = shapes[i][0]
        ups = [
            F.interpolate(x, size=(size, size), mode="bilinear", align_corners=align_corners)
            for x in tmp[i:]
        ]
        agent = t_cb(to[i], variables, f"agent{i + 1}")
        convert = t_cb(torch.cat(ups, 1), variables, f"convert{i + 1}")
        want = t_cb(torch.cat([agent, convert], 1), variables, f"merge{i + 1}", padding=1)
        want_np = want.permute(0, 2, 3, 1).numpy()
        assert got.shape == want_np.shape
        np.testing.assert_allclose(
            np.asarray(got), want_np, rtol=2e-4, atol=2e-4 * np.abs(want_np).max()
        )


def test_vgg_taps_match_torch_reference():
    """E1 = conv4_3 and E2 = conv7 before their ReLU, ceil-mode pool3, pool5 3×3/1, dilated conv6."""
    from daipnet_jax.models.vgg import VGG16

    x = jnp.asarray(np.random.default_rng(12).normal(size=(1, 84, 84, 3)), jnp.float32)
    module = VGG16(width=0.0625)
    variables = module.init(jax.random.key(0), x)
    e1, e2 = module.apply(variables, x)
    p = variables["params"]

    def c(y, name, padding=1, dilation=1):
        w = t_vec(p[name]["kernel"]).permute(3, 2, 0, 1)
        return F.conv2d(y, w, t_vec(p[name]["bias"]), padding=padding, dilation=dilation)

    y = t(x)
    for stage, (names, ceil) in enumerate(
        [(("conv1_1", "conv1_2"), False), (("conv2_1", "conv2_2"), False),
         (("conv3_1", "conv3_2", "conv3_3"), True), (("conv4_1", "conv4_2"), False)]
    ):  # fmt: skip
        for name in names:
            y = F.relu(c(y, name))
        if stage < 3:
            y = F.max_pool2d(y, 2, 2, ceil_mode=ceil)
    want1 = c(y, "conv4_3")
    y = F.max_pool2d(F.relu(want1), 2, 2)
    for name in ("conv5_1", "conv5_2", "conv5_3"):
        y = F.relu(c(y, name))
    y = F.relu(c(F.max_pool2d(y, 3, 1, 1), "conv6", padding=6, dilation=6))
    want2 = c(y, "conv7", padding=0)
    assert e1.shape == (1, 11, 11, 32) and e2.shape == (1, 5, 5, 64)  # 84→42→21→11 (ceil)
    for got, want in ((e1, want1), (e2, want2)):
        want_np = want.permute(0, 2, 3, 1).numpy()
        assert np.any(want_np < 0)  # pre-ReLU taps
        np.testing.assert_allclose(
            np.asarray(got), want_np, rtol=1e-4, atol=1e-4 * np.abs(want_np).max()
        )


# ----------------------------------------------------------------------------- full model numerics
@pytest.fixture(scope="module")
def tiny_daipnet():
    config = base_config("daipnet300", "coco", width=0.125)
    model = build(config)
    images = jax.random.uniform(jax.random.key(1), (1, 300, 300, 3), jnp.float32) * 255.0
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images)
    apply_eval = jax.jit(lambda v, x: model.apply(v, x))
    apply_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    return model, variables, images, apply_eval, apply_train


@pytest.mark.slow
def test_init_values(tiny_daipnet):
    _, variables, _, _, _ = tiny_daipnet
    p = variables["params"]
    assert all(float(p["fusion"][f"level{i}"]["omega"]) == 0.0 for i in range(1, 5))
    bn = p["fusion"]["level1"]["R_a"]["cb0"]["bn"]
    assert np.all(np.asarray(bn["scale"]) == 1) and not np.any(np.asarray(bn["bias"]))
    assert not np.any(np.asarray(p["heads"]["conf0"]["bias"]))
    stats = variables["batch_stats"]["aux"]["G1"]["cb0"]["bn"]
    assert not np.any(np.asarray(stats["mean"])) and np.all(np.asarray(stats["var"]) == 1)


@pytest.mark.slow
def test_eval_deterministic_and_train_updates_batch_stats(tiny_daipnet):
    _, variables, images, apply_eval, apply_train = tiny_daipnet
    loc1, logits1 = apply_eval(variables, images)
    loc2, logits2 = apply_eval(variables, images)
    assert loc1.shape == (1, 11620, 4) and logits1.shape == (1, 11620, 81)
    assert np.isfinite(np.asarray(logits1)).all()
    np.testing.assert_array_equal(np.asarray(loc1), np.asarray(loc2))
    np.testing.assert_array_equal(np.asarray(logits1), np.asarray(logits2))
    (loc_t, _), updates = apply_train(variables, images)
    old = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
    new = jax.tree.leaves(updates["batch_stats"])
    assert len(old) == len(new) > 0
    for (path, a), b in zip(old, new, strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0, jax.tree_util.keystr(path)
    assert np.abs(np.asarray(loc_t) - np.asarray(loc1)).max() > 1e-3  # batch vs running stats


@pytest.mark.slow
def test_jit_equals_no_jit(tiny_daipnet):
    model, variables, images, apply_eval, _ = tiny_daipnet
    loc_j, logits_j = apply_eval(variables, images)
    loc_e, logits_e = model.apply(variables, images)
    for a, b in ((loc_j, loc_e), (logits_j, logits_e)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
def test_full_width_daipnet300_forward():
    config = base_config("daipnet300", "coco")
    model = build(config)
    images = jax.random.uniform(jax.random.key(2), (1, 300, 300, 3), jnp.float32) * 255.0
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images)
    assert n_params(variables["params"]) == n_params(abstract_variables(config)[1]["params"])
    loc, logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    assert loc.shape == (1, 11620, 4) and logits.shape == (1, 11620, 81)
    assert np.isfinite(np.asarray(loc)).all() and np.isfinite(np.asarray(logits)).all()


def test_model_summary_cli():
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "daipnet_jax.models",
            "--config=configs/coco.py:lrf300",
            "--noflops",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "77,062,496" in out.stdout and "priors: 11620" in out.stdout
    assert "[1, 11620, 81]" in out.stdout


def test_module_is_a_flax_module():
    assert isinstance(build(base_config("lrf300", "coco")), nn.Module)
