"""VGG-16 convolution backward on XLA:CPU against PyTorch (oneDNN): what makes it slow, what fixes it.

    python bench/conv_backward.py                 # batch 8 at 300x300 (several minutes on 2 cores)
    python bench/conv_backward.py --batch 2 --layers   # + per-layer fwd / input-grad / weight-grad
    python bench/conv_backward.py --quick         # tiny sizes: checks the script runs

Times, on this machine and in one run, the forward and the gradient (w.r.t. all conv params and
the input; value_and_grad of sum(y * c), c a fixed random cotangent) of the VGG-16 conv stack
conv1_1..conv5_3 with ReLUs and the 2x2 max pools pool1..pool4 (ceil mode, 300 -> 150 -> 75 -> 38
-> 19), for PyTorch (2 threads) and for each JAX formulation below. Formulations that need XLA
flags run in a child process (flags are read when the backend starts); every process also times
PyTorch, interleaved round-robin with its JAX variants, and each variant's ratio is taken against
the PyTorch time of its own process. Each number is the minimum of `--reps` runs. Last line:
`RESULT conv_grad_ratio_plain=<xla/torch> conv_grad_ratio_best=<best/torch> best=<name>`.

Formulations (`--variants`, comma separated; `name@flags` runs `name` in a child process with
the flag set `flags`):
  xla            lax.conv_general_dilated, JAX's own VJP (the baseline)
  taps           custom_vjp, weight gradient as one GEMM per kernel tap (dW[i,j] = X_ij^T G),
                 forward and input gradient XLA's
  dw3d           custom_vjp, weight gradient = JAX's VJP of
                 the same conv written as a 3-D conv with unit depth (YNNPACK takes only 2-D
                 convs, so XLA runs it on Eigen)
  patches        custom_vjp, weight gradient as one im2col GEMM, patches from
                 lax.conv_general_dilated_patches
  im2col         custom_vjp, weight gradient as one im2col GEMM, patches by concatenating the
                 9 shifted slices
  nchw           lax conv in NCHW / OIHW dimension numbers
  @noynnconv     XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
                 (YNNPACK off for convolutions only; dots and fusions keep it)
  @noynn         --xla_cpu_experimental_ynn_fusion_type= (YNNPACK off entirely)
  @onednn        --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true

What was found (jax/jaxlib 0.10.2, torch 2.13.0, 2-core AMD EPYC VM shared with other jobs):

* Profile (per conv shape, `--layers`, batch 2; XLA / PyTorch): forward 0.5-1.1x and input
  gradient 0.3-1.0x at every VGG shape: not the problem. The *weight gradient* is: 2.0x at
  300x300 64->64, 2.9-4.3x at 150x150 128->128, 1.7x at 75x75 256->256, ~1.0x at 38x38 and
  19x19 (512). The compiled HLO (`jax.jit(f).lower(...).compile().as_text()`) shows why: every
  convolution is a `__ynn_fusion` (YNNPACK, XNNPACK's successor; `--xla_cpu_use_xnnpack` and
  `--xla_cpu_use_onednn` do not govern it), and JAX's weight-gradient convolution is
  `convolution(x^T, g^T), window={size=150x150 pad=1_1x1_1}, dim_labels=b01f_01io->b01f`: the
  input channels act as batch, the *batch* (2..8) is the contracted feature dimension and the
  whole feature map is the window. YNNPACK runs that shape far from peak; oneDNN has a dedicated
  backward-weights kernel. XLA:CPU GEMMs themselves run at 120-170 GFLOP/s on 2 cores, like
  PyTorch's (K=45000, M=N=128).
* `@noynnconv` (Eigen convolutions): per layer, weight gradient 0.6-1.2x PyTorch, forward and
  input gradient unchanged (0.5-1.0x). `@noynn` the same for convolutions. `@onednn`: no change
  (convolutions stay YNNPACK). `daipnet_jax.platform.setup()` sets the first
  flag on CPU-only runs (must run before JAX starts; process-wide).
* Per layer with the reformulations (`--layers`, batch 2, load average ~6; ms and / PyTorch):
      H=W x Cin->Cout     fwd         dx          dw xla      dw taps     dw dw3d
      300x3->64         48 0.37x    50 0.31x    74 0.97x    82 1.09x   126 1.66x
      300x64->64       232 0.59x   226 0.63x   749 2.15x   916 2.63x   932 2.67x
      150x64->128      104 0.76x    90 0.66x   669 4.84x   240 1.73x   319 2.30x
      150x128->128     207 0.99x   191 0.87x   880 3.55x   447 1.80x   580 2.34x
      75x128->256      122 1.02x   106 0.78x   250 1.88x   158 1.19x   175 1.32x
      75x256->256      208 1.04x   172 0.83x   428 1.88x   324 1.42x   371 1.63x
      38x256->512      104 0.86x   108 0.87x   107 0.70x   117 0.77x   146 0.96x
      38x512->512      248 1.33x   229 1.10x   299 1.24x   324 1.34x   294 1.22x
      19x512->512       54 0.65x    51 0.61x    46 0.53x    61 0.70x    80 0.90x
  `taps` (no flag) roughly halves the weight gradient at 150x150 and 75x75 but is slower than
  plain at 300x300x64 (9 slice copies of a big input with few channels) and on the small maps;
  `dw3d` (no flag) sits between. A per-shape mix (taps only for 75..150 maps) would gain a
  little more; not done.
* Tried and not better: im2col by `conv_general_dilated_patches` (that op is itself a
  convolution with an identity kernel: 1.3-2.7x slower than plain), im2col by concatenated slices
  (1.2-2.0x PyTorch), 3 width-shifted copies + 3 row GEMMs (1.1-2.1x), G^T X instead of X^T G
  (as taps), NCHW/OIHW dimension numbers (layout assignment transposes back to the same YNNPACK
  conv: same time), `precision=HIGHEST` / `preferred_element_type` (same HLO). The input
  gradient (XLA's transposed conv) was never slow, so it is left to XLA. bf16 not tried (the
  comparison is float32). Strided convs keep XLA's weight gradient in `taps`/`dw3d` (both
  were slower on the small strided maps of SSD's extras).

Whole stack (value_and_grad w.r.t. params and input, forward = inference; min of 3; PyTorch
2 threads; each ratio against PyTorch timed interleaved in the same process):

  batch 8 (load average 8-12 from teammates' jobs: PyTorch suffered most, 40 s instead of ~9 s;
  the ratios below 1 are an artefact of that load, the ordering is not):
      variant          fwd s   grad s   grad/torch
      torch           14.42    40.24
      xla              9.88    68.66    1.71
      dw3d             9.50    15.98    0.40
      taps             5.29    13.39    0.33
      torch (child)    6.36    18.74
      xla@noynnconv    5.41    17.20    0.92
  batch 4 (load average 4-7):
      torch            4.78    14.40
      xla              4.20    21.45    1.49
      dw3d             3.74    17.24    1.20
      taps             4.09    15.74    1.09
      torch (child)    4.47    12.83
      xla@noynnconv    2.75    10.72    0.84
  So: plain XLA's gradient is 1.5-1.7x PyTorch's on this stack (2.1-2.4x measured before on an
  idle machine); `taps` brings it to ~1.1x (-27% at batch 4, -80% at batch 8 under load), `dw3d`
  to ~1.2x, the flag to 0.8-0.9x (best). Recommendation (adopted): CPU-only runs set the flag
  (`daipnet_jax.platform.setup()`, called by every entry point); the custom-VJP formulations live
  only here, with their gradients checked against JAX's in every run.
* Noise: the machine is shared (load average 4-12 during these runs, 2 cores), so absolute times
  vary 2-5x between runs and PyTorch's OpenMP threads suffer more from the oversubscription
  than XLA's; ratios against PyTorch timed interleaved in the same process vary by about ±20%
  between runs. Rerun on an idle machine for publishable absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

FLAG_SETS = {
    "noynnconv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "noynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
}
# (cin, cout) of conv1_1..conv5_3; "M" = 2x2 max pool (ceil mode).
VGG_CFG: list = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _layers(width: float) -> list:
    return [v if v == "M" else max(1, int(v * width)) for v in VGG_CFG]


def _init(batch: int, size: int, width: float, seed: int = 0):
    """NumPy params [(w HWIO, b)], input NHWC, cotangent NHWC of the stack output."""
    rng = np.random.default_rng(seed)
    params, cin, s = [], 3, size
    for v in _layers(width):
        if v == "M":
            s = -(-s // 2)
            continue
        w = rng.standard_normal((3, 3, cin, v), np.float32) * np.sqrt(2.0 / (9 * cin))
        params.append((w.astype(np.float32), np.zeros(v, np.float32)))
        cin = v
    x = rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
    ct = rng.standard_normal((batch, s, s, cin)).astype(np.float32)
    return params, x, ct


# ------------------------------------------------------------------ JAX formulations
# Every formulation is a 3x3, stride-1, pad-1 NHWC/HWIO convolution (all VGG-16 convs).
PAD1 = ((1, 1), (1, 1))


def _plain(x, w):
    from jax import lax

    return lax.conv_general_dilated(x, w, (1, 1), PAD1, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _with_dw(dw_fn: Callable) -> Callable:
    """`_plain` with the weight gradient dw_fn(x, g) -> [3, 3, Cin, Cout]; dx stays XLA's."""
    import jax

    @jax.custom_vjp
    def f(x, w):
        return _plain(x, w)

    def fwd(x, w):
        return _plain(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        (dx,) = jax.vjp(lambda x_: _plain(x_, w), x)[1](g)
        return dx, dw_fn(x, g).astype(w.dtype)

    f.defvjp(fwd, bwd)
    return f


def _dw_taps(x, g):
    """dW[i, j] = X_ij^T G: one [Cin, B*H*W] x [B*H*W, Cout] GEMM per kernel tap."""
    import jax.numpy as jnp
    from jax import lax

    b, h, w_, cin = x.shape
    cout = g.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g2 = g.reshape(-1, cout)
    taps = [
        lax.dot_general(
            lax.slice(xp, (0, i, j, 0), (b, i + h, j + w_, cin)).reshape(-1, cin),
            g2,
            (((0,), (0,)), ((), ())),
        )
        for i in range(3)
        for j in range(3)
    ]
    return jnp.stack(taps).reshape(3, 3, cin, cout)


def _dw_3d(x, g):
    """JAX's weight gradient of the same conv written as a 3-D one with unit depth: XLA's
    YNNPACK rewriter takes only 2-D convolutions, so this one runs on Eigen."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    cin, cout = x.shape[-1], g.shape[-1]

    def conv3(k):
        return lax.conv_general_dilated(
            x[:, None], k, (1, 1, 1), [(0, 0), *PAD1],
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )  # fmt: skip

    (dk,) = jax.vjp(conv3, jnp.zeros((1, 3, 3, cin, cout), x.dtype))[1](g[:, None])
    return dk[0]


def _dw_patches(x, g):
    """One im2col GEMM, patches from lax.conv_general_dilated_patches (Cin-major)."""
    from jax import lax

    cin, cout = x.shape[-1], g.shape[-1]
    p = lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), PAD1, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # [B,H,W,Cin*9], Cin major
    d = lax.dot_general(p, g, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return d.reshape(cin, 3, 3, cout).transpose(1, 2, 0, 3)


def _dw_im2col(x, g):
    """One im2col GEMM, patches by concatenating the 9 shifted slices."""
    import jax.numpy as jnp
    from jax import lax

    b, h, w_, cin = x.shape
    cout = g.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    p = jnp.concatenate(
        [lax.slice(xp, (0, i, j, 0), (b, i + h, j + w_, cin)) for i in range(3) for j in range(3)],
        axis=-1,
    )
    d = p.reshape(-1, 9 * cin).T @ g.reshape(-1, cout)
    return d.reshape(3, 3, cin, cout)


def _jax_convs() -> dict[str, Callable]:
    from jax import lax

    def nchw(x, w):  # x already NCHW, w OIHW
        return lax.conv_general_dilated(
            x, w, (1, 1), PAD1, dimension_numbers=("NCHW", "OIHW", "NCHW")
        )

    return {
        "xla": _plain,
        "taps": _with_dw(_dw_taps),
        "dw3d": _with_dw(_dw_3d),
        "patches": _with_dw(_dw_patches),
        "im2col": _with_dw(_dw_im2col),
        "nchw": nchw,
    }


def _jax_stack(conv: Callable, layout: str):
    import jax.numpy as jnp
    from jax import lax

    def pool(y):
        if layout == "NCHW":
            h, w = y.shape[2], y.shape[3]
            pads = ((0, 0), (0, 0), (0, h % 2), (0, w % 2))
            win = (1, 1, 2, 2)
        else:
            h, w = y.shape[1], y.shape[2]
            pads = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
            win = (1, 2, 2, 1)
        return lax.reduce_window(y, -jnp.inf, lax.max, win, win, pads)

    def apply(params, x):
        if layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        k = 0
        for v in VGG_CFG:
            if v == "M":
                x = pool(x)
                continue
            w, b = params[k]
            k += 1
            if layout == "NCHW":
                x = jnp.maximum(conv(x, w.transpose(3, 2, 0, 1)) + b[:, None, None], 0.0)
            else:
                x = jnp.maximum(conv(x, w) + b, 0.0)
        return x.transpose(0, 2, 3, 1) if layout == "NCHW" else x

    return apply


# ------------------------------------------------------------------ measurement
def _torch_fns(params, x, ct) -> tuple[Callable, Callable, Callable]:
    import torch
    from torch import nn

    torch.set_num_threads(2)
    mods, k = [], 0
    for v in VGG_CFG:
        if v == "M":
            mods.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            continue
        w, b = params[k]
        k += 1
        c = nn.Conv2d(w.shape[2], w.shape[3], 3, padding=1)
        with torch.no_grad():
            c.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
            c.bias.copy_(torch.from_numpy(b))
        mods += [c, nn.ReLU()]
    model = nn.Sequential(*mods)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ctt = torch.from_numpy(ct.transpose(0, 3, 1, 2).copy())

    def fwd():
        with torch.no_grad():
            return model(xt)

    def grad():
        for p in model.parameters():
            p.grad = None
        xg = xt.clone().requires_grad_(True)
        loss = (model(xg) * ctt).sum()
        loss.backward()
        return loss.item(), xg.grad

    def out():
        return fwd().numpy().transpose(0, 2, 3, 1)

    return fwd, grad, out


def measure(variants: list[str], batch: int, size: int, width: float, reps: int) -> dict:
    """{name: {'fwd': s, 'grad': s}} incl. 'torch', interleaved round-robin, min over reps."""
    import jax
    import jax.numpy as jnp

    params, x, ct = _init(batch, size, width)
    t_fwd, t_grad, t_out = _torch_fns(params, x, ct)
    convs = _jax_convs()
    jp = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]
    jx, jct = jnp.asarray(x), jnp.asarray(ct)
    calls: dict[str, tuple[Callable, Callable]] = {"torch": (t_fwd, t_grad)}
    ref = t_out()

    def grad_fn(apply: Callable) -> Callable:
        return jax.jit(
            jax.value_and_grad(lambda p, x_: jnp.sum(apply(p, x_) * jct), argnums=(0, 1))
        )

    # Reference gradients: JAX's own VJP of the plain convolution, same process.
    ref_grads = jax.tree.leaves(grad_fn(_jax_stack(convs["xla"], "NHWC"))(jp, jx)[1])
    for name in variants:
        apply = _jax_stack(convs[name], "NCHW" if name == "nchw" else "NHWC")
        f, g = jax.jit(apply), grad_fn(apply)
        y = np.asarray(f(jp, jx))
        err = float(np.max(np.abs(y - ref)) / (np.max(np.abs(ref)) + 1e-30))
        if err > 1e-3:
            raise AssertionError(f"{name}: output differs from PyTorch's (rel {err:.2e})")
        for a, b in zip(jax.tree.leaves(g(jp, jx)[1]), ref_grads, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            gerr = float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
            if gerr > 1e-3:
                raise AssertionError(f"{name}: gradient differs from JAX's (rel {gerr:.2e})")
        calls[name] = (
            lambda f=f: f(jp, jx).block_until_ready(),
            lambda g=g: jax.block_until_ready(g(jp, jx)),
        )
    best = {k: {"fwd": float("inf"), "grad": float("inf")} for k in calls}
    for fw, gr in calls.values():  # warm-up / compile
        fw()
        gr()
    for _ in range(reps):
        for k, (fw, gr) in calls.items():
            for part, fn in (("fwd", fw), ("grad", gr)):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                best[k][part] = min(best[k][part], dt)
                print(f"  {k:8s} {part:4s} {dt:8.3f} s", file=sys.stderr, flush=True)
    return best


def per_layer(batch: int, size: int, width: float, reps: int) -> None:
    """Per distinct conv shape: forward, input gradient, weight gradient, XLA vs PyTorch."""
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    cin, s, seen = 3, size, []
    for v in _layers(width):
        if v == "M":
            s = -(-s // 2)
            continue
        if (s, cin, v) not in seen:
            seen.append((s, cin, v))
        cin = v
    print(f"\nper layer, batch {batch} (ms; ratio = XLA / PyTorch)")
    print(
        f"{'H=W x Cin->Cout':>18} {'fwd':>12} {'dx':>12} {'dw xla':>12} {'dw taps':>12} {'dw dw3d':>12}"
    )
    for s, ci, co in seen:
        x = rng.standard_normal((batch, s, s, ci), np.float32)
        w = rng.standard_normal((3, 3, ci, co), np.float32) * 0.05
        g = rng.standard_normal((batch, s, s, co), np.float32)
        best = _time_layer(x, w, g, reps)

        def cell(a: str, b: str, best: dict = best) -> str:
            return f"{best[a] * 1e3:6.0f} {best[a] / best[b]:4.2f}x"

        print(
            f"{f'{s}x{ci}->{co}':>18} {cell('xfwd', 'tfwd'):>12} {cell('xdx', 'tdx'):>12} "
            f"{cell('xdw', 'tdw'):>12} {cell('xdwt', 'tdw'):>12} {cell('xdw3', 'tdw'):>12}   torch "
            f"{best['tfwd'] * 1e3:.0f}/{best['tdx'] * 1e3:.0f}/{best['tdw'] * 1e3:.0f} ms",
            flush=True,
        )


def _time_layer(xn: np.ndarray, wn: np.ndarray, gn: np.ndarray, reps: int) -> dict[str, float]:
    """Min times of one 3x3 pad-1 conv's forward, input grad, weight grad (XLA, taps, PyTorch)."""
    import jax
    import jax.numpy as jnp
    import torch

    x, w, g = jnp.asarray(xn), jnp.asarray(wn), jnp.asarray(gn)
    convs = _jax_convs()
    plain, taps, dw3d = convs["xla"], convs["taps"], convs["dw3d"]

    fx = jax.jit(plain)
    dx = jax.jit(lambda w_, g_: jax.vjp(lambda x_: plain(x_, w_), x)[1](g_)[0])
    dw = jax.jit(lambda x_, g_: jax.vjp(lambda w_: plain(x_, w_), w)[1](g_)[0])
    dwt = jax.jit(lambda x_, g_: jax.vjp(lambda w_: taps(x_, w_), w)[1](g_)[0])
    dw3 = jax.jit(lambda x_, g_: jax.vjp(lambda w_: dw3d(x_, w_), w)[1](g_)[0])
    xt = torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(wn.transpose(3, 2, 0, 1).copy())
    gt = torch.from_numpy(gn.transpose(0, 3, 1, 2).copy())

    def tb(mask: list[bool]):
        return torch.ops.aten.convolution_backward(
            gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    calls = {
        "xfwd": lambda: fx(x, w).block_until_ready(),
        "xdx": lambda: dx(w, g).block_until_ready(),
        "xdw": lambda: dw(x, g).block_until_ready(),
        "xdwt": lambda: dwt(x, g).block_until_ready(),
        "xdw3": lambda: dw3(x, g).block_until_ready(),
        "tfwd": lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
        "tdx": lambda: tb([True, False, False]),
        "tdw": lambda: tb([False, True, False]),
    }
    best = dict.fromkeys(calls, float("inf"))
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(reps):
            for k, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="batch 1, 64x64, width 1/8, 2 reps")
    ap.add_argument("--variants", default="xla,taps,dw3d,xla@noynnconv")
    ap.add_argument("--layers", action="store_true", help="also time each conv shape separately")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.batch, a.size, a.width, a.reps = 1, 64, 0.125, 2

    if a.worker:  # child: the flags are already in XLA_FLAGS
        res = measure(a.variants.split(","), a.batch, a.size, a.width, a.reps)
        print("JSON " + json.dumps(res))
        return

    groups: dict[str, list[str]] = {"": []}
    for v in a.variants.split(","):
        base, _, flags = v.partition("@")
        groups.setdefault(flags, []).append(base)
    results: dict[str, dict] = {}
    for flags, bases in groups.items():
        if flags == "":
            res = measure(bases, a.batch, a.size, a.width, a.reps)
        else:
            env = dict(os.environ)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAG_SETS[flags]).strip()
            cmd = [sys.executable, __file__, "--worker", "--variants", ",".join(bases)]
            cmd += ["--batch", str(a.batch), "--size", str(a.size), "--width", str(a.width)]
            cmd += ["--reps", str(a.reps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("JSON ")]
            if out.returncode or not line:
                print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"worker for flags {flags!r} failed")
            res = json.loads(line[-1][5:])
        tag = f"@{flags}" if flags else ""
        for k, v in res.items():
            if k == "torch":
                results[f"torch{tag}"] = v
            else:
                results[k + tag] = {**v, "torch": res["torch"]}

    print(
        f"\nVGG-16 conv stack, batch {a.batch}, {a.size}x{a.size}, width {a.width}, "
        f"min of {a.reps} (s; ratio against PyTorch timed in the same process)"
    )
    print(f"{'variant':>16} {'fwd s':>8} {'grad s':>8} {'fwd/torch':>10} {'grad/torch':>11}")
    ratios = {}
    for k, v in results.items():
        if k.startswith("torch"):
            print(f"{k:>16} {v['fwd']:8.3f} {v['grad']:8.3f}")
            continue
        rf, rg = v["fwd"] / v["torch"]["fwd"], v["grad"] / v["torch"]["grad"]
        ratios[k] = rg
        print(f"{k:>16} {v['fwd']:8.3f} {v['grad']:8.3f} {rf:10.2f} {rg:11.2f}")
    if a.layers:
        per_layer(a.batch, a.size, a.width, a.reps)
    best = min(ratios, key=ratios.get)
    plain = ratios.get("xla", float("nan"))
    print(
        f"RESULT conv_grad_ratio_plain={plain:.2f} conv_grad_ratio_best={ratios[best]:.2f} "
        f"best={best}"
    )


if __name__ == "__main__":
    main()
