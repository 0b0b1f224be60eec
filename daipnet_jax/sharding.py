"""Data parallelism: one 1-D mesh `data`; batches split over it, parameters replicated."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(
    local: Mapping[str, Any], mesh: Mesh, keys: tuple[str, ...] | None = None
) -> dict[str, jax.Array]:
    """Process p's rows p·b … (p+1)·b − 1 → global `jax.Array`s [b · processes, ...]."""
    sharding = batch_sharding(mesh)
    out = {}
    for k in keys if keys is not None else tuple(local):
        x = np.asarray(local[k])
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


def put_replicated(tree: Any, sharding: NamedSharding) -> Any:
    """Host arrays (identical on every process) → replicated global `jax.Array`s."""

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


class DevicePrefetch(Iterator[dict[str, jax.Array]]):
    """`global_batch` of the next `size` batches, copied while the step runs (docs/design.md,
    Input transfer ahead of the step)."""

    def __init__(
        self,
        source: Iterator[Mapping[str, Any]],
        mesh: Mesh,
        keys: tuple[str, ...] | None = None,
        size: int = 2,
    ):
        self.source = source
        self._mesh, self._keys = mesh, keys
        self._queue: collections.deque[dict[str, jax.Array]] = collections.deque()
        for local in itertools.islice(source, max(size, 1)):
            self._queue.append(global_batch(local, mesh, keys))

    def __next__(self) -> dict[str, jax.Array]:
        if not self._queue:
            raise StopIteration
        out = self._queue.popleft()
        local = next(self.source, None)
        if local is not None:
            self._queue.append(global_batch(local, self._mesh, self._keys))
        return out
