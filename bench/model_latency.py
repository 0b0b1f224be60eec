"""Model forward latency: JAX (XLA CPU, jitted) vs the PyTorch reference models, one process.

Models (COCO, 81 classes, 300×300, float32, eval mode / inference):

- `daipnet300`: ours `configs/coco.py:daipnet300` (ipn/affm/pafm) vs `DAIPNetTorch` of
  `tests/torch_reference_daipnet.py` (independent PyTorch reference, same architecture);
- `lrf300`: ours `lrf300` (lsn/lrf/lrf) vs `torch_reference.LRF` (the official `vaesl/LRF-Net`
  layer structure);
- `ssd300`: ours `ssd300` vs `torch_reference.SSD300` (ssd.pytorch layout).

Method: random weights (the values do not change the cost); a fixed random image batch in
[0, 255]; JAX: `jax.jit(model.apply)` on device-resident inputs, `block_until_ready`, one
compile + one warm-up call, then the median of `--iters` calls. PyTorch: `torch.inference_mode`,
`torch.set_num_threads(2)` (this machine's core count; XLA CPU uses every core by default), one
warm-up call, then the median of `--iters`. `ratio` = PyTorch time / JAX time (> 1: JAX faster).
The 1-minute load average is printed before and after: the machine is shared, so numbers taken
under load are noisy and pessimistic for both sides.

    python bench/model_latency.py                 # full width, batch 1 and 8 (minutes on 2 cores)
    python bench/model_latency.py --quick         # width 0.125, batch 1, 1 iteration (smoke test)

Last line: `RESULT daipnet300_b1_ms=... daipnet300_b1_torch_ms=... daipnet300_b1_vs_torch=...
daipnet300_b1_img_s=... ... load_avg_1m=...` (JAX numbers unsuffixed; `_torch_` for PyTorch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import median_time, print_result  # noqa: E402

from daipnet_jax import platform  # noqa: E402

platform.setup()  # as train.py runs: XLA:CPU flag on CPU-only runs, quiet logs

MODELS = ("daipnet300", "lrf300", "ssd300")
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)


def random_variables(shapes: dict) -> dict:
    """Random float32 variables for a tree of `jax.ShapeDtypeStruct`s, made with NumPy.

    choice: not `jax.jit(model.init)`, whose XLA compile took minutes on the loaded 2-core
    machine (and timings do not depend on the values). Kernels He-normal (fan-in), BatchNorm
    scale / var 1, everything else (biases, means, AFFM ω) 0.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)

    def make(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def jax_latency(variant: str, width: float, batch: int, iters: int) -> tuple[float, float]:
    """(compile + first call seconds, median forward seconds) of our jitted model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from daipnet_jax import models
    from daipnet_jax.config import base_config

    cfg = base_config(variant, "coco", width=width)
    model = models.build(cfg)
    s = int(cfg.model.image_size)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(0, 255, (batch, s, s, 3)).astype(np.float32))
    variables = random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1]))
    forward = jax.jit(lambda v, x: model.apply(v, x))
    t = time.perf_counter()
    jax.block_until_ready(forward(variables, images))
    compile_s = time.perf_counter() - t
    sec = median_time(lambda: jax.block_until_ready(forward(variables, images)), iters)
    return compile_s, sec


def torch_model(variant: str, width: float):
    """The PyTorch reference network for `variant`, random weights, eval mode."""
    import torch_reference as ref
    import torch_reference_daipnet as dref

    if variant == "daipnet300":
        net = dref.DAIPNetTorch(300, 81, width, "ipn", "affm", "pafm", align_corners=False)
    elif variant == "lrf300":
        net = ref.LRF(300, 81, width=width, align_corners=False)
    elif variant == "ssd300":
        net = ref.SSD300(81, width=width)
    else:
        raise ValueError(variant)
    return ref.randomize(net, seed=0)


def torch_latency(variant: str, width: float, batch: int, iters: int) -> float:
    """Median forward seconds of the PyTorch reference (inference mode, 2 threads)."""
    import numpy as np
    import torch

    net = torch_model(variant, width)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-128, 128, (batch, 3, 300, 300)).astype(np.float32))

    def run() -> None:
        with torch.inference_mode():
            net(x)

    return median_time(run, iters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="width 0.125, batch 1, 1 iteration")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args(argv)
    width, batches, iters = args.width, args.batches, args.iters
    if args.quick:
        width, batches, iters = 0.125, [1], 1

    import jax
    import torch

    torch.set_num_threads(2)
    load0 = os.getloadavg()[0]
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cores), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); width {width}, "
        f"float32, {iters} timed iterations; load average (1 min) at start {load0:.2f}"
    )
    header = f"{'model':<12}{'batch':>6}{'jax ms':>11}{'torch ms':>11}{'jax img/s':>11}"
    header += f"{'torch img/s':>13}{'torch/jax':>11}{'compile s':>11}"
    print(header)
    results: dict[str, str] = {}
    for variant in args.models:
        for batch in batches:
            compile_s, jax_s = jax_latency(variant, width, batch, iters)
            torch_s = torch_latency(variant, width, batch, iters)
            ratio = torch_s / jax_s
            print(
                f"{variant:<12}{batch:>6}{1e3 * jax_s:>11.1f}{1e3 * torch_s:>11.1f}"
                f"{batch / jax_s:>11.2f}{batch / torch_s:>13.2f}{ratio:>11.2f}{compile_s:>11.1f}",
                flush=True,
            )
            key = f"{variant}_b{batch}"
            results[f"{key}_ms"] = f"{1e3 * jax_s:.1f}"
            results[f"{key}_torch_ms"] = f"{1e3 * torch_s:.1f}"
            results[f"{key}_vs_torch"] = f"{ratio:.3f}"
            results[f"{key}_img_s"] = f"{batch / jax_s:.3f}"
            results[f"{key}_torch_img_s"] = f"{batch / torch_s:.3f}"
    load1 = os.getloadavg()[0]
    print(f"load average (1 min) at end {load1:.2f}")
    results["width"] = f"{width:g}"
    results["load_avg_1m"] = f"{max(load0, load1):.2f}"
    print_result(results)


if __name__ == "__main__":
    main()
