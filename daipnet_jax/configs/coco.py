"""COCO configs for every model of the paper's Table 2, at 300 and 512.

Usage: `--config configs/coco.py:daipnet300` (or ssd300, lrf300, lrf_affm300, lrf_affm_ipn300,
and the same names with 512). Optional `,width=0.25` for a width-reduced model.
Own COCO-format data: add `--config.data.source=coco_folder --config.data.annotation_file=...
--config.data.image_dir=...` (and the `eval_` pair).
"""

from __future__ import annotations

import ml_collections

from daipnet_jax.config import parse_arg
from daipnet_jax.configs import common

NUM_CLASSES = 81  # 80 categories + background
# (min_sizes, max_sizes) in pixels per input size: LRF's COCO tables.
PRIOR_SIZES: dict[int, tuple[list[float], list[float]]] = {
    300: ([21, 45, 99, 153, 207, 261], [45, 99, 153, 207, 261, 315]),
    512: (
        [20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8],
        [51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72],
    ),
}


def recipe(variant: str, *, width: float = 1.0) -> ml_collections.ConfigDict:
    c = common.recipe(variant, width=width)
    c.name = f"{variant}_coco"
    c.model.num_classes = NUM_CLASSES
    common.set_priors(c, PRIOR_SIZES)
    c.data.update(source="tfds", tfds_name="coco/2017", train_split="train", max_boxes=128)
    c.data.eval_split = "validation"
    # Paper Section 4.2: SGD, lr 4e-3 at batch 32, 6 warm-up epochs, ×0.1 at 90/120/140, 160.
    c.train.update(batch_size=32, base_lr=4e-3, warmup_epochs=6.0, total_epochs=160.0)
    c.train.decay_epochs = (90.0, 120.0, 140.0)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, name="daipnet300", width=1.0)
    return recipe(args.name, width=args.width)
