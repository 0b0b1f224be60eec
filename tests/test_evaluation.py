"""COCO (pycocotools) and VOC evaluators on hand-made ground truth."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import coco_reference
import numpy as np
import pytest

from daipnet_jax.evaluation.coco import (
    COCO_METRIC_NAMES,
    CocoEvaluator,
    detections_to_coco,
    label_to_category_table,
)
from daipnet_jax.evaluation.voc import VocEvaluator, voc_ap

# ------------------------------------------------------------------ COCO
# Two images, two categories with non-contiguous ids (3 → label 1, 7 → label 2).
SIZES = {1: (100, 200), 2: (300, 150)}  # image id → (h, w)
GT_ANNS = [  # (image, category, [x, y, w, h] pixels)
    (1, 3, [10.0, 20.0, 50.0, 40.0]),
    (1, 7, [100.0, 10.0, 60.0, 80.0]),
    (2, 3, [30.0, 60.0, 90.0, 120.0]),
    (2, 3, [0.0, 0.0, 40.0, 40.0]),
]


def _gt() -> dict:
    return {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in SIZES.items()],
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
        "annotations": [
            {
                "id": n + 1,
                "image_id": i,
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
            }
            for n, (i, c, b) in enumerate(GT_ANNS)
        ],
    }


def _normalise(bbox_xywh, size):
    h, w = size
    x, y, bw, bh = bbox_xywh
    return [x / w, y / h, (x + bw) / w, (y + bh) / h]


def coco_to_detections(
    entries: Sequence[Mapping[str, Any]],
    orig_size: Sequence[int],
    label_to_category: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of `detections_to_coco` for one image: (boxes [N, 4] normalised corners,
    scores, labels), to check the round trip."""
    inverse = {int(c): k for k, c in enumerate(label_to_category) if k > 0}
    h, w = float(orig_size[0]), float(orig_size[1])
    xywh = np.asarray([e["bbox"] for e in entries], np.float64).reshape(-1, 4)
    corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes = corners / np.asarray([w, h, w, h])
    scores = np.asarray([e["score"] for e in entries], np.float64)
    labels = np.asarray([inverse[int(e["category_id"])] for e in entries], np.int64)
    return boxes, scores, labels


def test_label_table_sorted_ids():
    table = label_to_category_table(_gt()["categories"])
    np.testing.assert_array_equal(table, [0, 3, 7])


def test_coco_perfect_detections_give_ap_one():
    ev = CocoEvaluator(_gt())
    for i, c, b in GT_ANNS:
        label = {3: 1, 7: 2}[c]
        ev.add_image(np.array([_normalise(b, SIZES[i])]), [0.9], [label], i, SIZES[i])
    m = ev.evaluate()
    for k in ("AP", "AP50", "AP75", "APm", "APl", "AR10", "AR100", "ARm", "ARl"):
        assert m[k] == pytest.approx(1.0), k
    assert m["APs"] == -1.0  # no small object in the ground truth: pycocotools' "undefined"
    # AR1 (mean over categories): at maxDets=1 one detection per image counts, so category
    # 'a' (one object in image 1, two in image 2) recalls 2 of 3, category 'b' 1 of 1.
    assert m["AR1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert set(m["per_class"]) == {"a", "b"}
    for row in m["per_class"].values():
        assert row == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}


def test_coco_imperfect_detections_match_pycocotools(tmp_path):
    # Results written by hand in absolute pixels of the original images (2-decimal values).
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [12.0, 22.0, 50.0, 40.0], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [10.0, 20.0, 25.0, 40.0], "score": 0.8},
        {"image_id": 1, "category_id": 7, "bbox": [110.0, 15.0, 60.0, 70.0], "score": 0.35},
        {"image_id": 1, "category_id": 7, "bbox": [0.0, 50.0, 30.0, 30.0], "score": 0.6},
        {"image_id": 2, "category_id": 3, "bbox": [30.0, 66.0, 90.0, 105.0], "score": 0.7},
        {"image_id": 2, "category_id": 3, "bbox": [3.0, 1.5, 40.5, 36.0], "score": 0.5},
        {"image_id": 2, "category_id": 7, "bbox": [30.0, 60.0, 90.0, 120.0], "score": 0.45},
    ]
    expected = coco_reference.stats(_gt(), results)
    assert 0.1 < expected[0] < 0.9  # a non-trivial case

    # The same detections as `detect` would give them: normalised corners, labels 1..K, a
    # batch of 3 with one padding example and fixed-size D = 4 with a validity mask.
    cat_to_label = {3: 1, 7: 2}
    d = 4
    boxes = np.zeros((3, d, 4), np.float32)
    scores = np.zeros((3, d), np.float32)
    classes = np.ones((3, d), np.int32)
    valid = np.zeros((3, d), bool)
    fill = {0: 0, 1: 0}
    for r in results:
        b = {1: 0, 2: 1}[r["image_id"]]
        j = fill[b]
        fill[b] += 1
        boxes[b, j] = _normalise(r["bbox"], SIZES[r["image_id"]])
        scores[b, j] = r["score"]
        classes[b, j] = cat_to_label[r["category_id"]]
        valid[b, j] = True
    boxes[2] = 0.5  # padding example: must be skipped
    valid[2] = True
    ev = CocoEvaluator(_gt())
    ev.add_batch(
        boxes,
        scores,
        classes,
        valid,
        image_ids=np.array([1, 2, 1]),
        orig_sizes=np.array([SIZES[1], SIZES[2], SIZES[1]]),
        example_valid=np.array([True, True, False]),
    )
    m = ev.evaluate()
    got = np.array([m[k] for k in COCO_METRIC_NAMES])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)

    # The written file re-evaluates to the same numbers.
    path = ev.write_results(str(tmp_path / "res.json"))
    with open(path) as f:
        written = json.load(f)
    assert len(written) == len(results)
    np.testing.assert_allclose(coco_reference.stats(_gt(), written), expected, atol=1e-12)


def test_coco_mapping_round_trips():
    table = label_to_category_table([90, 1, 44])  # labels 1, 2, 3 → ids 1, 44, 90
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 0.5, (6, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (6, 2))], axis=1)
    labels = np.array([1, 2, 3, 3, 2, 1])
    scores = rng.uniform(0.01, 1, 6)
    size = (480, 640)
    entries = detections_to_coco(boxes, scores, labels, 42, size, table)
    assert [e["category_id"] for e in entries] == [1, 44, 90, 90, 44, 1]
    e = entries[0]
    # Absolute [x, y, w, h] of the original image, computed by hand.
    expected = [
        boxes[0, 0] * 640,
        boxes[0, 1] * 480,
        (boxes[0, 2] - boxes[0, 0]) * 640,
        (boxes[0, 3] - boxes[0, 1]) * 480,
    ]
    np.testing.assert_allclose(e["bbox"], expected, atol=0.006)
    b2, s2, l2 = coco_to_detections(entries, size, table)
    np.testing.assert_allclose(b2, boxes, atol=0.01 / 480)
    np.testing.assert_allclose(s2, scores, atol=1e-6)
    np.testing.assert_array_equal(l2, labels)


def test_coco_empty_detections_and_test_dev(tmp_path):
    m = CocoEvaluator(_gt()).evaluate()
    assert all(m[k] == 0.0 for k in COCO_METRIC_NAMES)

    gt = _gt()
    gt["annotations"] = []  # test-dev: images and categories only
    ev = CocoEvaluator(gt, name="tiny")
    ev.add_image(np.array([[0.1, 0.2, 0.3, 0.4]]), [0.5], [2], 2, SIZES[2])
    assert ev.evaluate() == {}
    path = ev.write_results(str(tmp_path))
    assert path.endswith("detections_test-dev2017_tiny_results.json")
    with open(path) as f:
        (entry,) = json.load(f)
    assert set(entry) == {"image_id", "category_id", "bbox", "score"}
    assert entry["category_id"] == 7 and entry["image_id"] == 2
    np.testing.assert_allclose(entry["bbox"], [15.0, 60.0, 30.0, 60.0])


# ------------------------------------------------------------------ VOC
# Hand-worked example in integer pixel coordinates (the evaluator uses continuous coordinates).
#
# Class 1: image 1 has A = [0,0,40,40] and a DIFFICULT B = [50,50,90,90];
#          image 2 has C = [10,10,50,50] and D = [60,10,90,40]; npos = 3 (A, C, D).
#   detections by score: 0.9 A (TP) · 0.8 A shifted by 2 px (IoU > .5 with the taken A:
#   duplicate → FP) · 0.7 B (difficult → ignored) · 0.6 C (TP) · 0.5 far box (FP) · 0.4 D (TP)
#   TP/FP (ignored dropped): T F T F T → cumTP 1 1 2 2 3, cumFP 0 1 1 2 2
#   recall    1/3 1/3 2/3 2/3 1
#   precision 1   1/2 2/3 1/2 3/5
#   VOC07: t = 0, .1, .2, .3 → 1; t = .4, .5, .6 → max(2/3, 1/2, 3/5) = 2/3; t = .7 … 1 → 3/5
#          AP = (4·1 + 3·2/3 + 4·3/5)/11 = 8.4/11
#   area:  envelope 1 up to recall 1/3, 2/3 up to 2/3, 3/5 up to 1
#          AP = 1/3·1 + 1/3·2/3 + 1/3·3/5 = 34/45
# Class 2: image 1 has E = [20,50,40,90]. Detections 0.3 [20,50,40,70] (IoU = 400/800 = 0.5
#   exactly, not > 0.5 → FP), 0.2 E (TP). recall 0, 1; precision 0, 1/2 → both APs 1/2.
# Class 3: no ground truth, one detection → AP undefined, not in the mean.
VOC_GT = {
    1: ([[0, 0, 40, 40], [50, 50, 90, 90], [20, 50, 40, 90]], [1, 1, 2], [False, True, False]),
    2: ([[10, 10, 50, 50], [60, 10, 90, 40]], [1, 1], [False, False]),
}
VOC_DETS = [  # (image, label, score, box)
    (1, 1, 0.9, [0, 0, 40, 40]),
    (1, 1, 0.8, [2, 2, 42, 42]),
    (1, 1, 0.7, [50, 50, 90, 90]),
    (2, 1, 0.6, [10, 10, 50, 50]),
    (2, 1, 0.5, [0, 60, 20, 90]),
    (2, 1, 0.4, [60, 10, 90, 40]),
    (1, 2, 0.3, [20, 50, 40, 70]),
    (1, 2, 0.2, [20, 50, 40, 90]),
    (2, 3, 0.9, [0, 0, 10, 10]),
]
VOC_AP07 = {"cat": 8.4 / 11, "dog": 0.5}
VOC_AREA = {"cat": 34 / 45, "dog": 0.5}


def _check_voc(m):
    for name in ("cat", "dog"):
        assert m["per_class"][name]["AP_voc07"] == pytest.approx(VOC_AP07[name], abs=1e-12)
        assert m["per_class"][name]["AP_area"] == pytest.approx(VOC_AREA[name], abs=1e-12)
    assert m["per_class"]["bird"] == {"AP_voc07": None, "AP_area": None}
    assert m["mAP_voc07"] == pytest.approx((8.4 / 11 + 0.5) / 2, abs=1e-12)
    assert m["mAP_area"] == pytest.approx((34 / 45 + 0.5) / 2, abs=1e-12)


def test_voc_hand_worked_example():
    ev = VocEvaluator(["cat", "dog", "bird"])
    for i, (b, lab, diff) in VOC_GT.items():
        ev.add_ground_truth(i, np.array(b, float), np.array(lab), np.array(diff))
    # Insert in a shuffled order: the evaluator must sort by score itself.
    for n in (5, 0, 8, 3, 1, 7, 2, 6, 4):
        i, lab, s, b = VOC_DETS[n]
        ev.add_image(i, np.array([b], float), [s], [lab])
    _check_voc(ev.evaluate())


def test_voc_from_coco_dict_and_batches():
    """Same example via a COCO-format ground truth (`difficult` flags) and `add_batch`."""
    size = {1: (100, 100), 2: (100, 100)}
    anns = []
    for i, (b, lab, diff) in VOC_GT.items():
        for box, la, d in zip(b, lab, diff, strict=True):
            x0, y0, x1, y1 = box
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": {1: 10, 2: 20}[la],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "difficult": int(d),
                    "iscrowd": 0,
                    "area": (x1 - x0) * (y1 - y0),
                }
            )
    gt = {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in size.items()],
        "categories": [
            {"id": 10, "name": "cat"},
            {"id": 20, "name": "dog"},
            {"id": 30, "name": "bird"},
        ],
        "annotations": anns,
    }
    ev = VocEvaluator.from_coco(gt)
    d = 6
    boxes = np.zeros((2, d, 4))
    scores = np.zeros((2, d))
    classes = np.ones((2, d), np.int32)
    valid = np.zeros((2, d), bool)
    fill = [0, 0]
    for i, lab, s, b in VOC_DETS:
        j = fill[i - 1]
        fill[i - 1] += 1
        boxes[i - 1, j] = np.array(b) / 100.0
        scores[i - 1, j], classes[i - 1, j], valid[i - 1, j] = s, lab, True
    ev.add_batch(boxes, scores, classes, valid, np.array([1, 2]))
    _check_voc(ev.evaluate())


def test_voc_ap_curves():
    # Perfect ranking: AP = 1 for both definitions.
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), True) == pytest.approx(1.0)
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), False) == pytest.approx(1.0)
    # Recall reaches only 0.5 at precision 1: 11-point → 6/11 (t = 0 … 0.5); area → 0.5.
    assert voc_ap(np.array([0.25, 0.5]), np.array([1.0, 1.0]), True) == pytest.approx(6 / 11)
    assert voc_ap(np.array([0.25, 0.5]), np.array([1.0, 1.0]), False) == pytest.approx(0.5)


def test_make_evaluator_picks_the_dataset_metric():
    from daipnet_jax.config import base_config
    from daipnet_jax.evaluation import make_evaluator

    gt = _gt()
    coco = make_evaluator(base_config("daipnet300", "coco"), gt)
    assert isinstance(coco, CocoEvaluator) and list(coco.label_to_category) == [0, 3, 7]
    voc = make_evaluator(base_config("daipnet300", "voc"), gt)
    assert isinstance(voc, VocEvaluator) and voc.class_names == ["a", "b"]
    # VOC from the same ground truth: perfect detections of every box → AP 1 per class.
    for i, c, b in GT_ANNS:
        voc.add_image(i, np.array([_normalise(b, SIZES[i])]), [0.9], [{3: 1, 7: 2}[c]])
    assert voc.evaluate()["mAP_voc07"] == pytest.approx(1.0)
    # The metric follows the data: a folder of the user's own data is a COCO-format folder,
    # even under the VOC recipe (whose tfds_name stays set), as are the generated data.
    folder = base_config("daipnet300", "voc")
    folder.data.source = "coco_folder"
    assert isinstance(make_evaluator(folder, gt), CocoEvaluator)
    generated = base_config("daipnet300", "generated")
    assert isinstance(make_evaluator(generated, gt), CocoEvaluator)
    voc07 = base_config("daipnet300", "voc")
    voc07.data.tfds_name = " voc/2007 "
    assert isinstance(make_evaluator(voc07, gt), VocEvaluator)


def test_training_eval_fn_builds_once_per_run(generated_config, tmp_path, monkeypatch):
    """The `eval_fn` train.py passes builds the model, data and jitted step at its first call and
    reuses them; nothing is kept between runs (a second `training_eval_fn` builds anew), and the
    metrics equal `run_evaluation`'s."""
    import jax

    from daipnet_jax import models
    from daipnet_jax.evaluation import loop
    from daipnet_jax.training import state as state_lib

    c = generated_config("daipnet300,width=0.0625")
    variables = state_lib.init_variables(models.build(c), c, jax.random.PRNGKey(0))
    builds = []
    real_build = models.build
    monkeypatch.setattr(models, "build", lambda config: builds.append(1) or real_build(config))
    eval_fn = loop.training_eval_fn(str(tmp_path))
    first = eval_fn(c, variables, 1)
    second = eval_fn(c, variables, 2)
    first.pop("images_per_s"), second.pop("images_per_s")
    assert len(builds) == 1 and first == second
    assert json.loads((tmp_path / "eval" / "metrics_2.json").read_text())["AP"] == first["AP"]
    loop.training_eval_fn()(c, variables, 3)
    assert len(builds) == 2
    reference = loop.run_evaluation(c, variables)
    assert reference["AP50"] == pytest.approx(first["AP50"], abs=1e-12)
