"""Data parallelism, multi-process training and preemption, in subprocesses.

Every run here trains the stand-in detector of `training_support.py` on the deterministic
synthetic stream with `train_and_evaluate` (the real loop, sharding, checkpoints), so each
comparison is between the same program on different device/process layouts. References are
in-process single-device runs on the same global batches. These are unit tests of the training
machinery; the real detector through the command-line programs, with evaluation, on several
devices and processes is in `test_multidevice.py`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from training_support import synthetic_batches, tiny_detector, tiny_train_config

from daipnet_jax.checkpoints import Checkpointer, load_variables
from daipnet_jax.training import train_and_evaluate
from daipnet_jax.training.state import init_variables

REPO = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(REPO / "tests" / "training_support.py")]


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    return env


def _reference(workdir: Path, total_steps: int, batch_size: int = 4):
    c = tiny_train_config(batch_size, total_steps)
    train_and_evaluate(
        c,
        str(workdir),
        model=tiny_detector(c),
        train_iter_fn=lambda cfg, pi, pc: synthetic_batches(cfg, pi, pc),
        eval_fn=lambda cfg, v, s: {},
    )
    return load_variables(workdir)


@pytest.fixture(scope="module")
def reference_3_steps(tmp_path_factory):
    """One device, one process, 3 steps on global batches 0, 1, 2 (batch 4)."""
    return _reference(tmp_path_factory.mktemp("ref3"), 3)


def _assert_same(a, b, atol=1e-5):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_two_devices_match_one_device(tmp_path, reference_3_steps):
    out = subprocess.run(
        [*WORKER, "--workdir", str(tmp_path), "--total_steps", "3"],
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 2 processes 1" in out.stdout
    got = load_variables(tmp_path)
    _assert_same(got, reference_3_steps)
    # not vacuous: the 3 steps moved the parameters far beyond the tolerance
    c = tiny_train_config()
    init = init_variables(tiny_detector(c), c, jax.random.split(jax.random.PRNGKey(c.seed))[0])
    moved = max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(
            jax.tree_util.tree_leaves(init["params"]),
            jax.tree_util.tree_leaves(got["params"]),
            strict=True,
        )
    )
    assert moved > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, reference_3_steps):
    """jax.distributed on 127.0.0.1: 2 processes × 1 device, each feeding its half of the batch."""
    addr = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                *WORKER,
                "--workdir",
                str(tmp_path),
                "--total_steps",
                "3",
                "--coordinator",
                addr,
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            ],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outs, strict=True):
        assert p.returncode == 0, se[-3000:]
        assert "devices 2 processes 2" in so
    _assert_same(load_variables(tmp_path), reference_3_steps)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_kill9_after_checkpoint_then_resume_equals_uninterrupted(tmp_path, reference_3_steps):
    args = [
        *WORKER,
        "--workdir",
        str(tmp_path),
        "--total_steps",
        "3",
        "--checkpoint_every_steps",
        "1",
    ]
    # slow_after=2: batches from index 2 on take 1 s, so the kill lands after checkpoint 2
    proc = subprocess.Popen(
        [*args, "--slow_after", "2"],
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(tmp_path / "checkpoints" / "2", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    out = subprocess.run(args, env=_env(1), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "checkpoints/2 (data position 2)" in out.stdout
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    _assert_same(load_variables(tmp_path), reference_3_steps, atol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_restorable_checkpoint(tmp_path, capsys):
    proc = subprocess.Popen(
        [
            *WORKER,
            "--workdir",
            str(tmp_path),
            "--total_steps",
            "50",
            "--batch_size",
            "2",
            "--checkpoint_every_steps",
            "2",
            "--slow_after",
            "2",
        ],
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(tmp_path / "checkpoints" / "2", proc)
    proc.send_signal(signal.SIGTERM)
    so, se = proc.communicate(timeout=120)
    assert proc.returncode == 0, se[-3000:]
    assert "SIGTERM received" in so and "stopping at step" in so
    ck = Checkpointer(tmp_path / "checkpoints")
    last = ck.latest_step()
    assert 2 <= last < 50
    stopped = int(so.split("stopping at step ")[1].split()[0])
    assert last == stopped
    variables = load_variables(tmp_path)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(variables))
    # restorable: the same workdir resumes at that step and data position and trains on
    c = tiny_train_config(2, last + 1)
    state = train_and_evaluate(
        c,
        str(tmp_path),
        model=tiny_detector(c),
        train_iter_fn=lambda cfg, pi, pc: synthetic_batches(cfg, pi, pc),
        eval_fn=lambda cfg, v, s: {},
    )
    assert f"checkpoints/{last} (data position {last})" in capsys.readouterr().out
    assert int(state.step) == last + 1
