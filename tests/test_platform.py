"""`daipnet_jax.platform`: the XLA:CPU flag only on CPU-only runs, log filtering, cache folder."""

from __future__ import annotations

import logging
from pathlib import Path

from daipnet_jax import platform


def test_cpu_flag_only_when_the_run_is_cpu_only(monkeypatch):
    monkeypatch.setattr(platform, "_jaxlib_version", lambda: (0, 10))
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert platform.add_cpu_flags(env)
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        platform.XLA_CPU_FAST_CONV_FLAGS,
    ]
    assert not platform.add_cpu_flags(env)  # a YNNPACK setting is there already: unchanged
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
    for accelerator in ("cuda", "tpu", "cuda,cpu"):
        env = {"JAX_PLATFORMS": accelerator}
        assert not platform.add_cpu_flags(env) and "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cpu", "DAIPNET_CPU_FAST_CONV": "0"}
    assert not platform.add_cpu_flags(env) and "XLA_FLAGS" not in env
    # a jaxlib the flag was not checked with would abort on an unknown flag: left alone
    monkeypatch.setattr(platform, "_jaxlib_version", lambda: (0, 99))
    env = {"JAX_PLATFORMS": "cpu"}
    assert not platform.add_cpu_flags(env) and "XLA_FLAGS" not in env


def test_accelerator_requested_follows_jax_platforms():
    assert platform.accelerator_requested({"JAX_PLATFORMS": "cuda"})
    assert not platform.accelerator_requested({"JAX_PLATFORMS": "cpu"})


def test_library_info_lines_dropped_warnings_kept():
    platform.quiet_library_logs()
    platform.quiet_library_logs()  # idempotent: one filter
    logger = logging.getLogger("absl")
    filters = [f for f in logger.filters if isinstance(f, platform._DropLibraryInfo)]
    assert len(filters) == 1

    def record(level: int, path: str) -> logging.LogRecord:
        return logging.LogRecord("absl", level, path, 1, "msg", None, None)

    site = "/venv/lib/python3.11/site-packages"
    assert not filters[0].filter(record(logging.INFO, f"{site}/orbax/checkpoint/x.py"))
    assert filters[0].filter(record(logging.WARNING, f"{site}/orbax/checkpoint/x.py"))
    assert filters[0].filter(record(logging.INFO, "/repo/daipnet_jax/training/loop.py"))


def test_compilation_cache_folder(monkeypatch, tmp_path):
    assert platform.default_cache_dir({"JAX_COMPILATION_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert platform.default_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/daipnet_jax/jax")
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "0")
    assert platform.enable_compilation_cache(tmp_path) is None


def test_gpu_flag_only_on_cuda_with_a_checked_jaxlib(monkeypatch):
    monkeypatch.setattr(platform, "_jaxlib_version", lambda: (0, 11))
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert platform.add_gpu_flags(env)
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", platform.XLA_GPU_CONV_GRAPH_FLAGS]
    assert not platform.add_gpu_flags(env)  # a command-buffer list is there already: unchanged
    assert env["XLA_FLAGS"].count("command_buffer") == 1
    for other in ("cpu", "tpu", "rocm"):
        env = {"JAX_PLATFORMS": other}
        assert not platform.add_gpu_flags(env) and "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cuda", "DAIPNET_GPU_CONV_GRAPHS": "off"}
    assert not platform.add_gpu_flags(env) and "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_enable_command_buffer="}
    assert not platform.add_gpu_flags(env)  # the user's own list (here: none) wins
    for version in ((0, 10), (0, 12)):  # not checked: an unknown enum value would abort XLA
        monkeypatch.setattr(platform, "_jaxlib_version", lambda v=version: v)
        env = {"JAX_PLATFORMS": "cuda"}
        assert not platform.add_gpu_flags(env) and "XLA_FLAGS" not in env


def test_cuda_requested_follows_jax_platforms_then_plugins(monkeypatch):
    assert platform.cuda_requested({"JAX_PLATFORMS": "gpu,cpu"})
    assert not platform.cuda_requested({"JAX_PLATFORMS": "tpu"})
    monkeypatch.setattr(platform, "_plugin_names", lambda: ["xla_cuda13"])
    assert platform.cuda_requested({})
    monkeypatch.setattr(platform, "_plugin_names", lambda: ["xla_rocm"])
    assert not platform.cuda_requested({}) and platform.accelerator_requested({})
    monkeypatch.setattr(platform, "_plugin_names", lambda: [])
    assert not platform.cuda_requested({})  # this machine: CPU only
