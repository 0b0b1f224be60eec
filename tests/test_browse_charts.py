"""The dataset browser, the evaluation charts and the model summary CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import coco_reference
import numpy as np
import pytest
from PIL import Image

from daipnet_jax.evaluation import CocoEvaluator, VocEvaluator, charts, write_metrics
from daipnet_jax.predict import draw_boxes, palette

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _box_band(shape, px_boxes, margin, tag_height=0, tag_width=0):
    """Mask of the pixels within `margin` of any box, plus a tag's room around its left
    corners (`tag_height` above and below, `tag_width` left and right)."""
    h, w = shape[:2]
    band = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in px_boxes:
        band[
            max(int(y0) - margin, 0) : int(np.ceil(y1)) + margin + 1,
            max(int(x0) - margin, 0) : int(np.ceil(x1)) + margin + 1,
        ] = True
        for y in (y0, y1):  # tags sit above / inside the top, or below / inside the bottom
            band[
                max(int(y) - tag_height, 0) : int(y) + tag_height + 1,
                max(int(x0) - tag_width, 0) : int(x0) + tag_width + 1,
            ] = True
    return band


def _check_drawn(drawn, original, px_boxes, tag_height=24, tag_width=130, margin=4):
    """Drawn differs from the original on every box's bottom edge, equals it away from boxes."""
    assert drawn.shape == original.shape
    changed = np.any(drawn != original, axis=-1)
    for x0, y0, x1, y1 in px_boxes:
        y = min(round(y1), drawn.shape[0] - 1)
        row = changed[max(y - 1, 0) : y + 2, int(np.ceil(x0)) + 2 : int(x1) - 2]
        assert row.any(axis=0).mean() > 0.9, (x0, y0, x1, y1)  # the bottom edge is drawn
    far = ~_box_band(drawn.shape, px_boxes, margin, tag_height, tag_width)
    assert far.sum() > 0.05 * far.size  # something left to compare
    assert not changed[far].any()


# ------------------------------------------------------------------ drawing
def test_draw_boxes_marks_boxes_only():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (150, 220, 3), dtype=np.uint8)
    boxes = np.array([[20.0, 60.0, 90.0, 130.0], [120.0, 10.0, 210.0, 80.0]])
    out = np.asarray(draw_boxes(img, boxes, np.array([1, 3]), ["a", "b", "c"]))
    _check_drawn(out, img, boxes)
    # The outline has the class colour; the second box starts near the top: its tag goes
    # inside the box, so the band above it is not needed there.
    np.testing.assert_array_equal(out[130, 50], palette(3)[1])
    np.testing.assert_array_equal(out[60, 210], palette(3)[3])


# ------------------------------------------------------------------ browser
def _folder_flags(data):
    return [
        "--config.data.source=coco_folder",
        f"--config.data.annotation_file={data['annotation_file']}",
        f"--config.data.image_dir={data['image_dir']}",
        f"--config.data.eval_annotation_file={data['eval_annotation_file']}",
        f"--config.data.eval_image_dir={data['eval_image_dir']}",
        "--config.model.num_classes=4",
    ]


def test_browse_ground_truth_cli_relative_paths(coco_folder_data, tmp_path):
    import tensorflow as tf

    data = {k: os.path.relpath(v, tmp_path) for k, v in coco_folder_data.items()}
    config = os.path.relpath(os.path.join(REPO, "configs", "coco.py"), tmp_path)
    proc = _cli(
        [
            "-m",
            "daipnet_jax.browse",
            f"--config={config}:daipnet300",
            *_folder_flags(data),
            "--split=eval",
            "--num=4",
            "--out=drawn",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(coco_folder_data["eval_annotation_file"]) as f:
        gt = json.load(f)
    images = {im["id"]: im for im in sorted(gt["images"], key=lambda i: i["id"])}
    written = sorted(os.listdir(tmp_path / "drawn"))
    assert len(written) == 4
    for n, image_id in enumerate(list(images)[:4]):
        name = f"eval_{n:03d}_{image_id}.png"
        assert name in written
        path = os.path.join(coco_folder_data["eval_image_dir"], images[image_id]["file_name"])
        original = tf.io.decode_image(tf.io.read_file(path), channels=3).numpy()
        drawn = np.asarray(Image.open(tmp_path / "drawn" / name).convert("RGB"))
        boxes = [
            [x, y, x + w, y + h]
            for a in gt["annotations"]
            if a["image_id"] == image_id
            for x, y, w, h in [a["bbox"]]
        ]
        _check_drawn(drawn, original, boxes)


def test_browse_augmented_matches_train_iterator(generated_config, generated_data, tmp_path):
    from daipnet_jax import data

    config = generated_config("daipnet300")
    flags = [
        "--config=" + os.path.join(REPO, "configs", "generated.py") + ":daipnet300",
        f"--config.data.data_dir={generated_data['dir']}",
        f"--config.data.generated_num_train={generated_data['num_train']}",
        f"--config.data.generated_num_val={generated_data['num_val']}",
        f"--config.data.generated_num_classes={generated_data['num_classes']}",
        f"--config.data.generated_image_size={generated_data['image_size']}",
        f"--config.data.generated_seed={generated_data['seed']}",
    ]
    proc = _cli(
        ["-m", "daipnet_jax.browse", *flags, "--augmented", "--num=3", f"--out={tmp_path}"],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
    s = config.model.image_size
    for n in range(3):
        drawn = np.asarray(Image.open(tmp_path / f"augmented_{n:03d}.png").convert("RGB"))
        image = np.clip(np.round(batch["image"][n]), 0, 255).astype(np.uint8)
        boxes = batch["boxes"][n][batch["mask"][n]] * s
        assert len(boxes) > 0
        _check_drawn(drawn, image, boxes)


def test_browse_bad_input(tmp_path, coco_folder_data):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    cases = [
        (str(tmp_path / "missing.json"), "missing.json"),
        (str(empty), "has no images"),
    ]
    for ann, msg in cases:
        d = dict(coco_folder_data, annotation_file=ann)
        proc = _cli(
            [
                "-m",
                "daipnet_jax.browse",
                "--config=configs/coco.py:daipnet300",
                *_folder_flags(d),
                f"--out={tmp_path / 'o'}",
            ],
            cwd=REPO,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and msg in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ charts
class _Writer:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, values):
        self.scalars.update({k: (step, float(v)) for k, v in values.items()})

    def flush(self):
        pass


def _bar_runs(png_path, colour):
    """(number of bars, their widths in pixels) from the rows of `colour` in the image."""
    im = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mask = np.all(im == rgb, axis=-1)
    rows = mask.any(axis=1)
    starts = np.nonzero(rows & ~np.concatenate([[False], rows[:-1]]))[0]
    ends = np.nonzero(rows & ~np.concatenate([rows[1:], [False]]))[0]
    widths = [int(mask[(a + b) // 2].sum()) for a, b in zip(starts, ends, strict=True)]
    return len(starts), widths


def _coco_case():
    """3 classes; class c has 4 ground-truth boxes, and c + 1 of them are detected (the rest
    missed) plus one false positive scoring highest, so the APs differ per class."""
    rng = np.random.default_rng(0)
    cats = [4, 9, 17]
    gt = {"images": [], "annotations": [], "categories": []}
    for c in cats:
        gt["categories"].append({"id": c, "name": f"class{c}"})
    dets = []
    for i in range(4):
        gt["images"].append({"id": i + 1, "height": 200, "width": 300})
    for k, c in enumerate(cats):
        for i in range(4):
            x, y = float(rng.integers(0, 150)), float(rng.integers(0, 100))
            box = [x, y, 80.0, 60.0]
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": c,
                 "bbox": box, "area": 4800.0, "iscrowd": 0}
            )  # fmt: skip
            if i <= k:
                dets.append((i + 1, k + 1, box, 0.5 + 0.1 * i))
        dets.append((1, k + 1, [250.0, 150.0, 40.0, 40.0], 0.95))  # a false positive
    return gt, cats, dets


def test_coco_charts_one_bar_and_curve_per_class(tmp_path):

    gt, cats, dets = _coco_case()
    ev = CocoEvaluator(gt, [0, *cats])
    for image_id, label, (x, y, w, h), score in dets:
        box = np.array([[x / 300, y / 200, (x + w) / 300, (y + h) / 200]])
        ev.add_image(box, np.array([score]), np.array([label]), image_id, (200, 300))
    metrics = ev.evaluate()
    writer = _Writer()
    write_metrics(metrics, str(tmp_path), 5, evaluator=ev, writer=writer)
    bars_png = tmp_path / "eval" / charts.PER_CLASS_AP_FILE
    assert bars_png.exists() and (tmp_path / "eval" / charts.PR_CURVES_FILE).exists()

    # pycocotools itself, run here: per-class AP and the precision at IoU 0.5.
    ce = coco_reference.cocoeval(dict(gt, info={}, licenses=[]), ev.results)
    prec = ce.eval["precision"]
    ap = [float(np.mean(prec[:, :, k, 0, -1])) for k in range(3)]
    assert len(set(np.round(ap, 4))) == 3 and min(ap) > 0

    # Bars: one per class, lengths proportional to the APs.
    n, widths = _bar_runs(bars_png, charts.BAR_COLOUR)
    assert n == 3
    np.testing.assert_allclose(np.array(widths) / widths[-1], np.array(ap) / ap[-1], rtol=0.03)

    # TensorBoard: one scalar per class, pycocotools' AP.
    for k, c in enumerate(cats):
        step, value = writer.scalars[f"eval/per_class/class{c}"]
        assert step == 5 and value == pytest.approx(ap[k], abs=1e-9)

    # PR curves: one panel per class with pycocotools' precision at IoU 0.5, visible in it.
    fig = charts.draw_pr_curves(
        ev.chart_data()["pr_curves"],
        str(tmp_path / "pr.png"),
        class_names=[f"class{c}" for c in cats],
    )
    im = np.asarray(Image.open(tmp_path / "pr.png").convert("RGB")).astype(int)
    curve_rgb = tuple(int(charts.CURVE_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    assert len(fig.axes) == 3
    for k, ax in enumerate(fig.axes):
        (line,) = ax.get_lines()
        np.testing.assert_allclose(line.get_xdata(), ce.params.recThrs)
        np.testing.assert_allclose(line.get_ydata(), np.maximum(prec[0, :, k, 0, -1], 0))
        x0, y0, x1, y1 = ax.get_window_extent().extents
        h = im.shape[0]
        panel = im[int(h - y1) : int(h - y0), int(x0) : int(x1)]
        assert np.all(panel == curve_rgb, axis=-1).sum() > 50


def test_voc_charts_hand_worked(tmp_path):
    ev = VocEvaluator(["cat", "dog"])
    ev.add_ground_truth(1, np.array([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]), np.array([1, 1]))
    ev.add_ground_truth(2, np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([2]))
    # cat: TP (0.9), FP (0.8), TP (0.7) → recall .5 .5 1, precision 1 .5 2/3.
    ev.add_image(
        1,
        np.array([[0.1, 0.1, 0.4, 0.4], [0.6, 0.1, 0.9, 0.3], [0.5, 0.5, 0.9, 0.9]]),
        np.array([0.9, 0.8, 0.7]),
        np.array([1, 1, 1]),
    )
    ev.add_image(2, np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([0.6]), np.array([2]))
    data = ev.chart_data()
    recall, precision = data["pr_curves"]["cat"]
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    # VOC07 11-point: recall ≤ .5 → 1 (6 points), > .5 → 2/3 (5 points).
    assert data["per_class_ap"]["cat"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert data["per_class_ap"]["dog"] == pytest.approx(1.0)
    writer = _Writer()
    paths = charts.write_charts(data, str(tmp_path), writer, 3)
    assert [os.path.basename(p) for p in paths] == [charts.PER_CLASS_AP_FILE, charts.PR_CURVES_FILE]
    n, widths = _bar_runs(paths[0], charts.BAR_COLOUR)
    assert n == 2 and widths[0] / widths[1] == pytest.approx((6 + 5 * 2 / 3) / 11, rel=0.03)
    assert set(writer.scalars) == {"eval/per_class/cat", "eval/per_class/dog"}
    # A class without ground truth: no bar, no scalar, an empty panel.
    ev2 = VocEvaluator(["cat", "dog", "cow"])
    ev2.add_ground_truth(1, np.array([[0.1, 0.1, 0.4, 0.4]]), np.array([1]))
    ev2.add_image(1, np.array([[0.1, 0.1, 0.4, 0.4]]), np.array([0.9]), np.array([1]))
    data2 = ev2.chart_data()
    assert data2["per_class_ap"] == {"cat": pytest.approx(1.0), "dog": None, "cow": None}
    paths = charts.write_charts(data2, str(tmp_path / "b"), _Writer(), 0)
    assert _bar_runs(paths[0], charts.BAR_COLOUR)[0] == 1
    assert charts.tag_name("traffic light") == "traffic_light"


# ------------------------------------------------------------------ model summary CLI
def test_model_summary_cli_overrides():
    proc = _cli(
        [
            "-m",
            "daipnet_jax.models",
            "--config=configs/generated.py:daipnet300",
            "--config.model.width=0.125",
            "--config.model.num_classes=7",
            "--noflops",
        ],
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classes=7 width=0.125" in proc.stdout
    assert "logits [1, 11620, 7]" in proc.stdout
    proc = _cli(
        ["-m", "daipnet_jax.models", "--config=configs/generated.py", "--config.model.widht=1"],
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last
        == "error: --config.model.widht: no such config key; did you mean --config.model.width?"
    )
    for tool in ("daipnet_jax.models", "daipnet_jax.browse"):
        proc = _cli(["-m", tool, "--config=configs/nope.py"], cwd=REPO, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last == "error: --config: No such file or directory: 'configs/nope.py'", tool
