"""Accelerator benchmark: forward, train step (with MFU), detect, and a PyTorch LRF300 anchor.

One process, one device, synthetic data made on the device, a time budget (default 400 s of
measurement after start-up, so that the whole run stays under 8 minutes on one GPU: a section
that would start too late is skipped and printed as such). Imports jax, flax, optax, numpy,
ml_collections, absl and (for the anchor only) torch; never TensorFlow (checked at the end).

Sections (run in the order that puts the headline numbers first: DAIPNet300 forward, the
bfloat16 train steps and their A/Bs (6, 7), the PyTorch anchor, detect, then the other
models, float32 training and the batch search):
1. Forward (eval mode, jitted, device-resident images): latency at batch 1 and throughput at
   batch 32, float32 and bfloat16 (`model.dtype`), for DAIPNet300, LRF300, SSD300, DAIPNet512.
2. Train step (`training.step.make_train_step`: matching, train-mode forward, MultiBox loss,
   gradient, SGD update) at batch 32, float32 and bfloat16, DAIPNet300 and LRF300; images/s and
   model FLOPs utilisation = XLA's cost-analysis FLOPs of the step lowered for the CPU
   (`cpu_flops`) / step time / the device's dense peak (`PEAKS`; "n/a" for an unknown device).
   float32 is compared with the TF32 peak at JAX's default matmul precision (XLA GPU runs
   float32 convolutions and dots on TF32 tensor cores then), with the float32 peak under
   `jax_default_matmul_precision=highest`.
3. PyTorch LRF300 (the tests' reference model, `tests/torch_reference.py`): eager,
   channels_last, autocast bfloat16 on CUDA (float32 on CPU); forward at batch 1 and 32 and the
   train step at batch 32 (same MultiBox loss as `bench/train_step.py`, SGD momentum): the ratio
   anchors. Skipped with a note without torch.
4. `postprocess.detect` on the device at batch 1 and 32 (COCO 300 trained-like outputs of
   `bench/postprocess.py`).
5. The largest bfloat16 train-step batch that fits (DAIPNet300), doubling from 64 up to 512.
6. On CUDA, the bfloat16 DAIPNet300 train step again in a child process without convolutions
   in CUDA graphs (`DAIPNET_GPU_CONV_GRAPHS=0`, docs/design.md, "Accelerators"): the ratio.
7. The same step with every BatchNorm's gradient in closed form (`bench/batchnorm_grad.py`,
   `closed_form_batchnorm`): the ratio to Flax's BatchNorm.

    python bench/accelerator.py                 # full sizes (one GPU: < 8 minutes)
    python bench/accelerator.py --quick         # width 0.0625, batch 2, DAIPNet300 only, bf16
                                                # train step, no batch search: a CPU smoke test
    python bench/accelerator.py --profile_dir /tmp/prof   # also: device time per kernel of
                                                # DAIPNet300 bf16 (10 batch-1 forwards, 3 steps)
    python bench/accelerator.py --only "forward daipnet300"   # a subset of the sections
    python bench/accelerator.py --only "forward lrf300,train float32,search"  # several subsets
    make bench-accel

JAX is limited to 70 % of the accelerator's memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`), leaving
the rest to PyTorch in the same process. Last line: `RESULT key=value ...` (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.70")

from common import jit_detect, median_time, parse_results, print_result  # noqa: E402

from daipnet_jax import platform  # noqa: E402

platform.setup()

#: Dense peak TFLOP/s per chip: (bfloat16, tf32, float32); matched in order on `device_kind`.
PEAKS: list[tuple[tuple[str, ...], tuple[float, float, float]]] = [
    (("H200",), (989.0, 495.0, 67.0)),
    (("H100", "PCIe"), (756.0, 378.0, 51.0)),
    (("H100",), (989.0, 495.0, 67.0)),  # SXM
    (("A100",), (312.0, 156.0, 19.5)),
]
FORWARD_MODELS = ("daipnet300", "lrf300", "ssd300", "daipnet512")
TRAIN_MODELS = ("daipnet300", "lrf300")
DTYPES = ("float32", "bfloat16")
#: Op-name fragments the profile summary groups device time by (first match wins).
OP_KINDS = (
    "convolution",
    "cudnn",
    "gemm",
    "dot",
    "sort",
    "reduce",
    "transpose",
    "copy",
    "scatter",
    "gather",
    "fusion",
)


def peak_flops(device_kind: str, dtype: str, precision: str | None) -> float | None:
    """The device's dense peak FLOP/s for `dtype` (TF32 for float32 unless 'highest')."""
    for needles, (bf16, tf32, f32) in PEAKS:
        if all(n.lower() in device_kind.lower() for n in needles):
            if dtype == "bfloat16":
                return bf16 * 1e12
            return (f32 if precision in ("highest", "float32") else tf32) * 1e12
    return None


def flops_of(lowered: Any) -> float | None:
    """XLA's cost-analysis FLOPs of a lowered, not yet optimised program (None where not
    reported)."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # backends behind a PJRT plugin (CUDA) do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float(value) if value else None


def cpu_flops(jitted: Any, *args: Any) -> float | None:
    """FLOPs of `jitted(*args)` as XLA counts them in the program lowered for the CPU.

    The count of the unoptimised program does not depend on the device, and neither GPU count
    is usable: the compiled program's convolutions are cuDNN calls counted as 0 FLOPs, and the
    lowered program's analysis is not implemented behind the CUDA plugin.
    """
    import jax

    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]):
        return flops_of(jitted.lower(*abstract))


def warm_median(fn: Callable[[], Any], iters: int, warm_s: float) -> float:
    """Median seconds of `fn()` over `iters` calls, after calling it for `warm_s` seconds (at
    least once): timed right after compilation, an idle GPU's batch-1 calls read slow
    (docs/design.md, "Accelerators")."""
    end = time.perf_counter() + warm_s
    fn()
    while time.perf_counter() < end:
        fn()
    return median_time(fn, iters, warmup=0)


def gflop(flops: float | None, batch: int) -> str:
    return f"{flops / batch / 1e9:.1f}" if flops else "n/a"


class Budget:
    """Wall-clock budget: `ok(name, need_s)` says whether a section may still start."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def ok(self, name: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append(name)
        print(f"  {name}: skipped (time budget: {self.left():.0f} s left, needs ~{need_s:.0f} s)")
        return False


# ------------------------------------------------------------------ JAX
def make_config(variant: str, width: float, dtype: str, batch: int) -> Any:
    from daipnet_jax.config import base_config

    c = base_config(variant, "coco", width=width)
    c.model.dtype = dtype
    c.train.batch_size = batch
    c.data.max_boxes = 8
    return c


def device_images(batch: int, size: int, seed: int = 0) -> Any:
    import jax
    import jax.numpy as jnp

    make = jax.jit(lambda k: jax.random.uniform(k, (batch, size, size, 3), jnp.float32) * 255.0)
    return make(jax.random.key(seed))


def device_batch(config: Any, mesh: Any, seed: int = 0) -> dict[str, Any]:
    """A train batch made on the device: images, 1..max_boxes random boxes per image."""
    import jax
    import jax.numpy as jnp

    from daipnet_jax import sharding

    b, s, g = config.train.batch_size, config.model.image_size, config.data.max_boxes
    k = config.model.num_classes - 1

    def make(key: Any) -> dict[str, Any]:
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        centre = jax.random.uniform(k1, (b, g, 2), minval=0.25, maxval=0.75)
        size = jax.random.uniform(k2, (b, g, 2), minval=0.1, maxval=0.4)
        boxes = jnp.clip(jnp.concatenate([centre - size / 2, centre + size / 2], -1), 0.0, 1.0)
        count = jax.random.randint(k3, (b, 1), 1, g + 1)
        return {
            "image": jax.random.uniform(k4, (b, s, s, 3), jnp.float32) * 255.0,
            "boxes": boxes,
            "labels": jax.random.randint(k5, (b, g), 1, k + 1, jnp.int32),
            "mask": jnp.arange(g)[None, :] < count,
        }

    return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))(jax.random.key(seed))


_VARIABLES: dict[tuple[str, float], Any] = {}


def variables_for(variant: str, width: float) -> Any:
    """Random float32 variables (`init_variables`), shared by both dtypes and the train step."""
    import jax

    from daipnet_jax import models
    from daipnet_jax.training import state as state_lib

    if (variant, width) not in _VARIABLES:
        c = make_config(variant, width, "float32", 1)
        _VARIABLES[(variant, width)] = state_lib.init_variables(
            models.build(c), c, jax.random.PRNGKey(0)
        )
    return _VARIABLES[(variant, width)]


def forward_bench(
    variant: str,
    width: float,
    dtype: str,
    batches: tuple[int, ...],
    iters: int,
    profile_dir: str = "",
    warm_s: float = 1.0,
):
    """{batch: seconds per call} of the jitted eval forward, plus FLOPs at the last batch; with
    `profile_dir`, 10 more calls at the first batch are traced there (`jax.profiler`)."""
    import jax

    from daipnet_jax import models

    c = make_config(variant, width, dtype, batches[-1])
    model = models.build(c)
    variables = variables_for(variant, width)
    out: dict[int, float] = {}
    flops = None
    for batch in dict.fromkeys(batches):
        images = device_images(batch, c.model.image_size)
        forward = jax.jit(lambda v, x: model.apply(v, x))
        if batch == batches[-1]:
            flops = cpu_flops(forward, variables, images)
        compiled = forward.lower(variables, images).compile()

        def run(f: Any = compiled, x: Any = images) -> None:
            jax.block_until_ready(f(variables, x))

        # batch 1 is launch-bound and noisy on a GPU: more calls for its median
        out[batch] = warm_median(run, 5 * iters if batch == 1 else iters, warm_s)
        if profile_dir and batch == batches[0]:
            with jax.profiler.trace(profile_dir):
                for _ in range(10):
                    run()
    return out, flops


def train_bench(
    variant: str,
    width: float,
    dtype: str,
    batch: int,
    iters: int,
    profile_dir: str = "",
    warm_s: float = 1.0,
) -> dict[str, Any]:
    """Seconds per train step, its FLOPs, and the final loss (finite) at `batch`; with
    `profile_dir`, 3 more steps are traced there (`jax.profiler`)."""
    import jax

    from daipnet_jax import boxes, models, sharding
    from daipnet_jax.training import schedule as sched_lib
    from daipnet_jax.training import state as state_lib
    from daipnet_jax.training import step as step_lib

    c = make_config(variant, width, dtype, batch)
    model = models.build(c)
    sched = sched_lib.learning_rate_schedule(c, 1000)
    tx = sched_lib.make_optimizer(c, sched)
    mesh = sharding.make_mesh(jax.devices()[:1])
    variables = variables_for(variant, width)
    # a copy: the step donates its state, and `variables` is shared with other sections
    state = jax.tree_util.tree_map(
        lambda x: x.copy(),
        jax.device_put(
            state_lib.create_train_state(variables, tx, jax.random.PRNGKey(1)),
            sharding.replicated(mesh),
        ),
    )
    batch_g = device_batch(c, mesh)
    step = step_lib.make_train_step(c, model, tx, sched, boxes.prior_boxes(c), mesh)
    cpu_mesh = sharding.make_mesh(jax.devices("cpu")[:1])
    cpu_step = step_lib.make_train_step(c, model, tx, sched, boxes.prior_boxes(c), cpu_mesh)
    flops = cpu_flops(cpu_step, state, batch_g)  # before the step donates `state`
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_g).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state, "metrics": None}

    def run() -> None:
        holder["state"], holder["metrics"] = compiled(holder["state"], batch_g)
        jax.block_until_ready(holder["metrics"])

    sec = warm_median(run, iters, warm_s)
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(3):
                run()
    loss = float(holder["metrics"]["loss"])  # type: ignore[index]
    return dict(step=sec, flops=flops, compile=compile_s, loss=loss)


def selected(name: str, only: str) -> bool:
    """Whether section `name` runs under `--only`: every word of one of its comma-separated
    selectors is in the name (an empty `--only` selects everything)."""
    selectors = [s.split() for s in only.split(",") if s.strip()]
    return not selectors or any(all(w in name for w in words) for words in selectors)


def conv_graphs_off(environ: Any) -> dict[str, str]:
    """A child's environment without the convolution CUDA-graph flags `platform.setup()` added:
    `DAIPNET_GPU_CONV_GRAPHS=0`, those flags taken out of `XLA_FLAGS`, and no preallocation (the
    parent holds `XLA_PYTHON_CLIENT_MEM_FRACTION` of the device)."""
    env = dict(environ)
    flags = env.get("XLA_FLAGS", "").replace(platform.XLA_GPU_CONV_GRAPH_FLAGS, "")
    env["XLA_FLAGS"] = " ".join(flags.split())
    env["DAIPNET_GPU_CONV_GRAPHS"] = "0"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.25"
    return env


def is_oom(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text


def largest_batch(
    step_seconds: Callable[[int], float], start: int, bound: int, budget: Budget, need_s: float
) -> tuple[int, float] | None:
    """Doubling from `start` up to `bound`: the largest batch whose step ran, and its seconds.

    Stops at the first out-of-memory error (other errors propagate) or when the budget ends.
    """
    largest, batch = None, start
    while batch <= bound and budget.ok(f"train batch {batch}", need_s):
        try:
            sec = step_seconds(batch)
        except Exception as err:  # XLA reports OOM as a runtime error at compile or run time
            if not is_oom(err):
                raise
            print(f"  batch {batch}: out of memory")
            break
        largest = (batch, sec)
        print(f"  batch {batch}: {batch / sec:.1f} img/s", flush=True)
        batch *= 2
    return largest


def detect_bench(
    batches: tuple[int, ...], iters: int, quick: bool, warm_s: float = 1.0
) -> dict[int, float]:
    """{batch: seconds per call} of jitted `postprocess.detect` on device-resident outputs."""

    import jax
    import numpy as np
    from postprocess import synthetic_outputs

    from daipnet_jax.boxes import prior_boxes
    from daipnet_jax.config import base_config

    cfg = base_config("daipnet300", "coco")
    priors = np.asarray(prior_boxes(cfg))
    num_classes = cfg.model.num_classes
    if quick:
        priors, num_classes = priors[::20], 11
    fn = jit_detect(cfg)
    out = {}
    dev_priors = jax.device_put(priors)
    for batch in batches:
        loc, logits = (jax.device_put(x) for x in synthetic_outputs(priors, batch, num_classes))

        def run(a: Any = loc, g: Any = logits) -> None:
            jax.block_until_ready(fn(a, g, dev_priors))

        out[batch] = warm_median(run, iters, warm_s)
    return out


# ------------------------------------------------------------------ PyTorch anchor
def torch_bench(
    width: float, batches: tuple[int, ...], iters: int, warm_s: float = 1.0
) -> dict[str, float] | None:
    """PyTorch LRF300: forward seconds at each batch and the train step at the last one."""
    try:
        import torch
        from torch_reference import LRF, randomize
        from train_step import torch_multibox
    except ImportError as err:
        print(f"  PyTorch LRF300: skipped ({err})")
        return None
    import jax
    import numpy as np

    from daipnet_jax import boxes as boxes_lib
    from daipnet_jax import sharding

    cuda = torch.cuda.is_available()
    # fixed input sizes: let cuDNN pick its fastest algorithms, as a tuned PyTorch run would
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda" if cuda else "cpu")
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    net = randomize(LRF(300, 81, width=width, align_corners=False)).to(dev)
    net = net.to(memory_format=torch.channels_last)
    out: dict[str, float] = {}
    net.eval()
    for batch in batches:
        x = torch.rand(batch, 3, 300, 300, device=dev).mul(255).sub(117)
        x = x.contiguous(memory_format=torch.channels_last)

        def fwd(x: Any = x) -> None:
            with torch.inference_mode(), torch.autocast(**amp):  # type: ignore[arg-type]
                net(x)
            sync()

        out[f"forward_b{batch}"] = warm_median(fwd, iters, warm_s)
    batch = batches[-1]
    c = make_config("lrf300", width, "float32", batch)
    mesh = sharding.make_mesh(jax.devices()[:1])
    b = device_batch(c, mesh)
    loc_t, cls_t = jax.jit(
        lambda b: boxes_lib.match(b["boxes"], b["labels"], b["mask"], boxes_lib.prior_boxes(c))
    )(b)
    lt = torch.tensor(np.asarray(loc_t), device=dev)
    ct = torch.tensor(np.asarray(cls_t), device=dev).long()
    x = torch.rand(batch, 3, 300, 300, device=dev).mul(255).sub(117)
    x = x.contiguous(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def train() -> None:
        with torch.autocast(**amp):  # type: ignore[arg-type]
            loc, conf = net(x)
        loss = torch_multibox(loc.float(), conf.float(), lt, ct)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    out["train_step"] = warm_median(train, iters, warm_s)
    return out


# ------------------------------------------------------------------ profile
def profile_summary(path: str, top: int = 20) -> list[str]:
    """Lines summarising a `jax.profiler` trace: device time per XLA op, largest first.

    Reads the device planes ('/device:GPU:0', ...) of the trace's `.xplane.pb`; on a device
    plane the 'XLA Ops' line holds one event per executed HLO op (the per-stream kernel lines are
    the fallback).
    """
    import glob

    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True))
    if not files:
        return [f"  no .xplane.pb under {path}"]
    data = ProfileData.from_file(files[-1])
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:") or "CPU" in plane.name:
            continue
        lines = {line.name: line for line in plane.lines}
        if "XLA Ops" in lines:
            chosen = [lines["XLA Ops"]]
        else:  # kernels, one line per stream
            chosen = [line for name, line in lines.items() if name.startswith("Stream")]
        for line in chosen:
            for event in line.events:
                totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
                counts[event.name] = counts.get(event.name, 0) + 1
    if not totals:
        return ["  no device events in the trace (CPU run?)"]
    whole = sum(totals.values())
    out = [f"  device op time {whole / 1e6:.2f} ms over {sum(counts.values())} op executions"]
    groups: dict[str, float] = {}
    for name, ns in totals.items():
        kind = next((k for k in OP_KINDS if k in name.lower()), "other")
        groups[kind] = groups.get(kind, 0.0) + ns
    out.append(
        "  by kind: "
        + ", ".join(
            f"{k} {100 * v / whole:.1f}%" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
        )
    )
    for name, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * ns / whole:5.1f}% {ns / 1e6:8.3f} ms x{counts[name]:<4d} {name[:90]}")
    return out


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="width 0.0625, batch 2, 1 iteration, fewer parts"
    )
    ap.add_argument("--budget_s", type=float, default=400.0, help="measurement time budget")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--max_batch", type=int, default=512, help="bound of the batch search")
    ap.add_argument(
        "--only",
        default="",
        help="run only the sections whose name holds every word of one comma-separated "
        "selector, e.g. 'forward daipnet300' or 'forward lrf300,train float32,search' (names: "
        "'forward|train <model> <dtype>', 'conv graphs', 'bn grad', torch, detect, search)",
    )
    ap.add_argument(
        "--profile_dir",
        default="",
        help="trace 10 batch-1 forwards and 3 train steps of DAIPNet300 bfloat16 here "
        "(jax.profiler) and print the device time per kernel",
    )
    args = ap.parse_args()
    forward_models, train_models, dtypes_train = FORWARD_MODELS, TRAIN_MODELS, DTYPES
    if args.quick:
        args.width, args.batch, args.iters = 0.0625, 2, 1
        forward_models, train_models, dtypes_train = ("daipnet300",), ("daipnet300",), ("bfloat16",)

    import jax

    start = time.perf_counter()
    budget = Budget(args.budget_s)
    dev = jax.devices()[0]
    kind = dev.device_kind
    precision = jax.config.jax_default_matmul_precision
    print(
        f"jax {jax.__version__}, device {kind} ({dev.platform}) x{jax.device_count()}, "
        f"width {args.width}, batch {args.batch}, {args.iters} timed iterations, "
        f"matmul precision {precision or 'default'}, budget {args.budget_s:.0f} s, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    results: dict[str, str] = {"accel_device": kind.replace(" ", "_"), "width": f"{args.width:g}"}
    b = args.batch
    # rough seconds a measurement needs (compile + runs), scaled down in quick mode
    need = {"forward": 40.0, "train": 90.0, "torch": 60.0, "detect": 30.0, "search": 90.0}
    warm_s = 1.0  # seconds of calls before each timing
    if args.quick:
        need, warm_s = dict.fromkeys(need, 0.0), 0.0

    def forward(variant: str, dtype: str) -> None:
        if not budget.ok(f"forward {variant} {dtype}", need["forward"]):
            return
        t0 = time.perf_counter()
        profile = ""
        if args.profile_dir and (variant, dtype) == ("daipnet300", "bfloat16"):
            profile = os.path.join(args.profile_dir, "forward_b1")
        times, flops = forward_bench(
            variant, args.width, dtype, (1, b), args.iters, profile, warm_s
        )
        tag = f"{variant}_{dtype}"
        results[f"fwd_{tag}_b1_ms"] = f"{1e3 * times[1]:.3f}"
        results[f"fwd_{tag}_b{b}_img_s"] = f"{b / times[b]:.1f}"
        peak = peak_flops(kind, dtype, precision)
        mfu = f"{100 * flops / times[b] / peak:.1f}" if flops and peak else "n/a"
        results[f"fwd_{tag}_b{b}_mfu_pct"] = mfu
        print(
            f"  forward {variant:<11} {dtype:<9} b1 {1e3 * times[1]:8.3f} ms   b{b} "
            f"{b / times[b]:9.1f} img/s   MFU {mfu} %  "
            f"({gflop(flops, b)} GFLOP/img, {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        if profile:
            print("  10 traced calls at batch 1:", flush=True)
            print("\n".join(profile_summary(profile, top=8)), flush=True)

    def train(variant: str, dtype: str) -> None:
        if not budget.ok(f"train {variant} {dtype}", need["train"]):
            return
        profile = ""
        if args.profile_dir and (variant, dtype) == ("daipnet300", "bfloat16"):
            profile = os.path.join(args.profile_dir, "train")
        r = train_bench(variant, args.width, dtype, b, args.iters, profile, warm_s)
        peak = peak_flops(kind, dtype, precision)
        mfu = f"{100 * r['flops'] / r['step'] / peak:.1f}" if r["flops"] and peak else "n/a"
        tag = f"{variant}_{dtype}"
        results[f"train_{tag}_b{b}_img_s"] = f"{b / r['step']:.1f}"
        results[f"train_{tag}_b{b}_mfu_pct"] = mfu
        print(
            f"  train b{b} {variant:<11} {dtype:<9} {b / r['step']:9.1f} img/s  step "
            f"{1e3 * r['step']:8.1f} ms  MFU {mfu} %  ({gflop(r['flops'], b)} GFLOP/img, "
            f"compile {r['compile']:.0f} s, "
            f"loss {r['loss']:.3f})",
            flush=True,
        )
        if profile:
            print("  3 traced steps:", flush=True)
            print("\n".join(profile_summary(profile)), flush=True)

    base_key = f"train_daipnet300_bfloat16_b{b}_img_s"  # the step both A/Bs compare with

    def ab_result(name: str, suffix: str, img_s: float, what: str, inverse: bool = False) -> None:
        """Record an A/B of the bfloat16 DAIPNet300 step: the variant's images/s and
        `<name>_train_speedup` (variant over this run's step; `inverse`: the other way)."""
        base = float(results[base_key])
        ratio = base / img_s if inverse else img_s / base
        results[f"train_daipnet300_bfloat16_b{b}_img_s_{suffix}"] = f"{img_s:.1f}"
        results[f"{name}_train_speedup"] = f"{ratio:.3f}"
        print(f"  train b{b} daipnet300 bfloat16 {what}: {img_s:.1f} img/s ({name} "
              f"speed-up {ratio:.3f}x)", flush=True)  # fmt: skip

    def conv_graphs() -> None:
        # XLA reads its flags once per process: the step without convolutions in CUDA graphs
        # runs in a child started with the user's flags and `DAIPNET_GPU_CONV_GRAPHS=0`.
        # --quick runs it on any device: the child's plumbing is tested on CPU (tests/test_bench.py)
        if (dev.platform != "gpu" and not args.quick) or base_key not in results:
            print("  conv graphs A/B: skipped (needs CUDA and this run's bfloat16 DAIPNet300 step)")
            return
        if not budget.ok("conv graphs A/B", need["train"] + 30):
            return
        env = conv_graphs_off(os.environ)
        cmd = [sys.executable, __file__, "--only", "train daipnet300 bfloat16", "--batch", str(b)]
        cmd += ["--iters", str(args.iters), "--width", str(args.width)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--budget_s", str(int(budget.left()))]
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=budget.left() + 120, check=False
        )
        child = parse_results(proc.stdout)
        if proc.returncode or base_key not in child:
            print(f"  conv graphs A/B: the child failed (exit {proc.returncode}):")
            print("\n".join((proc.stdout + proc.stderr).splitlines()[-5:]))
            return
        # the baseline is the variant here: the speed-up is that of the graphs
        ab_result("conv_graphs", "no_conv_graphs", float(child[base_key]), "without convolutions "
                  "in CUDA graphs", inverse=True)  # fmt: skip

    def bn_grad() -> None:
        # The model's BatchNorm layers with the closed-form gradient of bench/batchnorm_grad.py
        # (same variables and numbers; docs/design.md, "Accelerators"), the same step otherwise.
        if base_key not in results:
            print(
                "  closed-form BatchNorm A/B: skipped (needs this run's bfloat16 DAIPNet300 step)"
            )
            return
        if not budget.ok("bn grad", need["train"]):
            return
        from batchnorm_grad import closed_form_batchnorm

        with closed_form_batchnorm():
            r = train_bench("daipnet300", args.width, "bfloat16", b, args.iters, "", warm_s)
        ab_result("closed_form_bn", "closed_form_bn", b / r["step"], "with closed-form "
                  f"BatchNorm gradients (loss {r['loss']:.3f})")  # fmt: skip

    def torch_anchor() -> None:
        if not budget.ok("PyTorch LRF300", need["torch"]):
            return
        t = torch_bench(args.width, (1, b), args.iters, warm_s)
        if t is None:
            return
        results["torch_lrf300_b1_ms"] = f"{1e3 * t['forward_b1']:.3f}"
        results[f"torch_lrf300_b{b}_img_s"] = f"{b / t[f'forward_b{b}']:.1f}"
        results[f"torch_lrf300_train_b{b}_img_s"] = f"{b / t['train_step']:.1f}"
        print(
            f"  PyTorch LRF300 (autocast bf16 on CUDA, channels_last): b1 "
            f"{1e3 * t['forward_b1']:.3f} ms, b{b} {b / t[f'forward_b{b}']:.1f} img/s, "
            f"train step {b / t['train_step']:.1f} img/s",
            flush=True,
        )
        for key, ours in (
            ("fwd_b1_latency", "fwd_lrf300_bfloat16_b1_ms"),
            (f"train_b{b}", f"train_lrf300_bfloat16_b{b}_img_s"),
            (f"daipnet300_train_b{b}", f"train_daipnet300_bfloat16_b{b}_img_s"),
        ):
            if ours in results:
                if "fwd" in key:
                    ratio = 1e3 * t["forward_b1"] / float(results[ours])
                else:
                    ratio = float(results[ours]) / (b / t["train_step"])
                name = key if key.startswith("daipnet") else f"lrf300_{key}"
                results[f"{name}_bf16_vs_torch_lrf300"] = f"{ratio:.2f}"
                print(f"  {name} bf16: JAX / PyTorch LRF300 speed {ratio:.2f}x")

    def detect() -> None:
        if not budget.ok("detect", need["detect"]):
            return
        d = detect_bench((1, b), args.iters, args.quick, warm_s)
        for batch, sec in d.items():
            results[f"detect_b{batch}_ms_per_img"] = f"{1e3 * sec / batch:.3f}"
        print(
            "  detect on device: "
            + ", ".join(f"b{k} {1e3 * v / k:.3f} ms/img" for k, v in d.items()),
            flush=True,
        )

    def search() -> None:
        if args.quick:
            print("  largest batch search: skipped in --quick (tests/test_bench.py tests it)")
            return
        print("  largest bfloat16 train batch (DAIPNet300), doubling:")

        def train_at(batch: int) -> float:
            return train_bench(
                "daipnet300", args.width, "bfloat16", batch, max(1, args.iters // 2), "", warm_s
            )["step"]

        found = largest_batch(train_at, 2 * b, args.max_batch, budget, need["search"])
        if found is not None:
            results["train_daipnet300_bfloat16_largest_batch"] = str(found[0])
            results["train_daipnet300_bfloat16_largest_img_s"] = f"{found[0] / found[1]:.1f}"

    # Most important first, so that a short budget still yields the headline numbers: DAIPNet300
    # latency, the bfloat16 train steps and their PyTorch anchor, detect; then the rest.
    sections: list[tuple[str, Callable[[], None]]] = [
        ("forward daipnet300 bfloat16", lambda: forward("daipnet300", "bfloat16")),
        ("forward daipnet300 float32", lambda: forward("daipnet300", "float32")),
        *(
            (f"train {v} bfloat16", lambda v=v: train(v, "bfloat16"))
            for v in train_models
            if "bfloat16" in dtypes_train
        ),
        ("conv graphs", conv_graphs),
        ("bn grad", bn_grad),
        ("torch", torch_anchor),
        ("detect", detect),
        *(
            (f"forward {v} {d}", lambda v=v, d=d: forward(v, d))
            for v in forward_models[1:]
            for d in DTYPES
        ),
        *(
            (f"train {v} float32", lambda v=v: train(v, "float32"))
            for v in train_models
            if "float32" in dtypes_train
        ),
        ("search", search),
    ]
    for name, section in sections:
        if selected(name, args.only):
            section()

    assert "tensorflow" not in sys.modules, "something imported TensorFlow"
    total = time.perf_counter() - start
    results["skipped_sections"] = str(len(budget.skipped))
    results["wall_s"] = f"{total:.0f}"
    print(f"total {total:.0f} s; skipped: {', '.join(budget.skipped) or 'none'}")
    print_result(results)


if __name__ == "__main__":
    main()
