"""Optimiser and learning-rate schedule of the paper's recipe (paper Section 4.2).

- SGD with momentum 0.9 and L2 weight decay 5e-4 applied as PyTorch's `torch.optim.SGD` does:
  `g ← g + wd·θ` before the momentum trace `b ← μ·b + g`, then `θ ← θ − lr·b`. In optax that is
  `chain(add_decayed_weights(wd), sgd(lr, momentum))` (optax's trace starts at zero, so its first
  step is `b = g`, exactly PyTorch's first-step `b = g`).
  choice: every parameter is decayed, BatchNorm scales/offsets and biases included, because the
  LRF/RFBNet/ssd.pytorch training scripts pass `net.parameters()` to SGD without groups.
- Learning rate: `base_lr` (4e-3) at `reference_batch_size` (32), scaled linearly with the
  global batch when `train.scale_lr_with_batch`; per-step linear warm-up from `warmup_init_lr`
  (1e-6) to that peak over `warmup_epochs` (6); ×`decay_factor` (0.1) at each of `decay_epochs`
  (COCO 90/120/140, VOC 150/200); end at `total_epochs` (COCO 160, VOC 250).
- Epochs become steps with `config.steps_per_epoch` (the one place for epoch arithmetic).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import optax

from daipnet_jax.config import schedule_points


def peak_lr(config: ml_collections.ConfigDict) -> float:
    """`base_lr · batch / reference_batch` (or `base_lr` when scaling is off)."""
    t = config.train
    if t.scale_lr_with_batch:
        return float(t.base_lr) * float(t.batch_size) / float(t.reference_batch_size)
    return float(t.base_lr)


def learning_rate_schedule(config: ml_collections.ConfigDict, spe: int) -> optax.Schedule:
    """lr(step) for step = number of updates done so far (0 for the first update).

    lr(s) = init + (peak − init)·s/W           for s < W (W = warm-up steps)
          = peak · factor^#{b ∈ boundaries : s ≥ b}   otherwise.
    """
    peak = peak_lr(config)
    init = float(config.train.warmup_init_lr)
    factor = float(config.train.decay_factor)
    warmup, boundaries = schedule_points(config, spe)
    bounds = jnp.asarray(boundaries if boundaries else [math.inf], jnp.float32)
    counted = bool(boundaries)

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        s = jnp.asarray(step, jnp.float32)
        n = jnp.sum(s >= bounds) if counted else jnp.zeros((), jnp.int32)
        decayed = peak * jnp.power(jnp.float32(factor), n.astype(jnp.float32))
        if warmup <= 0:
            return decayed
        warm = init + (peak - init) * s / warmup
        return jnp.where(s < warmup, warm, decayed)

    return schedule


def make_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """PyTorch-style SGD: `chain(add_decayed_weights(wd), sgd(schedule, momentum))`.

    choice: `train.optimizer = "adam"` (not the paper's recipe; the from-scratch quick start of
    `configs/generated.py:demo` uses it) swaps the SGD step for `optax.adam(schedule)` after the
    same L2 term, i.e. `torch.optim.Adam(weight_decay=wd)`; `train.momentum` is then unused.
    """
    t = config.train
    parts = []
    if t.weight_decay > 0:
        parts.append(optax.add_decayed_weights(float(t.weight_decay)))
    name = t.get("optimizer", "sgd")
    if name == "adam":
        parts.append(optax.adam(schedule))
    elif name == "sgd":
        parts.append(optax.sgd(schedule, momentum=float(t.momentum) or None))
    else:
        raise ValueError(f"train.optimizer={name!r}: expected 'sgd' or 'adam'")
    return optax.chain(*parts)
