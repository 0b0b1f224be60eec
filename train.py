"""Train a detector: `python train.py --config configs/coco.py:daipnet300 --workdir DIR`.

Any config value can be overridden with `--config.KEY=VALUE` (e.g. `--config.train.batch_size=8`);
unknown keys are refused by ml_collections, inconsistent values by
`daipnet_jax.validate` before anything is compiled. The evaluation run during and after
training is `daipnet_jax.evaluation.evaluate_during_training`, passed to the loop.

The first run writes the resolved config to `WORKDIR/config.json`. Re-running with the same
`--workdir` resumes from its newest readable checkpoint; `--config` may then be left out (the
saved one is used) and a `--config` that differs outside the keys a resume may change (durations,
periods, evaluation, data paths: `config.RESUME_MAY_CHANGE`) is refused. SIGTERM during the
steps saves a checkpoint and exits cleanly. Errors are one line on stderr (exit 2;
`DAIPNET_TRACEBACK=1` shows the traceback).

Several processes (multi-host): pass `--coordinator_address HOST:PORT --num_processes N
--process_id I` on every process, or rely on the environment that `jax.distributed.initialize()`
detects by itself (SLURM, Cloud TPU, Open MPI, `JAX_COORDINATOR_ADDRESS`, ...), and set
`--distributed` to force that call. Each process reads its own shard of the data.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from daipnet_jax.logs import quiet_library_logs
from daipnet_jax.models.conv import add_fast_conv_flags

# Before the JAX backend starts: XLA:CPU convolutions on Eigen (2-4x faster weight gradients,
# see bench/conv_backward.py); no effect on GPU/TPU.
add_fast_conv_flags()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file and argument, e.g. configs/generated.py:daipnet300"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs, evaluation")
_COORD = flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0")
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
_DIST = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with the environment's settings"
)
_LOCAL_DEVICES = flags.DEFINE_string(
    "local_device_ids", None, "multi-process: comma-separated local device ids of this process"
)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    import jax

    if _COORD.value or _NPROC.value or _DIST.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs: dict[str, Any] = {}
        if _COORD.value:
            kwargs["coordinator_address"] = _COORD.value
        if _NPROC.value is not None:
            kwargs["num_processes"] = _NPROC.value
        if _PID.value is not None:
            kwargs["process_id"] = _PID.value
        if _LOCAL_DEVICES.value:
            kwargs["local_device_ids"] = [int(i) for i in _LOCAL_DEVICES.value.split(",")]
        jax.distributed.initialize(**kwargs)

    from daipnet_jax import cli
    from daipnet_jax.evaluation import evaluate_during_training
    from daipnet_jax.training import NonFiniteError, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, str(_WORKDIR.value), eval_fn=evaluate_during_training)
    except NonFiniteError as e:
        cli.fail(f"training stopped: {e}", code=3)


if __name__ == "__main__":
    from daipnet_jax import cli

    cli.run(main, dir_flags=("workdir",))
