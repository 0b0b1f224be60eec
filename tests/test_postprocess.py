"""`postprocess.detect` against a plain NumPy per-class greedy NMS."""

from __future__ import annotations

import functools

import jax
import numpy as np

from daipnet_jax import postprocess
from daipnet_jax.boxes import prior_boxes
from daipnet_jax.config import base_config


# ---------------------------------------------------------------- NumPy reference
def _np_decode(loc, priors, v=(0.1, 0.2)):
    c = priors[:, :2] + loc[:, :2] * v[0] * priors[:, 2:]
    wh = priors[:, 2:] * np.exp(loc[:, 2:] * v[1])
    return np.concatenate([c - wh / 2, c + wh / 2], 1)


def _np_iou(a, b):
    lo = np.maximum(a[:2], b[:2])
    hi = np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.maximum(hi - lo, 0.0)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])) - inter
    return inter / union if union > 0 else 0.0


def _np_detect(scores, boxes, thr=0.01, nms_iou=0.45, per_class=50, max_det=200, top_k=None):
    """One image. Per class: candidates > thr, by (−score, prior), the first top_k of them (all
    when None), greedy NMS (strict >)."""
    dets = []
    for c in range(1, scores.shape[1]):
        cand = sorted(
            (p for p in range(len(scores)) if scores[p, c] > thr), key=lambda p: (-scores[p, c], p)
        )[:top_k]
        kept: list[int] = []
        for p in cand:
            if len(kept) == per_class:
                break
            if all(_np_iou(boxes[p], boxes[q]) <= nms_iou for q in kept):
                kept.append(p)
        dets += [(float(scores[p, c]), c, p) for p in kept]
    dets.sort(key=lambda d: (-d[0], d[1], d[2]))
    return dets[:max_det]


def _check(loc, logits, priors, out=None, capped=False, **kw):
    """detect == reference on every image: same count, order, classes, scores, boxes. The
    reference caps each class at pre_nms_top_k candidates only when `capped`.

    Returns the kept count per image; `out`, a list, receives detect's outputs (as NumPy)."""
    opts = dict(score_threshold=0.01, nms_iou=0.45, per_class_max=50, max_detections=200)
    opts.update(kw)
    fn = jax.jit(functools.partial(postprocess.detect, variances=(0.1, 0.2), **opts))
    boxes, scores, classes, valid = (np.asarray(x) for x in fn(loc, logits, priors))
    if out is not None:
        out.extend([boxes, scores, classes, valid])
    d = opts["max_detections"]
    assert boxes.shape == (len(loc), d, 4) and scores.shape == classes.shape == valid.shape == (
        len(loc),
        d,
    )
    assert classes.dtype == np.int32 and valid.dtype == bool
    # the reference runs on the same float32 softmax scores (the NMS logic is under test)
    sm = np.asarray(jax.nn.softmax(logits, -1))
    counts = []
    for b in range(len(loc)):
        ref_boxes = _np_decode(loc[b], priors)
        ref = _np_detect(
            sm[b],
            ref_boxes,
            opts["score_threshold"],
            opts["nms_iou"],
            opts["per_class_max"],
            d,
            opts["pre_nms_top_k"] if capped else None,
        )
        n = len(ref)
        counts.append(n)
        assert valid[b].sum() == n and valid[b, :n].all()
        np.testing.assert_array_equal(classes[b, :n], [r[1] for r in ref])
        np.testing.assert_allclose(scores[b, :n], [r[0] for r in ref], rtol=1e-6)  # 1-ulp fusion
        if n:
            np.testing.assert_allclose(boxes[b, :n], ref_boxes[[r[2] for r in ref]], atol=1e-6)
        assert (classes[b, n:] == 0).all() and (scores[b, n:] == 0).all()
    return counts


def _centre(corners):
    corners = np.asarray(corners, np.float32)
    return np.concatenate(
        [(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1
    )


def _logits_for(probs):
    """Logits whose softmax is `probs` (rows sum to 1)."""
    return np.log(np.asarray(probs, np.float64)).astype(np.float32)


# ---------------------------------------------------------------- cases
def test_random_boxes_and_scores():
    rng = np.random.default_rng(0)
    num_p, num_c = 300, 6
    c = rng.uniform(0.1, 0.9, (num_p, 2))
    priors = np.concatenate([c, rng.uniform(0.05, 0.4, (num_p, 2))], 1).astype(np.float32)
    loc = rng.normal(0, 0.5, (3, num_p, 4)).astype(np.float32)
    logits = rng.normal(0, 1.5, (3, num_p, num_c)).astype(np.float32)
    logits[..., 0] += 2.0
    counts = _check(loc, logits, priors)
    assert min(counts) > 20


def test_many_overlapping_boxes():
    rng = np.random.default_rng(1)
    centres = rng.uniform(0.2, 0.8, (5, 2))
    idx = rng.integers(0, 5, 400)
    c = centres[idx] + rng.normal(0, 0.02, (400, 2))
    wh = 0.2 * np.exp(rng.normal(0, 0.15, (400, 2)))
    priors = np.concatenate([c, wh], 1).astype(np.float32)
    loc = np.zeros((2, 400, 4), np.float32)
    logits = rng.normal(0, 1, (2, 400, 4)).astype(np.float32)
    logits[..., 0] -= 1.0
    _check(loc, logits, priors, pre_nms_top_k=400)
    # also with a tighter threshold and a smaller cap per class
    _check(loc, logits, priors, nms_iou=0.3, per_class_max=3, max_detections=10)


def test_threshold_is_threaded_not_half():
    # two boxes with IoU 0.47 (between 0.45 and 0.5): the second is suppressed at 0.45
    a = [0.0, 0.0, 1.0, 0.5]
    h = 0.47 / 1.47  # b overlaps a over a 1 x h strip: IoU = h / (1 − h) = 0.47
    b = [0.0, 0.5 - h, 1.0, 1.0 - h]
    assert abs(_np_iou(np.array(a), np.array(b)) - 0.47) < 1e-6
    priors = _centre([a, b])
    logits = _logits_for([[0.1, 0.9], [0.2, 0.8]])[None]
    loc = np.zeros((1, 2, 4), np.float32)
    assert _check(loc, logits, priors, max_detections=5) == [1]
    assert _check(loc, logits, priors, max_detections=5, nms_iou=0.5) == [2]


def test_score_ties_lower_prior_first_and_identical_boxes():
    # four boxes, equal scores: two identical (later one suppressed), one overlapping, one apart
    corners = [
        [0.1, 0.1, 0.4, 0.4],
        [0.6, 0.6, 0.9, 0.9],
        [0.1, 0.1, 0.4, 0.4],
        [0.12, 0.1, 0.42, 0.4],
        [0.6, 0.1, 0.9, 0.4],
    ]
    priors = _centre(corners)
    probs = np.tile([[0.3, 0.35, 0.35]], (5, 1))  # classes 1 and 2 tie too
    logits = np.tile(_logits_for(probs)[None], (2, 1, 1))
    loc = np.zeros((2, 5, 4), np.float32)
    out: list = []
    _check(loc, logits, priors, out)
    boxes, _, classes, valid = out
    # kept per class: priors 0, 1, 4 (2 duplicates 0, 3 overlaps 0); order class 1 then class 2
    assert valid[0].sum() == 6
    np.testing.assert_array_equal(classes[0, :6], [1, 1, 1, 2, 2, 2])
    np.testing.assert_allclose(boxes[0, :3], np.asarray(corners, np.float32)[[0, 1, 4]], atol=1e-6)


def test_all_below_threshold():
    rng = np.random.default_rng(2)
    priors = np.concatenate([rng.uniform(0.2, 0.8, (50, 2)), np.full((50, 2), 0.1)], 1)
    priors = priors.astype(np.float32)
    logits = rng.normal(0, 0.5, (2, 50, 5)).astype(np.float32)
    logits[..., 0] += 10.0
    loc = np.zeros((2, 50, 4), np.float32)
    out: list = []
    assert _check(loc, logits, priors, out) == [0, 0]
    boxes, scores, classes, valid = out
    assert not valid.any() and (scores == 0).all() and (classes == 0).all() and (boxes == 0).all()


def test_more_than_50_per_class_and_more_than_200_per_image():
    # 9x9 grid of disjoint boxes (81 priors); 5 foreground classes all above threshold
    g = np.arange(9) / 9
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    corners = np.concatenate([xy + 0.01, xy + 0.1], 1)
    priors = _centre(corners)
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 0.3, (2, 81, 6)).astype(np.float32)
    logits[1, :, 1:] = logits[1, :1, 1:]  # image 1: every prior has the same scores (ties)
    loc = np.zeros((2, 81, 4), np.float32)
    out: list = []
    assert _check(loc, logits, priors, out, max_detections=300) == [250, 250]
    _, scores, classes, valid = out
    assert valid[:, :250].all()  # 5 classes x 50 kept = 250: more than 200
    for b in range(2):
        np.testing.assert_array_equal(np.bincount(classes[b, :250], minlength=6)[1:], 50)
        assert (np.diff(scores[b]) <= 0).all()
    assert _check(loc, logits, priors) == [200, 200]


def _synthetic(priors, num_classes, seed, objects=10, confusers=3):
    """SSD-like outputs: background dominates; around a few objects, clusters of priors score
    high for the object's class and less for a few confuser classes, and regress to the object."""
    rng = np.random.default_rng(seed)
    num_p = len(priors)
    pc = np.concatenate([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1)
    loc = rng.normal(0, 0.5, (1, num_p, 4)).astype(np.float32)
    logits = rng.normal(0, 1.0, (1, num_p, num_classes)).astype(np.float32)
    logits[..., 0] += 9.0
    for _ in range(objects):
        classes = rng.choice(np.arange(1, num_classes), 1 + confusers)
        wh = np.exp(rng.uniform(np.log(0.05), np.log(0.8), 2))
        cxy = rng.uniform(wh / 2, 1 - wh / 2)
        box = np.concatenate([cxy - wh / 2, cxy + wh / 2])
        inter = np.prod(
            np.maximum(np.minimum(box[2:], pc[:, 2:]) - np.maximum(box[:2], pc[:, :2]), 0), 1
        )
        iou = inter / (np.prod(wh) + np.prod(pc[:, 2:] - pc[:, :2], 1) - inter)
        near = iou > 0.1
        for rank, cls in enumerate(classes):
            lift = 3.0 + 12.0 * iou[near] - 1.5 * rank + rng.normal(0, 1, near.sum())
            logits[0, near, cls] += lift
        t = np.concatenate(
            [
                (cxy - priors[near, :2]) / (0.1 * priors[near, 2:]),
                np.log(wh / priors[near, 2:]) / 0.2,
            ],
            1,
        )
        loc[0, near] = t + rng.normal(0, 0.3, t.shape)
    return loc, logits


def test_realistic_coco300_outputs_match_uncapped_reference():
    """COCO 300 (11620 priors x 81 classes), ~4 thousand candidates above 0.01 concentrated in
    a few classes (one with 462): with the config's pre_nms_top_k, detect gives exactly the
    uncapped reference's detections, through the active-prior selection and multi-sub-row rows."""
    priors = prior_boxes(base_config("daipnet300", "coco"))
    loc, logits = _synthetic(priors, 81, seed=0)
    sm = np.asarray(jax.nn.softmax(logits, -1))[0, :, 1:]
    per_class = (sm > 0.01).sum(0)
    assert (sm > 0.01).sum() > 3000 and per_class.max() > 400
    # the paths of `detect` this case runs through: the priors that may have a candidate (best
    # foreground score bound sigmoid(fg_max - bg) above 0.01) are at most P / 4, and many
    # classes take several sub-rows, one more than four
    may = (logits[0, :, 1:].max(1) - logits[0, :, 0]) > np.log(0.01 / 0.99)
    assert may.sum() <= len(priors) // postprocess.ACTIVE_FRACTION
    assert (per_class > postprocess.SUB_WIDTH).sum() > 8
    assert per_class.max() > 4 * postprocess.SUB_WIDTH
    k = base_config("daipnet300", "coco").postprocess.pre_nms_top_k
    assert _check(loc, logits, priors, pre_nms_top_k=k) == [200]


def _flat_outputs(num_p, num_c, active, seed):
    """Outputs with many candidates in every class: `active` priors of each of 2 images have a
    flat softmax over the classes (every class above 0.01), the others a dominant background;
    priors in 5 clusters, so that NMS keeps few per class."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.2, 0.8, (5, 2))
    c = centres[rng.integers(0, 5, num_p)] + rng.normal(0, 0.05, (num_p, 2))
    priors = np.concatenate([c, 0.2 * np.exp(rng.normal(0, 0.2, (num_p, 2)))], 1)
    loc = rng.normal(0, 0.3, (2, num_p, 4)).astype(np.float32)
    logits = rng.normal(0, 0.3, (2, num_p, num_c)).astype(np.float32)
    for b in range(2):
        idle = np.ones(num_p, bool)
        idle[rng.choice(num_p, active, replace=False)] = False
        logits[b, idle, 0] += 12.0
    return loc, logits, priors.astype(np.float32)


def _sub_rows(logits, k):
    """Sub-rows each (image, class) row of at most k candidates takes in `_per_class_nms`."""
    count = (np.asarray(jax.nn.softmax(logits, -1))[..., 1:] > 0.01).sum(1)  # [B, K]
    return np.where(count <= k, -(-count // postprocess.SUB_WIDTH), 0), count


def _group_stride(n_rows, k):
    """Sub-rows per group of one NMS loop in `_per_class_nms` (its capacity less one row's
    largest share): rows starting beyond it go to a further loop."""
    per_row = -(-k // postprocess.SUB_WIDTH)
    return max(postprocess.SUB_ROWS_PER_ROW * n_rows, 2 * per_row) - per_row


def test_rows_beyond_one_loop_capacity_run_in_groups():
    """More sub-rows than one NMS loop holds: rows are handed out in several groups, on the
    active-prior path (few active priors) and on the dense path (all priors active)."""
    loc, logits, priors = _flat_outputs(2000, 5, active=450, seed=4)
    k_active = 2000 // postprocess.ACTIVE_FRACTION  # detect's k on the active path
    n_sub, count = _sub_rows(logits, k_active)
    assert count.min() > 300  # every class of both images: 5+ sub-rows
    assert n_sub.sum() > 2 * _group_stride(n_sub.size, k_active)  # at least three groups
    assert min(_check(loc, logits, priors, pre_nms_top_k=1000)) > 100
    loc, logits, priors = _flat_outputs(700, 5, active=700, seed=5)  # dense: one image a loop
    n_sub, count = _sub_rows(logits, 700)
    assert (n_sub.sum(1) > _group_stride(4, 700)).all()  # each image: at least two groups
    assert min(_check(loc, logits, priors, pre_nms_top_k=1000)) > 100


def test_classes_above_pre_nms_top_k_take_their_best():
    """Classes with more than pre_nms_top_k candidates keep NMS over their k best (ties: lower
    prior), next to classes under k in the same image; both paths of `detect`."""
    for active in (90, 400):  # the active-prior path (at most 400 / 4 active), the dense path
        loc, logits, priors = _flat_outputs(400, 4, active=active, seed=active)
        k = 60
        _, count = _sub_rows(logits, k)
        assert (count > k).sum() >= 4 and (count > 0).all()
        logits[0, 30:, 3] -= 20.0  # image 0, class 3: candidates among priors 0-29 only
        _, count = _sub_rows(logits, k)
        assert 0 < count[0, 2] <= k
        _check(loc, logits, priors, capped=True, pre_nms_top_k=k)


def test_score_bound_keeps_borderline_candidates():
    """The max-logit bound that skips priors never drops a candidate: scores a few ulps above
    and below the threshold (two classes, where the bound is tight), and thresholds 0 and 1."""
    t = 0.01
    n = 200
    grid = np.arange(n) - n // 2  # steps of float32 ulps around the logit of t
    base = np.float32(np.log(t / (1 - t)))
    diff = np.array([np.float32(base) + np.float32(i) * np.spacing(base) for i in grid])
    logits = np.zeros((1, n, 2), np.float32)
    logits[0, :, 1] = diff
    sm = np.asarray(jax.nn.softmax(logits, -1))[0, :, 1]
    assert 0 < (sm > t).sum() < n  # the grid straddles the threshold
    g = np.arange(n)
    priors = np.stack([(g % 20) / 20 + 0.02, (g // 20) / 20 + 0.02, 0.03 + 0 * g, 0.03 + 0 * g], 1)
    priors = priors.astype(np.float32)
    loc = np.zeros((1, n, 4), np.float32)
    kw = dict(per_class_max=n, max_detections=n, pre_nms_top_k=n)
    assert _check(loc, logits, priors, **kw) == [(sm > t).sum()]
    assert _check(loc, logits, priors, score_threshold=0.0, **kw) == [n]
    assert _check(loc, logits, priors, score_threshold=1.0, **kw) == [0]


def _compiled_detect_hlo(pre_nms_top_k: int) -> str:
    priors = np.asarray(prior_boxes(base_config("daipnet300", "coco")))
    fn = jax.jit(
        lambda loc, logits: postprocess.detect(loc, logits, priors, pre_nms_top_k=pre_nms_top_k)
    )
    p = len(priors)
    return (
        fn.lower(np.zeros((2, p, 4), np.float32), np.zeros((2, p, 81), np.float32))
        .compile()
        .as_text()
    )


def test_detect_compiles_without_a_full_sort():
    """XLA rewrites `top_k` whose last column alone is read into a sort of the whole row (50x
    slower on CPU); `detect` must keep its top_k calls. The count of `sort(` instructions in the
    optimised HLO is the check (a version reading `top_s[:, -1]` compiles to 4 sorts)."""
    import re

    hlo = _compiled_detect_hlo(1000)
    assert len(re.findall(r"\bsort\(", hlo)) == 0
    assert re.search(r"topk|TopK", hlo)


_TWO_DEVICE_SCRIPT = r"""
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from daipnet_jax import postprocess
assert jax.device_count() == 2, jax.devices()
d = np.load(sys.argv[1])
mesh = Mesh(np.asarray(jax.devices()), ("data",))
out = {}
for name, spec in (("replicated", P()), ("sharded", P("data"))):
    s = NamedSharding(mesh, spec)
    fn = jax.jit(lambda lo, lg: postprocess.detect(lo, lg, d["priors"]), in_shardings=(s, s))
    res = jax.device_get(fn(d["loc"], d["logits"]))
    for i, x in enumerate(res):
        out[f"{name}_{i}"] = np.asarray(x)
np.savez(sys.argv[2], **out)
"""


def test_detect_on_two_devices_equals_one_device(tmp_path):
    """Multi-device regression: an optimization_barrier around top_k made XLA abort (SIGABRT in
    TopkDecomposer) as soon as detect was compiled for 2 devices. Runs in a subprocess with two
    forced CPU devices, replicated and batch-sharded, and compares with this process's 1 device."""
    import os
    import subprocess
    import sys

    priors = prior_boxes(base_config("daipnet300", "coco"))
    parts = [_synthetic(priors, 81, seed=s) for s in (1, 2)]
    loc = np.concatenate([p[0] for p in parts])
    logits = np.concatenate([p[1] for p in parts])
    np.savez(tmp_path / "in.npz", loc=loc, logits=logits, priors=priors)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _TWO_DEVICE_SCRIPT,
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    want = jax.device_get(jax.jit(lambda lo, lg: postprocess.detect(lo, lg, priors))(loc, logits))
    got = np.load(tmp_path / "out.npz")
    assert np.asarray(want[3]).sum() == 400  # 200 valid detections in each image: not vacuous
    for name in ("replicated", "sharded"):
        # same detections; boxes and scores within float32 rounding (the sharded program
        # fuses the decode differently: 1-ulp differences)
        for i in (2, 3):
            np.testing.assert_array_equal(got[f"{name}_{i}"], np.asarray(want[i]), err_msg=name)
        for i in (0, 1):
            np.testing.assert_allclose(got[f"{name}_{i}"], want[i], rtol=0, atol=1e-6, err_msg=name)
