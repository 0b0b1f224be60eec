"""PyTorch → Flax weight conversion, against our PyTorch reference models.

Parity tests feed each model its own input convention: PyTorch caffe-style models get BGR minus
(104, 117, 123) in NCHW; our models get the RGB image and normalise it themselves
(pixel_mean (123, 117, 104)). Width-reduced (0.125) parity tests are fast; full-width ones are
`slow`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch_reference as ref
from torch_reference import caffe_input as _caffe_input
from torch_reference import random_image as _image
from torch_reference import rel_err as _rel_err

from daipnet_jax import checkpoints, convert, models
from daipnet_jax.config import TORCHVISION_MEAN_RGB, TORCHVISION_STD, base_config
from daipnet_jax.models.layers import normalize
from daipnet_jax.models.vgg import VGG16

TOL = 1e-4  # relative to the output's largest magnitude

REPO = pathlib.Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _shapes(cfg):
    return checkpoints.abstract_variables(models.build(cfg), cfg)


def _config(variant: str, width: float, align_corners: bool = False):
    cfg = base_config(variant, "coco", width=width)
    cfg.model.align_corners = align_corners
    return cfg


def _forward(cfg, variables, rgb: np.ndarray):
    model = models.build(cfg)
    return jax.jit(lambda v, x: model.apply(v, x))(variables, rgb)


# ------------------------------------------------------------------ the reference itself
def test_lrf300_reference_matches_published_parameter_counts():
    """Official LRF300 COCO (docs/design.md, reference counts) = 77,062,496 params in 274 tensors, per-module counts."""
    net = ref.LRF(300, 81)
    sd = net.state_dict()
    assert len(sd) == 274
    assert sum(p.numel() for p in net.parameters()) == 77_062_496
    per: dict[str, int] = {}
    for name, p in net.named_parameters():
        per[name.split(".")[0]] = per.get(name.split(".")[0], 0) + p.numel()
    expected = dict(
        base=20_483_904, Norm1=2_360_320, Norm2=9_439_232, Norm3=2_360_320, Norm4=590_336,
        icn1=234_624, icn2=559_616, icn3=361_728, dsc1=4_720_640, dsc2=4_719_616,
        dsc3=1_180_160, agent1=131_584, agent2=525_312, agent3=131_584, proj1=131_328,
        proj2=65_792, proj3=33_024, convert1=98_816, convert2=132_096, convert3=33_280,
        merge1=2_360_320, merge2=9_439_232, merge3=2_360_320, ibn1=1_024, ibn2=2_048,
        extras=2_461_440, loc=571_520, conf=11_573_280,
    )  # fmt: skip
    assert per == expected
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 37
    assert all(m.eps == 1e-5 and m.momentum == 0.01 for m in bns)


# ------------------------------------------------------------------ LRF / SSD parity
def _lrf_parity(size: int, width: float, align_corners: bool, drop_nbt: bool = False) -> None:
    net = ref.randomize(ref.LRF(size, 81, width=width, align_corners=align_corners), seed=size)
    sd = net.state_dict()
    if drop_nbt:  # PyTorch 0.3.1 checkpoints have no num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    cfg = _config(f"lrf{size}", width, align_corners)
    if align_corners:
        variables = convert.convert_state_dict("lrf", sd, cfg)
    else:  # the released weights were trained with align_corners=True: the converter warns
        with pytest.warns(UserWarning, match="align_corners"):
            variables = convert.convert_state_dict("lrf", sd, cfg)
    rgb = _image(size, seed=1)
    loc, conf = _forward(cfg, variables, rgb)
    with torch.no_grad():
        tloc, tconf = net(_caffe_input(rgb))
    assert loc.shape == tuple(tloc.shape) and conf.shape == tuple(tconf.shape)
    assert _rel_err(loc, tloc) < TOL
    assert _rel_err(conf, tconf) < TOL
    # The test can tell the two bilinear formulas apart (docs/design.md, align_corners).
    net.align_corners = not align_corners
    with torch.no_grad():
        _, other = net(_caffe_input(rgb))
    assert _rel_err(conf, other) > 100 * TOL
    if size == 300 and width == 1.0:  # every official parameter landed somewhere
        n = sum(v.size for v in convert.flatten(variables["params"]).values())
        assert n == 77_062_496


@pytest.mark.parametrize(("size", "align_corners"), [(300, True), (300, False), (512, True)])
def test_lrf_parity_width_reduced(size, align_corners):
    _lrf_parity(size, 0.125, align_corners, drop_nbt=size == 300)


@pytest.mark.slow
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [300, 512])
def test_lrf_parity_full_width(size, align_corners):
    _lrf_parity(size, 1.0, align_corners)


def _ssd_parity(width: float) -> None:
    net = ref.randomize(ref.SSD300(81, width=width), seed=3)
    cfg = _config("ssd300", width)
    variables = convert.convert_state_dict("ssd", net.state_dict(), cfg)
    rgb = _image(300, seed=2)
    loc, conf = _forward(cfg, variables, rgb)
    with torch.no_grad():
        tloc, tconf = net(_caffe_input(rgb))
    assert loc.shape == tuple(tloc.shape) == (1, 8732, 4)
    assert _rel_err(loc, tloc) < TOL
    assert _rel_err(conf, tconf) < TOL


def test_ssd300_parity_width_reduced():
    _ssd_parity(0.125)


@pytest.mark.slow
def test_ssd300_parity_full_width():
    _ssd_parity(1.0)


# ------------------------------------------------------------------ VGG formats
@pytest.fixture(scope="module")
def torchvision_sd() -> dict[str, torch.Tensor]:
    return ref.random_torchvision_vgg16_state_dict(seed=5)


@functools.cache
def _vgg_apply(width: float):
    return jax.jit(lambda p, x: VGG16(width).apply({"params": p}, x))


def _vgg_features(params, x_normalised: np.ndarray, width: float):
    """Our backbone alone: normalised [B,H,W,3] → (conv4_3, conv7) pre-ReLU."""
    return _vgg_apply(width)(params, x_normalised)


def test_torchvision_vgg16(torchvision_sd):
    sd = torchvision_sd
    cfg = _config("lrf300", 1.0)
    cfg.model.pixel_mean, cfg.model.pixel_std = TORCHVISION_MEAN_RGB, TORCHVISION_STD
    out = convert.convert_state_dict("torchvision-vgg16", sd, cfg)
    assert out["batch_stats"] == {} and list(out["params"]) == ["backbone"]
    bb = out["params"]["backbone"]
    # conv layers: equal after OIHW → HWIO, no channel swap (torchvision reads RGB)
    names = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"]
    names += ["conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision `features.N`
    for name, idx in zip(names, indices, strict=True):
        w = sd[f"features.{idx}.weight"].numpy()
        assert (
            bb[name]["kernel"][1, 2, 0, 0] == w[0, 0, 1, 2]
        )  # [ky, kx, in, out] = [out, in, ky, kx]
        np.testing.assert_array_equal(bb[name]["kernel"], np.einsum("oiyx->yxio", w))
        np.testing.assert_array_equal(bb[name]["bias"], sd[f"features.{idx}.bias"].numpy())
    # conv6 = fc6 decimated, computed here by explicit index arithmetic on the flat fc6 matrix:
    # kernel[ky, kx, c, o] = fc6[4·o, c·49 + 7·(3·ky) + 3·kx]
    fc6, fc6b = sd["classifier.0.weight"].numpy(), sd["classifier.0.bias"].numpy()
    o = np.arange(1024)[None, None, None, :]
    c = np.arange(512)[None, None, :, None]
    ky = np.arange(3)[:, None, None, None]
    kx = np.arange(3)[None, :, None, None]
    expected6 = fc6[4 * o, c * 49 + 21 * ky + 3 * kx]
    assert bb["conv6"]["kernel"].shape == (3, 3, 512, 1024)
    np.testing.assert_array_equal(bb["conv6"]["kernel"], expected6)
    np.testing.assert_array_equal(bb["conv6"]["bias"], fc6b[0:4096:4])
    fc7, fc7b = sd["classifier.3.weight"].numpy(), sd["classifier.3.bias"].numpy()
    expected7 = np.stack([fc7[4 * oo, 0:4096:4] for oo in range(1024)], axis=1)[None, None]
    np.testing.assert_array_equal(bb["conv7"]["kernel"], expected7)
    np.testing.assert_array_equal(bb["conv7"]["bias"], fc7b[0:4096:4])

    # features: a PyTorch forward of the same decimated layers (torchvision normalisation, RGB)
    tnet = ref.ReducedVGG(1.0).eval()
    tsd = {f"layers.{k}": v for k, v in sd.items() if k.startswith("features.")}
    tsd = {k.replace("features.", ""): v for k, v in tsd.items()}
    tsd["layers.31.weight"] = torch.from_numpy(expected6.transpose(3, 2, 0, 1).copy())
    tsd["layers.31.bias"] = torch.from_numpy(fc6b[::4].copy())
    tsd["layers.33.weight"] = torch.from_numpy(expected7.transpose(3, 2, 0, 1).copy())
    tsd["layers.33.bias"] = torch.from_numpy(fc7b[::4].copy())
    tnet.load_state_dict(tsd)
    rgb = _image(96, seed=4)
    xn = np.asarray(normalize(rgb, TORCHVISION_MEAN_RGB, TORCHVISION_STD))
    with torch.no_grad():
        t43, t7 = tnet(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy()))
    e1, e2 = _vgg_features(bb, xn, 1.0)
    assert e1.shape == (1, 12, 12, 512) and e2.shape == (1, 6, 6, 1024)
    assert _rel_err(e1, _nhwc(t43)) < TOL
    assert _rel_err(e2, _nhwc(t7)) < TOL


def test_ssd_vgg_bgr_to_rgb():
    """A caffe-style backbone fed BGR in PyTorch equals the converted one fed RGB."""
    width = 0.125
    net = ref.randomize(ref.ReducedVGG(width), seed=6)
    sd = net.state_dict_flat()  # vgg16_reducedfc.pth layout: `N.weight`
    cfg = _config("daipnet300", width)
    out = convert.convert_state_dict("ssd-vgg", sd, cfg)
    bb = out["params"]["backbone"]
    rgb = _image(96, seed=7)
    with torch.no_grad():
        t43, t7 = net(_caffe_input(rgb))
    xn = np.asarray(normalize(rgb, cfg.model.pixel_mean, cfg.model.pixel_std))
    e1, e2 = _vgg_features(bb, xn, width)
    assert _rel_err(e1, _nhwc(t43)) < TOL
    assert _rel_err(e2, _nhwc(t7)) < TOL
    # only conv1_1 is swapped; fed the BGR image the converted model would be wrong
    w = sd["0.weight"].numpy()
    np.testing.assert_array_equal(bb["conv1_1"]["kernel"], w[:, ::-1].transpose(2, 3, 1, 0))
    w = sd["2.weight"].numpy()
    np.testing.assert_array_equal(bb["conv1_2"]["kernel"], w.transpose(2, 3, 1, 0))
    e1_bgr, _ = _vgg_features(bb, xn[..., ::-1], width)
    assert _rel_err(e1_bgr, _nhwc(t43)) > 1e-2
    # the same weights under the `vgg.N` (inside SSD) and DataParallel `module.` prefixes
    for prefix in ("vgg.", "module.", "module.vgg."):
        again = convert.convert_state_dict("ssd-vgg", {prefix + k: v for k, v in sd.items()}, cfg)
        for path, v in convert.flatten(again["params"]).items():
            np.testing.assert_array_equal(v, convert.flatten(out["params"])[path])


def test_merge_vgg_grafts_backbone_only():
    width = 0.125
    net = ref.randomize(ref.ReducedVGG(width), seed=8)
    cfg = _config("lrf300", width)
    vgg = convert.convert_state_dict("ssd-vgg", net.state_dict_flat(), cfg)
    shapes = _shapes(cfg)
    rng = np.random.default_rng(0)
    init = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    merged = checkpoints.merge_vgg(init, vgg)
    flat_m = convert.flatten(merged["params"])
    flat_i = convert.flatten(init["params"])
    assert flat_m.keys() == flat_i.keys()
    for path, v in flat_m.items():
        want = (
            vgg["params"]["backbone"][path[1]][path[2]] if path[0] == "backbone" else flat_i[path]
        )
        np.testing.assert_array_equal(np.asarray(v), want)
    for path, v in convert.flatten(merged["batch_stats"]).items():
        np.testing.assert_array_equal(np.asarray(v), convert.flatten(init["batch_stats"])[path])
    # a width mismatch is refused
    wide = convert.convert_state_dict(
        "ssd-vgg", ref.ReducedVGG(0.25).state_dict_flat(), _config("lrf300", 0.25)
    )
    with pytest.raises(checkpoints.CheckpointError, match="conv1_1"):
        checkpoints.merge_vgg(init, wide)


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def small_ssd():
    cfg = _config("ssd300", 0.125)
    sd = {k: v.numpy() for k, v in ref.randomize(ref.SSD300(81, 0.125)).state_dict().items()}
    return cfg, sd, _shapes(cfg)


def test_error_truncated(small_ssd):
    cfg, sd, shapes = small_ssd
    truncated = dict(list(sd.items())[:-3])
    missing = list(sd)[-3]
    with pytest.raises(convert.ConversionError, match=f"missing key '{missing}'") as e:
        convert.convert_state_dict("ssd", truncated, cfg, shapes=shapes)
    assert "and 2 more" in str(e.value)


def test_error_extra_key(small_ssd):
    cfg, sd, shapes = small_ssd
    extra = dict(sd, **{"extras.8.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(
        convert.ConversionError, match=re.escape("unexpected key 'extras.8.weight'")
    ):
        convert.convert_state_dict("ssd", extra, cfg, shapes=shapes)


def test_error_wrong_shape(small_ssd):
    cfg, sd, shapes = small_ssd
    bad = dict(sd)
    bad["conf.2.weight"] = np.zeros((6 * 21, 64, 3, 3), np.float32)  # 21 classes, not 81
    with pytest.raises(
        convert.ConversionError, match=re.escape("'conf.2.weight' has a wrong shape")
    ):
        convert.convert_state_dict("ssd", bad, cfg, shapes=shapes)
    bad = dict(sd)
    bad["L2Norm.weight"] = np.zeros((65,), np.float32)
    with pytest.raises(convert.ConversionError, match=re.escape("'L2Norm.weight'")):
        convert.convert_state_dict("ssd", bad, cfg, shapes=shapes)


@pytest.mark.filterwarnings("ignore:torchvision-vgg16")
def test_error_torchvision_fc6_shape(torchvision_sd):
    bad = dict(torchvision_sd)
    bad["classifier.0.weight"] = torch.zeros(4096, 512 * 6 * 6)  # a 6×6-pool VGG, not 7×7
    with pytest.raises(
        convert.ConversionError, match=re.escape("'classifier.0.weight' has a wrong shape")
    ):
        convert.convert_state_dict("torchvision-vgg16", bad, _config("lrf300", 1.0))
    bad = {k: v for k, v in torchvision_sd.items() if not k.startswith("classifier.6")}
    with pytest.raises(
        convert.ConversionError, match=re.escape("missing key 'classifier.6.weight'")
    ):
        convert.convert_state_dict("torchvision-vgg16", bad, _config("lrf300", 1.0))


def test_error_needs_weights_only_false(tmp_path, small_ssd):
    _, sd, _ = small_ssd
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
                "args": argparse.Namespace(lr=0.004)}, path)  # fmt: skip
    with pytest.raises(convert.ConversionError, match="weights_only=False"):
        convert.load_state_dict(path)


def test_files_that_are_not_checkpoints_are_named(tmp_path, small_ssd):
    """Text, an empty file and a truncated checkpoint: a ConversionError naming the file and
    what is wrong with it; the legacy (pre-zip) format still loads."""
    _, sd, _ = small_ssd
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    text, empty, whole = tmp_path / "notes.pth", tmp_path / "empty.pth", tmp_path / "whole.pth"
    text.write_text("not weights\n")
    empty.write_bytes(b"")
    torch.save(tensors, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for path in (text, empty):
        with pytest.raises(convert.ConversionError, match=f"{path}: not a PyTorch checkpoint"):
            convert.load_state_dict(path)
    with pytest.raises(convert.ConversionError, match=f"{truncated}: cannot read it"):
        convert.load_state_dict(truncated)
    legacy = tmp_path / "legacy.pth"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    assert convert.load_state_dict(legacy).keys() == sd.keys()


def test_load_state_dict_plain_wrapped_and_dataparallel(tmp_path, small_ssd):
    _, sd, _ = small_ssd
    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    for i, obj in enumerate([tsd, {"state_dict": tsd}, {"module." + k: v for k, v in tsd.items()}]):
        # pre-1.6 (PyTorch 0.3-era) checkpoints use the legacy, non-zip serialisation
        torch.save(obj, tmp_path / f"{i}.pth", _use_new_zipfile_serialization=i != 2)
        got = convert.load_state_dict(tmp_path / f"{i}.pth")
        assert list(got) == list(sd)
        for k in sd:
            np.testing.assert_array_equal(got[k], sd[k])


def test_error_wrong_model_family():
    net = ref.LRF(300, 81, width=0.125)
    with pytest.raises(convert.ConversionError, match="lsn/lrf/lrf"):
        convert.convert_state_dict("lrf", net.state_dict(), _config("daipnet300", 0.125))


# ------------------------------------------------------------------ CLI
def test_cli_round_trip(tmp_path, small_ssd):
    cfg, sd, shapes = small_ssd
    src = tmp_path / "ssd.pth"
    torch.save({"module." + k: torch.from_numpy(v) for k, v in sd.items()}, src)
    out = tmp_path / "converted"
    proc = subprocess.run(
        [
            sys.executable, "-m", "daipnet_jax.convert", "ssd", "--input", str(src),
            "--config", "configs/coco.py:ssd300,width=0.125", "--output", str(out),
            "--config.model.align_corners=True",
        ],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / convert.METADATA_FILE).is_file()
    loaded = checkpoints.load_variables(out)
    checkpoints.check_variables(shapes, loaded)
    direct = convert.convert_state_dict("ssd", sd, cfg, shapes=shapes)
    for col in ("params", "batch_stats"):
        a, b = convert.flatten(loaded[col]), convert.flatten(direct[col])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    meta = json.loads((out / convert.METADATA_FILE).read_text())
    assert meta["format"] == "ssd" and meta["num_keys"] == len(sd)
    assert meta["model"]["width"] == 0.125 and meta["model"]["align_corners"] is True
    # train.py's config.init.checkpoint path: replace a same-shaped init tree
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    merged = checkpoints.merge_checkpoint(init, checkpoints.load_variables(out))
    for col in ("params", "batch_stats"):
        for k, v in convert.flatten(merged[col]).items():
            np.testing.assert_array_equal(v, convert.flatten(direct[col])[k])
    del init["params"]["heads"]["conf5"]
    with pytest.raises(checkpoints.CheckpointError, match=r"\['params'\]\['heads'\]\['conf5'\]"):
        checkpoints.merge_checkpoint(init, loaded)
    # a checkpoint for another model is refused by the restore evaluate.py and predict use
    with pytest.raises(checkpoints.CheckpointError, match="shape"):
        checkpoints.restore_variables(_config("ssd300", 0.25), out)


def test_cli_errors_are_one_line(tmp_path):
    """A missing input, a file that is not a checkpoint, an unknown format and an output that
    cannot be written: one `error:` line each, exit 2, no output folder."""
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights\n")
    out = tmp_path / "converted"
    common = ["--config", "configs/coco.py:ssd300,width=0.125", "--output", str(out)]
    cases = [
        (["ssd", "--input", str(tmp_path / "missing.pth")], "missing.pth: No such file"),
        (["ssd", "--input", str(notes)], "not a PyTorch checkpoint"),
        (["bogus", "--input", str(notes)], "expected one argument, the format"),
    ]
    unwritable = ["ssd", "--input", str(notes), "--output", "/proc/daipnet/x"]  # last one wins
    cases.append((unwritable, "--output: '/proc/daipnet' is not writable"))
    for args, want in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "daipnet_jax.convert", args[0], *common, *args[1:]],
            capture_output=True, text=True, cwd=REPO, check=False,
        )  # fmt: skip
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and want in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_output_folder_is_replaced_only_when_it_is_a_conversion(tmp_path, monkeypatch):
    """`save_variables` refuses a folder of other files (left as it was), replaces an earlier
    conversion only once the new one is written, and leaves no staging folder."""
    import orbax.checkpoint as ocp

    v1 = {"params": {"w": np.ones(3, np.float32)}, "batch_stats": {}}
    v2 = {"params": {"w": np.full(3, 2.0, np.float32)}, "batch_stats": {}}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(checkpoints.CheckpointError, match="holds files but no converted"):
        checkpoints.save_variables(v1, mine, {"n": 1})
    assert os.listdir(mine) == ["notes.txt"]
    out = tmp_path / "out"
    checkpoints.save_variables(v1, out, {"n": 1})
    np.testing.assert_array_equal(checkpoints.load_variables(out)["params"]["w"], 1.0)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointer, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            checkpoints.save_variables(v2, out, {"n": 2})
    np.testing.assert_array_equal(checkpoints.load_variables(out)["params"]["w"], 1.0)
    checkpoints.save_variables(v2, out, {"n": 2})
    np.testing.assert_array_equal(checkpoints.load_variables(out)["params"]["w"], 2.0)
    assert json.loads((out / convert.METADATA_FILE).read_text()) == {"n": 2}
    assert sorted(os.listdir(tmp_path)) == ["mine", "out"]


def test_convention_warnings_name_the_expected_normalisation():
    """Weights trained on caffe-style inputs under a torchvision-normalised config (and the
    reverse) are converted, with a warning that gives the values the weights expect."""
    import warnings

    from daipnet_jax import config as config_lib

    caffe = _config("lrf300", 0.125, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert._check_config("lrf", caffe)  # the recipe's convention: silent
    torchvision = _config("lrf300", 0.125, True)
    torchvision.model.pixel_mean = config_lib.TORCHVISION_MEAN_RGB
    torchvision.model.pixel_std = config_lib.TORCHVISION_STD
    with pytest.warns(UserWarning, match=r"^lrf: caffe-style weights expect pixel_mean \(123"):
        convert._check_config("lrf", torchvision)
    with pytest.warns(UserWarning, match=r"expect pixel_mean \(123\.675, 116\.28"):
        convert._check_config("torchvision-vgg16", caffe)
