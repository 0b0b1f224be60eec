"""The mesh, the local → global batch builder and the device prefetch iterator."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from daipnet_jax import sharding


def test_global_batch_single_process():
    mesh = sharding.make_mesh(jax.devices()[:1])
    batch = {"image": np.ones((2, 4, 4, 3), np.float32), "mask": np.array([[True], [False]])}
    out = sharding.global_batch(batch, mesh)
    assert isinstance(out["image"], jax.Array) and out["image"].shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(np.asarray(out["mask"]), batch["mask"])
    assert out["image"].sharding.spec == P("data")
    assert set(sharding.global_batch(batch, mesh, ("mask",))) == {"mask"}


def test_put_replicated_keeps_values():
    mesh = sharding.make_mesh()
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(2.5)}
    out = sharding.put_replicated(tree, sharding.replicated(mesh))
    assert out["w"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(out["w"]), tree["w"])
    assert float(out["b"]) == 2.5


@pytest.mark.parametrize("size", [1, 3])
def test_device_prefetch_keeps_order_and_reads_ahead(size):
    """Batches come out in source order as device arrays; the source is read `size` ahead."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"x": np.full((2, 3), i, np.float32), "skip": np.zeros(2)}

    it = sharding.DevicePrefetch(source(), mesh, ("x",), size=size)
    assert len(pulled) == size  # transferred before the first step asks
    got = []
    for b in it:
        assert isinstance(b["x"], jax.Array) and set(b) == {"x"}
        got.append(int(np.asarray(b["x"])[0, 0]))
        assert len(pulled) == min(len(got) + size, 5)
    assert got == [0, 1, 2, 3, 4]
