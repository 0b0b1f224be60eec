"""SSD MultiBox loss: smooth-L1 + hard-negative-mined softmax CE (SSD, Liu et al. 2016, §2.2).

Static shapes: hard negatives by a sort-based rank, no boolean indexing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_l1(x: jax.Array) -> jax.Array:
    """Smooth L1 with β = 1: 0.5·x² where |x| < 1, else |x| − 0.5 (elementwise)."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _wide(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def background_loss(logits: jax.Array) -> jax.Array:
    """−log softmax(logits)[..., 0]: logits [B, P, C] → [B, P] (the mining key)."""
    logits = _wide(logits)
    return jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]


def hard_negative_mask(
    bg_loss: jax.Array, cls_targets: jax.Array, *, neg_pos_ratio: int = 3
) -> jax.Array:
    """bg_loss [B, P], cls_targets [B, P] → mask [B, P] of the hard negatives per image.

    The min(neg_pos_ratio·n, P − 1, #negatives) negatives with the largest bg_loss (ties: lower
    prior index); none without positives. choice: never a positive (docs/design.md, Loss).
    """
    bg_loss = jax.lax.stop_gradient(_wide(bg_loss))
    positive = cls_targets > 0
    num_p = bg_loss.shape[-1]
    key = jnp.where(positive, -jnp.inf, bg_loss)
    order = jnp.argsort(-key, axis=-1, stable=True)  # [B, P], hardest first
    ranks = jnp.arange(num_p, dtype=jnp.int32)
    rank = jax.vmap(lambda o: jnp.zeros((num_p,), jnp.int32).at[o].set(ranks))(order)
    num_pos = positive.sum(-1, keepdims=True)
    num_neg = jnp.minimum(neg_pos_ratio * num_pos, num_p - 1)
    return (rank < num_neg) & ~positive


def multibox_loss(
    loc: jax.Array,
    logits: jax.Array,
    loc_targets: jax.Array,
    cls_targets: jax.Array,
    *,
    neg_pos_ratio: int = 3,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loc [B, P, 4], logits [B, P, C], loc_targets [B, P, 4], cls_targets [B, P] (0 = background)
    → (total = loc + conf, {'loc', 'conf', 'num_pos'}), in float32:
      loc = Σ_pos smooth-L1(loc − loc_targets) / N;  conf = Σ_{pos ∪ hard neg} CE / N;
      N = max(positives of the whole (global) batch array, 1).
    """
    loc = _wide(loc)
    logits = _wide(logits)
    loc_targets = jnp.asarray(loc_targets, loc.dtype)
    cls_targets = jnp.asarray(cls_targets, jnp.int32)
    positive = cls_targets > 0
    num_pos = positive.sum().astype(jnp.float32)
    denom = jnp.maximum(num_pos, 1.0)

    loc_term = jnp.where(positive[..., None], smooth_l1(loc - loc_targets), 0.0).sum()

    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, P]
    target_logit = jnp.take_along_axis(logits, cls_targets[..., None], axis=-1)[..., 0]
    ce = lse - target_logit
    negative = hard_negative_mask(lse - logits[..., 0], cls_targets, neg_pos_ratio=neg_pos_ratio)
    conf_term = jnp.where(positive | negative, ce, 0.0).sum()

    loc_loss = loc_term / denom
    conf_loss = conf_term / denom
    return loc_loss + conf_loss, {"loc": loc_loss, "conf": conf_loss, "num_pos": num_pos}
