"""Building blocks: ConvBN ("CB" / "CB−"), conv, BatchNorm, PyTorch-exact pooling and resize.

NHWC throughout; every conv has explicit symmetric padding (stride-2 'SAME' pads asymmetrically).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

BN_MOMENTUM = 0.99  # Flax running-average momentum = 1 - PyTorch momentum 0.01
BN_EPSILON = 1e-5


# He-normal fan-out, untruncated: N(0, 2 / (kh·kw·C_out)) (docs/design.md, Initialisation).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def channels(n: int | float, width: float, minimum: int = 1) -> int:
    """`n` channels scaled by `config.model.width`, rounded, at least `minimum`."""
    return max(minimum, round(n * width))


def compute_dtype(name: str) -> Dtype:
    """`model.dtype` as a jnp dtype ('float64': x64 reference runs only)."""
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
    if name not in table:
        raise ValueError(f"model.dtype={name!r}: expected one of {sorted(table)}")
    return table[name]


def wide_dtype(dtype: Any) -> Any:
    """float32 (float64 for a float64 model): dtype of normalisation, pooling, outputs, losses."""
    return jnp.promote_types(dtype, jnp.float32)


def normalize(images: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
    """(x − pixel_mean) / pixel_std: [B, S, S, 3] RGB 0..255 → [B, S, S, 3] float32."""
    x = images.astype(wide_dtype(images.dtype))
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A k×k convolution with explicit symmetric padding, params float32, compute `dtype`."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        bias_init=nn.initializers.zeros,
        name=name,
    )


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm, LRF's eps 1e-5 and PyTorch momentum 0.01 (Flax 0.99)."""
    # Flax's running variance uses the biased batch variance (PyTorch: unbiased); training only.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class ConvBN(nn.Module):
    """CB / CB− (`relu=False`): conv (no bias) → BN → ReLU; [B, H, W, Cin] → [B, H', W', features]."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    relu: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = conv(
            self.features,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = batch_norm(train, self.dtype, name="bn")(x)
        return nn.relu(x) if self.relu else x


def max_pool(
    x: Array, window: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> Array:
    """PyTorch `MaxPool2d(window, stride, padding, ceil_mode)` on [B, H, W, C] (−∞ padding)."""
    # ceil mode: the last window may hang over the edge but never starts in the padding (75 → 38).
    pads = []
    for n in x.shape[1:3]:
        lo = hi = padding
        if ceil_mode:
            out = -(-(n + 2 * padding - window) // stride) + 1
            if (out - 1) * stride >= n + padding:
                out -= 1
            hi = max(padding, (out - 1) * stride + window - n - padding)
        pads.append((lo, hi))
    if window != stride:
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))
    # Non-overlapping windows as a reshape and a max: its gradient is element-wise and fuses
    # with its neighbours, where reduce_window's is a select-and-scatter (docs/design.md,
    # "Max pooling").
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    b, h, w, c = x.shape
    h, w = h // stride, w // stride  # floor mode drops a partial last window
    x = x[:, : h * stride, : w * stride].reshape(b, h, stride, w, stride, c)
    return jnp.max(x, axis=(2, 4))


@functools.lru_cache(maxsize=256)
def linear_indices_weights(
    in_size: int, out_size: int, align_corners: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices (i0, i1) and weights (w0, w1) of PyTorch's 1-D linear interpolation (float32).

    align_corners=False: src = max(0, (dst + 0.5)·in/out − 0.5); True: src = dst·(in − 1)/(out − 1).
    i0 = floor(src), i1 = min(i0 + 1, in − 1), w1 = src − i0, w0 = 1 − w1.
    """
    dst = np.arange(out_size, dtype=np.float32)
    f32 = np.float32
    if align_corners:
        scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0.0)
        src = scale * dst
    else:
        scale = f32(in_size) / f32(out_size)
        src = np.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
    return i0, i1, (f32(1.0) - w1).astype(np.float32), w1


def _interp_axis(x: Array, axis: int, out_size: int, align_corners: bool) -> Array:
    i0, i1, w0, w1 = linear_indices_weights(x.shape[axis], out_size, align_corners)
    shape = [1] * x.ndim
    shape[axis] = out_size
    a = jnp.take(x, jnp.asarray(i0), axis=axis, mode="clip")
    b = jnp.take(x, jnp.asarray(i1), axis=axis, mode="clip")
    return a * jnp.asarray(w0).reshape(shape) + b * jnp.asarray(w1).reshape(shape)


def resize_bilinear(x: Array, size: tuple[int, int], align_corners: bool = False) -> Array:
    """PyTorch `F.interpolate(mode='bilinear')`: [B, H, W, C] → [B, size[0], size[1], C]."""
    # Separable static gathers: exact under any matmul precision; float32 inside.
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    y = x.astype(jnp.float32)
    y = _interp_axis(y, 2, size[1], align_corners)
    y = _interp_axis(y, 1, size[0], align_corners)
    return y.astype(x.dtype)
