"""Model summary:

    python -m daipnet_jax.models --config configs/coco.py:daipnet300 [--batch 1] [--noflops] \
        [--config.key=value ...]

Parameters per component (`jax.eval_shape`, nothing initialised), output shapes, priors and
XLA's forward GFLOPs (`--noflops` skips the compilation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from daipnet_jax.models import build, model_spec


def count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def forward_flops(model: Any, variables: Any, images: Any) -> float:
    """FLOPs of one eval-mode forward as XLA's cost analysis reports them."""
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    if not cost:
        return float("nan")
    return float(cost.get("flops", float("nan")))


def summary(config: Any, batch: int = 1, flops: bool = True) -> None:
    spec = model_spec(config)
    model = build(config)
    size = spec.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    loc, logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)

    m = config.model
    print(f"model: {config.get('name', '?')}  family={m.family}", end="")
    if m.family != "ssd":
        print(f" aux={m.aux} fusion={m.fusion} topdown={m.topdown}", end="")
    print(f"  size={size} classes={m.num_classes} width={m.width} dtype={m.dtype}")
    print(f"{'component':<12}{'params':>14}")
    for name, sub in variables["params"].items():
        print(f"{name:<12}{count(sub):>14,}")
    print(f"{'total':<12}{count(variables['params']):>14,}")
    print(f"batch-norm statistics: {count(variables.get('batch_stats', {})):,}")
    print(f"outputs: loc {list(loc.shape)} {loc.dtype}, logits {list(logits.shape)} {logits.dtype}")
    print(
        f"priors: {spec.num_priors} (feature maps {list(spec.feature_maps)}, k {list(spec.anchors)})"
    )
    if flops:
        concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
        gflops = forward_flops(model, concrete, jnp.zeros(images.shape, images.dtype)) / 1e9
        print(f"forward GFLOPs (batch {batch}, XLA cost analysis): {gflops:.2f}")


def run(argv: Sequence[str] | None = None) -> None:
    from daipnet_jax import platform

    platform.setup()  # before a JAX backend starts and TensorFlow loads
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (file.py:arg)", lock_config=False)
    flags.DEFINE_integer("batch", 1, "batch size of the shapes and the FLOP count")
    flags.DEFINE_boolean("flops", True, "compile once for XLA's FLOP count (--noflops: skip)")
    flags.mark_flags_as_required(["config"])

    def _main(args: Sequence[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        FLAGS = flags.FLAGS
        try:
            summary(FLAGS.config, FLAGS.batch, FLAGS.flops)
        except (ValueError, KeyError) as e:
            cli.fail(f"config: {e}")

    from daipnet_jax import cli

    cli.run(_main, argv=argv)  # flag and --config errors: one line, exit 2


if __name__ == "__main__":
    run()
