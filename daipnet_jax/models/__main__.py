"""Model summary: `python -m daipnet_jax.models --config configs/coco.py:daipnet300 [--batch 1]`.

Prints the parameters per top-level component and in total, the BatchNorm statistics count, the
output shapes, the number of priors and the forward GFLOPs of one batch from XLA's cost analysis
(`jax.jit(apply).lower(...).compile().cost_analysis()`). Parameters are counted with
`jax.eval_shape` (nothing is initialised); `--no-flops` skips the compilation.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from typing import Any

import jax
import jax.numpy as jnp

from daipnet_jax.models import build, model_spec


def load_config(spec: str) -> Any:
    """`path/to/file.py[:arg]` → the file's `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_daipnet_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="e.g. configs/coco.py:daipnet300")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-flops", action="store_true")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    spec = model_spec(config)
    model = build(config)
    size = spec.image_size
    images = jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32)
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
    if not args.no_flops:
        concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
        flops = forward_flops(model, concrete, jnp.zeros(images.shape, images.dtype))
        print(f"forward GFLOPs (batch {args.batch}, XLA cost analysis): {flops / 1e9:.2f}")


if __name__ == "__main__":
    main()
