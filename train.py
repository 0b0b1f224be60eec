"""Train a detector: `python train.py --config configs/coco.py:daipnet300 --workdir DIR`.

Any config value can be overridden with `--config.KEY=VALUE` (e.g. `--config.train.batch_size=8`);
unknown keys are refused by ml_collections, inconsistent values by
`daipnet_jax.validate` before anything is compiled. The evaluation run during and after
training is `daipnet_jax.evaluation.training_eval_fn(workdir)`, passed to the loop (it writes
`WORKDIR/eval/metrics*.json` like `evaluate.py`).

The first run writes the resolved config to `WORKDIR/config.json`. Re-running with the same
`--workdir` resumes from its newest readable checkpoint; `--config` may then be left out (the
saved one is used) and a `--config` that differs outside the keys a resume may change (durations,
periods, evaluation, data paths: `config.RESUME_MAY_CHANGE`) is refused. SIGTERM during the
steps saves a checkpoint and exits cleanly. Errors are one line on stderr (exit 2;
`DAIPNET_TRACEBACK=1` shows the traceback).

Several processes (multi-host): pass `--coordinator_address HOST:PORT --num_processes N
--process_id I` on every process (see `daipnet_jax.distributed`). Each process reads its own
shard of the data.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from daipnet_jax import distributed, platform

platform.setup(compilation_cache=True)  # before JAX starts: flags, quiet logs, compile cache

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file and argument, e.g. configs/generated.py:daipnet300"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs, evaluation")
_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _DISTRIBUTED.initialize()

    from daipnet_jax import cli
    from daipnet_jax.evaluation import training_eval_fn
    from daipnet_jax.training import NonFiniteError, train_and_evaluate

    try:
        workdir = str(_WORKDIR.value)
        train_and_evaluate(_CONFIG.value, workdir, eval_fn=training_eval_fn(workdir))
    except NonFiniteError as e:
        cli.fail(str(e), code=3)  # the message says the run stopped and where it left off


if __name__ == "__main__":
    from daipnet_jax import cli

    cli.run(main, dir_flags=("workdir",))
