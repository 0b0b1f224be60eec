"""Shared test set-up: JAX compilation cache, float32 precision, tiny configs.

Sections below are owned by different parts of the code base; add fixtures by appending a
labelled section, never by re-making one in a test file.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"),
)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- configs
@pytest.fixture
def tiny_config():
    """Factory: a width-reduced config for `variant` (e.g. `daipnet300`) on `dataset`."""
    from daipnet_jax.config import base_config

    def make(variant: str = "daipnet300", dataset: str = "coco", width: float = 0.125):
        return base_config(variant, dataset, width=width)

    return make
