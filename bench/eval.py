"""Evaluation-inference throughput: network + post-processing, batch 8.

JAX: `evaluation.make_eval_step` (forward with train=False + `postprocess.detect`, one jitted
function, static shapes) for DAIPNet300 and LRF300 (COCO, 81 classes, random weights).
PyTorch reference: `tests/torch_reference.py`'s LRF300 (the official LRF-Net layout), eval mode,
`torch.inference_mode`, followed by the reference's post-processing: softmax, decode, then per
image and class score > 0.01, a greedy NMS at 0.45 in descending score order (the per-class CPU
loop of LRF-Net / ssd.pytorch, written here in torch), 50 per class, the 200 best per image.

Random weights give a near-uniform softmax (every (prior, class) pair ≈ 1/81 > 0.01): on both
sides a constant is added to the background logit, calibrated per model so that ~5,000 pairs
per image pass the 0.01 threshold, as trained SSD-like outputs do (`bench/postprocess.py`).
Both sides get the same number of threads (the machine's cores). Timing: best of `--repeats`
(after one warm-up / compile call), images per second = batch / time.

    python bench/eval.py [--quick] [--batch 8] [--repeats 3]

`--quick`: width 0.125 models, one repeat (checks that the script runs). Last line:
`RESULT eval_images_per_s=<DAIPNet300 JAX> eval_speedup_vs_torch=<LRF300 JAX / LRF300 torch>`
(like-for-like: the same architecture on both sides; the DAIPNet-vs-torch-LRF ratio is on the
line before).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import best_time  # noqa: E402

from daipnet_jax import platform  # noqa: E402

platform.setup()  # as train.py runs: XLA:CPU flag on CPU-only runs, quiet logs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


TARGET_CANDIDATES = 5000  # (prior, class) pairs above 0.01 per image, as bench/postprocess.py


def background_bias(logits: np.ndarray, target: float = TARGET_CANDIDATES) -> float:
    """Bias b added to the background logit so that ~`target` (prior, class) pairs per image
    score > 0.01 (bisection). Random weights give a near-uniform softmax (every pair ≈ 1/81 >
    0.01, ~940k candidates per image), which no trained detector produces and which would
    make both post-processing paths measure a pathological case."""
    x = logits.astype(np.float64)

    def count(b: float) -> float:
        y = x.copy()
        y[..., 0] += b
        y -= y.max(-1, keepdims=True)
        p = np.exp(y)
        p /= p.sum(-1, keepdims=True)
        return float(np.sum(p[..., 1:] > 0.01)) / x.shape[0]

    lo, hi = -10.0, 60.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) > target else (lo, mid)
    return (lo + hi) / 2


def jax_images_per_s(variant: str, width: float, batch: int, repeats: int) -> float:
    import jax.numpy as jnp

    from daipnet_jax import boxes as boxes_lib
    from daipnet_jax import models, postprocess
    from daipnet_jax.config import base_config
    from daipnet_jax.evaluation.loop import detect_kwargs
    from daipnet_jax.training.state import init_variables

    config = base_config(variant, "coco", width=width)
    model = models.build(config)
    s = config.model.image_size
    variables = init_variables(model, config, jax.random.PRNGKey(0))
    images = np.random.default_rng(0).uniform(0, 255, (batch, s, s, 3)).astype(np.float32)
    _, logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    bias = background_bias(np.asarray(logits))
    priors = jnp.asarray(boxes_lib.prior_boxes(config))
    kwargs = detect_kwargs(config)

    # = evaluation.make_predict_fn, plus the calibration bias on the background logit.
    @jax.jit
    def step(v, x):
        loc, logits = model.apply(v, x, train=False)
        return postprocess.detect(loc, logits.at[..., 0].add(bias), priors, **kwargs)

    def run() -> None:
        jax.block_until_ready(step(variables, images))

    return batch / best_time(run, repeats, warmup=1)


def torch_postprocess(loc, conf, priors, *, thresh=0.01, nms_iou=0.45, per_class=50, top=200):
    """The reference's CPU post-processing (softmax, decode, per-class greedy NMS loop)."""
    import torch

    scores = torch.softmax(conf, -1)
    var = (0.1, 0.2)
    centres = priors[:, :2] + loc[..., :2] * var[0] * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[..., 2:] * var[1])
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], -1)
    out = []
    for b in range(loc.shape[0]):
        dets = []
        for c in range(1, scores.shape[-1]):
            s = scores[b, :, c]
            mask = s > thresh
            if not mask.any():
                continue
            cs, cb = s[mask], boxes[b][mask]
            order = torch.argsort(cs, descending=True, stable=True)
            cs, cb = cs[order], cb[order]
            area = (cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])
            alive = torch.ones(len(cs), dtype=torch.bool)
            kept = []
            for i in range(len(cs)):
                if not alive[i]:
                    continue
                kept.append(i)
                if len(kept) == per_class:
                    break
                lo = torch.maximum(cb[i, :2], cb[i + 1 :, :2])
                hi = torch.minimum(cb[i, 2:], cb[i + 1 :, 2:])
                inter = (hi - lo).clamp(min=0).prod(-1)
                iou = inter / (area[i] + area[i + 1 :] - inter)
                alive[i + 1 :] &= iou <= nms_iou
            idx = torch.tensor(kept)
            dets.append(
                torch.cat([cb[idx], cs[idx, None], torch.full((len(kept), 1), float(c))], 1)
            )
        d = torch.cat(dets) if dets else torch.zeros((0, 6))
        out.append(d[torch.argsort(d[:, 4], descending=True, stable=True)[:top]])
    return out


def torch_images_per_s(width: float, batch: int, repeats: int) -> float:
    import torch
    from torch_reference import LRF, randomize

    from daipnet_jax import boxes as boxes_lib
    from daipnet_jax.config import base_config

    torch.set_num_threads(os.cpu_count() or 1)
    model = randomize(LRF(300, 81, width=width), seed=0)
    priors = torch.from_numpy(np.asarray(boxes_lib.prior_boxes(base_config("lrf300", "coco"))))
    images = torch.from_numpy(
        np.random.default_rng(0).uniform(-128, 128, (batch, 3, 300, 300)).astype(np.float32)
    )

    with torch.inference_mode():
        _, conf = model(images)
    bias = background_bias(conf.numpy())

    def run() -> None:
        with torch.inference_mode():
            loc, conf = model(images)
            conf[..., 0] += bias
            torch_postprocess(loc, conf, priors)

    return batch / best_time(run, repeats, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 0.125, one repeat")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width = 0.125 if args.quick else 1.0
    repeats = 1 if args.quick else args.repeats
    print(f"devices: {jax.devices()}, batch {args.batch}, width {width}")
    daipnet = jax_images_per_s("daipnet300", width, args.batch, repeats)
    print(f"JAX DAIPNet300 eval (forward + detect): {daipnet:.2f} images/s")
    lrf = jax_images_per_s("lrf300", width, args.batch, repeats)
    print(f"JAX LRF300 eval (forward + detect):     {lrf:.2f} images/s")
    torch_lrf = torch_images_per_s(width, args.batch, repeats)
    print(f"PyTorch LRF300 eval (forward + CPU NMS): {torch_lrf:.2f} images/s")
    print(
        f"RESULT eval_lrf300_images_per_s={lrf:.3f} torch_lrf300_images_per_s={torch_lrf:.3f} "
        f"eval_daipnet_vs_torch_lrf={daipnet / torch_lrf:.3f}"
    )
    print(f"RESULT eval_images_per_s={daipnet:.3f} eval_speedup_vs_torch={lrf / torch_lrf:.3f}")


if __name__ == "__main__":
    main()
