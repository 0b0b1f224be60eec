"""Config mechanics: argument parsing, prior geometry, epoch arithmetic, `ConfigError`,
`first_line` (how every error is put on one line).

The recipe itself (every section and default) lives in `daipnet_jax/configs/` (`common.py` plus
one file per dataset, reachable as `configs/` from the repository root). A config is an
`ml_collections.ConfigDict` with the sections `model`, `priors`, `data`, `postprocess`, `train`
and `init`; the README's config reference lists every key.

Variants are chosen big_vision-style: `--config configs/coco.py:daipnet300` or
`--config configs/coco.py:lrf_affm512,width=0.25`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

# Table 2 of the paper, one row per name: (aux, fusion, topdown). `ssd` is the vanilla family.
VARIANTS: dict[str, tuple[str, str, str] | None] = {
    "ssd": None,
    "lrf": ("lsn", "lrf", "lrf"),
    "lrf_affm": ("lsn", "affm", "lrf"),
    "lrf_affm_ipn": ("ipn", "affm", "lrf"),
    "daipnet": ("ipn", "affm", "pafm"),
}
IMAGE_SIZES = (300, 512)

CAFFE_MEAN_RGB = (123.0, 117.0, 104.0)
CAFFE_STD = (1.0, 1.0, 1.0)
TORCHVISION_MEAN_RGB = (255 * 0.485, 255 * 0.456, 255 * 0.406)
TORCHVISION_STD = (255 * 0.229, 255 * 0.224, 255 * 0.225)


class ConfigError(ValueError):
    """A config value that cannot be used; `key` names the config entry."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def first_line(error: BaseException, limit: int = 0) -> str:
    """The first line of `str(error)` (its type's name when empty), cut to `limit` characters
    when `limit` > 0: how an error reaches a one-line message."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if limit <= 0 or len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ arguments
def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """big_vision-style `name,key=value,flag` parsing of the `file.py:ARG` config argument.

    Only the keys of `defaults` are accepted (the first bare word is `name` when `defaults` has
    one); anything else raises a one-line `ValueError` naming the key and the allowed keys.
    """
    out = dict(defaults)
    if not arg:
        return ml_collections.ConfigDict(out)
    for i, part in enumerate(p for p in arg.split(",") if p):
        key, value = part.split("=", 1) if "=" in part else (part, None)
        if value is None and i == 0 and "name" in defaults:
            key, value = "name", part
        if key not in defaults:
            raise ValueError(
                f"config argument {key!r} in {arg!r} is not one of {', '.join(defaults)}"
            )
        template = defaults[key]
        try:
            if value is None:
                out[key] = True
            elif isinstance(template, bool):
                out[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(template, int):
                out[key] = int(value)
            elif isinstance(template, float):
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError as e:
            raise ValueError(f"config argument {key}={value!r}: {e}") from None
    return ml_collections.ConfigDict(out)


def variant_name(name: str) -> tuple[str, int]:
    """Split `daipnet300` into (`daipnet`, 300)."""
    for size in IMAGE_SIZES:
        if name.endswith(str(size)):
            base = name[: -len(str(size))]
            if base in VARIANTS:
                return base, size
    raise ValueError(
        f"unknown model variant {name!r}; expected one of "
        + ", ".join(f"{v}{s}" for v in VARIANTS for s in IMAGE_SIZES)
    )


# ------------------------------------------------------------------ priors
# Feature-map sizes and steps per input size (SSD300/512 and LRF, paper Section 3).
PRIOR_GEOMETRY = {
    300: ([38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300]),
    512: ([64, 32, 16, 8, 4, 2, 1], [8, 16, 32, 64, 128, 256, 512]),
}


def prior_table(
    image_size: int, family: str, min_sizes: Sequence[float], max_sizes: Sequence[float]
) -> dict[str, Any]:
    """The `priors` section for an input size, a family and the dataset's prior sizes.

    Aspect ratios: the LRF skeleton uses [2, 3] on all but the last two sources; the vanilla
    `ssd` family keeps ssd.pytorch's [2], [2, 3]..., [2], [2] (k = 4, 6, ..., 4, 4). At 512
    (ssd.pytorch has no 512 table) `ssd` takes the same pattern with one more [2, 3] source.
    """
    if image_size not in PRIOR_GEOMETRY:
        raise ValueError(f"model.image_size={image_size}: priors exist only for 300 and 512")
    feature_maps, steps = PRIOR_GEOMETRY[image_size]
    n = len(feature_maps)
    if family == "ssd":
        ratios = [[2]] + [[2, 3]] * (n - 3) + [[2]] * 2
    else:
        ratios = [[2, 3]] * (n - 2) + [[2]] * 2
    return dict(
        feature_maps=list(feature_maps),
        steps=list(steps),
        min_sizes=list(min_sizes),
        max_sizes=list(max_sizes),
        aspect_ratios=[list(r) for r in ratios],
        variances=[0.1, 0.2],
        clip=True,
    )


def anchors_per_location(aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    """k per source: min, sqrt(min*max), and two boxes per ratio."""
    return [2 + 2 * len(r) for r in aspect_ratios]


def num_priors(priors: Any) -> int:
    """P = Σ_k f_k² · k_k over the sources of a `priors` section.

    COCO/VOC 300 (LRF/DAIPNet): 11620; 512: 32756; vanilla SSD300: 8732.
    """
    ks = anchors_per_location(priors.aspect_ratios)
    return sum(int(f) * int(f) * k for f, k in zip(priors.feature_maps, ks, strict=True))


# ------------------------------------------------------------------ epochs and steps
def tfds_names(tfds_name: str) -> list[str]:
    """`voc/2007+voc/2012` → ['voc/2007', 'voc/2012'] (`data.tfds_name` may join builders)."""
    return [n.strip() for n in str(tfds_name).split("+") if n.strip()]


def dataset_kind(config: ml_collections.ConfigDict) -> str:
    """`generated`, `voc` (a tfds source whose first builder is voc/…: VOC classes and the VOC
    metric), `coco` (any other tfds builder) or `folder` (`coco_folder`: the user's classes)."""
    source = config.data.source
    if source == "generated":
        return "generated"
    if source == "tfds":
        names = tfds_names(config.data.tfds_name)
        return "voc" if names and names[0].startswith("voc") else "coco"
    return "folder"


def epoch_size(config: ml_collections.ConfigDict, source_examples: int | Callable[[], int]) -> int:
    """Examples per epoch: `train.train_examples` when > 0, else the data source's count.

    `source_examples` may be a function, called only when the config does not set the size (so
    that a config with `train.train_examples` never touches the data).
    """
    examples = int(config.train.get("train_examples", -1))
    if examples > 0:
        return examples
    return int(source_examples() if callable(source_examples) else source_examples)


def steps_per_epoch(
    config: ml_collections.ConfigDict, source_examples: int | Callable[[], int]
) -> int:
    """`epoch_size // train.batch_size` (the last partial batch is dropped)."""
    examples = epoch_size(config, source_examples)
    spe = examples // int(config.train.batch_size)
    if spe < 1:
        raise ConfigError(
            "train.batch_size",
            f"{config.train.batch_size} exceeds the {examples} training examples",
        )
    return spe


def total_steps(config: ml_collections.ConfigDict, spe: int) -> int:
    """Training length in steps: `train.total_steps` if > 0, else `total_epochs · spe`."""
    if config.train.total_steps > 0:
        return int(config.train.total_steps)
    return round(config.train.total_epochs * spe)


def schedule_points(config: ml_collections.ConfigDict, spe: int) -> tuple[int, list[int]]:
    """(warm-up steps, decay boundary steps), each `round(epochs · spe)`.

    `train.total_steps > 0` moves only the end of training: the warm-up and decay points stay
    at their epochs, so a short run keeps the recipe's early learning rates.
    """
    t = config.train
    return round(t.warmup_epochs * spe), [round(e * spe) for e in t.decay_epochs]


def base_config(variant: str, dataset: str, *, width: float = 1.0) -> ml_collections.ConfigDict:
    """The recipe of `daipnet_jax/configs/<dataset>.py` for `variant` (e.g. `daipnet300`)."""
    from daipnet_jax import configs

    return configs.recipe(variant, dataset, width=width)


# ------------------------------------------------------------------ a workdir's saved config
# Keys a resumed training may change: durations, periods, evaluation and input-pipeline
# settings, and where the (same) data lives. Anything else changes what is trained.
RESUME_MAY_CHANGE = (
    "name",
    "train.total_steps",
    "train.total_epochs",
    "train.max_train_seconds",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.eval_every_steps",
    "train.eval_batch_size",
    "train.transfer_guard",
    "data.data_dir",
    "data.annotation_file",
    "data.image_dir",
    "data.eval_*",
    "data.num_parallel_calls",
    "data.prefetch",
    "data.cache",
    "data.validate_files",
    "postprocess.*",
    "init.*",
)
# Keys holding file or folder paths: saved absolute, so a saved config works from any folder.
PATH_KEYS = (
    "data.data_dir",
    "data.annotation_file",
    "data.image_dir",
    "data.eval_annotation_file",
    "data.eval_image_dir",
    "init.vgg",
    "init.checkpoint",
)


def absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config's nested dict with every non-empty `PATH_KEYS` value made absolute
    (relative to the current folder, `~` expanded)."""
    import copy
    import os

    out = copy.deepcopy(tree)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = out.get(section, {}).get(name)
        if isinstance(value, str) and value:
            out[section][name] = os.path.abspath(os.path.expanduser(value))
    return out


# Keys that evaluation, predict and export must share with the training run: the model.
EVAL_MUST_MATCH = ("model.*", "priors.*")


def flat_items(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{'a.b': value}` of a nested dict / ConfigDict (tuples as lists)."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def conflicting_keys(saved: Any, config: Any, purpose: str) -> list[str]:
    """Keys where `config` differs from a workdir's `saved` config and may not.

    purpose: `resume` (anything outside `RESUME_MAY_CHANGE` must match) or `eval` (only the
    `EVAL_MUST_MATCH` keys must match). Keys missing from `saved` (written by an older
    version) are not compared.
    """
    import fnmatch

    old, new = flat_items(saved), flat_items(config)
    out = []
    for key, value in new.items():
        if key not in old or old[key] == value:
            continue
        if purpose == "resume":
            if any(fnmatch.fnmatchcase(key, p) for p in RESUME_MAY_CHANGE):
                continue
        elif not any(fnmatch.fnmatchcase(key, p) for p in EVAL_MUST_MATCH):
            continue
        out.append(key)
    return sorted(out)


def describe_conflict(keys: list[str], saved: Any, config: Any, where: str) -> str:
    """One line naming the differing keys and both values."""
    old, new = flat_items(saved), flat_items(config)
    parts = [f"{k}={new[k]!r} (saved {old[k]!r})" for k in keys[:6]]
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    return f"the config differs from {where} in " + ", ".join(parts) + more
