"""The built-in generated dataset (no download): the quick start and the tests.

Usage: `--config configs/generated.py:daipnet300` (any Table 2 variant; default width 0.25), or
`--config configs/generated.py:demo` for the tuned quick-start recipe that `make demo` runs
(width 0.125, Adam, no augmentation, 800 steps; see docs/design.md).
"""

from __future__ import annotations

import ml_collections

from daipnet_jax import config as config_lib
from daipnet_jax.config import parse_arg
from daipnet_jax.configs import coco, common


def recipe(variant: str, *, width: float = 0.25) -> ml_collections.ConfigDict:
    c = common.recipe(variant, width=width)
    c.name = f"{variant}_generated"
    common.set_priors(c, coco.PRIOR_SIZES)  # object sizes span the COCO range
    c.data.source = "generated"
    c.model.num_classes = c.data.generated_num_classes + 1
    c.data.max_boxes = 16
    # The COCO schedule; the runs here set their own durations (`demo`, tests).
    c.train.update(batch_size=32, base_lr=4e-3, warmup_epochs=6.0, total_epochs=160.0)
    c.train.decay_epochs = (90.0, 120.0, 140.0)
    return c


def demo(width: float = 0.125) -> ml_collections.ConfigDict:
    """The quick start: DAIPNet300 from scratch, 800 steps (docs/design.md, "Quick-start")."""
    c = recipe("daipnet300", width=width)
    c.name = "demo"
    # From scratch (no ImageNet VGG): unit-variance inputs rather than the caffe convention.
    c.model.pixel_mean = config_lib.TORCHVISION_MEAN_RGB
    c.model.pixel_std = config_lib.TORCHVISION_STD
    c.data.augment = False  # a ~3-epoch run is far from over-fitting
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.scale_lr_with_batch = False
    c.train.optimizer = "adam"  # SGD plateaued from scratch (docs/design.md)
    c.train.base_lr = 2e-3
    c.train.warmup_epochs = 0.25
    c.train.decay_epochs = (2.8,)
    c.train.total_epochs = 3.2  # 800 steps of 250 per epoch: a fixed amount, not a time cap
    c.train.log_every_steps = 25
    c.train.checkpoint_every_steps = 300
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, name="daipnet300", width=0.0)
    if args.name == "demo":
        return demo(args.width if args.width > 0 else 0.125)
    return recipe(args.name, width=args.width if args.width > 0 else 0.25)
