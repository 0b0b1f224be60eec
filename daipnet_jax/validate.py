"""Config validation run before anything is built or compiled (training and evaluation).

`validate_config` checks every key a run depends on and raises `ConfigError` (a `ValueError`)
whose message starts with the offending key, e.g.
`train.batch_size: 6 is not divisible by the 4 devices`. Unknown `--config.X` keys never reach
this function: `ml_collections.config_flags` already refuses them. The allowed model switch
values are the model's own table, `models.SWITCHES`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from daipnet_jax import config as config_lib
from daipnet_jax.config import ConfigError
from daipnet_jax.configs import coco, voc
from daipnet_jax.models import SWITCHES

TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")
OPTIMIZERS = ("sgd", "adam")  # training.schedule.make_optimizer
__all__ = ["ConfigError", "check_writable", "validate_config", "validate_inputs"]


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if part not in node:
            raise ConfigError(key, "missing from the config")
        node = node[part]
    return node


def _positive(config: ml_collections.ConfigDict, key: str, *, allow_zero: bool = False) -> float:
    value = _get(config, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(key, f"{value!r} is not a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"{value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return float(value)


def _one_of(config: ml_collections.ConfigDict, key: str, allowed: Sequence[Any]) -> Any:
    value = _get(config, key)
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def _batch(config: ml_collections.ConfigDict, key: str, process_count: int) -> int:
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(key, f"{value!r} must be a positive int")
    if value % process_count:
        raise ConfigError(key, f"{value} is not divisible by the {process_count} processes")
    return value


def validate_config(
    config: ml_collections.ConfigDict, *, device_count: int | None = None, process_count: int = 1
) -> None:
    """Raise `ConfigError` naming the first key that cannot be trained with.

    `device_count` (global, all hosts) defaults to `jax.device_count()`; pass it explicitly to
    validate without touching the backend. Checks, in order: model switches and family, image
    size against the prior table, num_classes against the dataset, dtype, data source and its
    required keys, batch divisibility over devices and processes, optimiser and schedule
    numbers, durations, logging/checkpoint periods, the transfer guard, the optimiser name,
    the post-processing thresholds and counts.
    """
    m = config.model
    family = _one_of(config, "model.family", SWITCHES["family"])
    if family == "lrf":
        for key in ("aux", "fusion", "topdown"):
            _one_of(config, f"model.{key}", SWITCHES[key])
    size = _one_of(config, "model.image_size", SWITCHES["image_size"])
    fm = list(_get(config, "priors.feature_maps"))
    expected_fm = config_lib.PRIOR_GEOMETRY[size][0]
    if fm != expected_fm:
        raise ConfigError(
            "priors.feature_maps",
            f"{fm} does not match model.image_size={size} (expected {expected_fm})",
        )
    n = len(fm)
    for key in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
        if len(_get(config, f"priors.{key}")) != n:
            raise ConfigError(f"priors.{key}", f"needs {n} entries, one per feature map")
    if len(_get(config, "priors.variances")) != 2:
        raise ConfigError("priors.variances", "needs 2 entries (centre, size)")
    _positive(config, "model.width")
    if _one_of(config, "model.dtype", SWITCHES["dtype"]) == "float64":
        import jax

        if not jax.config.read("jax_enable_x64"):
            raise ConfigError("model.dtype", "'float64' needs JAX_ENABLE_X64=1 (reference runs)")
    if len(m.pixel_mean) != 3:
        raise ConfigError("model.pixel_mean", "needs 3 entries (RGB)")
    if len(m.pixel_std) != 3 or min(m.pixel_std) <= 0:
        raise ConfigError("model.pixel_std", "needs 3 positive entries (RGB)")

    from daipnet_jax.data.sources import SOURCES  # the one registry of data sources

    source = _one_of(config, "data.source", list(SOURCES))
    num_classes = _get(config, "model.num_classes")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError("model.num_classes", f"{num_classes!r} must be an int >= 2")
    kind = config_lib.dataset_kind(config)
    expected = {
        "coco": coco.NUM_CLASSES,
        "voc": voc.NUM_CLASSES,
        "generated": int(config.data.generated_num_classes) + 1,
    }.get(kind)
    if expected is not None and num_classes != expected:
        raise ConfigError(
            "model.num_classes",
            f"{num_classes} is inconsistent with the {kind} dataset "
            f"({expected} = its classes + background)",
        )
    if source == "tfds" and not config.data.tfds_name:
        raise ConfigError("data.tfds_name", "must name a tfds builder when data.source='tfds'")
    if source == "coco_folder":
        for key in ("data.annotation_file", "data.image_dir"):
            if not _get(config, key):
                raise ConfigError(key, "is required when data.source='coco_folder'")
    _positive(config, "data.max_boxes")

    t = config.train
    devices = device_count
    if devices is None:
        import jax

        devices = jax.device_count()
    batch = _batch(config, "train.batch_size", process_count)
    if batch % devices:
        raise ConfigError(
            "train.batch_size", f"{batch} is not divisible by the {devices} devices (data axis)"
        )
    # Each process reads its own share of every eval batch; an eval batch that does not divide
    # the devices runs replicated (evaluation.loop.make_eval_step), so only processes matter here.
    _batch(config, "train.eval_batch_size", process_count)
    _positive(config, "train.base_lr")
    _positive(config, "train.reference_batch_size")
    _positive(config, "train.warmup_init_lr", allow_zero=True)
    _positive(config, "train.momentum", allow_zero=True)
    if t.momentum >= 1:
        raise ConfigError("train.momentum", f"{t.momentum} must be < 1")
    _positive(config, "train.weight_decay", allow_zero=True)
    _positive(config, "train.decay_factor")
    _positive(config, "train.warmup_epochs", allow_zero=True)
    total_epochs = _positive(config, "train.total_epochs")
    decay = list(_get(config, "train.decay_epochs"))
    if decay != sorted(decay) or any(d <= 0 for d in decay):
        raise ConfigError("train.decay_epochs", f"{decay} must be positive and increasing")
    if decay and decay[-1] > total_epochs:
        raise ConfigError(
            "train.decay_epochs", f"{decay} reaches past train.total_epochs={total_epochs}"
        )
    if not isinstance(t.total_steps, int) or (t.total_steps <= 0 and t.total_steps != -1):
        raise ConfigError("train.total_steps", f"{t.total_steps!r}: -1 (epochs) or > 0 steps")
    if not isinstance(t.train_examples, int) or (t.train_examples <= 0 and t.train_examples != -1):
        raise ConfigError("train.train_examples", f"{t.train_examples!r}: -1 or > 0")
    _positive(config, "train.neg_pos_ratio")
    if not 0 < t.match_iou <= 1:
        raise ConfigError("train.match_iou", f"{t.match_iou!r} must be in (0, 1]")
    _positive(config, "train.log_every_steps")
    _positive(config, "train.checkpoint_every_steps")
    _positive(config, "train.keep_checkpoints")
    _positive(config, "train.eval_every_steps", allow_zero=True)
    _positive(config, "train.max_train_seconds", allow_zero=True)
    _one_of(config, "train.transfer_guard", TRANSFER_GUARDS)
    _one_of(config, "train.optimizer", OPTIMIZERS)
    p = config.postprocess
    if not 0 < p.nms_iou <= 1:
        raise ConfigError("postprocess.nms_iou", f"{p.nms_iou!r} must be in (0, 1]")
    if not 0 <= p.score_threshold < 1:
        raise ConfigError("postprocess.score_threshold", f"{p.score_threshold!r} must be in [0, 1)")
    for key in ("per_class_max", "max_detections", "pre_nms_top_k"):
        value = _get(config, f"postprocess.{key}")
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"postprocess.{key}", f"{value!r} must be a positive int")
    if config.init.vgg and config.init.checkpoint:
        raise ConfigError("init.vgg", "set either init.vgg or init.checkpoint, not both")


# ------------------------------------------------------------------ files, folders, data
def check_writable(directory: str | os.PathLike[str], flag: str = "--workdir") -> None:
    """Raise `ConfigError(flag)` unless `directory` exists (or can be made) and takes files."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write_check"):
            pass
    except OSError as e:
        raise ConfigError(flag, f"{str(directory)!r} is not writable ({e.strerror or e})") from e


def _readable_file(key: str, path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(key, f"{path} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(key, f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"{path} is not readable")


def _readable_dir(key: str, path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(key, f"{path} is not a folder" if os.path.exists(path) else
                          f"{path} does not exist")  # fmt: skip
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(key, f"{path} is not readable")


def validate_inputs(
    config: ml_collections.ConfigDict,
    *,
    train: bool = True,
    evaluate: bool = True,
    process_count: int = 1,
) -> None:
    """Raise `ConfigError` naming the key and file when the data cannot be used, before any
    compilation: files and folders exist and are readable, every image was not lost, the
    categories match `model.num_classes`, and (training) every process's shard holds usable
    examples (an image with at least one non-crowd box of positive area) and the data a whole
    batch of them. Folder sources only: tfds builders are checked when they are read.
    """
    from daipnet_jax.data import coco_folder, sources

    for name in ("vgg", "checkpoint"):
        path = str(config.init[name] or "")
        if path and not os.path.exists(path):
            raise ConfigError(f"init.{name}", f"{path} does not exist")
    source = sources.get(config)
    if not isinstance(source, sources.CocoFolderSource):
        return
    if isinstance(source, sources.GeneratedSource):
        source.warn_if_different(config)
    splits = (["train"] if train else []) + (["eval"] if evaluate else [])
    prefix = {"train": "data.", "eval": "data.eval_"}
    for split in splits:
        ann, img_dir = source.files(config, split)
        if not ann:
            raise ConfigError(f"{prefix[split]}annotation_file", "is required for this run")
        if config.data.source == "coco_folder":
            _readable_file(f"{prefix[split]}annotation_file", ann)
            _readable_dir(f"{prefix[split]}image_dir", img_dir)
        try:
            records = source.folder_records(config, split)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{prefix[split]}annotation_file", f"{ann}: {e}") from e
        if len(records.paths) == 0:
            st = records.stats
            raise ConfigError(
                f"{prefix[split]}image_dir",
                f"no image was found: {ann} lists {st.images_listed} images, none readable in "
                f"{img_dir} (missing {st.missing}, undecodable {st.undecodable})",
            )
        ids, _ = source.label_map(config)
        if int(config.model.num_classes) != len(ids) + 1:
            raise ConfigError(
                "model.num_classes",
                f"{config.model.num_classes} does not match the {len(ids)} categories of "
                f"{ann} (expected {len(ids) + 1}: categories + background)",
            )
        if split != "train":
            # pycocotools averages over the evaluation file's categories: one the model has no
            # label for would score 0 and pull AP down, while the per-class table omits it.
            eval_ids, eval_names = sources.file_categories(ann)
            train_ann, _ = source.files(config, "train")
            for cid, name in zip(eval_ids, eval_names, strict=True):
                if cid not in ids:
                    raise ConfigError(
                        f"{prefix[split]}annotation_file",
                        f"{ann}: category {cid} ({name!r}) is not one of the {len(ids)} "
                        f"categories the model is trained on ({train_ann or ann})",
                    )
            continue
        usable = coco_folder.usable_images(records)
        batch = int(config.train.batch_size)
        if int(usable.sum()) < batch:
            raise ConfigError(
                "train.batch_size",
                f"{batch} exceeds the {int(usable.sum())} usable training images of {ann} "
                "(an image is usable with a non-crowd box of positive area)",
            )
        for p in range(process_count):
            if not usable[p::process_count].any():
                raise ConfigError(
                    "data.annotation_file",
                    f"process {p} of {process_count} has no usable training image in {ann}",
                )
