"""Config construction and validation shared by every `configs/*.py` file.

A config is an `ml_collections.ConfigDict` with these sections (every key, its default and its
meaning is listed in the README's config reference):

- `model`: family (`lrf` skeleton or vanilla `ssd`), the three switches `aux`, `fusion`,
  `topdown`, `image_size`, `num_classes` (background included), `width`, `dtype`,
  `align_corners`, `pixel_mean`, `pixel_std`.
- `priors`: the prior-box table of SPEC §3.5, filled from (dataset, size, family).
- `data`: the input source and pipeline.
- `postprocess`: thresholds and caps of inference (SPEC §6).
- `train`: optimiser, schedule, durations, checkpointing, logging.
- `init`: optional converted weights to start from.

Variants are chosen big_vision-style: `--config configs/coco.py:daipnet300` or
`--config configs/coco.py:lrf_affm512,width=0.25`.
"""

from __future__ import annotations

from collections.abc import Sequence
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

DATASET_CLASSES = {"coco": 81, "voc": 21}

CAFFE_MEAN_RGB = (123.0, 117.0, 104.0)
CAFFE_STD = (1.0, 1.0, 1.0)
TORCHVISION_MEAN_RGB = (255 * 0.485, 255 * 0.456, 255 * 0.406)
TORCHVISION_STD = (255 * 0.229, 255 * 0.224, 255 * 0.225)


def prior_table(dataset: str, image_size: int, family: str) -> dict[str, Any]:
    """The prior-box table of SPEC §3.5 for (dataset, size, family).

    `dataset` is `coco` or `voc` (the generated dataset uses the `coco` sizes). The vanilla `ssd`
    family keeps ssd.pytorch's aspect ratios: [2], [2,3]x3, [2], [2] at 300 (k = 4,6,6,6,4,4);
    choice at 512 (ssd.pytorch has no 512 table): [2], [2,3]x4, [2], [2] with the LRF sizes.
    """
    feature_maps: list[int]
    steps: list[int]
    min_sizes: list[float]
    max_sizes: list[float]
    ratios: list[list[int]]
    if image_size == 300:
        feature_maps = [38, 19, 10, 5, 3, 1]
        steps = [8, 16, 32, 64, 100, 300]
        if dataset == "voc":
            min_sizes = [30, 60, 111, 162, 213, 264]
            max_sizes = [60, 111, 162, 213, 264, 315]
        else:
            min_sizes = [21, 45, 99, 153, 207, 261]
            max_sizes = [45, 99, 153, 207, 261, 315]
        if family == "ssd":
            ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
        else:
            ratios = [[2, 3]] * 4 + [[2]] * 2
    elif image_size == 512:
        feature_maps = [64, 32, 16, 8, 4, 2, 1]
        steps = [8, 16, 32, 64, 128, 256, 512]
        if dataset == "voc":
            min_sizes = [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8]
            max_sizes = [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6]
        else:
            min_sizes = [20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8]
            max_sizes = [51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72]
        if family == "ssd":
            ratios = [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]
        else:
            ratios = [[2, 3]] * 5 + [[2]] * 2
    else:
        raise ValueError(f"model.image_size={image_size}: priors exist only for 300 and 512")
    return dict(
        feature_maps=feature_maps,
        steps=steps,
        min_sizes=min_sizes,
        max_sizes=max_sizes,
        aspect_ratios=[list(r) for r in ratios],
        variances=[0.1, 0.2],
        clip=True,
    )


def anchors_per_location(aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    """k per source: min, sqrt(min*max), and two boxes per ratio."""
    return [2 + 2 * len(r) for r in aspect_ratios]


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """big_vision-style `name,key=value,flag` parsing of the `file.py:ARG` config argument."""
    out = dict(defaults)
    if not arg:
        return ml_collections.ConfigDict(out)
    for i, part in enumerate(p for p in arg.split(",") if p):
        if "=" in part:
            key, value = part.split("=", 1)
            template = defaults.get(key)
            if isinstance(template, bool):
                out[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(template, int):
                out[key] = int(value)
            elif isinstance(template, float):
                out[key] = float(value)
            else:
                out[key] = value
        elif i == 0 and "name" in defaults:
            out["name"] = part
        else:
            out[part] = True
    return ml_collections.ConfigDict(out)


def variant_name(name: str) -> tuple[str, int]:
    """Split `daipnet300` into (`daipnet`, 300)."""
    for size in (300, 512):
        if name.endswith(str(size)):
            base = name[: -len(str(size))]
            if base in VARIANTS:
                return base, size
    raise ValueError(
        f"unknown model variant {name!r}; expected one of "
        + ", ".join(f"{v}{s}" for v in VARIANTS for s in (300, 512))
    )


def base_config(variant: str, dataset: str, *, width: float = 1.0) -> ml_collections.ConfigDict:
    """Full config for `variant` (e.g. `daipnet300`) trained on `dataset` (coco | voc | generated).

    Data-source keys default to the dataset's tfds builder; `configs/*.py` override them.
    """
    base, size = variant_name(variant)
    prior_dataset = "voc" if dataset == "voc" else "coco"
    c = ml_collections.ConfigDict()
    c.name = f"{variant}_{dataset}"
    c.seed = 0

    m = c.model = ml_collections.ConfigDict()
    switches = VARIANTS[base]
    m.family = "ssd" if switches is None else "lrf"
    m.aux, m.fusion, m.topdown = switches if switches else ("lsn", "lrf", "lrf")
    m.image_size = size
    m.num_classes = DATASET_CLASSES.get(dataset, 81)
    m.width = width
    m.dtype = "float32"  # or "bfloat16": compute dtype; params stay float32
    m.align_corners = False  # True to match the released (PyTorch 0.3.1) LRF weights
    m.pixel_mean = CAFFE_MEAN_RGB
    m.pixel_std = CAFFE_STD

    c.priors = ml_collections.ConfigDict(prior_table(prior_dataset, size, m.family))

    d = c.data = ml_collections.ConfigDict()
    d.source = {"coco": "tfds", "voc": "tfds", "generated": "generated"}.get(dataset, dataset)
    d.tfds_name = {"coco": "coco/2017", "voc": "voc/2007+voc/2012"}.get(dataset, "")
    d.train_split = "train" if dataset != "voc" else "trainval"
    d.eval_split = "validation" if dataset != "voc" else "test"
    d.data_dir = ""  # tfds data_dir, or the generated dataset's folder
    d.annotation_file = ""  # COCO-format folder: instances JSON (train)
    d.image_dir = ""  # COCO-format folder: images (train)
    d.eval_annotation_file = ""
    d.eval_image_dir = ""
    d.max_boxes = 128 if dataset == "coco" else 64
    d.shuffle_buffer = 2048
    d.num_parallel_calls = -1  # tf.data.AUTOTUNE
    d.prefetch = 2
    d.cache = False
    # Generated dataset (see daipnet_jax.data.generated).
    d.generated_num_train = 2000
    d.generated_num_val = 200
    d.generated_num_classes = 3
    d.generated_image_size = 300
    d.generated_seed = 0  # the dataset's own seed (independent of the training seed)
    d.validate_files = True  # COCO-format folders: header-check every image at build time
    # Augmentation (SPEC §5); `augment=False` trains on plain resized images.
    d.augment = True
    d.expand_prob = 0.6
    d.max_expand_ratio = 4.0

    p = c.postprocess = ml_collections.ConfigDict()
    p.score_threshold = 0.01
    p.nms_iou = 0.45
    p.per_class_max = 50
    p.max_detections = 200
    p.pre_nms_top_k = 1000  # candidates per class fed to NMS (see postprocess.detect)

    t = c.train = ml_collections.ConfigDict()
    t.batch_size = 32  # global, over all devices and hosts
    t.eval_batch_size = 8
    t.base_lr = 4e-3  # at reference_batch_size
    t.reference_batch_size = 32
    t.scale_lr_with_batch = True
    t.warmup_init_lr = 1e-6
    t.momentum = 0.9
    t.optimizer = "sgd"  # the paper's recipe; "adam" only for the from-scratch quick start
    t.weight_decay = 5e-4
    if dataset == "voc":
        t.warmup_epochs, t.decay_epochs, t.total_epochs = 6.0, (150.0, 200.0), 250.0
    else:
        t.warmup_epochs, t.decay_epochs, t.total_epochs = 6.0, (90.0, 120.0, 140.0), 160.0
    # Epochs are floats so that `--config.train.warmup_epochs=0.5` is accepted.
    t.decay_factor = 0.1
    t.total_steps = -1  # > 0 overrides total_epochs (durations in steps)
    t.train_examples = -1  # epoch size; -1: from the data source
    t.neg_pos_ratio = 3
    t.match_iou = 0.5
    t.log_every_steps = 50
    t.checkpoint_every_steps = 1000
    t.keep_checkpoints = 3
    t.eval_every_steps = 0  # 0: evaluate only at the end
    t.max_train_seconds = 0.0  # > 0: stop (and checkpoint) after this wall time
    t.nan_guard = True
    t.transfer_guard = "disallow"

    i = c.init = ml_collections.ConfigDict()
    i.vgg = ""  # directory written by `python -m daipnet_jax.convert torchvision-vgg16|ssd-vgg`
    i.checkpoint = ""  # a full converted checkpoint (lrf / ssd) to start from
    return c
