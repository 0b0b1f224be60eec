"""SSD MultiBox loss: smooth-L1 localisation + hard-negative-mined softmax CE (SSD, Liu et al. 2016, Section 2.2).

Static shapes throughout (no boolean indexing): hard negatives are chosen with a sort-based rank,
so the loss is `jit`-able and shardable over the batch axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_l1(x: jax.Array) -> jax.Array:
    """Smooth L1 with β = 1: 0.5·x² where |x| < 1, else |x| − 0.5 (elementwise)."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _wide(x: jax.Array) -> jax.Array:
    """`x` in float32, or float64 when it is float64 (the reference runs under jax_enable_x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def background_loss(logits: jax.Array) -> jax.Array:
    """−log softmax(logits)[..., 0]: logits [B, P, C] → [B, P] (the mining key)."""
    logits = _wide(logits)
    return jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]


def hard_negative_mask(
    bg_loss: jax.Array, cls_targets: jax.Array, *, neg_pos_ratio: int = 3
) -> jax.Array:
    """Hard negatives per image (SSD's hard negative mining): bg_loss [B, P], cls_targets [B, P] → mask [B, P] bool.

    Per image with n positives, the negatives (cls_targets == 0) with the largest background loss,
    n_neg = min(neg_pos_ratio·n, P − 1, number of negatives) of them; ties: lower prior index
    first (stable sort). An image without positives gets no negatives.

    choice (differs from ssd.pytorch only in a corner case): ssd.pytorch zeroes the positives'
    loss and ranks all priors, so when neg_pos_ratio·n exceeds the number of negatives it may
    pick positives as "negatives" (harmless there, since it takes the union). Here negatives are
    chosen among negatives only, so the mask never overlaps the positives.

    Static shapes: one stable argsort of [B, P] plus a scatter for the inverse permutation (the
    rank of each prior); no data-dependent shapes. No gradient flows through the mask.
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
    """SSD MultiBox loss.

    Args:
      loc: [B, P, 4] predicted offsets; logits: [B, P, C] class logits (0 = background).
      loc_targets: [B, P, 4] from `boxes.match`; cls_targets: [B, P] int32, 0 = background.
    Returns:
      (total, {'loc', 'conf', 'num_pos'}), total = loc + conf (weight α = 1):
      - loc = Σ over positives of smooth-L1(loc − loc_targets) (summed over the 4 coords) / N;
      - conf = Σ over positives and `hard_negative_mask` of softmax CE / N;
      - N = max(total positives of the whole batch array, 1); num_pos is that total (float).
    Under `jit` with the batch sharded (NamedSharding) the arrays are global, so these sums are
    over the global batch: the normalisation is correct across devices and hosts without psum.
    A batch with no positives gives loss 0 from the loc term and no negatives (finite gradients).

    Memory: the CE uses logsumexp [B, P] and a gathered logit [B, P]; no one-hot or full
    log-softmax [B, P, C] array is materialised besides what XLA's fused reductions need.
    All computations in float32 (float64 for float64 inputs).
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
