"""Post-processing speed: jitted `postprocess.detect` vs a NumPy per-class greedy-NMS loop.

The NumPy baseline does what the PyTorch reference code does (LRF's `test_LRF.py`, which
ssd.pytorch's `Detect` resembles): per image, softmax and decode, then a Python loop over the
classes, each with a vectorised greedy NMS loop run to completion (take the best remaining box,
drop the others whose IoU with it is > 0.45; py_cpu_nms style), keep the first 50 of each class,
then the 200 best of the image. No pre-NMS cap.

Both run on the same synthetic SSD-like outputs (COCO 300: 11620 priors × 81 classes): a few
objects per image whose surrounding priors get a high class score and regress towards the object
(many overlapping candidates, as a trained SSD produces), plus background noise, tuned so that a
few thousand (prior, class) pairs per image score above 0.01. The bench also checks that the
detections agree (same classes, boxes, scores, order) with the uncapped NumPy reference, which
measures the effect of `pre_nms_top_k` (config default).

    python bench/postprocess.py            # full sizes
    python bench/postprocess.py --quick    # tiny sizes (smoke test)

Last line: `RESULT postprocess_speedup_b1=... postprocess_speedup_b8=... ...`.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import numpy as np

from daipnet_jax import postprocess
from daipnet_jax.config import base_config


# ------------------------------------------------------------------ NumPy reference
def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_decode(loc: np.ndarray, priors: np.ndarray, variances=(0.1, 0.2)) -> np.ndarray:
    c = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    wh = priors[:, 2:] * np.exp(loc[:, 2:] * variances[1])
    return np.concatenate([c - wh / 2, c + wh / 2], 1)


def np_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float, keep_max: int) -> list[int]:
    """Greedy NMS, descending score, ties by lower index, run to completion (as LRF's
    `test_LRF.py` does with py_cpu_nms), then the first keep_max kept indices."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        lo = np.maximum(boxes[i, :2], boxes[rest, :2])
        hi = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        wh = np.maximum(hi - lo, 0.0)
        inter = wh[:, 0] * wh[:, 1]
        union = area[i] + area[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        order = rest[iou <= thresh]
    return keep[:keep_max]


def reference_nms(
    scores: np.ndarray, boxes: np.ndarray, *, thresh=0.01, nms_iou=0.45, per_class=50, max_det=200
):
    """One image: scores [P, C], boxes [P, 4] → list of (score, class, prior, box), best first."""
    dets = []
    for c in range(1, scores.shape[1]):
        idx = np.nonzero(scores[:, c] > thresh)[0]
        if idx.size == 0:
            continue
        for j in np_nms(boxes[idx], scores[idx, c], nms_iou, per_class):
            dets.append((float(scores[idx[j], c]), c, int(idx[j])))
    dets.sort(key=lambda d: (-d[0], d[1], d[2]))
    return [(s, c, p, boxes[p]) for s, c, p in dets[:max_det]]


def reference_detect(loc: np.ndarray, logits: np.ndarray, priors: np.ndarray):
    """The PyTorch-reference way, per image: softmax, decode, per-class NMS loop."""
    return [
        reference_nms(np_softmax(lg), np_decode(lc, priors))
        for lc, lg in zip(loc, logits, strict=True)
    ]


# ------------------------------------------------------------------ synthetic outputs
def synthetic_outputs(
    priors: np.ndarray,
    batch: int,
    num_classes: int,
    seed: int = 0,
    objects: int = 10,
    confusers: int = 3,
    boost: float = 3.0,
    background: float = 9.0,
):
    """SSD-like (loc [B,P,4], logits [B,P,C]) float32 with a realistic candidate count.

    Background dominates everywhere (logit +9 over N(0, 1) class logits: almost no candidate
    from noise alone). Around each of `objects` random boxes, the priors with IoU > 0.1 get a
    class logit boost rising with the IoU for the object's class and, less, for `confusers`
    other classes (as a trained detector spreads probability over similar classes), and their
    offsets regress to the object with noise. COCO 300: ~5-8 thousand (prior, class) pairs above
    0.01 per image, concentrated in a few classes (the largest with several hundred).
    `background=7` instead gives a flatter output (noise candidates in every class, ~10
    thousand per image), closer to a weak or early-training model.
    """
    rng = np.random.default_rng(seed)
    num_p = priors.shape[0]
    pc = np.concatenate([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1)
    loc = rng.normal(0, 0.5, (batch, num_p, 4)).astype(np.float32)
    logits = rng.normal(0, 1.0, (batch, num_p, num_classes)).astype(np.float32)
    logits[..., 0] += background
    for b in range(batch):
        for _ in range(objects):
            classes = rng.choice(np.arange(1, num_classes), min(1 + confusers, num_classes - 1))
            wh = np.exp(rng.uniform(np.log(0.05), np.log(0.8), 2))
            cxy = rng.uniform(wh / 2, 1 - wh / 2)
            box = np.concatenate([cxy - wh / 2, cxy + wh / 2])
            lo = np.maximum(box[:2], pc[:, :2])
            hi = np.minimum(box[2:], pc[:, 2:])
            inter = np.prod(np.maximum(hi - lo, 0), 1)
            iou = inter / (np.prod(wh) + np.prod(pc[:, 2:] - pc[:, :2], 1) - inter)
            near = iou > 0.1
            for rank, cls in enumerate(classes):
                lift = boost + 12.0 * iou[near] - 1.5 * rank + rng.normal(0, 1, near.sum())
                logits[b, near, cls] += lift
            g = np.concatenate([cxy, wh])
            t = np.concatenate(
                [
                    (g[:2] - priors[near, :2]) / (0.1 * priors[near, 2:]),
                    np.log(g[2:] / priors[near, 2:]) / 0.2,
                ],
                1,
            )
            loc[b, near] = t + rng.normal(0, 0.3, t.shape)
    return loc, logits


# ------------------------------------------------------------------ comparison and timing
def compare(jax_out, ref) -> int:
    """Number of images whose detections differ from the reference (classes, order, boxes, scores)."""
    boxes, scores, classes, valid = (np.asarray(x) for x in jax_out)
    bad = 0
    for b, dets in enumerate(ref):
        n = int(valid[b].sum())
        ok = n == len(dets) and valid[b, :n].all()
        if ok and n:
            ok = (
                np.array_equal(classes[b, :n], [d[1] for d in dets])
                and np.allclose(scores[b, :n], [d[0] for d in dets], rtol=1e-5, atol=1e-7)
                and np.allclose(boxes[b, :n], np.stack([d[3] for d in dets]), atol=1e-5)
            )
        bad += not ok
    return bad


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = base_config("daipnet300", "coco")
    from daipnet_jax.boxes import prior_boxes

    priors = prior_boxes(cfg)
    num_classes = cfg.model.num_classes
    pp = cfg.postprocess
    batches = (1, 8)
    if args.quick:
        priors, num_classes, args.repeats = priors[::20], 11, 1

    fn = jax.jit(
        functools.partial(
            postprocess.detect,
            variances=tuple(cfg.priors.variances),
            score_threshold=pp.score_threshold,
            nms_iou=pp.nms_iou,
            per_class_max=pp.per_class_max,
            max_detections=pp.max_detections,
            pre_nms_top_k=pp.pre_nms_top_k,
        )
    )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}), P={priors.shape[0]}, C={num_classes}, "
        f"pre_nms_top_k={pp.pre_nms_top_k}"
    )
    from daipnet_jax.boxes import decode

    results = {}
    scenarios = (("", 9.0), ("_flat", 7.0))  # concentrated (primary) and flat outputs
    for name, background in scenarios:
        for batch in batches:
            loc, logits = synthetic_outputs(
                priors, batch, num_classes, seed=batch, background=background
            )
            scores = np_softmax(logits)
            cand = (scores[..., 1:] > pp.score_threshold).sum((1, 2))
            per_class = (scores[..., 1:] > pp.score_threshold).sum(1).max(1)
            jax.block_until_ready(fn(loc, logits, priors))  # compile
            t_jax = best_time(
                lambda lc=loc, g=logits: jax.block_until_ready(fn(lc, g, priors)), args.repeats
            )
            t_np = best_time(lambda lc=loc, g=logits: reference_detect(lc, g, priors), args.repeats)
            # Agreement: the reference NMS on JAX's own softmax/decode (same float32 inputs).
            jax_scores = np.asarray(jax.nn.softmax(logits, -1))
            jax_boxes = np.asarray(decode(loc, priors))
            ref = [reference_nms(s, bx) for s, bx in zip(jax_scores, jax_boxes, strict=True)]
            mismatched = compare(fn(loc, logits, priors), ref)
            kept = [len(r) for r in ref]
            speedup = t_np / t_jax
            print(
                f"{name.strip('_') or 'concentrated'} batch {batch}: candidates > "
                f"{pp.score_threshold} per image {cand.min()}..{cand.max()} (max per class "
                f"{per_class.max()}), kept {min(kept)}..{max(kept)}; detect "
                f"{1e3 * t_jax / batch:.1f} ms/img, numpy loop {1e3 * t_np / batch:.1f} ms/img, "
                f"speedup {speedup:.1f}x; images differing from the uncapped reference: "
                f"{mismatched}/{batch}"
            )
            results[f"postprocess{name}_speedup_b{batch}"] = f"{speedup:.2f}"
            results[f"postprocess{name}_ms_per_img_b{batch}"] = f"{1e3 * t_jax / batch:.2f}"
            results[f"postprocess{name}_numpy_ms_per_img_b{batch}"] = f"{1e3 * t_np / batch:.2f}"
            results[f"postprocess{name}_mismatch_b{batch}"] = str(mismatched)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in results.items()))


if __name__ == "__main__":
    main()
