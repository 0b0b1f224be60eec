"""MultiBox loss against a plain NumPy loop reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from daipnet_jax import losses


def _np_multibox(loc, logits, loc_t, cls_t, ratio=3):
    """Reference written from the definition, per image with loops, float64."""
    loc, logits, loc_t = (np.asarray(x, np.float64) for x in (loc, logits, loc_t))
    bsz, num_p, _ = logits.shape
    total_pos = int((cls_t > 0).sum())
    n = max(total_pos, 1)
    loc_sum, conf_sum = 0.0, 0.0
    for b in range(bsz):
        pos = [p for p in range(num_p) if cls_t[b, p] > 0]
        for p in pos:
            for d in loc[b, p] - loc_t[b, p]:
                loc_sum += 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5
        m = logits[b].max(1, keepdims=True)
        log_sm = logits[b] - m - np.log(np.exp(logits[b] - m).sum(1, keepdims=True))
        negs = [p for p in range(num_p) if cls_t[b, p] == 0]
        negs.sort(key=lambda p: (log_sm[p, 0], p))  # largest −log p0 first, ties: lower index
        num_neg = min(ratio * len(pos), num_p - 1)
        chosen = pos + negs[:num_neg]
        for p in chosen:
            conf_sum += -log_sm[p, cls_t[b, p]]
    return (loc_sum + conf_sum) / n, loc_sum / n, conf_sum / n, total_pos


def _random_batch(seed, bsz=3, num_p=400, num_c=6, pos_frac=(0.05, 0.0, 0.02)):
    rng = np.random.default_rng(seed)
    loc = rng.normal(0, 1.5, (bsz, num_p, 4)).astype(np.float32)
    loc_t = rng.normal(0, 1.5, (bsz, num_p, 4)).astype(np.float32)
    logits = rng.normal(0, 2.0, (bsz, num_p, num_c)).astype(np.float32)
    cls_t = np.zeros((bsz, num_p), np.int32)
    for b, frac in enumerate(pos_frac):
        idx = rng.choice(num_p, int(frac * num_p), replace=False)
        cls_t[b, idx] = rng.integers(1, num_c, idx.size)
    return loc, logits, loc_t, cls_t


@pytest.mark.parametrize("seed,pos_frac", [(0, (0.05, 0.0, 0.02)), (1, (0.4, 0.01, 0.9))])
def test_loss_matches_numpy_reference(seed, pos_frac):
    loc, logits, loc_t, cls_t = _random_batch(seed, pos_frac=pos_frac)
    total, parts = jax.jit(losses.multibox_loss)(loc, logits, loc_t, cls_t)
    ref_total, ref_loc, ref_conf, ref_pos = _np_multibox(loc, logits, loc_t, cls_t)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
    np.testing.assert_allclose(float(parts["loc"]), ref_loc, rtol=1e-5)
    np.testing.assert_allclose(float(parts["conf"]), ref_conf, rtol=1e-5)
    assert float(parts["num_pos"]) == ref_pos


def test_loss_with_ties_in_background_loss():
    # many identical logit rows: ties in the mining key are broken by the lower prior index
    loc, logits, loc_t, cls_t = _random_batch(2, bsz=2, num_p=60, pos_frac=(0.1, 0.05))
    logits[:, ::2] = logits[:, :1]
    logits[:, 1::3, 1:] = 0.0
    total, _ = jax.jit(losses.multibox_loss)(loc, logits, loc_t, cls_t)
    np.testing.assert_allclose(float(total), _np_multibox(loc, logits, loc_t, cls_t)[0], rtol=1e-5)


def test_no_positives_finite_loss_and_gradients():
    loc, logits, loc_t, _ = _random_batch(3, bsz=2, num_p=100, pos_frac=(0.0, 0.0))
    cls_t = np.zeros((2, 100), np.int32)

    def f(loc, logits):
        return losses.multibox_loss(loc, logits, loc_t, cls_t)[0]

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(loc, logits)
    assert np.isfinite(float(value)) and float(value) == 0.0
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    # with positives the gradients are finite and non-zero
    _, _, _, cls_pos = _random_batch(3, bsz=2, num_p=100, pos_frac=(0.05, 0.0))
    grad_fn = jax.grad(lambda a, b: losses.multibox_loss(a, b, loc_t, cls_pos)[0], argnums=(0, 1))
    g2 = jax.jit(grad_fn)(loc, logits)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0 for g in g2)


def test_hard_negative_count_per_image():
    rng = np.random.default_rng(4)
    num_p = 50
    num_pos = [0, 1, 5, 12, 13, 30, 49]
    cls_t = np.zeros((len(num_pos), num_p), np.int32)
    for b, n in enumerate(num_pos):
        cls_t[b, rng.choice(num_p, n, replace=False)] = 1
    logits = rng.normal(0, 1, (len(num_pos), num_p, 3)).astype(np.float32)
    mine = jax.jit(lambda g, c: losses.hard_negative_mask(losses.background_loss(g), c))
    mask = np.asarray(mine(logits, cls_t))
    for b, n in enumerate(num_pos):
        expected = min(3 * n, num_p - 1)
        # negatives only: when 3·n exceeds the number of negatives, all negatives are taken
        expected = min(expected, num_p - n)
        assert mask[b].sum() == expected, (n, mask[b].sum())
        assert not (mask[b] & (cls_t[b] > 0)).any()
    # exactly min(3·pos, P − 1) wherever that many negatives exist
    assert [mask[b].sum() for b in range(4)] == [0, 3, 15, 36]
    # the chosen negatives are the hardest: every chosen one has bg loss ≥ every unchosen negative
    bg = np.asarray(losses.background_loss(logits))
    for b in range(len(num_pos)):
        neg = cls_t[b] == 0
        if mask[b].any() and (neg & ~mask[b]).any():
            assert bg[b][mask[b]].min() >= bg[b][neg & ~mask[b]].max()


def test_loss_is_normalised_by_global_positives():
    """Splitting a batch in two and summing the unnormalised halves gives the same total."""
    loc, logits, loc_t, cls_t = _random_batch(5, bsz=4, num_p=80, pos_frac=(0.1, 0.0, 0.05, 0.2))
    loss_fn = jax.jit(losses.multibox_loss)
    total, parts = loss_fn(loc, logits, loc_t, cls_t)
    halves = [loss_fn(loc[s], logits[s], loc_t[s], cls_t[s]) for s in (slice(0, 2), slice(2, 4))]
    unnorm = sum(float(t) * max(float(p["num_pos"]), 1.0) for t, p in halves)
    np.testing.assert_allclose(float(total) * float(parts["num_pos"]), unnorm, rtol=1e-5)
