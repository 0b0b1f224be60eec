"""bfloat16 compute (`model.dtype`) trains end to end through the real jitted train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from training_support import synthetic_global_batch, tiny_train_config

from daipnet_jax import boxes, models, sharding
from daipnet_jax.training import schedule as sched_lib
from daipnet_jax.training import state as state_lib
from daipnet_jax.training import step as step_lib


def test_bfloat16_daipnet_trains_with_finite_falling_loss():
    """DAIPNet300 at width 1/16 in bfloat16: ten steps on one fixed batch (SGD, lr 0.02, no
    warm-up) give finite losses and gradients, the loss falls, and params stay float32."""
    c = tiny_train_config(batch_size=4, total_steps=10)
    c.model.family, c.model.aux, c.model.fusion, c.model.topdown = "lrf", "ipn", "affm", "pafm"
    c.model.dtype = "bfloat16"
    model = models.build(c)
    sched = sched_lib.learning_rate_schedule(c, 16)
    tx = sched_lib.make_optimizer(c, sched)
    mesh = sharding.make_mesh(jax.devices()[:1])
    variables = state_lib.init_variables(model, c, jax.random.PRNGKey(0))
    state = jax.device_put(
        state_lib.create_train_state(variables, tx, jax.random.PRNGKey(1)),
        sharding.replicated(mesh),
    )
    batch = sharding.global_batch(synthetic_global_batch(c, 0), mesh)
    step = step_lib.make_train_step(c, model, tx, sched, boxes.prior_boxes(c), mesh)

    # the forward really computes in bfloat16
    hlo = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, batch["image"]).as_text()
    assert "bf16" in hlo

    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"]))
    assert np.all(np.isfinite(losses)), losses
    assert int(state.bad_step) == -1  # the NaN guard never fired
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
