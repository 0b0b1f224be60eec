"""The bench scripts keep running (tiny sizes), and their RESULT lines are collected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
import run_all  # noqa: E402


def test_parse_results_collects_every_pair():
    output = "warm-up\nRESULT a=1.5 b=2\nnoise RESULT c=3\n  RESULT d=x=y\n"
    assert common.parse_results(output) == {"a": "1.5", "b": "2", "d": "x=y"}


def test_recorded_section_survives_a_rewrite():
    text = "# Benchmark results\n| a | b | c |\n\n## Recorded on other machines\n\nGPU: 1 ms\n\n"
    assert run_all.recorded_section(text) == "## Recorded on other machines\n\nGPU: 1 ms\n"
    assert run_all.recorded_section("# Benchmark results\n| a | b | c |\n") == ""


@pytest.mark.slow
def test_every_bench_script_runs_quick(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# old table\n\n## Recorded on other machines\n\nrecorded elsewhere\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "quick" in table and "old table" not in table
    assert table.endswith("## Recorded on other machines\n\nrecorded elsewhere\n")
    rows = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| ")][1:]
    scripts = {r[0].strip() for r in rows}
    assert scripts == set(run_all.SCRIPTS), scripts
    # the accelerator bench's A/Bs ran: CUDA graphs (a child process, on CPU in --quick) and
    # the closed-form BatchNorm gradient
    ab = {"conv_graphs_train_speedup", "closed_form_bn_train_speedup"}
    assert ab <= {r[1].strip() for r in rows if r[0].strip() == "accelerator.py"}
    # names, not measures: the fastest conv variant, the torch NMS used, the device
    names = {"best", "postprocess_torch_nms", "accel_device"}
    for _script, key, value in rows:
        number = value.strip().rstrip("x")
        if key.strip() in names or (key.strip().endswith("_mfu_pct") and number == "n/a"):
            continue  # MFU is n/a on a device without a peak in the table (the CPU)
        float(number)  # every measure is a number


# ------------------------------------------------------------------ bench/accelerator.py
_NO_TENSORFLOW = r"""
import importlib.abc, sys


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"blocked: {name}")


sys.meta_path.insert(0, Block())
sys.argv = ["accelerator.py"]
sys.path.insert(0, "bench")
import accelerator  # top-level set-up (platform) runs here
# every module its sections import lazily
from daipnet_jax import boxes, models, postprocess  # noqa: F401
from daipnet_jax.training import schedule, state, step  # noqa: F401
import postprocess as bench_postprocess, train_step, torch_reference  # noqa: F401
assert "tensorflow" not in sys.modules
print("IMPORTS OK")
"""


def test_accelerator_bench_imports_no_tensorflow():
    """The GPU machine has no TensorFlow: everything the accelerator bench imports must load with
    TensorFlow's import blocked (the run itself also asserts it at the end)."""
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TENSORFLOW],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "IMPORTS OK" in proc.stdout, proc.stderr[-3000:]


def test_accelerator_peak_table():
    import accelerator

    assert accelerator.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16", None) == 989e12
    assert accelerator.peak_flops("NVIDIA H100 80GB HBM3", "float32", None) == 495e12  # TF32
    assert accelerator.peak_flops("NVIDIA H100 80GB HBM3", "float32", "highest") == 67e12
    assert accelerator.peak_flops("NVIDIA H100 PCIe", "bfloat16", None) == 756e12
    assert accelerator.peak_flops("NVIDIA H200", "bfloat16", None) == 989e12
    assert accelerator.peak_flops("cpu", "bfloat16", None) is None


def test_accelerator_largest_batch_doubles_until_out_of_memory():
    import accelerator

    tried = []

    def step_seconds(batch):
        tried.append(batch)
        if batch >= 256:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return batch / 1000.0

    budget = accelerator.Budget(100.0)
    assert accelerator.largest_batch(step_seconds, 64, 512, budget, 1.0) == (128, 0.128)
    assert tried == [64, 128, 256]
    # the bound stops it; another error is not taken for out-of-memory
    assert accelerator.largest_batch(step_seconds, 64, 64, budget, 1.0) == (64, 0.064)

    def broken(batch):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        accelerator.largest_batch(broken, 64, 512, budget, 1.0)
    # an exhausted budget skips the search and says so
    spent = accelerator.Budget(0.0)
    assert accelerator.largest_batch(step_seconds, 64, 512, spent, 5.0) is None
    assert spent.skipped == ["train batch 64"]


def test_accelerator_only_takes_several_selectors():
    import accelerator

    names = [
        "forward daipnet300 bfloat16",
        "forward lrf300 float32",
        "train lrf300 float32",
        "train daipnet300 bfloat16",
        "torch",
        "search",
    ]

    def chosen(only):
        return [n for n in names if accelerator.selected(n, only)]

    assert chosen("") == names
    assert chosen("forward daipnet300") == ["forward daipnet300 bfloat16"]
    assert chosen("forward lrf300, train float32 ,search") == [
        "forward lrf300 float32",
        "train lrf300 float32",
        "search",
    ]
    assert chosen("lrf300 bfloat16") == []  # every word of one selector, not of any


def test_accelerator_child_runs_without_the_conv_graph_flags():
    import accelerator

    from daipnet_jax import platform

    parent = {
        "XLA_FLAGS": f"--xla_dump_to=/tmp/d {platform.XLA_GPU_CONV_GRAPH_FLAGS}",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.70",
        "PATH": "/bin",
    }
    env = accelerator.conv_graphs_off(parent)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"  # the user's own flags stay
    assert env["DAIPNET_GPU_CONV_GRAPHS"] == "0" and env["PATH"] == "/bin"
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) + 0.70 < 1.0
    assert parent["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.70"  # the parent's is untouched
    # what platform.setup() does in the child: nothing, so XLA's default list applies
    assert not platform.add_gpu_flags(env)
    assert "command_buffer" not in env["XLA_FLAGS"]


def test_accelerator_flops_counted_on_the_cpu_lowering():
    """Model FLOPs of a convolution, hand-counted: 2 x B x Ho x Wo x Cout x kh x kw x Cin."""
    import accelerator
    import jax
    import jax.numpy as jnp

    conv = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    x, w = jnp.ones((2, 10, 12, 8)), jnp.ones((3, 3, 8, 16))
    assert accelerator.cpu_flops(conv, x, w) == 2 * 2 * 8 * 10 * 16 * 3 * 3 * 8


def test_accelerator_profile_summary_without_a_trace(tmp_path):
    import accelerator

    assert "no .xplane.pb" in accelerator.profile_summary(str(tmp_path))[0]


# ------------------------------------------------------------------ bench/batchnorm_grad.py
def _run_x64(script: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -c script` in the repository with jax_enable_x64 (float64 references)."""
    import os

    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, JAX_ENABLE_X64="1"),
        timeout=timeout,
        check=False,
    )


_BN_FLOAT64 = r"""
import sys
import jax, numpy as np, flax.linen as nn
sys.path.insert(0, "bench")
import batchnorm_grad

assert jax.config.jax_enable_x64
f64 = np.float64
x = np.random.default_rng(0).normal(size=(3, 6, 6, 5)) * 2 + 1
out = []
for custom in (False, True):
    net = batchnorm_grad.Stack(3, 7, custom, dtype=f64, param_dtype=f64)
    v = net.init(jax.random.PRNGKey(0), x)
    # non-trivial scales and biases (init: 1 and 0)
    params = jax.tree.map(lambda p: p + 0.1 * np.cos(np.arange(p.size)).reshape(p.shape), v["params"])
    _, stats, loss, grads = batchnorm_grad.train_step(net)(params, v["batch_stats"], x)
    assert loss.dtype == f64 and all(g.dtype == f64 for g in jax.tree.leaves(grads))
    out.append((loss, grads, stats))
(l0, g0, s0), (l1, g1, s1) = out
np.testing.assert_allclose(l1, l0, rtol=1e-13)
assert max(np.abs(g).max() for g in jax.tree.leaves(g0)) > 1e-3  # not vacuous
for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-13)
# inference: the running averages, through each module
variables = {
    "params": {"scale": np.linspace(0.5, 2, 5), "bias": np.linspace(-1, 1, 5)},
    "batch_stats": {"mean": np.linspace(-1, 1, 5), "var": np.linspace(0.1, 3, 5)},
}
kw = dict(use_running_average=True, dtype=f64, param_dtype=f64)
want = nn.BatchNorm(**kw).apply(variables, x)
got = batchnorm_grad.CustomVJPBatchNorm(**kw).apply(variables, x)
np.testing.assert_allclose(got, want, rtol=1e-14)
print("BN OK")
"""


def test_batchnorm_custom_vjp_equals_flax_in_float64():
    """The hand-written BatchNorm gradient that bench/batchnorm_grad.py times is Flax's: in
    float64 (a subprocess with jax_enable_x64), the same loss, gradients and running statistics
    on a conv-BN stack, and the same inference output."""
    proc = _run_x64(_BN_FLOAT64, timeout=300)
    assert proc.returncode == 0 and "BN OK" in proc.stdout, proc.stderr[-3000:]


_BN_MODEL_FLOAT64 = r"""
import sys
import jax, numpy as np
sys.path.insert(0, "bench")
import batchnorm_grad
from daipnet_jax import models
from daipnet_jax.config import base_config
from daipnet_jax.training import state as state_lib

assert jax.config.jax_enable_x64
x = np.random.default_rng(0).uniform(0, 255, size=(2, 300, 300, 3))
for variant in ("daipnet300", "lrf300"):  # lrf300: the standalone BatchNorms of models/lrf.py
    c = base_config(variant, "coco", width=0.0625)
    c.model.dtype = "float64"
    v = state_lib.init_variables(models.build(c), c, jax.random.PRNGKey(0))
    v = jax.tree.map(lambda a: np.asarray(a, np.float64), v)
    params = jax.tree.map(lambda p: p + 0.1 * np.cos(np.arange(p.size)).reshape(p.shape), v["params"])
    layers = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(v["batch_stats"])
                 if path[-1].key == "mean")

    def run(model):
        def loss_fn(p):
            (loc, logits), new = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                             train=True, mutable=["batch_stats"])
            return (loc ** 2).mean() + (logits.std(-1) ** 2).mean(), new["batch_stats"]
        custom = str(jax.make_jaxpr(loss_fn)(params)).count("custom_vjp_call[")
        return custom, jax.device_get(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params))

    with batchnorm_grad.closed_form_batchnorm():
        custom, ((l1, s1), g1) = run(models.build(c))
    assert custom == layers > 30, (variant, custom, layers)  # every BatchNorm replaced
    plain, ((l0, s0), g0) = run(models.build(c))
    assert plain == 0  # and put back on exit
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(g0))
    assert scale > 0.1
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * scale)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12)
    print(variant, layers, "OK")
"""


def test_closed_form_batchnorm_swaps_every_model_batchnorm_in_float64():
    """The accelerator bench's whole-model A/B (`closed_form_batchnorm`) replaces every
    BatchNorm of DAIPNet300 and LRF300 and changes no number: in float64, the same loss,
    gradients and batch statistics as Flax's BatchNorm; the models are restored afterwards."""
    proc = _run_x64(_BN_MODEL_FLOAT64, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "daipnet300 65 OK" in proc.stdout and "lrf300 37 OK" in proc.stdout, proc.stdout
