"""Evaluation charts beside `eval/metrics.json`: per-class AP bars and precision-recall curves.

`write_charts` takes an evaluator's `chart_data()` ({metric, per_class_ap, pr_title, pr_curves})
and writes `per_class_ap.png`, `pr_curves.png` and TensorBoard scalars `eval/per_class/<name>`.
"""
# choice: matplotlib's object API on Agg: no pyplot state or display; 80 legible labels for free.

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PER_CLASS_AP_FILE = "per_class_ap.png"
PR_CURVES_FILE = "pr_curves.png"
BAR_COLOUR = "#2f6db3"
CURVE_COLOUR = "#c2410c"


def _figure(width: float, height: float, dpi: int = 100) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def draw_per_class_ap(
    per_class_ap: Mapping[str, float | None], path: str, *, metric: str = "AP"
) -> Any:
    names = list(per_class_ap)
    values = [per_class_ap[n] for n in names]
    defined = [v for v in values if v is not None]
    k = len(names)
    fig = _figure(7.0, 1.3 + 0.26 * max(k, 1))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(k)
    ax.barh(y, [0.0 if v is None else v for v in values], height=0.7, color=BAR_COLOUR)
    for yi, v in zip(y, values, strict=True):
        ax.text((v or 0.0) + 0.01, yi, "n/a" if v is None else f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # label 1 at the top
    ax.set_xlim(0.0, 1.1)
    ax.set_ylim(k - 0.5, -0.5)
    mean = f", mean {np.mean(defined):.3f} over {len(defined)} classes" if defined else ""
    ax.set_xlabel(metric)
    ax.set_title(f"per-class {metric}{mean}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def draw_pr_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str,
    *,
    class_names: Sequence[str] | None = None,
    title: str = "precision-recall",
) -> Any:
    """One panel per class (empty, saying so, without a curve) to `path`; returns the Figure."""
    names = list(class_names) if class_names is not None else list(curves)
    k = max(len(names), 1)
    cols = min(k, 5)
    rows = math.ceil(k / cols)
    fig = _figure(2.4 * cols, 2.2 * rows + 0.5)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        if name in curves:
            recall, precision = (np.asarray(a, np.float64) for a in curves[name])
            ax.plot(recall, precision, color=CURVE_COLOUR, linewidth=1.5)
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=8)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("precision", fontsize=8)
        if i >= (rows - 1) * cols:
            ax.set_xlabel("recall", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def tag_name(name: str) -> str:
    """A class name as a TensorBoard tag part (spaces and other characters → `_`)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name.strip()) or "_"


def write_charts(
    data: Mapping[str, Any], eval_dir: str, writer: Any = None, step: int = 0
) -> list[str]:
    """The two PNGs in `eval_dir` and the scalars; the written paths (none without classes)."""
    per_class = dict(data.get("per_class_ap", {}))
    if not per_class:
        return []
    os.makedirs(eval_dir, exist_ok=True)
    metric = str(data.get("metric", "AP"))
    bars = os.path.join(eval_dir, PER_CLASS_AP_FILE)
    draw_per_class_ap(per_class, bars, metric=metric)
    pr = os.path.join(eval_dir, PR_CURVES_FILE)
    draw_pr_curves(
        data.get("pr_curves", {}),
        pr,
        class_names=list(per_class),
        title=str(data.get("pr_title", "precision-recall")),
    )
    if writer is not None:
        writer.write_scalars(
            int(step),
            {f"eval/per_class/{tag_name(n)}": v for n, v in per_class.items() if v is not None},
        )
    return [bars, pr]
