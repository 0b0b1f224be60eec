"""Input pipelines: sources (generated, COCO-format folder, tfds; `sources.SOURCES`), SSD
augmentation in tf.data, per-process batching. See `pipeline` for the batch contract."""

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
