"""Export a detector as a TensorFlow SavedModel through `jax2tf`.

    python -m daipnet_jax.export --config configs/coco.py:daipnet300 \\
        --checkpoint WORKDIR_OR_CONVERTED_DIR [--step N] --out DIR [--config.key=value ...]

The SavedModel has three signatures:
- `serving_default(images: uint8 [B, H, W, 3])` (any B, H, W) returns the fixed-size
  detections of `postprocess.detect`: `boxes [B, D, 4]` normalised corners (xmin,
  ymin, xmax, ymax) of the input image, `scores [B, D]`, `classes [B, D]` int32 in 1..K,
  `valid [B, D]` bool, `num_detections [B]` int32; D = `postprocess.max_detections`. Multiply
  boxes by (W, H, W, H) for pixels.
- `serve_single(image: uint8 [H, W, 3])`: the same for one image, unbatched: `boxes [D, 4]`,
  `scores [D]`, `classes [D]`, `valid [D]`, `num_detections []`.
- `label_map()`: `labels [K]` int32 (1..K), `class_names [K]` string, `category_ids [K]` int32
  (the dataset's category id of each label, e.g. COCO's 1..90), so `classes` can be named
  without the training config:

      m = tf.saved_model.load(DIR)
      names = m.signatures["label_map"]()["class_names"].numpy()   # names[c - 1] for class c

  The same table is written as `DIR/assets/label_map.json`
  ({"labels": [...], "class_names": [...], "category_ids": [...]}) for non-TF readers.

Inside: uint8 → float32 → `tf.image.resize` to S×S (bilinear, half-pixel, no antialias; the
same `predict.resize_images` the predict command uses), then the jax2tf-converted network +
post-processing (native serialisation) for a static chunk of `--batch_size` images, looped over
by `tf.map_fn` so B is free (a batch-polymorphic conversion does not run in TF 2.21, see
`export_saved_model`). Parameters are
`tf.Variable`s of the module (not graph constants), so the SavedModel stays loadable for the
full-size model.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

if __name__ == "__main__":
    from daipnet_jax import platform

    platform.setup()  # before JAX starts

LABEL_MAP_FILE = "label_map.json"


@contextlib.contextmanager
def stablehlo_target(requirement: str = "WEEK_12") -> Iterator[str]:
    """Serialise jax2tf modules for an older StableHLO consumer while the context is open:
    TensorFlow's `XlaCallModule` cannot read what JAX serialises by default (docs/design.md,
    "Export"). Private JAX API: restored on exit.
    """
    from jax._src.export import _export

    hlo = _export.hlo
    original = hlo.get_version_from_compatibility_requirement
    target = original(getattr(hlo.StablehloCompatibilityRequirement, requirement))
    hlo.get_version_from_compatibility_requirement = lambda requirement: target
    try:
        yield target
    finally:
        hlo.get_version_from_compatibility_requirement = original


def check_out_dir(out_dir: str) -> None:
    """Refuse (`InputError`) an `--out` that exists but is neither an empty folder nor an
    earlier SavedModel: the export replaces it whole, so it must hold nothing else."""
    from daipnet_jax.cli import InputError

    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise InputError(f"--out {out_dir!r} exists and is not a folder")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "saved_model.pb")):
        raise InputError(
            f"--out {out_dir!r} is a folder that holds files but no SavedModel; not replacing it"
        )


def export_saved_model(
    config: Any, variables: Any, out_dir: str, *, model: Any = None, batch_size: int = 1
) -> str:
    """Writes the SavedModel of `config`'s detector with `variables` to `out_dir`; returns it.

    `batch_size`: images per call of the converted network (inputs of any B are padded to a
    multiple and looped over in TF); larger values serve large batches faster, 1 is best for
    single images. The SavedModel is written beside `out_dir` and moved there when complete: a
    failed export leaves an earlier one at `out_dir` as it was (`check_out_dir`).
    """
    from daipnet_jax.cli import InputError

    check_out_dir(out_dir)
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    import tensorflow as tf
    from jax.experimental import jax2tf

    from daipnet_jax import checkpoints
    from daipnet_jax.evaluation.loop import make_predict_fn
    from daipnet_jax.predict import label_map_for, resize_images

    if model is None:
        from daipnet_jax import models

        model = models.build(config)
    size = int(config.model.image_size)
    k = int(batch_size)
    d = int(config.postprocess.max_detections)
    predict = make_predict_fn(config, model)
    # Static shapes: a batch-polymorphic conversion fails in TF 2.21 (`lax.top_k` lowers to a
    # sort + slice with dynamic shapes that XlaCallModule rejects: "'stablehlo.sort' op has
    # dynamic shapes"), so the JAX function is converted for [k, S, S, 3] and TF loops over
    # chunks of k images.
    tf_predict = jax2tf.convert(predict, with_gradient=False)

    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(
        lambda x: tf.Variable(np.asarray(x), trainable=False), _plain(variables)
    )
    out_signature = (
        tf.TensorSpec([k, d, 4], tf.float32),
        tf.TensorSpec([k, d], tf.float32),
        tf.TensorSpec([k, d], tf.int32),
        tf.TensorSpec([k, d], tf.bool),
    )

    def run(images: tf.Tensor) -> dict[str, tf.Tensor]:
        x = resize_images(images, size)  # [B, S, S, 3] float32
        b = tf.shape(x)[0]
        n = (b + k - 1) // k
        x = tf.pad(x, [[0, n * k - b], [0, 0], [0, 0], [0, 0]])
        chunks = tf.reshape(x, [n, k, size, size, 3])
        outs = tf.map_fn(
            lambda chunk: tuple(tf_predict(module.variables_tree, chunk)),
            chunks,
            fn_output_signature=out_signature,
        )
        boxes, scores, classes, valid = (
            tf.reshape(o, tf.concat([[n * k], tf.shape(o)[2:]], 0))[:b] for o in outs
        )
        return {
            "boxes": boxes,
            "scores": scores,
            "classes": classes,
            "valid": valid,
            "num_detections": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
        }

    # autograph=False: no Python control flow to convert, and AutoGraph cannot parse JAX's
    # internals that `tf_predict` calls (it warns for each).
    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        autograph=False,
    )
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return run(images)

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")], autograph=False
    )
    def serve_single(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {k: v[0] for k, v in run(image[None]).items()}

    category_ids, class_names = label_map_for(config)
    table = {
        "labels": list(range(1, len(class_names) + 1)),
        "class_names": list(class_names),
        "category_ids": [int(c) for c in category_ids],
    }

    @tf.function(input_signature=[], autograph=False)
    def label_map() -> dict[str, tf.Tensor]:
        return {
            "labels": tf.constant(table["labels"], tf.int32),
            "class_names": tf.constant(table["class_names"], tf.string),
            "category_ids": tf.constant(table["category_ids"], tf.int32),
        }

    module.serve = serve
    module.serve_single = serve_single
    module.label_map = label_map
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(dir=parent, prefix=".export-") as staging,
    ):
        table_file = os.path.join(tmp, LABEL_MAP_FILE)
        with open(table_file, "w") as f:
            json.dump(table, f, indent=1)
        module.label_map_file = tf.saved_model.Asset(table_file)  # copied into DIR/assets/
        written = os.path.join(staging, "saved_model")
        with stablehlo_target():
            tf.saved_model.save(
                module,
                written,
                signatures={
                    "serving_default": serve,
                    "serve_single": serve_single,
                    "label_map": label_map,
                },
                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
            )
        checkpoints.publish_folder(written, out_dir)
    return out_dir


def _plain(tree: Any) -> Any:
    """Nested plain dicts of numpy arrays (flax FrozenDicts / orbax outputs → dict)."""
    if hasattr(tree, "items"):
        return {str(k): _plain(v) for k, v in tree.items()}
    return np.asarray(tree)


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    from daipnet_jax.checkpoints import restore_variables
    from daipnet_jax.cli import InputError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from daipnet_jax import checkpoints

    FLAGS = flags.FLAGS
    config = FLAGS.config
    if not FLAGS.checkpoint:
        raise InputError("--checkpoint is required (a training workdir or a converted checkpoint)")
    if FLAGS.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    # The model must be the trained one (`--config.model.*` overrides included).
    checkpoints.check_saved_config(FLAGS.checkpoint, config, "eval")
    check_out_dir(FLAGS.out)
    from daipnet_jax.validate import check_writable

    # the SavedModel is staged beside --out: its folder must take files (before converting)
    check_writable(os.path.dirname(os.path.abspath(FLAGS.out)), "--out")
    variables = restore_variables(config, FLAGS.checkpoint, FLAGS.step)
    path = export_saved_model(config, variables, FLAGS.out, batch_size=FLAGS.batch_size)
    print(f"SavedModel written to {path} (signatures: serving_default, serve_single, label_map)")


def run(argv: Sequence[str] | None = None) -> None:
    """The CLI: `--config` defaults to the config saved with `--checkpoint`'s training run."""
    from absl import flags
    from ml_collections import config_flags

    from daipnet_jax import cli

    config_flags.DEFINE_config_file("config", None, "config file (file.py:arg)", lock_config=False)
    flags.DEFINE_string("checkpoint", None, "training workdir or converted checkpoint directory")
    flags.DEFINE_integer("step", None, "checkpoint step (workdir only; default latest)")
    flags.DEFINE_string(
        "out", "saved_model", "output SavedModel folder (an earlier export there is replaced)"
    )
    flags.DEFINE_integer("batch_size", 1, "images per call of the converted network")
    cli.run(main, dir_flags=("checkpoint",), argv=argv)


if __name__ == "__main__":
    run()
