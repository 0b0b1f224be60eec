"""2-D convolution with a hand-written backward pass for XLA:CPU (issue 9, item 8).

Why this exists (measured in `bench/conv_backward.py`, whose docstring has the numbers): with
jaxlib 0.10 XLA:CPU hands every convolution to YNNPACK (`__ynn_fusion` in the compiled HLO).
The forward convolution and the input gradient are as fast as PyTorch's oneDNN there, but the
*weight* gradient is lowered by JAX to a convolution whose window is the whole feature map
(`window={size=150x150}`) and whose contraction is over the batch only (`dim_labels=b01f_01io->b01f`
with the batch as "feature" dimension); YNNPACK runs that 2-4x slower than oneDNN on the
large maps of VGG-16 (conv1_x..conv3_x).

Fixes, all measured (numbers in the bench's docstring):

* `conv2d` here (config `model.conv_impl = 'taps'`; the fastest on the whole VGG stack, no flag
  needed): forward and input gradient are XLA's own; the weight gradient is one matrix product
  per kernel tap, `dW[i, j] = X_ij^T @ G`, `X_ij` the strided, shifted [B·H'·W', Cin] slice of
  the padded input and `G` the [B·H'·W', Cout] output cotangent: plain GEMMs with a long
  contraction, which XLA:CPU runs at matmul speed.
* `conv2d_dw3d` (`'dw3d'`): the weight gradient is JAX's own, but of the same convolution
  written as a 3-D one with a unit depth; XLA's YNNPACK rewriter takes only 2-D convolutions, so
  that one runs on XLA's Eigen convolution, which handles the shape well.
* the process-wide XLA flag `XLA_CPU_FAST_CONV_FLAGS` (YNNPACK off for convolutions only, so
  Eigen runs all of them), set before JAX starts: `add_fast_conv_flags`; with it the plain
  `lax` convolution's gradient is about PyTorch's.

Layouts: NHWC activations, HWIO kernels (Flax's convention), explicit padding pairs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, MutableMapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

#: XLA flags that route XLA:CPU convolutions to Eigen instead of YNNPACK (jaxlib 0.10); dots and
#: element-wise fusions keep YNNPACK. Must be in `XLA_FLAGS` before the JAX backend starts.
XLA_CPU_FAST_CONV_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def add_fast_conv_flags(environ: MutableMapping[str, str] | None = None) -> bool:
    """Append `XLA_CPU_FAST_CONV_FLAGS` to `environ['XLA_FLAGS']` (default `os.environ`).

    Returns False (and changes nothing) when the user already set a YNNPACK fusion type, or when
    the JAX backend is already running (the flag would be ignored). Call it before the first JAX
    computation, e.g. at the top of `train.py`.
    choice: opt-in, because the flag name is specific to XLA:CPU builds that have YNNPACK (older
    jaxlibs reject unknown flags at start-up).
    """
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in current:
        return False
    if environ is None:
        try:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                return False
        except (ImportError, AttributeError):  # private API; without it, trust the caller
            pass
    env["XLA_FLAGS"] = (current + " " + XLA_CPU_FAST_CONV_FLAGS).strip()
    return True


def conv2d_xla(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    dilation: Sequence[int] = (1, 1),
) -> jax.Array:
    """Plain `lax.conv_general_dilated`: x [B,H,W,Cin], kernel [kh,kw,Cin,Cout] -> [B,H',W',Cout]."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=[(int(lo), int(hi)) for lo, hi in padding],
        rhs_dilation=tuple(dilation),
        dimension_numbers=_DIMENSION_NUMBERS,
    )


def _weight_grad_taps(
    x: jax.Array,
    g: jax.Array,
    kernel_hw: Pair,
    strides: Pair,
    padding: Padding,
    dilation: Pair,
) -> jax.Array:
    """dL/dkernel [kh,kw,Cin,Cout] from x [B,H,W,Cin] and g = dL/dy [B,H',W',Cout].

    y[b,p,q,o] = Σ_{i,j,c} xp[b, p·s_h + i·d_h, q·s_w + j·d_w, c] · k[i,j,c,o], xp = x padded, so
    dk[i,j,c,o] = Σ_{b,p,q} xp[b, p·s_h + i·d_h, q·s_w + j·d_w, c] · g[b,p,q,o]: one GEMM per tap.
    """
    kh, kw = kernel_hw
    b, ho, wo, cout = g.shape
    cin = x.shape[-1]
    (pt, pb), (pl, pr) = padding
    # lax.pad also crops for negative pads.
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    g2 = g.reshape(b * ho * wo, cout)
    taps = []
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            xs = lax.slice(
                xp,
                (0, r0, c0, 0),
                (b, r0 + (ho - 1) * strides[0] + 1, c0 + (wo - 1) * strides[1] + 1, cin),
                (1, strides[0], strides[1], 1),
            )
            taps.append(
                lax.dot_general(
                    xs.reshape(b * ho * wo, cin),
                    g2,
                    (((0,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )
            )
    return jnp.stack(taps).reshape(kh, kw, cin, cout)


def _weight_grad_3d(
    x: jax.Array,
    g: jax.Array,
    kernel_hw: Pair,
    strides: Pair,
    padding: Padding,
    dilation: Pair,
) -> jax.Array:
    """dL/dkernel [kh,kw,Cin,Cout] as the VJP of the same convolution written as a 3-D one.

    x [B,H,W,Cin] -> [B,1,H,W,Cin], kernel -> [1,kh,kw,Cin,Cout]: the values are unchanged, but
    XLA:CPU's YNNPACK rewriter only takes 2-D convolutions, so JAX's weight-gradient convolution
    of the 3-D form runs on XLA's Eigen convolution, which is fast for this shape (full-map
    window, batch as contraction) where YNNPACK is not.
    """
    kh, kw = kernel_hw
    cin, cout = x.shape[-1], g.shape[-1]

    def conv3(k: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            x[:, None],
            k,
            window_strides=(1, *strides),
            padding=[(0, 0), *padding],
            rhs_dilation=(1, *dilation),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )

    k0 = jnp.zeros((1, kh, kw, cin, cout), x.dtype)
    _, vjp = jax.vjp(conv3, k0)  # the primal conv is unused and removed by XLA's DCE
    (dk,) = vjp(g[:, None])
    return dk[0]


_WEIGHT_GRADS = {"taps": _weight_grad_taps, "dw3d": _weight_grad_3d}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv2d_custom(
    x: jax.Array, kernel: jax.Array, strides: Pair, padding: Padding, dilation: Pair, method: str
) -> jax.Array:
    return conv2d_xla(x, kernel, strides=strides, padding=padding, dilation=dilation)


def _conv2d_custom_fwd(
    x: jax.Array,
    kernel: jax.Array,
    strides: Pair,
    padding: Padding,
    dilation: Pair,
    method: str,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = conv2d_xla(x, kernel, strides=strides, padding=padding, dilation=dilation)
    return y, (x, kernel)


def _conv2d_custom_bwd(
    strides: Pair,
    padding: Padding,
    dilation: Pair,
    method: str,
    res: tuple[jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    # Input gradient: XLA's own transposed convolution (as fast as oneDNN's on this machine).
    _, vjp_x = jax.vjp(
        lambda x_: conv2d_xla(x_, kernel, strides=strides, padding=padding, dilation=dilation), x
    )
    (dx,) = vjp_x(g)
    kernel_hw = (int(kernel.shape[0]), int(kernel.shape[1]))
    if strides != (1, 1):
        # choice: strided convolutions (only small maps in SSD's extras, where XLA's own weight
        # gradient is as fast as PyTorch's) keep XLA's weight gradient; both reformulations
        # measured slower there.
        _, vjp_k = jax.vjp(
            lambda k_: conv2d_xla(x, k_, strides=strides, padding=padding, dilation=dilation),
            kernel,
        )
        (dk,) = vjp_k(g)
    else:
        dk = _WEIGHT_GRADS[method](x, g, kernel_hw, strides, padding, dilation)
    return dx, dk.astype(kernel.dtype)


_conv2d_custom.defvjp(_conv2d_custom_fwd, _conv2d_custom_bwd)


def _normalise(
    strides: Sequence[int], padding: Sequence[Sequence[int]], dilation: Sequence[int]
) -> tuple[Pair, Padding, Pair]:
    s = (int(strides[0]), int(strides[1]))
    p = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
    d = (int(dilation[0]), int(dilation[1]))
    return s, p, d


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    dilation: Sequence[int] = (1, 1),
) -> jax.Array:
    """Convolution with the per-tap GEMM weight gradient ('taps'; the fastest measured).

    Args:
      x: [B, H, W, Cin] input.
      kernel: [kh, kw, Cin, Cout] (HWIO).
      strides: (s_h, s_w).
      padding: ((top, bottom), (left, right)), explicit.
      dilation: kernel (atrous) dilation (d_h, d_w).

    Returns:
      [B, H', W', Cout], H' = (H + top + bottom - d_h·(kh-1) - 1) // s_h + 1; value and gradients
      equal `conv2d_xla`'s to float32 rounding. Forward and input gradient are XLA's; strided
      convolutions keep XLA's weight gradient too.
    """
    s, p, d = _normalise(strides, padding, dilation)
    return _conv2d_custom(x, kernel, s, p, d, "taps")


def conv2d_dw3d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    dilation: Sequence[int] = (1, 1),
) -> jax.Array:
    """As `conv2d`, but the weight gradient is the VJP of the convolution written in 3-D ('dw3d')."""
    s, p, d = _normalise(strides, padding, dilation)
    return _conv2d_custom(x, kernel, s, p, d, "dw3d")


#: `config.model.conv_impl` -> implementation.
CONV_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "xla": conv2d_xla,
    "taps": conv2d,
    "dw3d": conv2d_dw3d,
}


def get_conv(impl: str) -> Callable[..., jax.Array]:
    """The conv function for `config.model.conv_impl` ('xla' | 'taps' | 'dw3d')."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl must be one of {sorted(CONV_IMPLS)}, got {impl!r}")
    return CONV_IMPLS[impl]
