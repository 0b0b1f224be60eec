"""pycocotools run directly, independently of the package's evaluator: the tests' reference."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any

import numpy as np


def cocoeval(gt: dict, results: list[dict] | str | Path) -> Any:
    """A `COCOeval` ("bbox") of `results` (a list or a results file) on `gt`, evaluated,
    accumulated and summarised (its printing swallowed); the inputs are not modified."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dets = coco.loadRes(
            str(results) if isinstance(results, Path | str) else copy.deepcopy(results)
        )
        ev = COCOeval(coco, dets, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def stats(gt: dict, results: list[dict] | str | Path) -> np.ndarray:
    """pycocotools' 12 summary numbers (AP, AP50, ..., ARl)."""
    return np.asarray(cocoeval(gt, results).stats)
