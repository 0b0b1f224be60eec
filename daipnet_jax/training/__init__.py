"""Training: config validation, the paper's optimiser and schedule, the data-parallel step,
orbax checkpoints and the train loop (issue 9; SPEC §6).

- `validate.validate_config(config)` / `ConfigError`
- `schedule.learning_rate_schedule`, `schedule.make_optimizer`, `schedule.steps_per_epoch`
- `state.TrainState`, `state.create_train_state`
- `step.make_train_step`, `step.make_mesh`, `step.global_batch`
- `checkpoint.Checkpointer`, `checkpoint.load_variables(workdir, step=None)` (for evaluate.py)
- `loop.train_and_evaluate(config, workdir)`
"""

from daipnet_jax.training.checkpoint import Checkpointer, load_variables
from daipnet_jax.training.loop import NonFiniteError, train_and_evaluate
from daipnet_jax.training.schedule import learning_rate_schedule, make_optimizer, steps_per_epoch
from daipnet_jax.training.validate import ConfigError, validate_config

__all__ = [
    "Checkpointer",
    "ConfigError",
    "NonFiniteError",
    "learning_rate_schedule",
    "load_variables",
    "make_optimizer",
    "steps_per_epoch",
    "train_and_evaluate",
    "validate_config",
]
