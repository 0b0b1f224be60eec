"""BatchNorm's gradient: Flax's autodiff against a hand-written VJP, on a conv-BN-ReLU stack.

    python bench/batchnorm_grad.py            # CPU sizes (about a minute on 2 cores)
    python bench/batchnorm_grad.py --quick    # tiny sizes: checks the script runs
    python bench/batchnorm_grad.py --batch 32 --size 38 --channels 512 --dtype bfloat16  # a GPU

A lead for the train step's reduction time on accelerators (docs/design.md, "Accelerators"):
the model's 65 BatchNorm layers go through `flax.linen.BatchNorm`, whose autodiff gradient
differentiates through the batch mean and variance as separate reductions; the closed form
needs only Σdy and Σdy·x̂. `CustomVJPBatchNorm` below is that closed form with Flax's variable
names, forward and batch statistics. This script times the train step (loss, gradient, SGD
update) of the same stack with each, back to back in one process (median of `--iters` calls),
and prints the compiled programs' fusion and reduction counts and the largest gradient
difference. Imports jax, flax and numpy only (runs on the GPU image as it is). Last line:
`RESULT bn_grad_step_ratio=<flax time / custom time> ...` (> 1: the custom VJP is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from common import print_result


# ------------------------------------------------------------------ the candidate
def _batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over all but the channel axis, as Flax: at least float32,
    E[x²] − E[x]² clipped at 0."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = xf.mean(axes)
    return mean, jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)


def _bn_forward(x, scale, bias, eps, dtype):
    mean, var = _batch_stats(x)
    rstd = jax.lax.rsqrt(var + eps)
    y = jnp.asarray((x - mean) * (rstd * scale) + bias, dtype)  # Flax's order of operations
    return (y, mean, var), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bn_train(x, scale, bias, eps, dtype):
    """Training-mode BatchNorm [..., C] → (y, batch mean, batch variance); mean and variance
    only feed the running averages and carry no gradient."""
    return _bn_forward(x, scale, bias, eps, dtype)[0]


def _bn_backward(eps, dtype, res, cotangents):
    del eps, dtype
    x, mean, rstd, scale = res
    dy = cotangents[0]
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    g = dy.astype(mean.dtype)
    xhat = (x - mean) * rstd
    sum_g = g.sum(axes)
    sum_gx = (g * xhat).sum(axes)
    dx = (scale * rstd / n) * (n * g - sum_g - xhat * sum_gx)
    return dx.astype(x.dtype), sum_gx.astype(scale.dtype), sum_g.astype(scale.dtype)


bn_train.defvjp(_bn_forward, _bn_backward)


class CustomVJPBatchNorm(nn.Module):
    """`flax.linen.BatchNorm` (same variables, forward and running averages; no axis_name, no
    mask) whose training gradient is `bn_train`'s closed form."""

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        if self.use_running_average:
            mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
            return jnp.asarray((x - ra_mean.value) * mul + bias, self.dtype)
        y, mean, var = bn_train(x, scale, bias, self.epsilon, self.dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


@contextlib.contextmanager
def closed_form_batchnorm() -> Iterator[int]:
    """While open, every BatchNorm the daipnet_jax models build is a `CustomVJPBatchNorm` (the
    same variables, eps and momentum): the whole-model A/B of `bench/accelerator.py`. Patches
    `batch_norm` in each models module holding it (modules are traced when a jitted function
    first runs, so compile inside); yields how many modules were patched."""
    import importlib
    import pkgutil

    from daipnet_jax import models
    from daipnet_jax.models import layers

    original = layers.batch_norm

    def closed_form(train: bool, dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
        return CustomVJPBatchNorm(
            use_running_average=not train,
            momentum=layers.BN_MOMENTUM,
            epsilon=layers.BN_EPSILON,
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    patched = []
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"{models.__name__}.{info.name}")
        if getattr(module, "batch_norm", None) is original:
            module.batch_norm = closed_form  # type: ignore[attr-defined]
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.batch_norm = original  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the benchmark
class Stack(nn.Module):
    """`layers` × (3×3 conv without bias → BatchNorm → ReLU) at `channels`, then a mean."""

    layers: int
    channels: int
    custom: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.layers):  # named: both variants get the same variables
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            x = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, name=f"conv{i}", **kw)(x)
            bn = CustomVJPBatchNorm if self.custom else nn.BatchNorm
            x = bn(use_running_average=False, name=f"bn{i}", **kw)(x)
            x = nn.relu(x)
        return jnp.mean(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))


def train_step(net: Stack) -> Callable[..., Any]:
    """Loss, gradient and an SGD update of `net`'s variables; also returns the gradient."""

    def step(params, stats, x):
        def loss_fn(p):
            return net.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
        return params, new["batch_stats"], loss, grads

    return jax.jit(step)


def op_counts(compiled_text: str) -> tuple[int, int]:
    """(fusion instructions, reduce instructions) in a compiled program's HLO text."""
    fusions = len(re.findall(r"= \S+ fusion\(", compiled_text))
    return fusions, len(re.findall(r"\breduce\(", compiled_text))


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two pytrees of arrays of the same structure."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=19, help="feature map side")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.size, args.channels, args.layers, args.iters = 2, 5, 8, 2, 2
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.size, args.size, 16))
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}); batch {args.batch}, "
        f"{args.size}x{args.size}, {args.layers} x conv3x3-BN-ReLU at {args.channels}, {args.dtype}"
    )
    steps, variables, out, counts = {}, {}, {}, {}
    for custom in (False, True):
        name = "custom" if custom else "flax"
        net = Stack(args.layers, args.channels, custom, dtype)
        v = net.init(jax.random.PRNGKey(0), x)
        step = train_step(net)
        counts[name] = op_counts(step.lower(v["params"], v["batch_stats"], x).compile().as_text())
        steps[custom], variables[custom] = step, v
        out[custom] = jax.device_get(step(v["params"], v["batch_stats"], x))
        print(f"{name}: compiled program with {counts[name][0]} fusions, {counts[name][1]} reduces")

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.iters):  # interleaved: both see the same machine load
        for custom, step in steps.items():
            v = variables[custom]
            t = time.perf_counter()
            jax.block_until_ready(step(v["params"], v["batch_stats"], x))
            times[custom].append(time.perf_counter() - t)
    t_flax, t_custom = (statistics.median(times[c]) for c in (False, True))
    diff = max_abs_diff(out[False][3], out[True][3])  # gradients
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(out[False][3]))
    stats_diff = max_abs_diff(out[False][1], out[True][1])
    print(
        f"train step: flax {1e3 * t_flax:.2f} ms, custom VJP {1e3 * t_custom:.2f} ms "
        f"({t_flax / t_custom:.3f}x); largest gradient difference {diff:.3g} (largest gradient "
        f"{scale:.3g}), running statistics {stats_diff:.3g}"
    )
    print_result(
        {
            "bn_grad_flax_ms": f"{1e3 * t_flax:.3f}",
            "bn_grad_custom_ms": f"{1e3 * t_custom:.3f}",
            "bn_grad_step_ratio": f"{t_flax / t_custom:.3f}",
            "bn_grad_fusions_flax": counts["flax"][0],
            "bn_grad_fusions_custom": counts["custom"][0],
            "bn_grad_reduces_flax": counts["flax"][1],
            "bn_grad_reduces_custom": counts["custom"][1],
            "bn_grad_max_diff": f"{diff / scale:.3g}",
        }
    )


if __name__ == "__main__":
    main()
