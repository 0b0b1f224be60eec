"""Train-step speed: JAX DAIPNet300 / LRF300 vs PyTorch LRF300, split into forward / backward / update.

JAX (XLA CPU): the project's jitted step (`training.step.train_step`: matching, forward in train
mode, MultiBox loss, gradient, SGD momentum + weight decay), and two partial programs to split
it: `forward` (train-mode forward + loss) and `forward+backward` (value_and_grad). backward =
(forward+backward) − forward; update + matching = step − (forward+backward).

PyTorch (CPU, same thread count): the LRF300 reference model of `tests/torch_reference.py`
(the official `vaesl/LRF-Net` layer structure), train mode, MultiBox loss (smooth L1 on
positives + hard-negative-mined cross-entropy, written below), `loss.backward()`,
`torch.optim.SGD(momentum=0.9, weight_decay=5e-4).step()`; each phase timed separately. The
match targets are computed once by `boxes.match` and given to both sides' losses (so PyTorch's
time excludes matching; JAX's step includes it: the comparison is conservative for JAX).

    python bench/train_step.py                  # batch 8, full width, COCO 300 (slow on 2 cores)
    python bench/train_step.py --quick          # width 0.125, batch 2: checks the script runs

Last line: `RESULT train_step_jax_lrf300_s=... train_step_torch_lrf300_s=... ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import median_time  # noqa: E402

from daipnet_jax import platform  # noqa: E402

platform.setup()  # as train.py runs: XLA:CPU flag on CPU-only runs, quiet logs


def make_batch(config, batch: int, seed: int = 0):
    from training_support import synthetic_global_batch

    c = config.copy_and_resolve_references()
    c.train.batch_size = batch
    return synthetic_global_batch(c, 0, seed)


def targets(batch: int, width: float):
    """The synthetic batch and its match targets (LRF300 COCO priors), shared by both sides."""
    import jax

    from daipnet_jax import boxes
    from daipnet_jax.config import base_config

    c = base_config("lrf300", "coco", width=width)
    c.data.max_boxes = 8
    host = make_batch(c, batch)
    match = jax.jit(lambda b: boxes.match(b["boxes"], b["labels"], b["mask"], boxes.prior_boxes(c)))
    loc_t, cls_t = match({k: host[k] for k in ("boxes", "labels", "mask")})
    return host, loc_t, cls_t


def jax_bench(variant: str, width: float, batch: int, iters: int) -> dict[str, float]:
    import jax

    from daipnet_jax import boxes, losses, models, sharding
    from daipnet_jax.config import base_config
    from daipnet_jax.training import schedule as sched_lib
    from daipnet_jax.training import state as state_lib
    from daipnet_jax.training import step as step_lib

    c = base_config(variant, "coco", width=width)
    c.train.batch_size = batch
    c.data.max_boxes = 8
    model = models.build(c)
    priors = boxes.prior_boxes(c)
    sched = sched_lib.learning_rate_schedule(c, 1000)
    tx = sched_lib.make_optimizer(c, sched)
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    t0 = time.perf_counter()
    variables = state_lib.init_variables(model, c, jax.random.PRNGKey(0))
    state = jax.device_put(state_lib.create_train_state(variables, tx, jax.random.PRNGKey(1)), rep)
    host = make_batch(c, batch)
    batch_g = sharding.global_batch(host, mesh, step_lib.TRAIN_KEYS)
    loc_t, cls_t = jax.jit(lambda b: boxes.match(b["boxes"], b["labels"], b["mask"], priors))(
        batch_g
    )

    def loss_fn(params, bs, images):
        (loc, logits), _ = model.apply(
            {"params": params, "batch_stats": bs}, images, train=True, mutable=["batch_stats"]
        )
        return losses.multibox_loss(loc, logits, loc_t, cls_t)[0]

    fwd = jax.jit(loss_fn)
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
    step = step_lib.make_train_step(c, model, tx, sched, priors, mesh)
    p, bs, img = state.params, state.batch_stats, batch_g["image"]
    jax.block_until_ready(fwd(p, bs, img))
    jax.block_until_ready(fwd_bwd(p, bs, img))
    holder = {"s": step(jax.tree_util.tree_map(lambda x: x.copy(), state), batch_g)[0]}
    compile_s = time.perf_counter() - t0

    def run_step():
        holder["s"], m = step(holder["s"], batch_g)
        jax.block_until_ready(m)

    f = median_time(lambda: jax.block_until_ready(fwd(p, bs, img)), iters)
    fb = median_time(lambda: jax.block_until_ready(fwd_bwd(p, bs, img)), iters)
    s = median_time(run_step, iters)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    return dict(
        forward=f,
        backward=fb - f,
        update=s - fb,
        step=s,
        compile=compile_s,
        params=n_params,
        loc_t=loc_t,
        cls_t=cls_t,
        host=host,
    )


def torch_multibox(loc, conf, loc_t, cls_t, neg_pos_ratio: int = 3):
    """SSD MultiBox loss in PyTorch, normalised by the batch's positives."""
    import torch
    import torch.nn.functional as F

    pos = cls_t > 0
    num_pos = pos.sum().clamp(min=1).float()
    loss_l = F.smooth_l1_loss(loc[pos], loc_t[pos], reduction="sum")
    ce = F.cross_entropy(
        conf.reshape(-1, conf.shape[-1]), cls_t.reshape(-1), reduction="none"
    ).view(cls_t.shape)
    with torch.no_grad():
        bg = torch.logsumexp(conf, -1) - conf[..., 0]
        bg[pos] = 0
        rank = bg.argsort(1, descending=True).argsort(1)
        k = (neg_pos_ratio * pos.sum(1, keepdim=True)).clamp(max=cls_t.shape[1] - 1)
        neg = rank < k
    loss_c = ce[pos | neg].sum()
    return (loss_l + loss_c) / num_pos


def torch_bench(width: float, batch: int, iters: int, loc_t, cls_t, host) -> dict[str, float]:
    import numpy as np
    import torch
    from torch_reference import LRF, randomize

    model = randomize(LRF(300, 81, width=width, align_corners=False)).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    # caffe-style input: BGR minus the mean, NCHW
    x = torch.tensor(np.ascontiguousarray(host["image"][..., ::-1].transpose(0, 3, 1, 2)))
    x = x - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    lt = torch.tensor(np.asarray(loc_t))
    ct = torch.tensor(np.asarray(cls_t)).long()
    fwd, bwd, upd = [], [], []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        loc, conf = model(x)
        loss = torch_multibox(loc, conf, lt, ct)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i:  # first iteration is warm-up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
    f, b, u = (statistics.median(v) for v in (fwd, bwd, upd))
    return dict(forward=f, backward=b, update=u, step=f + b + u)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="width 0.125, batch 2, 1 iteration")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--models", default="lrf300,daipnet300")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.width, args.iters = 2, 0.125, 1
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    import jax

    print(
        f"device {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads {threads}, "
        f"batch {args.batch}, width {args.width}"
    )
    results: dict[str, float] = {}
    host, loc_t, cls_t = targets(args.batch, args.width)
    t = torch_bench(args.width, args.batch, args.iters, loc_t, cls_t, host)
    print(
        f"PyTorch lrf300: forward {t['forward']:.3f}s backward {t['backward']:.3f}s "
        f"update {t['update']:.3f}s step {t['step']:.3f}s ({args.batch / t['step']:.2f} img/s)",
        flush=True,
    )
    for k in ("forward", "backward", "update", "step"):
        results[f"train_step_torch_lrf300_{k}_s"] = t[k]
    for variant in args.models.split(","):
        r = jax_bench(variant, args.width, args.batch, args.iters)
        print(
            f"JAX {variant}: forward {r['forward']:.3f}s backward {r['backward']:.3f}s "
            f"update+match {r['update']:.3f}s step {r['step']:.3f}s "
            f"({args.batch / r['step']:.2f} img/s; compile {r['compile']:.0f}s, "
            f"{r['params'] / 1e6:.2f}M params)",
            flush=True,
        )
        for k in ("forward", "backward", "update", "step"):
            results[f"train_step_jax_{variant}_{k}_s"] = r[k]
    if "train_step_jax_lrf300_step_s" in results:
        fr = results["train_step_jax_lrf300_forward_s"] / t["forward"]
        sr = results["train_step_jax_lrf300_step_s"] / t["step"]
        results["train_step_lrf300_forward_ratio"] = fr
        results["train_step_lrf300_step_ratio"] = sr
        print(
            f"LRF300 JAX/PyTorch: forward {fr:.2f}x (target <= 1.0), step {sr:.2f}x (target <= 1.5)"
        )
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in results.items()))


if __name__ == "__main__":
    main()
