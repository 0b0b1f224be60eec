"""`daipnet_jax.models.conv`: the 'dw3d' and 'taps' convolutions equal lax.conv_general_dilated in
value and in both gradients; their weight gradients also equal a direct NumPy sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daipnet_jax.models import conv as conv_mod

# (kernel, stride, padding ((t, b), (l, r)), dilation, H, W, Cin, Cout)
CASES = [
    (1, 1, ((0, 0), (0, 0)), 1, 7, 8, 3, 5),
    (1, 2, ((0, 0), (0, 0)), 1, 9, 9, 4, 3),
    (3, 1, ((1, 1), (1, 1)), 1, 9, 10, 3, 4),
    (3, 2, ((1, 1), (1, 1)), 1, 9, 8, 5, 4),
    (3, 2, ((0, 0), (0, 0)), 1, 11, 11, 4, 6),
    (3, 1, ((6, 6), (6, 6)), 6, 13, 12, 4, 3),  # SSD conv6: atrous, pad 6, dilation 6
    (3, 2, ((6, 6), (6, 6)), 6, 15, 14, 3, 4),
    (4, 2, ((1, 1), (1, 1)), 1, 10, 11, 3, 5),
    (4, 1, ((0, 0), (0, 0)), 1, 8, 7, 4, 4),
    (3, 1, ((0, 1), (1, 0)), 1, 8, 9, 3, 3),  # asymmetric padding
]


def _data(k, h, w, cin, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, h, w, cin)).astype(np.float32)
    kern = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(kern)


IMPLS = [conv_mod.conv2d, conv_mod.conv2d_dw3d]


@pytest.mark.parametrize("impl", IMPLS, ids=["taps", "dw3d"])
@pytest.mark.parametrize("k,s,pad,d,h,w,cin,cout", CASES)
def test_value_and_grads_match_xla(impl, k, s, pad, d, h, w, cin, cout):
    x, kern = _data(k, h, w, cin, cout)
    kw = dict(strides=(s, s), padding=pad, dilation=(d, d))
    y_ref = conv_mod.conv2d_xla(x, kern, **kw)
    y = jax.jit(lambda a, b: impl(a, b, **kw))(x, kern)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

    ct = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape).astype(np.float32))

    def loss(f):
        return lambda a, b: jnp.sum(f(a, b, **kw) * ct)

    gx_ref, gk_ref = jax.grad(loss(conv_mod.conv2d_xla), argnums=(0, 1))(x, kern)
    gx, gk = jax.jit(jax.grad(loss(impl), argnums=(0, 1)))(x, kern)
    scale_k = float(jnp.max(jnp.abs(gk_ref)))
    scale_x = float(jnp.max(jnp.abs(gx_ref)))
    np.testing.assert_allclose(gk, gk_ref, rtol=0, atol=2e-5 * scale_k)
    np.testing.assert_allclose(gx, gx_ref, rtol=0, atol=2e-5 * scale_x)


@pytest.mark.parametrize("impl", IMPLS, ids=["taps", "dw3d"])
def test_weight_grad_equals_numpy_sum(impl):
    """dK[i,j,c,o] = Σ_{b,p,q} xp[b, p·s + i·d, q·s + j·d, c] · g[b,p,q,o], written out in NumPy."""
    k, s, d = 3, 2, 2
    pad = ((2, 1), (0, 2))
    x, kern = _data(k, 11, 10, 3, 4, seed=3)
    g = np.random.default_rng(4).standard_normal(
        conv_mod.conv2d_xla(x, kern, strides=(s, s), padding=pad, dilation=(d, d)).shape
    )
    g = g.astype(np.float32)
    _, vjp = jax.vjp(lambda kk: impl(x, kk, strides=(s, s), padding=pad, dilation=(d, d)), kern)
    (gk,) = vjp(jnp.asarray(g))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
    ho, wo = g.shape[1:3]
    want = np.zeros((k, k, 3, 4))
    for i in range(k):
        for j in range(k):
            xs = xp[:, i * d : i * d + (ho - 1) * s + 1 : s, j * d : j * d + (wo - 1) * s + 1 : s]
            want[i, j] = np.einsum("bpqc,bpqo->co", xs, g.astype(np.float64))
    np.testing.assert_allclose(gk, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS, ids=["taps", "dw3d"])
def test_grads_match_finite_differences(impl):
    """Gradients of the custom VJP agree with finite differences (first order, reverse mode)."""
    from jax.test_util import check_grads

    x, kern = _data(3, 7, 6, 2, 3, seed=5)

    def f(a, b):
        return impl(a, b, padding=((1, 1), (2, 0)), dilation=(2, 1))

    check_grads(f, (x, kern), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


def test_weight_grad_leaves_ynnpack():
    """The 'dw3d' weight gradient compiles to a non-YNNPACK convolution (the point of it)."""
    x, kern = _data(3, 40, 40, 32, 32)
    pad = ((1, 1), (1, 1))

    def dk(impl):
        return jax.jit(lambda a, b: jax.grad(lambda kk: jnp.sum(impl(a, kk, padding=pad)))(b))

    hlo = dk(conv_mod.conv2d_dw3d).lower(x, kern).compile().as_text()  # stride 1: the 3-D form
    convs = [ln for ln in hlo.splitlines() if " convolution(" in ln]
    assert any("b012f" in ln for ln in convs), convs  # the 3-D weight-gradient convolution
    np.testing.assert_allclose(
        dk(conv_mod.conv2d_dw3d)(x, kern), dk(conv_mod.conv2d_xla)(x, kern), rtol=1e-4, atol=1e-3
    )


def test_get_conv_and_flags():
    assert conv_mod.get_conv("xla") is conv_mod.conv2d_xla
    assert conv_mod.get_conv("taps") is conv_mod.conv2d
    assert conv_mod.get_conv("dw3d") is conv_mod.conv2d_dw3d
    with pytest.raises(ValueError, match="conv_impl"):
        conv_mod.get_conv("cudnn")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert conv_mod.add_fast_conv_flags(env)
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        conv_mod.XLA_CPU_FAST_CONV_FLAGS,
    ]
    assert not conv_mod.add_fast_conv_flags(env)  # a YNN setting is already there: unchanged
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
