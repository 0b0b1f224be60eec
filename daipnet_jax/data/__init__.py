"""Input pipelines: sources (generated, COCO-format folder, tfds; `sources.SOURCES`), SSD
augmentation in tf.data, per-process batching. See `pipeline` for the batch contract.

The names below load on first use, so that `python -m daipnet_jax.data.generated` (NumPy and
PIL only) does not start TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daipnet_jax.data.coco_folder import DataStats
    from daipnet_jax.data.pipeline import (
        EvalIterator,
        TrainIterator,
        eval_dataset,
        eval_ground_truth,
        label_map,
        make_eval_iterator,
        make_train_iterator,
        num_examples,
        num_train_examples,
        train_dataset,
    )

_HOMES = {"DataStats": "coco_folder"}

__all__ = [
    "DataStats",
    "EvalIterator",
    "TrainIterator",
    "eval_dataset",
    "eval_ground_truth",
    "label_map",
    "make_eval_iterator",
    "make_train_iterator",
    "num_examples",
    "num_train_examples",
    "train_dataset",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_HOMES.get(name, 'pipeline')}")
    return getattr(module, name)
