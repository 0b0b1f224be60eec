"""Training: the paper's optimiser and schedule, the data-parallel step and the train loop.

- `schedule.learning_rate_schedule`, `schedule.make_optimizer`
- `state.TrainState`, `state.create_train_state`, `state.init_variables`
- `step.make_train_step`, `step.train_step`
- `loop.train_and_evaluate(config, workdir, eval_fn=...)`

Config validation is `daipnet_jax.validate`, checkpoints `daipnet_jax.checkpoints`, the mesh
and batch transfers `daipnet_jax.sharding`.
"""

from daipnet_jax.training.loop import NonFiniteError, train_and_evaluate
from daipnet_jax.training.schedule import learning_rate_schedule, make_optimizer

__all__ = ["NonFiniteError", "learning_rate_schedule", "make_optimizer", "train_and_evaluate"]
