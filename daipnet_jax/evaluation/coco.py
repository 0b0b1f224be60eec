"""COCO evaluation: detections → COCO results JSON → pycocotools `COCOeval`.

Normalised corners map to the original image by a per-axis scale (images are resized to S×S
without keeping the aspect ratio) → absolute [x, y, w, h] with the real category id.
"""
# choice: clip to [0, 1]; round bbox to 2 and scores to 6 decimals in what is evaluated too
# (docs/design.md, Evaluation).

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The 12 standard COCOeval numbers in `COCOeval.stats` order.
COCO_METRIC_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def label_to_category_table(categories: Sequence[Mapping[str, Any]] | Sequence[int]) -> np.ndarray:
    """t[k] = COCO category id of label k (t[0] = 0); labels 1..K follow the ascending ids."""
    ids = [int(c["id"]) if isinstance(c, Mapping) else int(c) for c in categories]
    return np.asarray([0, *sorted(ids)], np.int64)


def detections_to_coco(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    image_id: int,
    orig_size: Sequence[int],
    label_to_category: np.ndarray,
) -> list[dict[str, Any]]:
    """One image's boxes [N, 4] (normalised corners), scores [N], labels [N] in 1..K →
    [{image_id, category_id, bbox [x, y, w, h] pixels, score}]; `orig_size` is (h, w)."""
    boxes = np.clip(np.asarray(boxes, np.float64).reshape(-1, 4), 0.0, 1.0)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if labels.size and (labels.min() < 1 or labels.max() >= len(label_to_category)):
        raise ValueError(
            f"labels must be in 1..{len(label_to_category) - 1}, got {labels.min()}..{labels.max()}"
        )
    h, w = float(orig_size[0]), float(orig_size[1])
    scale = np.asarray([w, h, w, h])
    px = boxes * scale
    xywh = np.stack([px[:, 0], px[:, 1], px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]], axis=1)
    xywh = np.round(xywh, 2)
    cats = label_to_category[labels]
    return [
        {
            "image_id": int(image_id),
            "category_id": int(c),
            "bbox": [float(v) for v in b],
            "score": round(float(s), 6),
        }
        for b, s, c in zip(xywh, scores, cats, strict=True)
    ]


def _coco_from_dict(gt: Mapping[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    dataset = dict(gt)
    dataset.setdefault("info", {})
    dataset.setdefault("licenses", [])
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoEvaluator:
    """Accumulates detections, scores them with pycocotools; `gt_dict=None`: test-dev mode."""

    def __init__(
        self,
        ground_truth: Mapping[str, Any] | None,
        label_to_category: Sequence[int] | np.ndarray | None = None,
        *,
        class_names: Sequence[str] | None = None,
        name: str = "daipnet",
        split: str | None = None,
    ) -> None:
        self.ground_truth = ground_truth
        self.name = name
        self.split = split or ("test-dev2017" if self.test_dev else "val2017")
        if label_to_category is None:
            if ground_truth is None:
                raise ValueError("test-dev mode needs an explicit label_to_category table")
            label_to_category = label_to_category_table(ground_truth["categories"])
        self.label_to_category = np.asarray(label_to_category, np.int64)
        if class_names is None and ground_truth is not None:
            names = {int(c["id"]): c.get("name", str(c["id"])) for c in ground_truth["categories"]}
            class_names = [names.get(int(c), str(c)) for c in self.label_to_category[1:]]
        self.class_names = (
            list(class_names)
            if class_names is not None
            else [str(c) for c in self.label_to_category[1:]]
        )
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()
        self.summary_text = ""
        self._per_class: dict[str, dict[str, float]] = {}
        self._pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def test_dev(self) -> bool:
        return self.ground_truth is None or not self.ground_truth.get("annotations")

    def add_image(
        self,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        image_id: int,
        orig_size: Sequence[int],
    ) -> None:
        """Adds one image's detections ([N,4] normalised corners, [N], [N] in 1..K)."""
        self.image_ids.add(int(image_id))
        self.results.extend(
            detections_to_coco(boxes, scores, labels, image_id, orig_size, self.label_to_category)
        )

    def add_batch(
        self,
        boxes: np.ndarray,
        scores: np.ndarray,
        classes: np.ndarray,
        valid: np.ndarray,
        image_ids: np.ndarray,
        orig_sizes: np.ndarray,
        example_valid: np.ndarray | None = None,
    ) -> None:
        """`postprocess.detect`'s [B, D, …] outputs; orig_sizes [B, 2] (h, w); example_valid [B]."""
        boxes, scores, classes, valid = (np.asarray(a) for a in (boxes, scores, classes, valid))
        for b in range(boxes.shape[0]):
            if example_valid is not None and not bool(example_valid[b]):
                continue
            keep = valid[b].astype(bool)
            self.add_image(
                boxes[b][keep], scores[b][keep], classes[b][keep], image_ids[b], orig_sizes[b]
            )

    def leave_out_unevaluated(self) -> list[int]:
        """Restricts the ground truth to the images that were added and returns the ids of the
        others. The evaluation pipeline drops an image it cannot decode (a header that reads,
        data that does not); its objects would otherwise count as missed detections."""
        if self.ground_truth is None:
            return []
        listed = [int(i["id"]) for i in self.ground_truth.get("images", [])]
        lost = sorted(set(listed) - self.image_ids)
        if lost:
            gt = dict(self.ground_truth)
            gt["images"] = [i for i in gt["images"] if int(i["id"]) in self.image_ids]
            anns = gt.get("annotations", [])
            gt["annotations"] = [a for a in anns if int(a["image_id"]) in self.image_ids]
            self.ground_truth = gt
        return lost

    def write_results(self, path: str, write: Any = None) -> str:
        """Writes the results list as JSON to `path` (a file, or a directory: server file name),
        through `write(path, text)` when given (the evaluation loop's atomic write)."""
        if os.path.isdir(path):
            path = os.path.join(path, results_file_name(self.split, self.name))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if write is not None:
            write(path, json.dumps(self.results))
            return path
        with open(path, "w") as f:
            json.dump(self.results, f)
        return path

    def evaluate(self) -> dict[str, Any]:
        """COCOeval (bbox): the 12 standard numbers (-1 undefined) plus `per_class` AP / AP50."""
        # No detections at all: every number 0 (pycocotools cannot load an empty result list).
        if self.test_dev:
            return {}
        assert self.ground_truth is not None
        if not self.results:
            metrics: dict[str, Any] = dict.fromkeys(COCO_METRIC_NAMES, 0.0)
            metrics["per_class"] = {n: {"AP": 0.0, "AP50": 0.0} for n in self.class_names}
            # No detections: precision 0 at every recall point, as pycocotools would report.
            recall = np.linspace(0.0, 1.0, 101)
            self._per_class = metrics["per_class"]
            self._pr_curves = {n: (recall, np.zeros_like(recall)) for n in self.class_names}
            return metrics
        from pycocotools.cocoeval import COCOeval

        gt = _coco_from_dict(self.ground_truth)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dt = gt.loadRes([dict(r) for r in self.results])
            ev = COCOeval(gt, dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.summary_text = buf.getvalue()
        metrics = {n: float(v) for n, v in zip(COCO_METRIC_NAMES, ev.stats, strict=True)}
        metrics["per_class"] = per_class_ap(ev, self.label_to_category, self.class_names)
        self._per_class = metrics["per_class"]
        self._pr_curves = pr_curves(ev, self.label_to_category, self.class_names)
        return metrics

    def chart_data(self) -> dict[str, Any]:
        """After `evaluate`: per-class AP (None without ground truth) and PR curves at IoU 0.5."""
        return {
            "metric": "AP (IoU .50:.95)",
            "per_class_ap": {
                n: (None if r["AP"] < 0 else float(r["AP"])) for n, r in self._per_class.items()
            },
            "pr_title": "precision-recall at IoU 0.5 (COCO, 101 recall points)",
            "pr_curves": dict(self._pr_curves),
        }


def per_class_ap(
    ev: Any, label_to_category: np.ndarray, class_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per-class AP (.50:.95) and AP50 from `ev.eval['precision']` [T, R, K, A, M] (area all,
    maxDets 100, as `summarize`; -1 kept)."""
    precision = ev.eval["precision"]
    cat_ids = list(ev.params.catIds)
    iou50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(class_names):
        cat = int(label_to_category[k + 1])
        if cat not in cat_ids:
            continue
        p = precision[:, :, cat_ids.index(cat), 0, -1]
        p50 = p[iou50]
        out[name] = {
            "AP": float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0,
            "AP50": float(np.mean(p50[p50 > -1])) if np.any(p50 > -1) else -1.0,
        }
    return out


def pr_curves(
    ev: Any, label_to_category: np.ndarray, class_names: Sequence[str], iou: float = 0.5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class with ground truth: (recall [R], precision [R]) at IoU `iou` from
    `ev.eval['precision']` [T, R, K, A, M] (area all, maxDets 100)."""
    precision = ev.eval["precision"]
    cat_ids = list(ev.params.catIds)
    t = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - iou)))
    recall = np.asarray(ev.params.recThrs, np.float64)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, name in enumerate(class_names):
        cat = int(label_to_category[k + 1])
        if cat not in cat_ids:
            continue
        p = np.asarray(precision[t, :, cat_ids.index(cat), 0, -1], np.float64)
        if np.all(p < 0):
            continue
        out[name] = (recall, np.maximum(p, 0.0))
    return out


def results_file_name(split: str | None, name: str = "daipnet") -> str:
    """COCO server naming: `detections_<split>_<name>_results.json` (split default test-dev2017)."""
    return f"detections_{split or 'test-dev2017'}_{name}_results.json"


def format_table(per_class: Mapping[str, Mapping[str, float]]) -> str:
    if not per_class:
        return ""
    cols = list(next(iter(per_class.values())).keys())
    width = max(len("class"), *(len(n) for n in per_class))
    lines = [f"{'class':<{width}} " + " ".join(f"{c:>7}" for c in cols)]
    for name, row in per_class.items():
        vals = " ".join(
            f"{row[c]:7.4f}" if row[c] is not None and not np.isnan(row[c]) else f"{'n/a':>7}"
            for c in cols
        )
        lines.append(f"{name:<{width}} {vals}")
    return "\n".join(lines)
