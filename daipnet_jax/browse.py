"""Dataset browser: ground-truth boxes, or augmented training batches, drawn to PNG files.

    python -m daipnet_jax.browse --config configs/generated.py:daipnet300 --out DIR \\
        [--split train|eval] [--num 16] [--augmented] [--config.key=value ...]

- default: the first `--num` images of the split as stored (original size, file order),
  their boxes and class names drawn: `DIR/<split>_<n>_<image id>.png`;
- `--augmented`: the first `--num` examples exactly as `data.make_train_iterator` yields them
  to training (S×S after augmentation, boxes from the batch's `boxes` / `labels` / `mask`):
  `DIR/augmented_<n>.png`.

Crowd (and VOC difficult) boxes are drawn like the others in the default view; training drops
them, so they are absent from the augmented view. Drawing: `predict.draw_boxes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from daipnet_jax.cli import InputError


class BrowseError(InputError):
    """Data that cannot be browsed (no examples, unreadable annotation file)."""


def _check_not_empty(config: Any, split: str) -> None:
    from daipnet_jax import data
    from daipnet_jax.data import sources

    n = data.num_examples(config, split)
    if n == 0:
        raise BrowseError(f"the {split} split of data source {config.data.source!r} has no images")
    train_folder = split == "train" and config.data.source != "tfds"
    if (
        train_folder
        and int(np.sum(sources.get(config).folder_records(config, "train").counts)) == 0
    ):
        raise BrowseError("no training image has a box: training would skip every image")


def ground_truth_examples(config: Any, split: str, num: int) -> list[dict[str, Any]]:
    """The first `num` stored examples of `split`: {image uint8 [H, W, 3], boxes [N, 4]
    normalised corners, labels [N] 1..K, image_id}."""
    from daipnet_jax.data import pipeline

    ds, _ = pipeline.records(config, split, 0, 1, shuffle_seed=None)
    out = []
    for r in ds.take(num):
        out.append(
            dict(
                image=pipeline.decode(r).numpy(),
                boxes=r["boxes"].numpy().reshape(-1, 4),
                labels=r["labels"].numpy().reshape(-1),
                image_id=int(r["image_id"].numpy()),
            )
        )
    return out


def augmented_examples(config: Any, num: int) -> list[dict[str, Any]]:
    """The first `num` examples of the training iterator: {image uint8 [S, S, 3], boxes [M, 4]
    normalised corners, labels [M]} with the padding (mask False) removed."""
    from daipnet_jax import data

    it = data.make_train_iterator(config, process_index=0, process_count=1)
    out: list[dict[str, Any]] = []
    while len(out) < num:
        batch = next(it)
        for j in range(batch["image"].shape[0]):
            if len(out) == num:
                break
            m = batch["mask"][j].astype(bool)
            image = np.clip(np.round(batch["image"][j]), 0, 255).astype(np.uint8)
            out.append(dict(image=image, boxes=batch["boxes"][j][m], labels=batch["labels"][j][m]))
    return out


def browse(
    config: Any, out_dir: str, *, split: str = "train", num: int = 16, augmented: bool = False
) -> list[str]:
    """Writes the PNGs; returns their paths."""
    from daipnet_jax.predict import class_names_for, draw_boxes

    if split not in ("train", "eval"):
        raise BrowseError(f"--split must be train or eval, got {split!r}")
    if augmented and split != "train":
        raise BrowseError("--augmented shows training batches: use it with --split train")
    if num < 1:
        raise BrowseError(f"--num must be at least 1, got {num}")
    _check_not_empty(config, split)
    names = class_names_for(config)
    examples = (
        augmented_examples(config, num) if augmented else ground_truth_examples(config, split, num)
    )
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for n, ex in enumerate(examples):
        h, w = ex["image"].shape[:2]
        px = np.asarray(ex["boxes"], np.float64) * np.array([w, h, w, h])
        name = f"augmented_{n:03d}" if augmented else f"{split}_{n:03d}_{ex['image_id']}"
        path = os.path.join(out_dir, f"{name}.png")
        draw_boxes(ex["image"], px, ex["labels"], names).save(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    paths = browse(
        FLAGS.config, FLAGS.out, split=FLAGS.split, num=FLAGS.num, augmented=FLAGS.augmented
    )
    what = "augmented training examples" if FLAGS.augmented else f"{FLAGS.split} images"
    print(f"{len(paths)} {what} drawn → {FLAGS.out}")


def run(argv: Sequence[str] | None = None) -> None:
    from daipnet_jax import platform

    platform.setup()  # before a JAX backend starts and TensorFlow loads
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (file.py:arg)", lock_config=False)
    flags.DEFINE_string("out", "browse", "output folder for the PNGs")
    flags.DEFINE_enum("split", "train", ["train", "eval"], "which split to draw")
    flags.DEFINE_integer("num", 16, "how many images")
    flags.DEFINE_boolean("augmented", False, "draw augmented training batches instead")
    flags.mark_flags_as_required(["config"])

    def _main(args: Sequence[str]) -> None:
        import tensorflow as tf

        from daipnet_jax.config import first_line

        try:
            main(args)
        except tf.errors.OpError as e:  # BrowseError and file errors: cli.run, one line too
            cli.fail(first_line(e))

    from daipnet_jax import cli

    cli.run(_main, argv=argv)  # flag and --config errors: one line, exit 2


if __name__ == "__main__":
    run()
