"""PASCAL VOC 07+12 configs (tfds `voc/2007` + `voc/2012` trainval, tested on VOC2007 test).

Usage: `--config configs/voc.py:daipnet300` (ssd, lrf, lrf_affm, lrf_affm_ipn, daipnet x 300, 512).
"""

from daipnet_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, name="daipnet300", width=1.0)
    return base_config(args.name, "voc", width=args.width)
