"""PyTorch state dicts → Flax variables, and the conversion CLI (`FORMATS`):

- `torchvision-vgg16`: `features.N`; fc6/fc7 decimated into conv6/conv7 (`decimate_fc6/7`),
  fc8 dropped; RGB, train with the torchvision normalisation.
- `ssd-vgg`: ssd.pytorch `vgg16_reducedfc.pth` (`N.*`, `vgg.N.*` or `base.N.*`).
- `lrf`: official LRF300 / LRF512 (`vaesl/LRF-Net`) into the `lsn/lrf/lrf` model
  (`lrf_entries`, the one key map); use with `model.align_corners=True` (docs/design.md).
- `ssd`: ssd.pytorch SSD300 into the `ssd` family.
Every key is consumed and shape-checked (docs/design.md, Converted weights).

    python -m daipnet_jax.convert lrf --input LRF_COCO_300.pth \\
        --config configs/coco.py:lrf300 --config.model.align_corners=True --output DIR
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from daipnet_jax import checkpoints
from daipnet_jax import config as config_lib
from daipnet_jax.checkpoints import METADATA_FILE

if __name__ == "__main__":
    from daipnet_jax import platform

    platform.setup()  # before JAX starts

FORMATS = ("torchvision-vgg16", "ssd-vgg", "lrf", "ssd")
__all__ = ["FORMATS", "METADATA_FILE", "ConversionError", "convert_file", "convert_state_dict"]

StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
    """A state dict that does not match the target model (or cannot be loaded safely)."""


# ------------------------------------------------------------------ loading
def load_state_dict(path: str | pathlib.Path) -> StateDict:
    """`.pth` (bare, or under 'state_dict' / 'model') → float32 numpy dict; `weights_only=True`."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "weight conversion needs PyTorch: pip install 'daipnet_jax[convert]'"
        ) from e
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PyTorch >= 1.6) or, before, a pickle (protocol >= 2)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as e:  # a truncated or damaged file
        raise ConversionError(
            f"{path}: cannot read it (damaged or truncated?): {config_lib.first_line(e)}"
        ) from e
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refusing to load: the pickle needs torch.load(weights_only=False), i.e. it "
            "holds arbitrary Python objects, not only tensors (only plain state dicts are "
            f"converted; re-save `model.state_dict()` in a trusted environment). torch said: {e}"
        ) from e
    if isinstance(obj, Mapping) and len(obj) == 1:
        (key,) = obj.keys()
        if key in ("state_dict", "model") and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict (a mapping), got {type(obj)}")
    out: StateDict = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().cpu().numpy()
    return strip_module_prefix(out)


def strip_module_prefix(sd: Mapping[str, np.ndarray]) -> StateDict:
    """Drop the DataParallel `module.` prefix when every key carries it."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


# ------------------------------------------------------------------ layout transforms
def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight [O, I, H, W] → Flax kernel [H, W, I, O]."""
    if w.ndim != 4:
        raise ValueError(f"expected a 4-D conv weight, got shape {w.shape}")
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def bgr_to_rgb_oihw(w: np.ndarray) -> np.ndarray:
    """Reverse the input channels of a conv reading a BGR image [O, 3, H, W] → reads RGB."""
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"BGR→RGB swap needs a [O, 3, H, W] weight, got {w.shape}")
    return w[:, ::-1]


def decimate_fc6(w: np.ndarray) -> np.ndarray:
    """fc6 [4096, 25088] → conv6 OIHW [1024, 512, 3, 3]: every 4th filter, taps 0, 3, 6 per axis."""
    if w.shape != (4096, 512 * 7 * 7):
        raise ValueError(f"fc6 weight must be [4096, 25088], got {w.shape}")
    return w.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3]


def decimate_fc7(w: np.ndarray) -> np.ndarray:
    """torchvision fc7 [4096, 4096] → conv7 OIHW [1024, 1024, 1, 1]: every 4th output and input."""
    if w.shape != (4096, 4096):
        raise ValueError(f"fc7 weight must be [4096, 4096], got {w.shape}")
    return w[::4, ::4][:, :, None, None]


def every_4th(b: np.ndarray) -> np.ndarray:
    """fc6 / fc7 bias [4096] → [1024]."""
    return b[::4]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


# ------------------------------------------------------------------ mapping entries
@dataclasses.dataclass(frozen=True)
class Entry:
    """One state-dict key → (`collection`, `path`), transformed; `collection=None` drops it."""

    key: str
    collection: str | None
    path: Path
    transform: Transform = _identity
    optional: bool = False


def conv_entries(tkey: str, path: Path, *, bias: bool = True, bgr: bool = False) -> list[Entry]:
    """`{tkey}.weight` (OIHW) → `path/kernel` (HWIO), `{tkey}.bias` → `path/bias`."""
    if bgr:

        def tr(w: np.ndarray) -> np.ndarray:
            return oihw_to_hwio(bgr_to_rgb_oihw(w))
    else:
        tr = oihw_to_hwio
    out = [Entry(f"{tkey}.weight", "params", (*path, "kernel"), tr)]
    if bias:
        out.append(Entry(f"{tkey}.bias", "params", (*path, "bias")))
    return out


def bn_entries(tkey: str, path: Path) -> list[Entry]:
    """BatchNorm2d `{tkey}.*` → params `path/{scale,bias}`, batch_stats `path/{mean,var}`."""
    return [
        Entry(f"{tkey}.weight", "params", (*path, "scale")),
        Entry(f"{tkey}.bias", "params", (*path, "bias")),
        Entry(f"{tkey}.running_mean", "batch_stats", (*path, "mean")),
        Entry(f"{tkey}.running_var", "batch_stats", (*path, "var")),
        Entry(f"{tkey}.num_batches_tracked", None, (), optional=True),
    ]


def convbn_entries(tkey: str, path: Path, *, bgr: bool = False) -> list[Entry]:
    """Official LRF `ConvBlock` `{tkey}.{conv,bn}` → our `ConvBN` `path/{conv,bn}`."""
    return conv_entries(f"{tkey}.conv", (*path, "conv"), bias=False, bgr=bgr) + bn_entries(
        f"{tkey}.bn", (*path, "bn")
    )


# ------------------------------------------------------------------ applying a mapping
def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def apply_entries(
    sd: Mapping[str, np.ndarray],
    entries: Iterable[Entry],
    target: Mapping[str, Any],
    *,
    fmt: str,
    require: Iterable[tuple[str, Path]] = (),
) -> dict[str, Any]:
    """Consume `sd` through `entries` into float32 arrays shaped like `target` (leaves: `.shape`).

    `require`: (collection, path prefix) pairs that must be fully written (all of `target` if empty).
    """
    entries = list(entries)
    by_key = {e.key: e for e in entries}
    if len(by_key) != len(entries):  # pragma: no cover - a bug in a mapping table
        raise AssertionError("duplicate state-dict key in the mapping")
    missing = [e.key for e in entries if e.key not in sd and not e.optional]
    unexpected = [k for k in sd if k not in by_key]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing key {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected key {unexpected[0]!r}"
                + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            )
        raise ConversionError(
            f"{fmt}: the state dict does not match the model: {'; '.join(parts)} "
            f"({len(sd)} keys given, {sum(not e.optional for e in entries)} expected)"
        )
    flat_target = {
        (col, *p): leaf
        for col in ("params", "batch_stats")
        for p, leaf in flatten(target.get(col, {})).items()
    }
    written: dict[Path, np.ndarray] = {}
    for e in entries:
        if e.key not in sd or e.collection is None:
            continue
        dest = (e.collection, *e.path)
        if dest not in flat_target:  # pragma: no cover - a bug in a mapping table
            raise ConversionError(
                f"{fmt}: key {e.key!r} maps to {'/'.join(dest)}, which the model does not have"
            )
        src = np.asarray(sd[e.key])
        try:
            value = e.transform(src)
        except ValueError as err:
            raise ConversionError(f"{fmt}: key {e.key!r} has a wrong shape: {err}") from err
        want = _shape(flat_target[dest])
        if value.shape != want:
            raise ConversionError(
                f"{fmt}: key {e.key!r} has a wrong shape: {tuple(src.shape)} becomes "
                f"{tuple(value.shape)} but {'/'.join(dest)} is {want}"
            )
        # reshape: np.ascontiguousarray turns 0-d values (AFFM ω) into shape (1,)
        written[dest] = np.ascontiguousarray(value, dtype=np.float32).reshape(value.shape)
    req = list(require) or [("params", ()), ("batch_stats", ())]
    for dest in flat_target:
        if dest not in written and any(
            dest[0] == col and dest[1 : 1 + len(p)] == p for col, p in req
        ):
            raise ConversionError(
                f"{fmt}: the state dict leaves the model variable {'/'.join(dest)} unset"
            )
    out = unflatten(written)
    out.setdefault("params", {})
    out.setdefault("batch_stats", {})
    return out


# ------------------------------------------------------------------ format tables
# Top-level module names of `models.build(config)` (see `daipnet_jax/models/detector.py`).
BACKBONE = "backbone"
AUX = "aux"
FUSION = "fusion"
TOPDOWN = "topdown"
EXTRAS = "extras"
HEADS = "heads"
L2NORM = "l2norm"
L2NORM_PARAM = "scale"

VGG_CONVS = (
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7",
)  # fmt: skip


def _vgg_index() -> dict[str, int]:
    from daipnet_jax.models.vgg import VGG_TORCH_INDEX

    return VGG_TORCH_INDEX


def vgg_entries(prefix: str, *, bgr: bool) -> list[Entry]:
    """Reduced-fc VGG as a module list (`{prefix}N.*`) → `backbone/conv*`."""
    index = _vgg_index()
    out: list[Entry] = []
    for name in VGG_CONVS:
        out += conv_entries(
            f"{prefix}{index[name]}", (BACKBONE, name), bgr=bgr and name == "conv1_1"
        )
    return out


def torchvision_vgg16_entries() -> list[Entry]:
    """torchvision `vgg16`: `features.N` convs, fc6/fc7 decimated into conv6/conv7, fc8 dropped."""
    index = _vgg_index()
    out: list[Entry] = []
    for name in VGG_CONVS[:13]:
        out += conv_entries(f"features.{index[name]}", (BACKBONE, name))
    for key, name, decimate in (
        ("classifier.0", "conv6", decimate_fc6),
        ("classifier.3", "conv7", decimate_fc7),
    ):

        def tr(w: np.ndarray, decimate: Transform = decimate) -> np.ndarray:
            return oihw_to_hwio(decimate(w))

        out.append(Entry(f"{key}.weight", "params", (BACKBONE, name, "kernel"), tr))
        out.append(Entry(f"{key}.bias", "params", (BACKBONE, name, "bias"), every_4th))
    out.append(Entry("classifier.6.weight", None, ()))
    out.append(Entry("classifier.6.bias", None, ()))
    return out


def lrf_entries(image_size: int, num_sources: int) -> list[Entry]:
    """Official LRF300 / LRF512 → the `lsn/lrf/lrf` model: the one LRF key map (table:
    docs/design.md, Converted weights)."""
    n = 4 if image_size == 300 else 5
    out = vgg_entries("base.", bgr=True)
    out += bn_entries("ibn1.bn", (FUSION, "ibn1")) + bn_entries("ibn2.bn", (FUSION, "ibn2"))
    for i in range(1, n + 1):
        out += convbn_entries(f"Norm{i}.single_branch.0", (FUSION, f"Norm{i}"))
    for i in range(1, n):
        out += convbn_entries(f"dsc{i}.single_branch.0", (FUSION, f"dsc{i}"))
    out += lsn_entries(n)
    out += lrf_extras_entries(image_size)
    out += topdown_entries(n, ("proj", "agent", "convert", "merge"))
    out += head_entries(num_sources)
    return out


def lsn_entries(n: int) -> list[Entry]:
    """LSN `icn*.part_{a,b}` → `aux/icn*` (the first conv reads the image: BGR → RGB swap)."""
    out: list[Entry] = []
    for j in range(3):
        out += convbn_entries(f"icn1.part_a.{j}", (AUX, "icn1", f"part_a_{j}"), bgr=j == 0)
    out += convbn_entries("icn1.part_b", (AUX, "icn1", "part_b"))
    for k in range(2, n):
        for part in ("part_a", "part_b"):
            out += convbn_entries(f"icn{k}.{part}", (AUX, f"icn{k}", part))
    return out


def lrf_extras_entries(image_size: int) -> list[Entry]:
    """LRF `extras.N` → `extras/otc{N}/single_branch_{0,1}` and `extras/cb{N}`."""
    otc = (0, 2) if image_size == 300 else (0, 2, 4, 6)
    cbs = (4, 5, 6, 7) if image_size == 300 else (8, 9)
    out: list[Entry] = []
    for idx in otc:
        for j in (0, 1):
            out += convbn_entries(
                f"extras.{idx}.single_branch.{j}", (EXTRAS, f"otc{idx}", f"single_branch_{j}")
            )
    for idx in cbs:
        out += convbn_entries(f"extras.{idx}", (EXTRAS, f"cb{idx}"))
    return out


def topdown_entries(n: int, names: tuple[str, ...]) -> list[Entry]:
    """LRF top-down `{name}{i}` (i = 1..n−1) → `topdown/{name}{i}`."""
    out: list[Entry] = []
    for name in names:
        for i in range(1, n):
            out += convbn_entries(f"{name}{i}", (TOPDOWN, f"{name}{i}"))
    return out


def ssd_entries(image_size: int, num_sources: int) -> list[Entry]:
    """ssd.pytorch SSD (`vgg.N`, `L2Norm.weight`, `extras.N`, `loc.s`, `conf.s`) → family `ssd`."""
    out = vgg_entries("vgg.", bgr=True)
    out.append(Entry("L2Norm.weight", "params", (L2NORM, L2NORM_PARAM)))
    for k in range(8 if image_size == 300 else 10):
        out += conv_entries(f"extras.{k}", (EXTRAS, f"conv{k}"))
    out += head_entries(num_sources)
    return out


def head_entries(num_sources: int) -> list[Entry]:
    """`loc.s`, `conf.s` → `heads/loc{s}`, `heads/conf{s}`."""
    out: list[Entry] = []
    for kind in ("loc", "conf"):
        for s in range(num_sources):
            out += conv_entries(f"{kind}.{s}", (HEADS, f"{kind}{s}"))
    return out


# ------------------------------------------------------------------ conversion
def _normalise_sd(fmt: str, sd: Mapping[str, Any]) -> StateDict:
    sd = strip_module_prefix({k: np.asarray(v) for k, v in sd.items()})
    if fmt == "ssd-vgg":
        for prefix in ("vgg.", "base."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _check_config(fmt: str, config: Any) -> None:
    m = config.model
    if fmt == "lrf":
        got = (m.family, m.aux, m.fusion, m.topdown)
        if got != ("lrf", "lsn", "lrf", "lrf"):
            raise ConversionError(
                f"lrf: official LRF weights need the lsn/lrf/lrf model (configs/coco.py:lrf300 or "
                f"lrf512); the config has family/aux/fusion/topdown = {'/'.join(got)}"
            )
        if not m.align_corners:
            warnings.warn(
                "lrf: config.model.align_corners is False, but the official LRF weights were "
                "trained with PyTorch 0.3.1's align_corners=True bilinear upsampling",
                stacklevel=3,
            )
    if fmt == "ssd" and m.family != "ssd":
        raise ConversionError(f"ssd: SSD300 weights need model.family='ssd', got {m.family!r}")
    caffe = fmt != "torchvision-vgg16"
    mean = tuple(float(v) for v in m.pixel_mean)
    std = tuple(float(v) for v in m.pixel_std)
    caffe_mean, caffe_std = config_lib.CAFFE_MEAN_RGB, config_lib.CAFFE_STD
    if caffe and (not np.allclose(mean, caffe_mean) or not np.allclose(std, caffe_std)):
        warnings.warn(
            f"{fmt}: caffe-style weights expect pixel_mean {caffe_mean} and pixel_std "
            f"{caffe_std}; the config has {mean}, {std}",
            stacklevel=3,
        )
    if not caffe and np.allclose(mean, caffe_mean):
        warnings.warn(
            "torchvision-vgg16: torchvision weights expect pixel_mean "
            f"{config_lib.TORCHVISION_MEAN_RGB} and pixel_std {config_lib.TORCHVISION_STD}; "
            "the config has the caffe mean",
            stacklevel=3,
        )


def convert_state_dict(
    fmt: str,
    sd: Mapping[str, Any],
    config: Any,
    *,
    shapes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """State dict of format `fmt` → variables of `config`'s model (VGG formats: backbone only,
    for `checkpoints.merge_vgg`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    _check_config(fmt, config)
    sd = _normalise_sd(fmt, {k: _to_numpy(v) for k, v in sd.items()})
    size = int(config.model.image_size)
    num_sources = len(config.priors.feature_maps)
    if fmt == "torchvision-vgg16":
        entries, require = torchvision_vgg16_entries(), [("params", (BACKBONE,))]
    elif fmt == "ssd-vgg":
        entries, require = vgg_entries("", bgr=True), [("params", (BACKBONE,))]
    elif fmt == "lrf":
        entries, require = lrf_entries(size, num_sources), []
    else:
        entries, require = ssd_entries(size, num_sources), []
    if shapes is None:
        from daipnet_jax import models

        shapes = checkpoints.abstract_variables(models.build(config), config)
    target = shapes
    return apply_entries(sd, entries, target, fmt=fmt, require=require)


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        return v.detach().cpu().numpy()
    return np.asarray(v)


def convert_file(
    fmt: str, input_path: str | pathlib.Path, config: Any, output: str | pathlib.Path
) -> pathlib.Path:
    from daipnet_jax.validate import check_writable

    checkpoints.check_conversion_target(output)  # before the (slow) load
    check_writable(pathlib.Path(output).resolve().parent, "--output")  # staged beside it
    sd = load_state_dict(input_path)
    variables = convert_state_dict(fmt, sd, config)
    meta = {
        "format": fmt,
        "input": str(pathlib.Path(input_path).resolve()),
        "num_keys": len(sd),
        "config_name": str(config.get("name", "")),
        "model": config.model.to_dict(),
        "num_params": int(sum(v.size for v in flatten(variables["params"]).values())),
    }
    return checkpoints.save_variables(variables, output, meta)


# ------------------------------------------------------------------ CLI
def _cli_main(argv: list[str]) -> None:
    from absl import flags

    from daipnet_jax import cli

    fl = flags.FLAGS
    if len(argv) != 2 or argv[1] not in FORMATS:
        cli.fail(f"expected one argument, the format ({', '.join(FORMATS)}); got {argv[1:]}")
    try:
        out = convert_file(argv[1], fl.input, fl.config, fl.output)
    except ConversionError as e:
        cli.fail(f"conversion: {e}")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    """`python -m daipnet_jax.convert FORMAT --input X.pth --config CFG --output DIR`."""
    # Flags defined here, not at import: importing this module must not clash with `--config`.
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("input", None, "PyTorch state dict (.pth), read with weights_only=True")
    flags.DEFINE_string("output", None, "output directory (an orbax checkpoint, see the docs)")
    config_flags.DEFINE_config_file(
        "config", None, "config file and argument, e.g. configs/coco.py:lrf300"
    )
    flags.mark_flags_as_required(["input", "output", "config"])
    from daipnet_jax import cli

    cli.run(_cli_main, argv=argv)  # errors: one line on stderr, exit 2


if __name__ == "__main__":
    main()
