"""COCO configs for every model of the paper's Table 2, at 300 and 512.

Usage: `--config configs/coco.py:daipnet300` (or ssd300, lrf300, lrf_affm300, lrf_affm_ipn300,
and the same names with 512). Optional `,width=0.25` for a width-reduced model.
Own COCO-format data: add `--config.data.source=coco_folder --config.data.annotation_file=...
--config.data.image_dir=...` (and the `eval_` pair).
"""

from daipnet_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, name="daipnet300", width=1.0)
    return base_config(args.name, "coco", width=args.width)
