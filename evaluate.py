"""Evaluate a checkpoint: COCO (pycocotools, 12 numbers + per-class AP) or VOC (VOC07 mAP).

    python evaluate.py --config configs/coco.py:daipnet300 --workdir DIR [--step N]
    python evaluate.py --config configs/coco.py:lrf300 --checkpoint CONVERTED_DIR [--workdir OUT]
        [--config.key=value ...]

`--workdir`: a training workdir; the latest (or `--step`) checkpoint of `DIR/checkpoints` is
evaluated and the outputs go to `DIR/eval/`. `--checkpoint`: a converted checkpoint directory
(`python -m daipnet_jax.convert`) or another training workdir; outputs go to `--workdir` if
given, else `CHECKPOINT/eval/`.

Several processes: `--coordinator_address HOST:PORT --num_processes N --process_id I` on every
process, as for `train.py` (see `daipnet_jax.distributed`); each reads its own shard of the
evaluation set and the first process writes the outputs.

Outputs: `eval/metrics.json` (+ `metrics_<step>.json`), the COCO results file
(`detections_<split>_<name>_results.json`; for test-dev, the server format and nothing else),
`eval/per_class_ap.png` (a bar per class) and `eval/pr_curves.png` (precision-recall per class
at IoU 0.5), TensorBoard scalars `eval/*` and `eval/per_class/<class name>`.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from daipnet_jax import distributed, platform

platform.setup(compilation_cache=True)  # before JAX starts: flags, quiet logs, compile cache

config_flags.DEFINE_config_file("config", None, "config file (file.py:arg)", lock_config=False)
flags.DEFINE_string("workdir", None, "training workdir (checkpoints + outputs)")
flags.DEFINE_string("checkpoint", None, "a converted checkpoint directory (instead of a workdir)")
flags.DEFINE_integer("step", None, "checkpoint step of the workdir (default: latest)")
_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _DISTRIBUTED.initialize()
    if not FLAGS.workdir and not FLAGS.checkpoint:
        raise app.UsageError("give --workdir DIR (training checkpoints) or --checkpoint PATH")
    from daipnet_jax import checkpoints
    from daipnet_jax.config import ConfigError
    from daipnet_jax.evaluation import coco, loop
    from daipnet_jax.validate import validate_config

    config = FLAGS.config
    source = FLAGS.checkpoint or FLAGS.workdir
    out_dir = FLAGS.workdir or FLAGS.checkpoint
    try:
        validate_config(config)
        variables = checkpoints.restore_variables(config, source, FLAGS.step)
    except (ConfigError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    step = FLAGS.step
    if step is None and FLAGS.checkpoint is None:
        step = checkpoints.latest_step(FLAGS.workdir)
    logging.info("evaluating %s (step %s)", source, step)
    metrics = loop.run_evaluation(config, variables, workdir=out_dir, step=step)
    per_class = metrics.pop("per_class", {})
    print(coco.format_table(per_class))
    print(json.dumps(metrics, indent=1, default=float))
    print(f"outputs in {out_dir}/eval")


if __name__ == "__main__":
    app.run(main)
