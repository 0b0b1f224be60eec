"""PyTorch state dicts → Flax variables, and the conversion CLI (SPEC §7, issue 6).

Formats (`FORMATS`):

- `torchvision-vgg16`: torchvision `vgg16` (`features.N.*`, `classifier.{0,3,6}.*`). The 13
  convs load directly; fc6 (4096×25088) is reshaped to 4096×512×7×7 and decimated to every 4th
  output filter and every 3rd tap in each spatial axis (→ conv6, 1024×512×3×3, used with dilation
  6), fc7 (4096×4096) to every 4th output and input (→ conv7, 1024×1024×1×1); fc8
  (`classifier.6`) is consumed and dropped. Images stay RGB (no channel swap); train with the
  torchvision normalisation (`config.model.pixel_mean/std`, SPEC §1).
- `ssd-vgg`: ssd.pytorch `vgg16_reducedfc.pth`, the reduced-fc VGG as a bare module list
  (`N.*`; `vgg.N.*` / `base.N.*` also accepted). Caffe weights: BGR → RGB swap of conv1_1.
- `lrf`: the official LRF300 / LRF512 checkpoints (`vaesl/LRF-Net`) into the `lsn/lrf/lrf` model
  (`config.model.family='lrf'`, aux/fusion/topdown = lsn/lrf/lrf); the key table is in
  `daipnet_jax/models/detector.py`'s docstring. BGR → RGB swap of every conv
  that reads the image: the backbone's conv1_1 and the LSN's first conv (`icn1.part_a.0`, which
  reads the max-pooled image; pooling is per channel, so the swap commutes with it).
  The released weights were trained under PyTorch 0.3.1 (bilinear `align_corners=True`): use them
  with `config.model.align_corners=True` (SPEC §3.4; a warning is issued otherwise).
- `ssd`: ssd.pytorch SSD300 checkpoints (`vgg.N`, `L2Norm.weight`, `extras.N`, `loc.N`, `conf.N`)
  into the `ssd` family. BGR → RGB swap of conv1_1.

Caffe-style sources (`ssd-vgg`, `lrf`, `ssd`) expect BGR minus (104, 117, 123): after the swap our
model reads RGB minus `pixel_mean` (123, 117, 104), std 1 (the default config). A config with
other normalisation gets a warning.

Rules (SPEC §7): `torch.load(path, map_location='cpu', weights_only=True)` only (a pickle that
needs `weights_only=False` is refused with a `ConversionError`); a DataParallel `module.` prefix
is stripped; layouts change OIHW → HWIO; BatchNorm `weight/bias` → params `scale/bias`,
`running_mean/var` → batch_stats `mean/var`; `num_batches_tracked` (absent from PyTorch 0.3
checkpoints) is optional and dropped. Every key is consumed, every shape is checked against the
initialised Flax tree of `models.build(config)` (shapes only: `jax.eval_shape`, nothing is
computed), and every Flax leaf of the converted part must be written; any violation raises a
`ConversionError` naming the first missing, unexpected or mis-shaped key.

Output layout (what `train.py`'s `config.init.vgg` / `config.init.checkpoint` and
`evaluate.py --checkpoint` read; `load_converted` = `load_variables` reads it back):

    DIR/                  one orbax `StandardCheckpointer` item (`ocp.args.StandardSave`) of the
                          pytree {'params': {...}, 'batch_stats': {...}} (float32 leaves);
                          restorable with `ocp.StandardCheckpointer().restore(DIR)` or
                          `ocp.PyTreeCheckpointer().restore(DIR)` without a target. For the VGG
                          formats only the backbone subtree: {'params': {'backbone': {...}},
                          'batch_stats': {}}.
    DIR/conversion.json   metadata beside orbax's own files: format, input path, the config's
                          model section, key and parameter counts.

Full formats (`lrf`, `ssd`) hold the complete variables of `models.build(config)`
(`merge_checkpoint(init_variables, load_variables(DIR))` checks every path and shape); VGG formats
are grafted into a freshly initialised tree with `merge_vgg(variables, load_variables(DIR))`.

CLI:

    python -m daipnet_jax.convert lrf --input LRF_COCO_300.pth \\
        --config configs/coco.py:lrf300 --config.model.align_corners=True --output DIR

torch is needed only here, at conversion time (`pip install daipnet_jax[convert]`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

if __name__ == "__main__":
    from daipnet_jax import platform

    platform.setup()  # before JAX starts

FORMATS = ("torchvision-vgg16", "ssd-vgg", "lrf", "ssd")
METADATA_FILE = "conversion.json"

StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]

CAFFE_MEAN_RGB = (123.0, 117.0, 104.0)


class ConversionError(ValueError):
    """A state dict that does not match the target model (or cannot be loaded safely)."""


# ------------------------------------------------------------------ loading
def load_state_dict(path: str | pathlib.Path) -> StateDict:
    """Read a `.pth` state dict with `torch.load(..., weights_only=True)`; float32 numpy values.

    Accepts a bare state dict or one wrapped as {'state_dict': …} / {'model': …} (choice: the two
    common wrappers); strips a DataParallel `module.` prefix. Raises `ConversionError` when the
    pickle holds anything but tensors and containers (it would need `weights_only=False`).
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "weight conversion needs PyTorch: pip install 'daipnet_jax[convert]'"
        ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
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
    """torchvision fc6 [4096, 25088] → conv6 OIHW [1024, 512, 3, 3] (SPEC §7).

    Reshaped to [4096, 512, 7, 7]; every 4th output filter, every 3rd tap (0, 3, 6) per axis.
    """
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
    """One state-dict key: where it goes (`collection`, `path`) and how it is transformed.

    `collection=None` consumes and drops the key (torchvision fc8, `num_batches_tracked`);
    `optional` keys may be absent.
    """

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
    """Nested dict → {path tuple: leaf}."""
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """{path tuple: leaf} → nested dict."""
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
    """Consume `sd` through `entries` into a tree shaped like `target` ({'params','batch_stats'}).

    `target` leaves need only `.shape` (e.g. `jax.ShapeDtypeStruct` from `jax.eval_shape`).
    `require`: (collection, path prefix) pairs whose every target leaf must be written (the
    whole target when empty). Returns {'params': …, 'batch_stats': …} of float32 numpy arrays
    (only the written leaves). Raises `ConversionError` naming the first missing, unexpected or
    mis-shaped key.
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
    """Reduced-fc VGG as a module list (`{prefix}N.*`) → `backbone/conv*` (SPEC §2)."""
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
    """Official LRF300 / LRF512 (`vaesl/LRF-Net`) → the `lsn/lrf/lrf` model.

    The table of `daipnet_jax/models/detector.py`; n = 4 fused levels at 300, 5 at 512.
    """
    n = 4 if image_size == 300 else 5
    out = vgg_entries("base.", bgr=True)
    out += bn_entries("ibn1.bn", (FUSION, "ibn1")) + bn_entries("ibn2.bn", (FUSION, "ibn2"))
    for i in range(1, n + 1):
        out += convbn_entries(f"Norm{i}.single_branch.0", (FUSION, f"Norm{i}"))
    for i in range(1, n):
        out += convbn_entries(f"dsc{i}.single_branch.0", (FUSION, f"dsc{i}"))
    for j in range(3):
        out += convbn_entries(f"icn1.part_a.{j}", (AUX, "icn1", f"part_a_{j}"), bgr=j == 0)
    out += convbn_entries("icn1.part_b", (AUX, "icn1", "part_b"))
    for k in range(2, n):
        for part in ("part_a", "part_b"):
            out += convbn_entries(f"icn{k}.{part}", (AUX, f"icn{k}", part))
    otc = (0, 2) if image_size == 300 else (0, 2, 4, 6)
    cbs = (4, 5, 6, 7) if image_size == 300 else (8, 9)
    for idx in otc:
        for j in (0, 1):
            out += convbn_entries(
                f"extras.{idx}.single_branch.{j}", (EXTRAS, f"otc{idx}", f"single_branch_{j}")
            )
    for idx in cbs:
        out += convbn_entries(f"extras.{idx}", (EXTRAS, f"cb{idx}"))
    for name in ("proj", "agent", "convert", "merge"):
        for i in range(1, n):
            out += convbn_entries(f"{name}{i}", (TOPDOWN, f"{name}{i}"))
    out += _head_entries(num_sources)
    return out


def ssd_entries(image_size: int, num_sources: int) -> list[Entry]:
    """ssd.pytorch SSD (`vgg.N`, `L2Norm.weight`, `extras.N`, `loc.s`, `conf.s`) → family `ssd`."""
    out = vgg_entries("vgg.", bgr=True)
    out.append(Entry("L2Norm.weight", "params", (L2NORM, L2NORM_PARAM)))
    for k in range(8 if image_size == 300 else 10):
        out += conv_entries(f"extras.{k}", (EXTRAS, f"conv{k}"))
    out += _head_entries(num_sources)
    return out


def _head_entries(num_sources: int) -> list[Entry]:
    out: list[Entry] = []
    for kind in ("loc", "conf"):
        for s in range(num_sources):
            out += conv_entries(f"{kind}.{s}", (HEADS, f"{kind}{s}"))
    return out


# ------------------------------------------------------------------ conversion
def model_shapes(config: Any) -> dict[str, Any]:
    """The variables of `models.build(config)` as `jax.ShapeDtypeStruct`s (nothing computed)."""
    import jax
    import jax.numpy as jnp

    from daipnet_jax import models

    model = models.build(config)
    s = int(config.model.image_size)
    images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


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
                "trained with PyTorch 0.3.1's align_corners=True bilinear upsampling (SPEC §3.4)",
                stacklevel=3,
            )
    if fmt == "ssd" and m.family != "ssd":
        raise ConversionError(f"ssd: SSD300 weights need model.family='ssd', got {m.family!r}")
    caffe = fmt != "torchvision-vgg16"
    mean = tuple(float(v) for v in m.pixel_mean)
    std = tuple(float(v) for v in m.pixel_std)
    if caffe and (not np.allclose(mean, CAFFE_MEAN_RGB) or not np.allclose(std, 1.0)):
        warnings.warn(
            f"{fmt}: caffe-style weights expect pixel_mean {CAFFE_MEAN_RGB} and std 1; the config "
            f"has {mean}, {std}",
            stacklevel=3,
        )
    if not caffe and np.allclose(mean, CAFFE_MEAN_RGB):
        warnings.warn(
            "torchvision-vgg16: torchvision weights expect pixel_mean 255·(0.485, 0.456, 0.406) "
            "and pixel_std 255·(0.229, 0.224, 0.225) (SPEC §1); the config has the caffe mean",
            stacklevel=3,
        )


def convert_state_dict(
    fmt: str,
    sd: Mapping[str, Any],
    config: Any,
    *,
    shapes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """State dict (numpy or torch values) of format `fmt` → Flax variables for `config`'s model.

    `lrf` / `ssd`: the complete {'params', 'batch_stats'} of `models.build(config)`.
    VGG formats: only the backbone, {'params': {'backbone': …}, 'batch_stats': {}} (graft it with
    `merge_vgg`). `shapes` (optional): precomputed `model_shapes(config)`.
    Raises `ConversionError` on any mismatch (SPEC §7).
    """
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
    target = shapes if shapes is not None else model_shapes(config)
    return apply_entries(sd, entries, target, fmt=fmt, require=require)


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        return v.detach().cpu().numpy()
    return np.asarray(v)


# ------------------------------------------------------------------ checkpoints
def save_converted(
    variables: Mapping[str, Any], directory: str | pathlib.Path, metadata: Mapping[str, Any]
) -> pathlib.Path:
    """Write `variables` as the orbax item DIR (StandardSave) plus DIR/conversion.json.

    An existing DIR is replaced (orbax `force=True`).
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tree = {
        "params": variables.get("params", {}),
        "batch_stats": variables.get("batch_stats", {}),
    }
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory, tree, force=True)
    ckpt.wait_until_finished()
    (directory / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True))
    return directory


def load_converted(
    path: str | pathlib.Path, target: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read a directory written by `save_converted` / the CLI → {'params', 'batch_stats'} (numpy).

    With `target` (a variables tree or its `jax.eval_shape`), every leaf must exist in the
    checkpoint with the same shape and vice versa; otherwise `ConversionError` names the first
    differing path.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(path).resolve()
    if not (directory / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"{directory}: not a converted checkpoint ({METADATA_FILE} missing; write one with "
            "`python -m daipnet_jax.convert`)"
        )
    restored = ocp.StandardCheckpointer().restore(directory)
    out = {
        "params": dict(restored.get("params", {}) or {}),
        "batch_stats": dict(restored.get("batch_stats", {}) or {}),
    }
    if target is not None:
        _check_same_tree(out, target, str(directory))
    return out


load_variables = load_converted


def _check_same_tree(got_tree: Mapping[str, Any], want_tree: Mapping[str, Any], what: str) -> None:
    got = {(c, *p): v for c in got_tree for p, v in flatten(got_tree[c]).items()}
    want = {(c, *p): v for c in want_tree for p, v in flatten(want_tree[c]).items()}
    for p in want:
        if p not in got:
            raise ConversionError(f"{what}: the checkpoint lacks {'/'.join(p)}")
        if _shape(got[p]) != _shape(want[p]):
            raise ConversionError(
                f"{what}: {'/'.join(p)} has shape {_shape(got[p])}, the model wants "
                f"{_shape(want[p])}"
            )
    for p in got:
        if p not in want:
            raise ConversionError(f"{what}: the checkpoint has {'/'.join(p)}, the model does not")


def merge_checkpoint(variables: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
    """A full converted checkpoint in place of `variables` (e.g. a fresh init of the same model).

    Both trees must have exactly the same paths and shapes (`ConversionError` names the first
    difference); leaves are cast to the dtypes of `variables`.
    """
    _check_same_tree(loaded, variables, "merge_checkpoint")
    out: dict[str, Any] = {}
    for c in variables:
        new = flatten(loaded[c])
        out[c] = unflatten(
            {p: np.asarray(new[p], dtype=ref.dtype) for p, ref in flatten(variables[c]).items()}
        )
    return out


def merge_vgg(variables: Mapping[str, Any], vgg_variables: Mapping[str, Any]) -> dict[str, Any]:
    """Graft converted backbone weights into a full variables tree (e.g. a fresh init).

    Every leaf of `vgg_variables` must exist in `variables` with the same shape; the result is a
    new tree of host numpy arrays (inputs unchanged) whose backbone leaves are replaced, cast to
    the target dtype.
    """
    flat = {(c, *p): v for c in variables for p, v in flatten(variables[c]).items()}
    for c in vgg_variables:
        for p, v in flatten(vgg_variables[c]).items():
            dest = (c, *p)
            if dest not in flat:
                raise ConversionError(f"merge_vgg: the model has no {'/'.join(dest)}")
            if _shape(v) != _shape(flat[dest]):
                raise ConversionError(
                    f"merge_vgg: {'/'.join(dest)} is {_shape(v)} in the converted weights but "
                    f"{_shape(flat[dest])} in the model (check model.width)"
                )
            flat[dest] = np.asarray(v, dtype=flat[dest].dtype)
    out = unflatten(flat)
    for c in variables:
        out.setdefault(c, {})
    return out


def convert_file(
    fmt: str, input_path: str | pathlib.Path, config: Any, output: str | pathlib.Path
) -> pathlib.Path:
    """Load `input_path`, convert (`convert_state_dict`), save to `output`; returns the directory."""
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
    return save_converted(variables, output, meta)


# ------------------------------------------------------------------ CLI
def _cli_main(argv: list[str]) -> None:
    import sys

    from absl import app, flags

    fl = flags.FLAGS
    if len(argv) != 2 or argv[1] not in FORMATS:
        raise app.UsageError(
            f"expected one positional argument, the format ({', '.join(FORMATS)}); got {argv[1:]}"
        )
    try:
        out = convert_file(argv[1], fl.input, fl.config, fl.output)
    except (ConversionError, FileNotFoundError) as e:
        print(f"conversion error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    """`python -m daipnet_jax.convert FORMAT --input X.pth --config CFG --output DIR`.

    Flags are defined here, not at import, so that importing this module (as the training loop
    does) never clashes with the importer's own `--config` flag.
    """
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("input", None, "PyTorch state dict (.pth), read with weights_only=True")
    flags.DEFINE_string("output", None, "output directory (an orbax checkpoint, see the docs)")
    config_flags.DEFINE_config_file(
        "config", None, "config file and argument, e.g. configs/coco.py:lrf300"
    )
    flags.mark_flags_as_required(["input", "output", "config"])
    app.run(_cli_main, argv=argv)


if __name__ == "__main__":
    main()
