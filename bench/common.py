"""Timing and set-up shared by the bench scripts (each stays runnable as `python bench/x.py`)."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any


def _times(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median_time(fn: Callable[[], Any], iters: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `iters` calls after `warmup` calls."""
    return statistics.median(_times(fn, iters, warmup))


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
    """Best wall seconds of `fn()` over `repeats` calls after `warmup` calls."""
    return min(_times(fn, repeats, warmup))


def jit_detect(cfg: Any) -> Callable[..., Any]:
    """`postprocess.detect` jitted with `cfg`'s variances and post-processing settings."""
    import functools

    import jax

    from daipnet_jax import postprocess

    pp = cfg.postprocess
    return jax.jit(
        functools.partial(
            postprocess.detect,
            variances=tuple(cfg.priors.variances),
            score_threshold=pp.score_threshold,
            nms_iou=pp.nms_iou,
            per_class_max=pp.per_class_max,
            max_detections=pp.max_detections,
            pre_nms_top_k=pp.pre_nms_top_k,
        )
    )


def print_result(results: dict[str, Any]) -> None:
    """The last line every bench prints: `RESULT key=value ...` (collected by run_all.py)."""
    print("RESULT " + " ".join(f"{k}={v}" for k, v in results.items()))


RESULT_RE = re.compile(r"^RESULT\s+(.*)$")


def parse_results(output: str) -> dict[str, str]:
    """All `key=value` pairs of the `RESULT` lines in `output`."""
    results: dict[str, str] = {}
    for line in output.splitlines():
        match = RESULT_RE.match(line.strip())
        if match:
            for pair in match.group(1).split():
                key, _, value = pair.partition("=")
                results[key] = value
    return results
