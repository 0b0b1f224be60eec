"""The data-parallel train step: one `jax.jit` over the 1-D device mesh of `sharding.py`.

The batch is split over `data`, the train state is replicated; XLA inserts the gradient
all-reduce. The state argument is donated, so its buffers are updated in place.

Inside the step (no host round trip): SSD matching of the padded ground truth against the priors
(`boxes.match`), the forward pass in train mode (BatchNorm batch statistics, updated
running averages), the MultiBox loss normalised by the positives of the whole global batch
(`losses.multibox_loss`), the gradient, the PyTorch-style SGD update (`schedule.py`).

choice: BatchNorm statistics are those of the global batch (jit over a sharded batch computes
the mean over the whole array: "sync BN"), so 1, 2 or N devices give the same step
(docs/design.md, batch statistics).

NaN/inf guard: the step computes a bit mask of non-finite terms (1 loc loss, 2 conf
loss, 4 gradient global norm). A non-finite step is not applied: the whole state is kept as it
was (`jnp.where` on every leaf) and the first bad step and its mask are recorded in the state
(`bad_step`, `bad_term`); every later step is a no-op too. choice: the host does not fetch the
flag every step (that would serialise dispatch with the device); the loop reads it with the
metrics at log steps and before every checkpoint, so a bad state is never saved and the run
stops naming the first bad step and term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from daipnet_jax import boxes as boxes_lib
from daipnet_jax import losses as losses_lib
from daipnet_jax.sharding import batch_sharding, replicated
from daipnet_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]

TRAIN_KEYS = ("image", "boxes", "labels", "mask")


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    priors: jax.Array,
    variances: tuple[float, float],
    match_iou: float,
    neg_pos_ratio: int,
    nan_guard: bool = True,
) -> tuple[TrainState, Metrics]:
    """One SGD step on the global batch.

    batch: `image [B,S,S,3] f32 0..255`, `boxes [B,G,4] f32 corners`, `labels [B,G] i32 1..K`,
    `mask [B,G] bool`. Returns the new state and replicated scalar metrics: `loss`, `loc`,
    `conf`, `pos_per_image`, `lr` (of this update), `grad_norm`, `bad_step`, `bad_term`.
    """
    loc_t, cls_t = boxes_lib.match(
        batch["boxes"],
        batch["labels"],
        batch["mask"],
        priors,
        iou_threshold=match_iou,
        variances=variances,
    )

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        (loc, logits), mutated = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        total, parts = losses_lib.multibox_loss(
            loc, logits, loc_t, cls_t, neg_pos_ratio=neg_pos_ratio
        )
        return total, (parts, mutated["batch_stats"])

    (total, (parts, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    batch_size = batch["image"].shape[0]
    metrics = {
        "loss": total,
        "loc": parts["loc"],
        "conf": parts["conf"],
        "pos_per_image": jnp.asarray(parts["num_pos"], jnp.float32) / batch_size,
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "grad_norm": grad_norm,
    }
    new_state = state.replace(  # type: ignore[attr-defined]
        step=state.step + 1, params=new_params, batch_stats=new_bs, opt_state=new_opt
    )
    if nan_guard:
        bad = (
            jnp.where(jnp.isfinite(parts["loc"]), 0, 1)
            | jnp.where(jnp.isfinite(parts["conf"]), 0, 2)
            | jnp.where(jnp.isfinite(grad_norm), 0, 4)
        ).astype(jnp.int32)
        first_bad = (state.bad_step < 0) & (bad != 0)
        apply = (state.bad_step < 0) & (bad == 0)
        new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new_state, state)
        new_state = new_state.replace(  # type: ignore[attr-defined]
            bad_step=jnp.where(first_bad, state.step, state.bad_step),
            bad_term=jnp.where(first_bad, bad, state.bad_term),
        )
    metrics["bad_step"] = new_state.bad_step
    metrics["bad_term"] = new_state.bad_term
    return new_state, metrics


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    priors: np.ndarray,
    mesh: Mesh,
) -> StepFn:
    """The jitted, state-donating step with the mesh's shardings (one compilation per shape)."""
    priors_j = jnp.asarray(priors, jnp.float32)
    t = config.train

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return train_step(
            state,
            {k: batch[k] for k in TRAIN_KEYS},
            model=model,
            tx=tx,
            schedule=schedule,
            priors=priors_j,
            variances=tuple(config.priors.variances),
            match_iou=float(t.match_iou),
            neg_pos_ratio=int(t.neg_pos_ratio),
            nan_guard=bool(t.nan_guard),
        )

    rep = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, batch_sharding(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
