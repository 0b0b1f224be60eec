"""The train state: everything a checkpoint holds besides the data position.

`TrainState` is a pytree (flax.struct) so that one jitted step can take and donate it whole:
`step` (updates applied), `params`, `batch_stats`, `opt_state`, `rng` (raw uint32[2] key data,
so it checkpoints as a plain array) and the NaN guard's record `bad_step` / `bad_term`
(-1 / 0 while every step has been finite; see `step.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 []
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray  # uint32 [2]
    bad_step: jnp.ndarray  # int32 [], -1 while all steps were finite
    bad_term: jnp.ndarray  # int32 [], bit 1 loc, 2 conf, 4 grad

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def _dummy(config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
    size = int(config.model.image_size)
    return jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)


def init_variables(
    model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array
) -> dict[str, Any]:
    """Fresh `{'params', 'batch_stats'}` from a [1, S, S, 3] dummy image (float32 params).

    The draws use an `unsafe_rbg` key made from `rng` (a pure function of it): XLA compiles one
    random-number kernel per parameter, and threefry's take 2-10x longer to compile than
    RngBitGenerator's (measured in docs/design.md, "Initialisation").
    """
    key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="unsafe_rbg")
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(key, jnp.zeros(_dummy(config).shape, jnp.float32))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(
    variables: dict[str, Any], tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """State at step 0 for `variables` (e.g. from `init_variables`, possibly VGG-merged)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jnp.asarray(rng, jnp.uint32),
        bad_step=jnp.full((), -1, jnp.int32),
        bad_term=jnp.zeros((), jnp.int32),
    )


BAD_TERMS = {1: "loc loss", 2: "conf loss", 4: "gradient"}


def describe_bad_term(code: int) -> str:
    """'loc loss', 'conf loss + gradient', ... from the guard's bit mask."""
    return " + ".join(name for bit, name in BAD_TERMS.items() if code & bit) or "unknown"
