"""The built-in generated dataset (no download): the quick start and the tests.

Usage: `--config configs/generated.py:daipnet300` (any Table 2 variant; default width 0.25).
"""

from daipnet_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, name="daipnet300", width=0.25)
    c = base_config(args.name, "generated", width=args.width)
    c.model.num_classes = c.data.generated_num_classes + 1
    c.data.max_boxes = 16
    return c
