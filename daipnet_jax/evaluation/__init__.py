"""Evaluation: COCO and VOC evaluators, the jitted loop (`evaluate`, `run_evaluation`) and
`training_eval_fn`, the `eval_fn` train.py hands to the train loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from daipnet_jax import config as config_lib
from daipnet_jax.evaluation.coco import (
    COCO_METRIC_NAMES,
    CocoEvaluator,
    format_table,
    label_to_category_table,
)
from daipnet_jax.evaluation.loop import (
    evaluate,
    make_eval_step,
    make_evaluator_for,
    make_predict_fn,
    run_evaluation,
    training_eval_fn,
    write_metrics,
)
from daipnet_jax.evaluation.voc import VocEvaluator, voc_ap


def metric_kind(config: ml_collections.ConfigDict) -> str:
    """`voc` (the VOC metric, `evaluation.voc`) for VOC data, `coco` (pycocotools) for any other."""
    return "voc" if config_lib.dataset_kind(config) == "voc" else "coco"


def make_evaluator(
    config: ml_collections.ConfigDict,
    ground_truth: Mapping[str, Any] | None,
    label_to_category: Sequence[int] | np.ndarray | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> CocoEvaluator | VocEvaluator:
    """The evaluator for `config` (no annotations: COCO test-dev mode)."""
    if metric_kind(config) == "voc":
        if ground_truth is None:
            raise ValueError("VOC evaluation needs ground truth")
        return VocEvaluator.from_coco(ground_truth, label_to_category)
    return CocoEvaluator(
        ground_truth,
        label_to_category,
        class_names=class_names,
        name=str(config.get("name", "daipnet")),
    )


__all__ = [
    "COCO_METRIC_NAMES",
    "CocoEvaluator",
    "VocEvaluator",
    "evaluate",
    "format_table",
    "label_to_category_table",
    "make_eval_step",
    "make_evaluator",
    "make_evaluator_for",
    "make_predict_fn",
    "metric_kind",
    "run_evaluation",
    "training_eval_fn",
    "voc_ap",
    "write_metrics",
]
