"""PASCAL VOC 07+12 configs (tfds `voc/2007` + `voc/2012` trainval, tested on VOC2007 test).

Usage: `--config configs/voc.py:daipnet300` (ssd, lrf, lrf_affm, lrf_affm_ipn, daipnet x 300, 512).
"""

from __future__ import annotations

import ml_collections

from daipnet_jax.config import parse_arg
from daipnet_jax.configs import common

NUM_CLASSES = 21  # 20 categories + background
# (min_sizes, max_sizes) in pixels per input size: ssd.pytorch's / RFBNet's VOC tables.
PRIOR_SIZES: dict[int, tuple[list[float], list[float]]] = {
    300: ([30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315]),
    512: (
        [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8],
        [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6],
    ),
}


def recipe(variant: str, *, width: float = 1.0) -> ml_collections.ConfigDict:
    c = common.recipe(variant, width=width)
    c.name = f"{variant}_voc"
    c.model.num_classes = NUM_CLASSES
    common.set_priors(c, PRIOR_SIZES)
    c.data.update(source="tfds", tfds_name="voc/2007+voc/2012", max_boxes=64)
    c.data.train_split, c.data.eval_split = "trainval", "test"
    # Paper Section 4.2: SGD, lr 4e-3 at batch 32, 6 warm-up epochs, ×0.1 at 150/200, 250.
    c.train.update(batch_size=32, base_lr=4e-3, warmup_epochs=6.0, total_epochs=250.0)
    c.train.decay_epochs = (150.0, 200.0)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, name="daipnet300", width=1.0)
    return recipe(args.name, width=args.width)
