"""The recipes: `common.py` (shared sections and defaults) and one file per dataset.

`recipe(variant, dataset, width=...)` returns the config of `configs/<dataset>.py` for a Table 2
variant; `coco_folder` is the COCO recipe reading a COCO-format folder (`data.annotation_file`,
`data.image_dir` and the `eval_` pair).
"""

from __future__ import annotations

import ml_collections

from daipnet_jax.configs import coco, generated, voc

DATASETS = {"coco": coco.recipe, "voc": voc.recipe, "generated": generated.recipe}


def recipe(variant: str, dataset: str, *, width: float = 1.0) -> ml_collections.ConfigDict:
    if dataset == "coco_folder":
        c = coco.recipe(variant, width=width)
        c.name = f"{variant}_coco_folder"
        c.data.source, c.data.tfds_name = "coco_folder", ""
        return c
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[dataset](variant, width=width)
