"""PASCAL VOC detection mAP: VOC07 11-point and area-based (VOC2010+) AP per class.

Follows the VOC devkit's `VOCevaldet` logic:
- per class, all detections of all images sorted by descending score;
- each detection is matched to the ground truth box of its class in its image with the highest
  IoU; if that IoU > 0.5 (strictly):
    - the box is `difficult`: the detection is ignored (neither TP nor FP);
    - the box is not yet taken: TP, and the box is taken;
    - the box is already taken (duplicate detection): FP;
  otherwise FP;
- recall = cumTP / #non-difficult boxes, precision = cumTP / (cumTP + cumFP);
- VOC07: AP = mean over t ∈ {0, 0.1, …, 1} of max(precision[recall ≥ t]) (0 if none);
- area (VOC2010+): area under the monotone (right-to-left running max) precision envelope.

choice: no "+1 pixel", so boxes stay normalised; stable sort; a class without non-difficult truth
has AP NaN, left out of the mean (docs/design.md, Evaluation).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from daipnet_jax import boxes as boxes_lib


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP of recall, precision [N] (detection order): VOC07 11-point, else area (VOC2010+)."""
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            mask = recall >= t - 1e-12
            ap += (float(np.max(precision[mask])) if np.any(mask) else 0.0) / 11.0
        return ap
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


class VocEvaluator:
    """Accumulates ground truth and detections (corners, one frame), then VOC07 / area mAP."""

    def __init__(self, class_names: Sequence[str], *, iou_threshold: float = 0.5) -> None:
        self.class_names = list(class_names)
        self.iou_threshold = iou_threshold
        # gt[label][image_id] = (boxes [G,4], difficult [G] bool)
        self._gt: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
        # dets[label] = list of (image_id, score, box)
        self._dets: dict[int, list[tuple[int, float, np.ndarray]]] = defaultdict(list)
        self.image_ids: set[int] = set()

    @classmethod
    def from_coco(
        cls,
        ground_truth: Mapping[str, Any],
        label_to_category: Sequence[int] | np.ndarray | None = None,
        *,
        iou_threshold: float = 0.5,
    ) -> VocEvaluator:
        """From COCO-format ground truth, normalised; difficult = `difficult` (else `iscrowd`)."""
        from daipnet_jax.evaluation.coco import label_to_category_table

        if label_to_category is None:
            label_to_category = label_to_category_table(ground_truth["categories"])
        table = np.asarray(label_to_category, np.int64)
        cat_to_label = {int(c): k for k, c in enumerate(table) if k > 0}
        names = {int(c["id"]): c.get("name", str(c["id"])) for c in ground_truth["categories"]}
        ev = cls([names.get(int(c), str(c)) for c in table[1:]], iou_threshold=iou_threshold)
        sizes = {
            int(im["id"]): (float(im["height"]), float(im["width"]))
            for im in ground_truth["images"]
        }
        per_image: dict[int, list[tuple[list[float], int, bool]]] = {i: [] for i in sizes}
        for ann in ground_truth.get("annotations", []):
            difficult = bool(ann.get("difficult", ann.get("iscrowd", 0)))
            per_image[int(ann["image_id"])].append(
                (ann["bbox"], cat_to_label[int(ann["category_id"])], difficult)
            )
        for image_id, anns in per_image.items():
            h, w = sizes[image_id]
            xywh = np.asarray([a[0] for a in anns], np.float64).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            boxes = boxes / np.asarray([w, h, w, h])
            ev.add_ground_truth(
                image_id, boxes, np.asarray([a[1] for a in anns]), np.asarray([a[2] for a in anns])
            )
        return ev

    def add_ground_truth(
        self,
        image_id: int,
        boxes: np.ndarray,
        labels: np.ndarray,
        difficult: np.ndarray | None = None,
    ) -> None:
        """One image's ground truth: boxes [G,4] corners, labels [G] in 1..K, difficult [G] bool."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        labels = np.asarray(labels, np.int64).reshape(-1)
        diff = (
            np.zeros(len(labels), bool)
            if difficult is None
            else np.asarray(difficult, bool).reshape(-1)
        )
        self.image_ids.add(int(image_id))
        for k in np.unique(labels):
            sel = labels == k
            old_b, old_d = self._gt[int(k)].get(
                int(image_id), (np.zeros((0, 4)), np.zeros(0, bool))
            )
            self._gt[int(k)][int(image_id)] = (
                np.concatenate([old_b, boxes[sel]]),
                np.concatenate([old_d, diff[sel]]),
            )

    def add_image(
        self, image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray
    ) -> None:
        """One image's detections: boxes [N,4] corners, scores [N], labels [N] in 1..K."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        for b, s, k in zip(
            boxes, np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1), strict=True
        ):
            self._dets[int(k)].append((int(image_id), float(s), b))

    def add_batch(
        self,
        boxes: np.ndarray,
        scores: np.ndarray,
        classes: np.ndarray,
        valid: np.ndarray,
        image_ids: np.ndarray,
        orig_sizes: np.ndarray | None = None,
        example_valid: np.ndarray | None = None,
    ) -> None:
        """`postprocess.detect` output for one batch (`orig_sizes` unused: as `CocoEvaluator`)."""
        del orig_sizes
        boxes, scores, classes, valid = (np.asarray(a) for a in (boxes, scores, classes, valid))
        for b in range(boxes.shape[0]):
            if example_valid is not None and not bool(example_valid[b]):
                continue
            keep = valid[b].astype(bool)
            self.add_image(int(image_ids[b]), boxes[b][keep], scores[b][keep], classes[b][keep])

    def pr_curve(self, label: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(recall [N], precision [N]) of class `label` by descending score, or None."""
        gt = self._gt.get(label, {})
        npos = int(sum(int(np.sum(~d)) for _, d in gt.values()))
        dets = self._dets.get(label, [])
        order = sorted(range(len(dets)), key=lambda i: -dets[i][1])  # stable
        taken = {i: np.zeros(len(d), bool) for i, (_, d) in gt.items()}
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for n, i in enumerate(order):
            image_id, _, box = dets[i]
            if image_id not in gt or len(gt[image_id][0]) == 0:
                fp[n] = 1
                continue
            gboxes, gdiff = gt[image_id]
            ious = boxes_lib.iou(box[None], gboxes, xp=np)[0]
            j = int(np.argmax(ious))
            if ious[j] > self.iou_threshold:
                if gdiff[j]:
                    continue  # ignored: neither TP nor FP
                if not taken[image_id][j]:
                    tp[n] = 1
                    taken[image_id][j] = True
                else:
                    fp[n] = 1  # duplicate
            else:
                fp[n] = 1
        if npos == 0:
            return None
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = ctp / npos
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        return recall, precision

    def class_ap(self, label: int) -> tuple[float, float]:
        """(VOC07 11-point AP, area AP) of class `label` (NaN, NaN without non-difficult truth)."""
        curve = self.pr_curve(label)
        if curve is None:
            return float("nan"), float("nan")
        recall, precision = curve
        # Ignored detections leave (tp, fp) unchanged: they add a repeated point to the curve,
        # which changes neither AP definition.
        return voc_ap(recall, precision, True), voc_ap(recall, precision, False)

    def chart_data(self) -> dict[str, Any]:
        """For `evaluation.charts`: per-class VOC07 AP (or None) and PR curves."""
        per_class: dict[str, float | None] = {}
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for k, name in enumerate(self.class_names, start=1):
            curve = self.pr_curve(k)
            per_class[name] = None if curve is None else voc_ap(*curve, use_07_metric=True)
            if curve is not None:
                curves[name] = curve
        return {
            "metric": "AP (VOC07 11-point)",
            "per_class_ap": per_class,
            "pr_title": f"precision-recall at IoU {self.iou_threshold:g} (VOC)",
            "pr_curves": curves,
        }

    def evaluate(self) -> dict[str, Any]:
        """{'mAP_voc07', 'mAP_area', 'per_class': {name: {'AP_voc07', 'AP_area'}}}."""
        per_class: dict[str, dict[str, float | None]] = {}
        ap07, aparea = [], []
        for k, name in enumerate(self.class_names, start=1):
            a07, aa = self.class_ap(k)
            per_class[name] = {
                "AP_voc07": None if np.isnan(a07) else a07,
                "AP_area": None if np.isnan(aa) else aa,
            }
            if not np.isnan(a07):
                ap07.append(a07)
                aparea.append(aa)
        return {
            "mAP_voc07": float(np.mean(ap07)) if ap07 else 0.0,
            "mAP_area": float(np.mean(aparea)) if aparea else 0.0,
            "per_class": per_class,
        }
