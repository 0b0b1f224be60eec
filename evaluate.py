"""Evaluate a checkpoint: COCO (pycocotools, 12 numbers + per-class AP) or VOC (VOC07 mAP).

    python evaluate.py --workdir DIR [--step N] [--max_images N] [--config.key=value ...]
    python evaluate.py --config configs/coco.py:lrf300 --checkpoint CONVERTED_DIR [--workdir OUT]

`--workdir`: a training workdir; its newest checkpoint that restores (or `--step`) of
`DIR/checkpoints` is evaluated and the outputs go to `DIR/eval/`. `--checkpoint`: a converted
checkpoint directory (`python -m daipnet_jax.convert`), another training workdir or its
`checkpoints_best`, or one step's folder (`WORKDIR/checkpoints/N`, read as `--workdir WORKDIR
--step N`); outputs go to `--workdir` if given, else `CHECKPOINT/eval/` (`WORKDIR/eval/` for a
step's folder). `--config`
defaults to the config the training saved (`WORKDIR/config.json`); a given `--config` whose
model differs from it is refused. `--max_images N`: a quick evaluation of the first N images,
written to `eval/metrics_partial.json` only (full-run metrics are never overwritten by it).

Several processes: `--coordinator_address HOST:PORT --num_processes N --process_id I` on every
process, as for `train.py` (see `daipnet_jax.distributed`); each reads its own shard of the
evaluation set and the first process writes the outputs.

Outputs: `eval/metrics.json` (+ `metrics_<step>.json`), the COCO results file
(`detections_<split>_<name>_results.json`; for test-dev, the server format and nothing else),
`eval/per_class_ap.png` (a bar per class) and `eval/pr_curves.png` (precision-recall per class
at IoU 0.5), TensorBoard scalars `eval/*` and `eval/per_class/<class name>`. Everything is
checked before the model is compiled; errors are one line on stderr (exit 2).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from daipnet_jax import distributed, platform

platform.setup(compilation_cache=True)  # before JAX starts: flags, quiet logs, compile cache

config_flags.DEFINE_config_file("config", None, "config file (file.py:arg)", lock_config=False)
flags.DEFINE_string("workdir", None, "training workdir (checkpoints + outputs)")
flags.DEFINE_string("checkpoint", None, "a converted checkpoint directory (instead of a workdir)")
flags.DEFINE_integer("step", None, "checkpoint step of the workdir (default: newest readable)")
flags.DEFINE_integer("max_images", 0, "evaluate only the first N images (partial metrics)")
_DISTRIBUTED = distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _DISTRIBUTED.initialize()
    import jax

    from daipnet_jax import checkpoints, cli
    from daipnet_jax.evaluation import coco, loop
    from daipnet_jax.validate import check_writable, validate_config, validate_inputs

    if not FLAGS.workdir and not FLAGS.checkpoint:
        cli.fail("give --workdir DIR (training checkpoints) or --checkpoint PATH")
    config = FLAGS.config
    source = FLAGS.checkpoint or FLAGS.workdir
    out_dir = FLAGS.workdir or FLAGS.checkpoint
    found = checkpoints.step_dir(out_dir)
    if found is not None:  # WORKDIR/checkpoints/N: outputs go to WORKDIR/eval, not into N
        out_dir = str(found[0])
    for d in (FLAGS.checkpoint, FLAGS.workdir):  # the model must be the trained one
        if d and checkpoints.check_saved_config(d, config, "eval") is not None:
            break
    if FLAGS.max_images < 0:
        cli.fail(f"--max_images: {FLAGS.max_images} must be >= 0 (0: every image)")
    if FLAGS.max_images:
        config.data.eval_max_images = FLAGS.max_images
    validate_config(config, process_count=jax.process_count())
    checkpoints.check_checkpoint_path(source, FLAGS.step)  # cheap, before reading the data
    validate_inputs(config, train=False, evaluate=True)
    variables, step = checkpoints.restore_variables_and_step(config, source, FLAGS.step)
    # Before the evaluation, not after it: a folder that cannot take the metrics fails now.
    check_writable(os.path.join(out_dir, "eval"), "--workdir" if FLAGS.workdir else "--checkpoint")
    logging.info("evaluating %s (step %s)", source, step)
    metrics = loop.run_evaluation(config, variables, workdir=out_dir, step=step)
    per_class = metrics.pop("per_class", {})
    print(coco.format_table(per_class))
    print(json.dumps(metrics, indent=1, default=float))
    print(f"outputs in {out_dir}/eval")


if __name__ == "__main__":
    from daipnet_jax import cli

    cli.run(main, dir_flags=("checkpoint", "workdir"))
