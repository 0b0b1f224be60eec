"""Priors, IoU, encode/decode and matching (SSD) against hand-worked values."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from daipnet_jax import boxes
from daipnet_jax.config import base_config, num_priors


# ---------------------------------------------------------------- priors
@pytest.mark.parametrize(
    "variant,dataset,expected",
    [
        ("daipnet300", "coco", 11620),
        ("lrf300", "voc", 11620),
        ("daipnet512", "coco", 32756),
        ("ssd300", "voc", 8732),
    ],
)
def test_prior_count(variant, dataset, expected):
    cfg = base_config(variant, dataset)
    priors = boxes.prior_boxes(cfg)
    assert priors.shape == (expected, 4)
    assert priors.dtype == np.float32
    assert num_priors(cfg.priors) == expected
    assert priors.min() >= 0.0 and priors.max() <= 1.0


def _hand_prior(size, f, step, smin, smax, ratios, i, j, a):
    """Prior `a` of cell (i, j) written out from SSD's prior formula, then clamped."""
    fk = size / step
    cx, cy = (j + 0.5) / fk, (i + 0.5) / fk
    sizes = [(smin, smin), (math.sqrt(smin * smax), math.sqrt(smin * smax))]
    for r in ratios:
        sizes += [
            (smin * math.sqrt(r), smin / math.sqrt(r)),
            (smin / math.sqrt(r), smin * math.sqrt(r)),
        ]
    w, h = sizes[a]
    return [min(max(v, 0.0), 1.0) for v in (cx, cy, w / size, h / size)]


@pytest.mark.parametrize("variant", ["daipnet300", "daipnet512"])
def test_prior_spot_values_first_and_last_of_each_source(variant):
    cfg = base_config(variant, "coco")
    size = cfg.model.image_size
    t = cfg.priors
    priors = boxes.prior_boxes(cfg)
    offset = 0
    for k, f in enumerate(t.feature_maps):
        n_anchor = 2 + 2 * len(t.aspect_ratios[k])
        args = (size, f, t.steps[k], t.min_sizes[k], t.max_sizes[k], t.aspect_ratios[k])
        first = _hand_prior(*args, 0, 0, 0)
        second = _hand_prior(*args, 0, 0, 1)
        last = _hand_prior(*args, f - 1, f - 1, n_anchor - 1)
        np.testing.assert_allclose(priors[offset], first, rtol=1e-6)
        np.testing.assert_allclose(priors[offset + 1], second, rtol=1e-6)
        offset += f * f * n_anchor
        np.testing.assert_allclose(priors[offset - 1], last, rtol=1e-6)
    assert offset == len(priors)


def test_prior_hand_numbers_coco300():
    """A few numbers worked out by hand (not through the helper above)."""
    priors = boxes.prior_boxes(base_config("daipnet300", "coco"))
    # source 0: f_k = 300/8 = 37.5, first centre 0.5/37.5; min 21/300; sqrt(21*45)/300.
    np.testing.assert_allclose(priors[0], [1 / 75, 1 / 75, 0.07, 0.07], rtol=1e-6)
    np.testing.assert_allclose(priors[1, 2], math.sqrt(945) / 300, rtol=1e-6)
    # ratio 2 of the first cell: (0.07·√2, 0.07/√2); ratio 3 second box: (0.07/√3, 0.07·√3).
    np.testing.assert_allclose(priors[2, 2:], [0.07 * math.sqrt(2), 0.07 / math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(priors[5, 2:], [0.07 / math.sqrt(3), 0.07 * math.sqrt(3)], rtol=1e-6)
    # 10x10 source (step 32): last centre 9.5/9.375 > 1 clamped to 1.
    start = 38 * 38 * 6 + 19 * 19 * 6
    last10 = priors[start + 10 * 10 * 6 - 1]
    assert last10[0] == 1.0 and last10[1] == 1.0
    # last source 1x1, step 300: centre 0.5; sqrt(261*315)/300 = 0.95...; ratio 2 box w > 1 → 1.
    tail = priors[-4:]
    np.testing.assert_allclose(tail[:, :2], 0.5)
    np.testing.assert_allclose(tail[1, 2], math.sqrt(261 * 315) / 300, rtol=1e-6)
    np.testing.assert_allclose(tail[2], [0.5, 0.5, 1.0, 0.87 / math.sqrt(2)], rtol=1e-6)


# ---------------------------------------------------------------- IoU, encode, decode
def test_iou_hand_table():
    a = np.array(
        [
            [0.0, 0.0, 0.5, 0.5],  # reference box
            [0.0, 0.0, 0.5, 0.5],  # identical
            [0.6, 0.6, 0.9, 0.9],  # disjoint
            [0.5, 0.0, 1.0, 0.5],  # touching (shared edge x = 0.5)
            [0.125, 0.125, 0.375, 0.375],  # nested, area 1/16 of the 1/4
            [0.25, 0.25, 0.75, 0.75],  # quarter overlap: inter 1/16, union 7/16
            [0.0, 0.0, 0.5, 0.25],  # half: inter 1/8, union 1/4
        ],
        np.float32,
    )
    got = np.asarray(boxes.iou(a[:1], a))[0]
    expected = [1.0, 1.0, 0.0, 0.0, 0.25, 1 / 7, 0.5]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # symmetric and batched over leading axes
    full = np.asarray(boxes.iou(a[None], a[None]))
    assert full.shape == (1, 7, 7)
    np.testing.assert_allclose(full[0], full[0].T, rtol=1e-6)
    # two empty boxes: 0, not NaN
    empty = np.zeros((1, 4), np.float32)
    assert float(boxes.iou(empty, empty)[0, 0]) == 0.0


def test_encode_hand_value_and_roundtrip():
    prior = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
    # truth: centre (0.52, 0.5), w 0.4, h 0.1
    g = np.array([[0.32, 0.45, 0.72, 0.55]], np.float32)
    enc = np.asarray(boxes.encode(g, prior, (0.1, 0.2)))
    np.testing.assert_allclose(
        enc[0], [0.02 / 0.02, 0.0, math.log(2) / 0.2, math.log(0.5) / 0.2], rtol=1e-5, atol=1e-5
    )
    rng = np.random.default_rng(0)
    centre = rng.uniform(0.1, 0.9, (2, 50, 2))
    wh = rng.uniform(0.02, 0.5, (2, 50, 2))
    gt = np.concatenate([centre - wh / 2, centre + wh / 2], -1).astype(np.float32)
    priors = np.concatenate([rng.uniform(0, 1, (50, 2)), rng.uniform(0.05, 0.6, (50, 2))], -1)
    priors = priors.astype(np.float32)
    back = boxes.decode(boxes.encode(gt, priors), priors)
    np.testing.assert_allclose(np.asarray(back), gt, atol=2e-6)


# ---------------------------------------------------------------- match
def _corners_to_center(c):
    c = np.asarray(c, np.float32)
    return np.concatenate([(c[:, :2] + c[:, 2:]) / 2, c[:, 2:] - c[:, :2]], 1)


PRIOR_CORNERS = np.array(
    [
        [0.0, 0.0, 0.5, 0.5],  # 0
        [0.5, 0.0, 1.0, 0.5],  # 1
        [0.0, 0.5, 0.5, 1.0],  # 2
        [0.5, 0.5, 1.0, 1.0],  # 3
        [0.25, 0.25, 0.75, 0.75],  # 4
    ],
    np.float32,
)
PRIORS = _corners_to_center(PRIOR_CORNERS)


def _match(gt, labels, mask):
    gt = np.asarray(gt, np.float32)[None]
    fn = jax.jit(lambda g, lab, m: boxes.match(g, lab, m, PRIORS))
    loc, cls = fn(gt, np.asarray(labels, np.int32)[None], np.asarray(mask, bool)[None])
    return np.asarray(loc)[0], np.asarray(cls)[0]


def test_match_low_iou_truth_still_gets_best_prior():
    # small box inside prior 3: IoU = 0.01/0.25 = 0.04 with prior 3, < 0.04 with the rest
    gt = [[0.8, 0.8, 0.9, 0.9]]
    loc, cls = _match(gt, [7], [True])
    np.testing.assert_array_equal(cls, [0, 0, 0, 7, 0])
    np.testing.assert_allclose(
        loc[3], np.asarray(boxes.encode(np.float32(gt), PRIORS))[3], rtol=1e-6
    )
    np.testing.assert_array_equal(loc[[0, 1, 2, 4]], 0.0)


def test_match_threshold_and_best_truth_per_prior():
    # truth A equals prior 0 (IoU 1); it overlaps prior 4 by 1/7 (background).
    # truth B = [0.25,0.25,0.75,0.7]: IoU 0.9 with prior 4, ≤ 0.15 with the others.
    gt = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.7]]
    _, cls = _match(gt, [1, 2], [True, True])
    np.testing.assert_array_equal(cls, [1, 0, 0, 0, 2])
    # a truth covering priors 0 and 1 (IoU 0.5 each, ≥ threshold → positive)
    gt = [[0.0, 0.0, 1.0, 0.5]]
    _, cls = _match(gt, [3], [True])
    np.testing.assert_array_equal(cls, [3, 3, 0, 0, 0])  # prior 4: IoU 0.125/0.625 = 0.2
    # IoU just below 0.5 (0.49) with non-forced priors → background
    gt = [[0.0, 0.0, 1.0, 0.49]]
    _, cls = _match(gt, [3], [True])
    assert cls[0] == 3  # forced (best prior, ties → lower index)
    np.testing.assert_array_equal(cls[1:], [0, 0, 0, 0])


def test_match_tie_rule_later_truth_wins():
    a = [0.0, 0.0, 0.5, 0.475]  # IoU 0.95 with prior 0
    b = [0.0, 0.05, 0.5, 0.5]  # IoU 0.90 with prior 0
    # both truths' best prior is prior 0; prior 0's best truth by IoU is A, but B forces later.
    _, cls = _match([a, b], [1, 2], [True, True])
    assert cls[0] == 2
    _, cls = _match([b, a], [2, 1], [True, True])
    assert cls[0] == 1
    # an invalid later truth does not take part in the tie
    _, cls = _match([a, b], [1, 2], [True, False])
    assert cls[0] == 1


def test_match_padded_truths_never_matched():
    # padding row identical to prior 1 with label 9, masked out
    gt = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
    loc, cls = _match(gt, [4, 9, 9], [True, False, False])
    np.testing.assert_array_equal(cls, [4, 0, 0, 0, 0])
    # image with no valid truth: all background, zero targets
    loc, cls = _match(gt, [4, 9, 9], [False, False, False])
    np.testing.assert_array_equal(cls, 0)
    np.testing.assert_array_equal(loc, 0.0)


def _np_match(gt, labels, mask, priors, thr=0.5):
    """ssd.pytorch-style sequential reference on one image (loops, float64)."""
    pc = np.concatenate([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1)
    valid = [g for g in range(len(gt)) if mask[g]]
    ov = np.zeros((len(valid), len(pc)))
    for r, g in enumerate(valid):
        for p in range(len(pc)):
            lo = np.maximum(gt[g, :2], pc[p, :2])
            hi = np.minimum(gt[g, 2:], pc[p, 2:])
            inter = np.prod(np.maximum(hi - lo, 0))
            area_g = np.prod(gt[g, 2:] - gt[g, :2])
            area_p = np.prod(pc[p, 2:] - pc[p, :2])
            ov[r, p] = inter / (area_g + area_p - inter)
    cls = np.zeros(len(pc), np.int64)
    if not valid:
        return cls
    best_t = ov.argmax(0)
    best_o = ov.max(0)
    for r in range(len(valid)):  # sequential: later truth overwrites
        p = ov[r].argmax()
        best_t[p] = r
        best_o[p] = 2.0
    for p in range(len(pc)):
        if best_o[p] >= thr:
            cls[p] = labels[valid[best_t[p]]]
    return cls


def test_match_random_against_loop_reference():
    rng = np.random.default_rng(1)
    priors = boxes.prior_boxes(base_config("daipnet300", "coco"))[::7]  # 1660 priors
    bsz, g = 3, 6
    centre = rng.uniform(0.2, 0.8, (bsz, g, 2))
    wh = rng.uniform(0.05, 0.5, (bsz, g, 2))
    gt = np.concatenate([centre - wh / 2, centre + wh / 2], -1).astype(np.float32)
    labels = rng.integers(1, 81, (bsz, g)).astype(np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    loc, cls = jax.jit(lambda *a: boxes.match(*a, priors))(gt, labels, mask)
    loc, cls = np.asarray(loc), np.asarray(cls)
    for b in range(bsz):
        np.testing.assert_array_equal(cls[b], _np_match(gt[b], labels[b], mask[b], priors))
    assert (cls[0] > 0).sum() >= 4 and (cls[2] == 0).all()
    assert np.isfinite(loc).all()
