"""Test support for tests/test_training.py and tests/test_multihost.py (training).

- `TinyDetector`: a small stand-in Flax detector (convs + BatchNorm + SSD-style heads) whose
  outputs match the prior count of a 300 config, so the training machinery (sharding, resume,
  multi-process) is tested at a cost of seconds rather than a full model compile.
- `synthetic_batches`: a deterministic in-memory stream of training batches: global batch i is
  drawn from `np.random.default_rng([seed, i])`; process p of n gets rows p·b … (p+1)·b − 1.
- `tiny_train_config`: a config for both.
- `python tests/training_support.py --workdir DIR ...`: one training run (a worker for the
  subprocess tests: several devices via XLA_FLAGS, several processes via jax.distributed, kill -9
  and SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tiny_train_config(
    batch_size: int = 4, total_steps: int = 3, variant: str = "lrf300", **train: Any
):
    from daipnet_jax.config import base_config

    c = base_config(variant, "generated", width=0.0625)
    c.model.num_classes = c.data.generated_num_classes + 1
    c.data.max_boxes = 4
    c.train.batch_size = batch_size
    c.train.total_steps = total_steps
    c.train.train_examples = 64
    c.train.warmup_epochs = 0
    c.train.base_lr = 0.02
    c.train.log_every_steps = 1
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 10
    for k, v in train.items():
        c.train[k] = v
    return c


def synthetic_global_batch(config: Any, index: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Global batch `index`: images with one bright box per object, valid boxes and labels."""
    rng = np.random.default_rng([seed, index])
    b, s, g = int(config.train.batch_size), int(config.model.image_size), int(config.data.max_boxes)
    k = int(config.model.num_classes) - 1
    images = rng.uniform(0, 60, (b, s, s, 3)).astype(np.float32)
    centre = rng.uniform(0.25, 0.75, (b, g, 2))
    size = rng.uniform(0.1, 0.4, (b, g, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], -1).clip(0, 1).astype(np.float32)
    labels = rng.integers(1, k + 1, (b, g)).astype(np.int32)
    count = rng.integers(1, g + 1, (b,))
    mask = np.arange(g)[None, :] < count[:, None]
    for i in range(b):
        for j in range(int(count[i])):
            x0, y0, x1, y1 = (boxes[i, j] * s).astype(int)
            images[i, y0:y1, x0:x1, labels[i, j] % 3] = 200.0 + 20 * labels[i, j]
    return {"image": images, "boxes": boxes, "labels": labels, "mask": mask}


def synthetic_batches(
    config: Any,
    process_index: int,
    process_count: int,
    *,
    slow_after: int = -1,
    nan_at: int = -1,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the deterministic global stream (see module docstring)."""
    b = int(config.train.batch_size) // process_count
    i = 0
    while True:
        if 0 <= slow_after <= i:
            time.sleep(1.0)
        batch = synthetic_global_batch(config, i)
        if i == nan_at:
            batch["image"][0, 0, 0, 0] = np.nan
        yield {k: v[process_index * b : (process_index + 1) * b] for k, v in batch.items()}
        i += 1


def tiny_detector(config: Any):
    """The stand-in detector for `config` (priors of a 300 config)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from daipnet_jax.config import anchors_per_location

    anchors = tuple(anchors_per_location(config.priors.aspect_ratios))
    num_classes = int(config.model.num_classes)

    class TinyDetector(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = (x - 100.0) / 60.0
            feats = []
            specs = [(8, "SAME"), (2, "SAME"), (2, "SAME"), (2, "SAME"), (2, "SAME"), (1, "VALID")]
            for stride, pad in specs:
                x = nn.Conv(8, (3, 3), strides=stride, padding=pad, use_bias=False)(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.relu(x)
                feats.append(x)
            locs, confs = [], []
            for f, k in zip(feats, anchors, strict=True):
                bsz = f.shape[0]
                locs.append(nn.Conv(k * 4, (3, 3))(f).reshape(bsz, -1, 4))
                confs.append(nn.Conv(k * num_classes, (3, 3))(f).reshape(bsz, -1, num_classes))
            return jnp.concatenate(locs, 1), jnp.concatenate(confs, 1)

    return TinyDetector()


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--total_steps", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--checkpoint_every_steps", type=int, default=1000)
    p.add_argument("--slow_after", type=int, default=-1)
    p.add_argument("--coordinator", default="")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_default_matmul_precision", "highest")
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from daipnet_jax.training import train_and_evaluate

    config = tiny_train_config(
        args.batch_size, args.total_steps, checkpoint_every_steps=args.checkpoint_every_steps
    )
    print(f"devices {jax.device_count()} processes {jax.process_count()}", flush=True)
    train_and_evaluate(
        config,
        args.workdir,
        model=tiny_detector(config),
        train_iter_fn=lambda c, pi, pc: synthetic_batches(c, pi, pc, slow_after=args.slow_after),
        eval_fn=lambda c, v, s: {},
    )
    print("done", flush=True)


def equivalence_config():
    """The real detector (DAIPNet300, width 0.0625) for the data-parallel equivalence runs."""
    c = tiny_train_config(4, 4, "daipnet300")
    c.train.base_lr = 0.004  # the recipe's; × 4 / 32 with the batch scaling
    return c


def equivalence_runs(
    out: str, init: str, steps: int, device_counts: tuple[int, ...], x64: bool
) -> None:
    """`steps` train steps of `equivalence_config()` from the variables pickled in `init`
    (written there first if missing) on the synthetic global batches 0.., once per device
    count; pickles {n: {'params': [after step 1, after the last step], 'loss': [...],
    'dtype': compute dtype}} to `out`. x64: float64 model, parameters, optimiser state and
    images (the matching targets stay float32 in every run, so all runs share them)."""
    import pickle

    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)
    from daipnet_jax import boxes, models, sharding
    from daipnet_jax import config as config_lib
    from daipnet_jax.training import schedule as schedule_lib
    from daipnet_jax.training import state as state_lib
    from daipnet_jax.training import step as step_lib

    c = equivalence_config()
    if not os.path.exists(init):
        v = state_lib.init_variables(models.build(c), c, jax.random.PRNGKey(0))
        with open(init, "wb") as f:
            pickle.dump(jax.tree_util.tree_map(np.asarray, v), f)
    with open(init, "rb") as f:
        variables = pickle.load(f)
    dtype = np.float64 if x64 else np.float32
    if x64:
        c.model.dtype = "float64"
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), variables)
    model = models.build(c)
    schedule = schedule_lib.learning_rate_schedule(c, config_lib.steps_per_epoch(c, 64))
    tx = schedule_lib.make_optimizer(c, schedule)
    priors = boxes.prior_boxes(c)
    batches = []
    for i in range(steps):
        b = synthetic_global_batch(c, i)
        batches.append({**b, "image": b["image"].astype(dtype)})
    results = {}
    for n in device_counts:
        mesh = sharding.make_mesh(jax.devices()[:n])
        rep = sharding.replicated(mesh)
        state = jax.jit(lambda v: state_lib.create_train_state(v, tx, jax.random.PRNGKey(1)),
                        out_shardings=rep)(variables)  # fmt: skip
        train_step = step_lib.make_train_step(c, model, tx, schedule, priors, mesh)
        kept, losses = [], []
        for i, batch in enumerate(batches):
            state, metrics = train_step(state, sharding.global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
            if i in (0, steps - 1):
                kept.append(jax.tree_util.tree_map(np.asarray, jax.device_get(state.params)))
            assert int(metrics["bad_step"]) < 0, f"non-finite step {i}"
        results[n] = {"params": kept, "loss": losses, "dtype": str(metrics["loss"].dtype)}
        print(f"{n} device(s), {results[n]['dtype']}: losses {losses}", flush=True)
    with open(out, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["equivalence"]:
        # python tests/training_support.py equivalence OUT INIT STEPS DEVICES[,..] f32|f64
        sys.path.insert(0, str(REPO))
        import jax

        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_default_matmul_precision", "highest")
        out, init, steps, devices, kind = sys.argv[2:7]
        counts = tuple(int(d) for d in devices.split(","))
        equivalence_runs(out, init, int(steps), counts, kind == "f64")
    else:
        run()


def optax_and_torch_steps(tx, make_torch_optimizer, lrs, seed: int = 0):
    """Run `tx` (lr from a step-indexed schedule) and a torch optimiser on the same random
    parameter [5, 3] and gradients, one step per entry of `lrs` (the torch lr set before each
    step). Returns (optax params, torch params) as NumPy arrays."""
    import jax
    import optax
    import torch

    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in lrs]
    tp = torch.nn.Parameter(torch.tensor(p0.copy()))
    opt = make_torch_optimizer([tp], lrs[0])
    params = {"w": jax.numpy.asarray(p0)}
    state = tx.init(params)
    for lr, g in zip(lrs, grads, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        tp.grad = torch.tensor(g)
        opt.step()
        updates, state = tx.update({"w": jax.numpy.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["w"]), tp.detach().numpy()
