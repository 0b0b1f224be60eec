"""Runtime switches of the entry points: XLA:CPU and XLA:GPU flags, quiet logs, the
compilation cache.

Every entry point calls `setup()` before JAX starts a backend; the library never sets flags.
`JAX_ENABLE_COMPILATION_CACHE=0`, `DAIPNET_CPU_FAST_CONV=0` and `DAIPNET_GPU_CONV_GRAPHS=0`
switch the cache and the flags off.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys
import types
from collections.abc import Callable, MutableMapping
from pathlib import Path

#: XLA:CPU convolutions on Eigen instead of YNNPACK, whose convolution weight gradients are
#: several times slower on VGG-16's large maps (bench/conv_backward.py, docs/design.md). Dots and
#: element-wise fusions keep YNNPACK. Read once, when the CPU backend starts.
XLA_CPU_FAST_CONV_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

#: jaxlib (major, minor) versions known to accept the flag: XLA aborts at start-up on an
#: unknown flag, so a newer jaxlib runs without it until checked.
FAST_CONV_JAXLIB = ((0, 10),)

#: XLA:GPU: cuDNN convolutions join the fusions and library calls that XLA replays as CUDA
#: graphs; its default list leaves them out, so each convolution splits the graph and a batch-1
#: forward launches most of its ~350 kernels one by one (docs/design.md, "Accelerators").
XLA_GPU_CONV_GRAPH_FLAGS = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONVOLUTION"
)

#: jaxlib (major, minor) versions checked to accept that list (XLA aborts on an unknown value).
CONV_GRAPH_JAXLIB = ((0, 11),)

#: Environment defaults that silence start-up banners: TensorFlow's and oneDNN's INFO and
#: WARNING lines, libtpu's INFO lines. TensorFlow 2.21 prints its oneDNN banner whatever
#: TF_CPP_MIN_LOG_LEVEL says; TensorFlow here only runs tf.data (no oneDNN matmuls or convs),
#: so its oneDNN custom ops are turned off instead.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "TPU_STDERR_LOG_LEVEL": "1",
    "TPU_MIN_LOG_LEVEL": "1",
}

#: Libraries whose INFO lines are dropped (orbax logs a dozen per checkpoint); their warnings
#: and errors still come through.
NOISY_LIBRARIES = ("orbax", "etils", "tensorflow_datasets")

_OFF = ("0", "false", "no", "off")


def setup(*, compilation_cache: bool = False) -> None:
    """All runtime switches of an entry point; idempotent. Call before JAX computes anything."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    add_cpu_flags()
    add_gpu_flags()
    quiet_library_logs()
    if compilation_cache:
        enable_compilation_cache()


def accelerator_requested(environ: MutableMapping[str, str] | None = None) -> bool:
    """True unless CPU-only: `JAX_PLATFORMS` if set, else any installed accelerator plugin."""
    env = os.environ if environ is None else environ
    platforms = _platforms(env)
    if platforms:
        return any(p != "cpu" for p in platforms)
    return bool(_plugin_names()) or importlib.util.find_spec("libtpu") is not None


def _platforms(env: MutableMapping[str, str]) -> list[str]:
    """The platforms `JAX_PLATFORMS` names, lower case ([] when unset)."""
    return [p.strip() for p in env.get("JAX_PLATFORMS", "").lower().split(",") if p.strip()]


def _plugin_names() -> list[str]:
    """Installed JAX PJRT plugins (e.g. 'xla_cuda13'): entry points and `jax_plugins.*`."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    return names


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _append_flags(
    env: MutableMapping[str, str],
    flags: str,
    *,
    switch: str,
    set_by_user: str,
    jaxlibs: tuple[tuple[int, int], ...],
    applies: Callable[[], bool],
) -> bool:
    """Append `flags` to `XLA_FLAGS` unless `switch` is off, `XLA_FLAGS` already holds
    `set_by_user`, the jaxlib is not one of `jaxlibs`, or `applies()` is False."""
    current = env.get("XLA_FLAGS", "")
    if (
        env.get(switch, "1").lower() in _OFF
        or set_by_user in current
        or _jaxlib_version() not in jaxlibs
        or not applies()
    ):
        return False
    env["XLA_FLAGS"] = (current + " " + flags).strip()
    return True


def add_cpu_flags(environ: MutableMapping[str, str] | None = None) -> bool:
    """Append `XLA_CPU_FAST_CONV_FLAGS` to `XLA_FLAGS` if CPU-only, the jaxlib is checked
    (`FAST_CONV_JAXLIB`) and the user set no fusion type; returns whether it did."""
    env = os.environ if environ is None else environ
    return _append_flags(
        env,
        XLA_CPU_FAST_CONV_FLAGS,
        switch="DAIPNET_CPU_FAST_CONV",
        set_by_user="xla_cpu_experimental_ynn_fusion_type",
        jaxlibs=FAST_CONV_JAXLIB,
        applies=lambda: not accelerator_requested(env),
    )


def cuda_requested(environ: MutableMapping[str, str] | None = None) -> bool:
    """True for a CUDA run: `JAX_PLATFORMS` names cuda or gpu if set, else a CUDA plugin is
    installed."""
    env = os.environ if environ is None else environ
    platforms = _platforms(env)
    if platforms:
        return any(p in ("cuda", "gpu") for p in platforms)
    return any("cuda" in name for name in _plugin_names())


def add_gpu_flags(environ: MutableMapping[str, str] | None = None) -> bool:
    """Append `XLA_GPU_CONV_GRAPH_FLAGS` to `XLA_FLAGS` on a CUDA run with a checked jaxlib
    (`CONV_GRAPH_JAXLIB`) unless the user set a command-buffer list or
    `DAIPNET_GPU_CONV_GRAPHS=0`; returns whether it did."""
    env = os.environ if environ is None else environ
    return _append_flags(
        env,
        XLA_GPU_CONV_GRAPH_FLAGS,
        switch="DAIPNET_GPU_CONV_GRAPHS",
        set_by_user="xla_gpu_enable_command_buffer",
        jaxlibs=CONV_GRAPH_JAXLIB,
        applies=lambda: cuda_requested(env),
    )


def default_cache_dir(environ: MutableMapping[str, str] | None = None) -> Path:
    """`$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/daipnet_jax/jax` (~/.cache/...)."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(env["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "daipnet_jax" / "jax"


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Persistent compilation cache (programs over 1 s); its folder, or None when off."""
    if os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "1").lower() in _OFF:
        return None
    import jax

    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


class _DropLibraryInfo(logging.Filter):
    def __init__(self, libraries: tuple[str, ...]) -> None:
        super().__init__()
        self._markers = tuple(f"/{name}/" for name in libraries)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(m in _origin(record) for m in self._markers)


def _origin(record: logging.LogRecord) -> str:
    """The file that logged `record`: some libraries (orbax) log through a wrapper that absl
    reports as the caller, so walk the stack past the logging modules."""
    if "/absl/logging/" not in record.pathname:
        return record.pathname
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in ("/logging/", "platform.py")):
            return name
        frame = frame.f_back
    return record.pathname


def quiet_library_logs(libraries: tuple[str, ...] = NOISY_LIBRARIES) -> None:
    """Keep our INFO lines (data reports, metrics) but not the libraries' chatter."""
    for name in ("absl", ""):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
            logger.addFilter(_DropLibraryInfo(libraries))
    # JAX logs through its own loggers (e.g. "Unable to initialize backend 'tpu'" on every
    # machine without one); a filter on the root does not see propagated records.
    logging.getLogger("jax").setLevel(logging.WARNING)
