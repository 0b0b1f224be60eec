"""Evaluation loop, evaluate.py, predict and the SavedModel export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import coco_reference
import jax
import numpy as np
import pytest
from PIL import Image

from daipnet_jax import boxes as boxes_lib
from daipnet_jax.checkpoints import CheckpointError, check_variables
from daipnet_jax.checkpoints import load_variables as load_checkpoint
from daipnet_jax.config import base_config
from daipnet_jax.evaluation import CocoEvaluator, evaluate
from daipnet_jax.predict import (
    InputError,
    collect_images,
    draw_boxes,
    load_image,
    output_names,
    palette,
    parse_class_filter,
    select_detections,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ loop with a scripted model
class _ScriptedModel:
    """`apply`: image b asks, through its pixel (0, 0), for one confident detection of label
    `image[b,0,0,1]` on prior `image[b,0,0,0]` (box = the prior, loc = 0); nothing else
    scores above 0.01 (background logit 10 everywhere)."""

    def __init__(self, num_priors: int, num_classes: int):
        self.p, self.c = num_priors, num_classes

    def apply(self, variables, images, train=False):
        import jax.numpy as jnp

        idx = images[:, 0, 0, 0].astype(jnp.int32)
        lab = images[:, 0, 0, 1].astype(jnp.int32)
        hit = jax.nn.one_hot(idx, self.p)[:, :, None] * jax.nn.one_hot(lab, self.c)[:, None, :]
        logits = 10.0 * jax.nn.one_hot(0, self.c) + (20.0 + variables["x"]) * hit
        return jnp.zeros((images.shape[0], self.p, 4)), logits


def test_evaluate_loop_maps_back_and_skips_padding(tmp_path):
    config = base_config("daipnet300", "generated", width=0.125)
    config.model.num_classes = 4
    priors = boxes_lib.prior_boxes(config)
    corners = np.concatenate(
        [priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1
    )
    inside = np.nonzero(np.all((corners > 0.05) & (corners < 0.95), axis=1))[0]
    idx = inside[[10, 500, 3000, 10]]
    labels = np.array([1, 3, 2, 1])
    sizes = np.array([[100, 200], [480, 640], [300, 300], [1, 1]])
    ids = np.array([11, 12, 13, -1])  # the last row is a padding example (valid=False)
    cats = [5, 9, 2]  # label k ↔ category cats[k-1]
    gt = {
        "images": [
            {"id": int(i), "height": int(h), "width": int(w)}
            for i, (h, w) in zip(ids[:3], sizes[:3], strict=True)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in cats],
        "annotations": [],
    }
    for n in range(3):  # ground truth = the prior's box in pixels of the original image
        h, w = sizes[n]
        x0, y0, x1, y1 = corners[idx[n]] * np.array([w, h, w, h])
        gt["annotations"].append(
            {
                "id": n + 1,
                "image_id": int(ids[n]),
                "category_id": cats[labels[n] - 1],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
        )
    images = np.zeros((4, 300, 300, 3), np.float32)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = idx, labels
    batches = [
        {
            "image": images[s : s + 2],
            "image_id": ids[s : s + 2],
            "orig_size": sizes[s : s + 2],
            "valid": ids[s : s + 2] >= 0,
        }
        for s in (0, 2)
    ]
    ev = CocoEvaluator(gt, [0, *cats])
    m = evaluate(
        config,
        {"x": np.float32(0.0)},
        batches,
        ev,
        model=_ScriptedModel(len(priors), 4),
        workdir=str(tmp_path),
        step=7,
    )
    assert m["num_images"] == 3
    assert len(ev.results) == 3  # the padding row's detection is dropped
    assert m["AP"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    by_image = {r["image_id"]: r for r in ev.results}
    for n in range(3):
        r = by_image[int(ids[n])]
        assert r["category_id"] == cats[labels[n] - 1]
        np.testing.assert_allclose(r["bbox"], gt["annotations"][n]["bbox"], atol=0.006)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["step"] == 7 and written["AP"] == pytest.approx(1.0)
    assert (tmp_path / "eval" / "metrics_7.json").exists()
    assert (tmp_path / "eval" / "detections_val2017_daipnet_results.json").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_errors(tmp_path):
    import orbax.checkpoint as ocp

    tree = {
        "params": {
            "conv": {"kernel": np.ones((3, 3, 3, 8), np.float32), "bias": np.zeros(8, np.float32)}
        },
        "batch_stats": {"bn": {"mean": np.arange(8, dtype=np.float32)}},
    }
    path = tmp_path / "converted"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(str(path), tree)
    ckptr.wait_until_finished()
    got = load_checkpoint(str(path))
    np.testing.assert_array_equal(got["batch_stats"]["bn"]["mean"], np.arange(8))
    check_variables(tree, got)  # fits itself

    wrong = {
        "params": {"conv": {"kernel": np.ones((3, 3, 3, 16)), "bias": np.zeros(16)}},
        "batch_stats": tree["batch_stats"],
    }
    with pytest.raises(
        CheckpointError, match=r"\['params'\]\['conv'\]\['bias'\] has shape \(8,\).*\(16,\)"
    ):
        check_variables(wrong, got)
    extra = {"params": {**wrong["params"], "head": {"kernel": np.ones(2)}}, "batch_stats": {}}
    with pytest.raises(CheckpointError, match=r"missing|shape"):
        check_variables(extra, got)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(str(tmp_path / "empty"))


# ------------------------------------------------------------------ predict helpers
def test_collect_and_load_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="contains no images"):
        collect_images([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="does not exist"):
        collect_images([str(tmp_path / "missing.jpg")])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match=r"cannot read image .*bad\.jpg"):
        load_image(bad)
    good = tmp_path / "imgs"
    good.mkdir()
    for n in ("b.png", "a.jpg", "notes.txt"):
        if n.endswith("txt"):
            (good / n).write_text("x")
        else:
            Image.new("RGB", (8, 6)).save(good / n)
    assert [p.name for p in collect_images([str(good)])] == ["a.jpg", "b.png"]
    assert load_image(good / "b.png").shape == (6, 8, 3)


def test_load_image_decodes_as_the_evaluation_pipeline(tmp_path):
    """predict sees the pixels evaluation sees: a 16-bit PNG was clipped to white by PIL's
    convert (TensorFlow scales it to 8 bits), and PIL's JPEG decoder rounds differently."""
    from daipnet_jax.data import pipeline

    rng = np.random.default_rng(0)
    v16 = rng.integers(0, 65536, (20, 30)).astype(np.uint16)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(v16).save(tmp_path / "i16.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", progressive=True)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    with Image.open(tmp_path / "i16.png") as im:
        assert im.mode == "I;16"
    for name in ("i16.png", "cmyk.jpg", "rgb.jpg", "p.png"):
        want = pipeline.decode({"path": str(tmp_path / name)}).numpy()
        np.testing.assert_array_equal(load_image(tmp_path / name), want, err_msg=name)
    scaled = np.round(v16 * (255 / 65535)).astype(int)  # 16 → 8 bits, independently
    got = load_image(tmp_path / "i16.png").astype(int)
    assert np.abs(got - scaled[..., None]).max() <= 1


def test_label_map_for_without_the_data(tmp_path):
    """predict and export name classes without needing (or writing) the training data: the
    generator's names for a generated set not written yet (and nothing is written), the
    builder's table for tfds, COCO's names for 81 classes whose folder is gone."""
    from daipnet_jax.data.generated import SHAPES
    from daipnet_jax.data.tfds_sources import COCO_CATEGORY_IDS, COCO_NAMES
    from daipnet_jax.predict import label_map_for

    c = base_config("daipnet300", "generated", width=0.125)
    c.data.data_dir = str(tmp_path / "not_written")
    assert label_map_for(c) == ([1, 2, 3], list(SHAPES[:3]))
    assert not (tmp_path / "not_written").exists()
    assert label_map_for(base_config("daipnet300", "coco")) == (
        list(COCO_CATEGORY_IDS),
        list(COCO_NAMES),
    )
    gone = base_config("daipnet300", "coco_folder")
    gone.data.annotation_file = str(tmp_path / "gone.json")
    assert label_map_for(gone) == (list(COCO_CATEGORY_IDS), list(COCO_NAMES))
    gone.model.num_classes = 3
    assert label_map_for(gone) == ([1, 2], ["class 1", "class 2"])


def test_predict_json_carries_the_users_category_ids(tmp_path):
    """Labels are 1..K; the JSON also names the dataset's own category id. The names and ids
    come from the training annotation file, as the labels do: an evaluation file listing only
    some categories gave `class k` names and ids 1..K."""
    from daipnet_jax.predict import label_map_for, predict_files

    cats = [(1, "a"), (7, "b"), (90, "c"), (1000, "d")]
    train_json, eval_json = tmp_path / "train.json", tmp_path / "val.json"
    train_json.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": i, "name": n} for i, n in cats]}))  # fmt: skip
    eval_json.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": i, "name": n} for i, n in cats[1:]]}))  # fmt: skip
    c = base_config("daipnet300", "coco_folder", width=0.125)
    c.data.source = "coco_folder"
    c.model.num_classes = len(cats) + 1
    c.data.annotation_file, c.data.eval_annotation_file = str(train_json), str(eval_json)
    assert label_map_for(c) == ([i for i, _ in cats], [n for _, n in cats])
    # The scripted model detects label 3 (category 90) on prior 5, read from the pixels.
    num_priors = len(boxes_lib.prior_boxes(c))
    img = np.zeros((40, 50, 3), np.uint8)
    img[..., 0], img[..., 1] = 5, 3
    Image.fromarray(img).save(tmp_path / "x.png")
    (rec,) = predict_files(
        c,
        {"x": jax.numpy.zeros(())},
        [tmp_path / "x.png"],
        str(tmp_path / "out"),
        score_threshold=0.5,
        batch_size=1,
        model=_ScriptedModel(num_priors, len(cats) + 1),
    )
    (det,) = rec["detections"]
    assert (det["label"], det["category_id"], det["class_name"]) == (3, 90, "c")
    assert (
        json.loads((tmp_path / "out" / "x.json").read_text())["detections"][0]["category_id"] == 90
    )


def test_draw_boxes_marks_box_outline():
    img = np.full((120, 160, 3), 128, np.uint8)
    names = ["a", "b", "c"]
    box = np.array([[40.0, 50.0, 120.0, 110.0]])
    out = np.asarray(draw_boxes(img, box, np.array([2]), names, np.array([0.9])))
    col = palette(3)[2]
    assert out.shape == img.shape
    # Outline pixels: left edge at x = 40 (rows below the label tag), bottom edge at y = 110.
    np.testing.assert_array_equal(out[90, 40], col)
    np.testing.assert_array_equal(out[110, 80], col)
    # Interior and outside untouched.
    np.testing.assert_array_equal(out[95, 80], [128, 128, 128])
    np.testing.assert_array_equal(out[5, 5], [128, 128, 128])
    # The tag above the box has the class colour and some text pixels of another colour.
    tag = out[30:50, 40:70].reshape(-1, 3)
    assert np.any(np.all(tag == col, axis=1)) and np.any(np.any(tag != col, axis=1))
    # Palette: distinct colours.
    assert len(set(palette(80)[1:])) == 80


def _contrast(a, b):
    """WCAG 2 contrast ratio of two sRGB colours."""

    def lum(c):
        c = np.asarray(c, np.float64) / 255.0
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    hi, lo = sorted([lum(a), lum(b)], reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_legend_readable_on_small_images():
    """Tags on a 64×64 image: inside the image even for a box at its right or top edge, at
    least 12 px high, text in black or white with WCAG contrast ≥ 4.5 against the tag."""
    names = [f"class{k}" for k in range(1, 81)]
    for label in (1, 2, 3, 5, 8, 13, 21, 34, 55, 80):
        img = np.full((64, 64, 3), 128, np.uint8)
        out = np.asarray(
            draw_boxes(img, np.array([[50.0, 2.0, 63.0, 30.0]]), np.array([label]), names, [0.5])
        )
        col = np.array(palette(80)[label])
        tag = np.all(out == col, axis=-1)
        rows = np.nonzero(tag[:, :49].any(axis=1))[0]  # tag pixels left of the box
        assert rows.size and rows.max() - rows.min() + 1 >= 12
        cols = np.nonzero(tag.any(axis=0))[0]
        assert cols.min() < 40  # shifted left so "class80 0.50" fits
        region = out[rows.min() : rows.max() + 1, : cols.max() + 1].reshape(-1, 3).astype(int)
        far = region[np.argmax(np.abs(region - col).sum(axis=1))]  # the text's core colour
        assert tuple(far) in ((0, 0, 0), (255, 255, 255)), far
        assert _contrast(far, col) >= 4.5
    # Two boxes whose tags would overlap above them: the lesser tag moves to a free spot,
    # so both are whole (at least 12 rows with 14+ pixels of each class colour; a tag hidden
    # behind the other would leave a 10-pixel sliver).
    img = np.full((120, 160, 3), 128, np.uint8)
    near = np.array([[10.0, 30.0, 80.0, 90.0], [20.0, 33.0, 90.0, 95.0]])
    out = np.asarray(draw_boxes(img, near, np.array([1, 2]), ["a", "b"], [0.9, 0.5]))
    for label in (1, 2):
        rows = np.all(out == palette(2)[label], axis=-1).sum(axis=1)
        assert (rows >= 14).sum() >= 12, label
    # Best first: with a cap of 1 only the best box is drawn.
    img = np.full((100, 100, 3), 128, np.uint8)
    two = np.array([[10.0, 30.0, 40.0, 60.0], [60.0, 30.0, 90.0, 60.0]])
    out = np.asarray(draw_boxes(img, two, np.array([1, 2]), ["a", "b"], [0.3, 0.9], max_boxes=1))
    np.testing.assert_array_equal(out[45, 10], [128, 128, 128])  # the 0.3 box: not drawn
    np.testing.assert_array_equal(out[45, 60], palette(2)[2])


def test_select_and_filter_detections():
    scores = np.array([0.2, 0.9, 0.5, 0.7, 0.95, 0.1])
    classes = np.array([1, 2, 3, 2, 1, 3])
    valid = np.array([True, True, True, True, False, True])
    np.testing.assert_array_equal(select_detections(scores, classes, valid), [1, 3, 2, 0, 5])
    np.testing.assert_array_equal(
        select_detections(scores, classes, valid, score_threshold=0.3, max_boxes=2), [1, 3]
    )
    np.testing.assert_array_equal(
        select_detections(scores, classes, valid, classes_kept={1, 3}), [2, 0, 5]
    )
    names = ["cat", "dog", "traffic light"]
    assert parse_class_filter("", names) is None
    assert parse_class_filter("traffic light, cat", names) == {1, 3}
    with pytest.raises(
        InputError, match=r"unknown class 'cow'.*valid names: cat, dog, traffic light"
    ):
        parse_class_filter("cat,cow", names)


def test_collect_recursive_dedup_and_output_names(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    for rel in ("x.jpg", "x.png", "y.jpg", "sub/x.jpg", "sub/deeper/z.jpg", "../other/x.jpg"):
        Image.new("RGB", (4, 4)).save(root / rel)
    (root / "link.jpg").symlink_to(root / "y.jpg")
    flat = collect_images([str(root)])
    assert [p.name for p in flat] == ["link.jpg", "x.jpg", "x.png"]  # y.jpg: its link came first
    rec = collect_images(
        [str(root / "y.jpg"), str(root), str(root / "sub"), str(tmp_path / "other" / "x.jpg")],
        recursive=True,
    )
    rel = [os.path.relpath(p.resolve(), tmp_path) for p in rec]
    assert rel == [
        "imgs/y.jpg",
        "imgs/sub/deeper/z.jpg",
        "imgs/sub/x.jpg",
        "imgs/x.jpg",
        "imgs/x.png",
        "other/x.jpg",
    ]
    names = output_names(rec)
    assert names == ["y", "z", "sub_x_jpg", "imgs_x_jpg", "imgs_x_png", "other_x_jpg"]
    assert output_names([root / "x.jpg", root / "x.png"]) == ["x_jpg", "x_png"]
    assert output_names([root / "x.jpg", root / "sub" / "x.jpg"]) == ["imgs_x", "sub_x"]
    with pytest.raises(InputError, match="or its sub-folders contains no images"):
        (tmp_path / "none" / "deep").mkdir(parents=True)
        collect_images([str(tmp_path / "none")], recursive=True)


def test_predict_cli_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    predict = [
        "daipnet_jax.predict",
        f"--config.data.data_dir={tmp_path / 'no_data'}",
        f"--checkpoint={tmp_path}",
        f"--out={tmp_path}/o",
    ]
    # The export command: a missing checkpoint or a batch of no images.
    export = ["daipnet_jax.export", f"--checkpoint={tmp_path / 'nope'}", f"--out={tmp_path}/sm"]
    for command, args, msg in (
        (predict, [str(tmp_path / "empty")], "contains no images"),
        (predict, [str(bad)], "cannot read image"),
        (
            predict,
            [str(good), "--classes=ellipse,elipse"],
            "unknown class 'elipse'; valid names: rectangle, ellipse, triangle",
        ),
        (predict, [str(good), "--batch_size=-1"], "--batch_size must be >= 0"),
        (export, [], "does not exist"),
        (export, ["--batch_size=0"], "--batch_size must be >= 1"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                command[0],
                "--config=configs/generated.py",
                *command[1:],
                *args,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert msg in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ end to end on a tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A width-0.125 DAIPNet300 (random init) saved as a converted checkpoint, and a small
    generated dataset."""
    import orbax.checkpoint as ocp

    from configs.generated import get_config
    from daipnet_jax import models

    root = tmp_path_factory.mktemp("tiny")
    overrides = {
        "data.data_dir": str(root / "data"),
        "data.generated_num_train": 2,
        "data.generated_num_val": 3,
        "train.eval_batch_size": 2,
    }
    config = get_config("daipnet300,width=0.125")
    for k, v in overrides.items():
        sec, key = k.split(".")
        config[sec][key] = v
    model = models.build(config)
    variables = jax.jit(
        lambda: model.init(
            jax.random.PRNGKey(0), np.zeros((1, 300, 300, 3), np.float32), train=False
        )
    )()
    variables = jax.device_get(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    )
    ckpt = root / "ckpt"
    c = ocp.StandardCheckpointer()
    c.save(str(ckpt), variables)
    c.wait_until_finished()
    flags = ["--config=configs/generated.py:daipnet300,width=0.125"] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]
    return dict(
        config=config, model=model, variables=variables, ckpt=str(ckpt), root=root, flags=flags
    )


def _run(args, timeout=600):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    return proc


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tiny):

    from daipnet_jax import data

    out = tiny["root"] / "eval_out"
    proc = _run(["evaluate.py", *tiny["flags"], f"--checkpoint={tiny['ckpt']}", f"--workdir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 3
    results_file = out / "eval" / "detections_val2017_daipnet300_generated_results.json"
    results = json.loads(results_file.read_text())
    gt = data.eval_ground_truth(tiny["config"])
    assert {r["image_id"] for r in results} <= {im["id"] for im in gt["images"]}
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    # The written numbers are pycocotools' own on the written results file.
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    ev = coco_reference.cocoeval(gt, results_file)
    np.testing.assert_allclose([metrics[k] for k in names], ev.stats, atol=1e-12)
    # The charts beside metrics.json and the per-class AP in TensorBoard, pycocotools' values.
    import tensorflow as tf

    assert (out / "eval" / "per_class_ap.png").exists()
    assert (out / "eval" / "pr_curves.png").exists()
    tags = {}
    for f in os.listdir(out):
        if f.startswith("events.out.tfevents"):
            for e in tf.compat.v1.train.summary_iterator(str(out / f)):
                for v in e.summary.value:
                    tags[v.tag] = float(tf.make_ndarray(v.tensor))
    for k, name in enumerate(["rectangle", "ellipse", "triangle"]):
        p = ev.eval["precision"][:, :, k, 0, -1]
        assert tags[f"eval/per_class/{name}"] == pytest.approx(float(np.mean(p[p > -1])), abs=1e-6)

    # A mismatched checkpoint (other width) and a missing one: clear errors, exit code 2.
    flags = [f.replace("width=0.125", "width=0.25") for f in tiny["flags"]]
    proc = _run(["evaluate.py", *flags, f"--checkpoint={tiny['ckpt']}"])
    assert proc.returncode == 2 and "does not fit the model" in proc.stderr
    proc = _run(["evaluate.py", *tiny["flags"], f"--checkpoint={tiny['root'] / 'missing'}"])
    assert proc.returncode == 2 and "does not exist" in proc.stderr

    # A training workdir (the trainer's Checkpointer layout) with steps 3 and 5: --step 3.
    import optax

    from daipnet_jax.checkpoints import Checkpointer
    from daipnet_jax.training.state import create_train_state

    workdir = tiny["root"] / "train_run"
    ck = Checkpointer(workdir / "checkpoints", keep=3)
    state = create_train_state(tiny["variables"], optax.sgd(0.1), jax.random.PRNGKey(0))
    for step in (3, 5):
        ck.save(step, state.replace(step=np.int32(step)), {"data_position": step, "step": step})
    ck.close()
    proc = _run(["evaluate.py", *tiny["flags"], f"--workdir={workdir}", "--step=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_step = json.loads((workdir / "eval" / "metrics_3.json").read_text())
    assert by_step["step"] == 3 and by_step["num_images"] == 3
    # Same weights as the converted checkpoint: the same numbers.
    assert by_step["AP"] == pytest.approx(metrics["AP"], abs=1e-12)
    assert by_step["AR100"] == pytest.approx(metrics["AR100"], abs=1e-12)


@pytest.mark.slow
def test_predict_cli_writes_pngs_and_json(tiny):
    imgs = tiny["root"] / "inputs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"im0.jpg": (90, 140), "im1.jpg": (200, 120), "im2.jpg": (64, 64)}
    sizes["sub/im0.jpg"] = (70, 100)  # the same name in a sub-folder
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / name)
    (imgs / "sub" / "again.jpg").symlink_to(imgs / "im1.jpg")  # seen already: skipped
    out = tiny["root"] / "pred"
    # Random weights: every (prior, class) scores ~1/4, so threshold 0 keeps detections.
    common = [
        "-m",
        "daipnet_jax.predict",
        *tiny["flags"],
        f"--checkpoint={tiny['ckpt']}",
        "--score_threshold=0.0",
    ]
    proc = _run([*common, f"--out={out}", str(imgs / "im2.jpg"), str(imgs), "--recursive"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 images" in proc.stdout
    stems = {"im2.jpg": "im2", "im0.jpg": "inputs_im0", "im1.jpg": "im1", "sub/im0.jpg": "sub_im0"}
    assert sorted(os.listdir(out)) == sorted(
        f"{v}.{e}" for v in stems.values() for e in ("json", "png")
    )
    full = {}
    for name, (h, w) in sizes.items():
        rec = json.loads((out / f"{stems[name]}.json").read_text())
        assert rec["image"].endswith(name) and (rec["height"], rec["width"]) == (h, w)
        assert 0 < len(rec["detections"]) <= tiny["config"].postprocess.max_detections
        d = rec["detections"][0]
        assert d["class_name"] == ["rectangle", "ellipse", "triangle"][d["label"] - 1]
        x0, y0, x1, y1 = d["bbox"]
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        png = np.asarray(Image.open(out / f"{stems[name]}.png").convert("RGB"))
        orig = np.asarray(Image.open(imgs / name).convert("RGB"))
        assert png.shape == orig.shape
        assert np.mean(np.any(png != orig, axis=-1)) > 0.01  # boxes drawn
        full[name] = rec["detections"]

    # --classes and --max_boxes: the best 3 of the two classes, best first, nothing else.
    out2 = tiny["root"] / "pred_filtered"
    proc = _run(
        [*common, f"--out={out2}", "--classes=ellipse,triangle", "--max_boxes=3", str(imgs)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("im0.jpg", "im1.jpg", "im2.jpg"):
        got = json.loads((out2 / f"{name[:-4]}.json").read_text())["detections"]
        want = [d for d in full[name] if d["class_name"] in ("ellipse", "triangle")]
        want = sorted(want, key=lambda d: -d["score"])[:3]
        assert len(got) == 3
        assert [(d["label"], d["score"]) for d in got] == [(d["label"], d["score"]) for d in want]


def test_export_replaces_only_a_saved_model_and_only_when_complete(tiny, tmp_path, monkeypatch):
    """`--out` holding other files (or a file) is refused and left alone; a failed export
    leaves the earlier SavedModel as it was and no staging folder; a complete one replaces it."""
    import tensorflow as tf

    from daipnet_jax import export
    from daipnet_jax.cli import InputError

    config, model, variables = tiny["config"], tiny["model"], tiny["variables"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="holds files but no SavedModel"):
        export.export_saved_model(config, variables, str(mine), model=model)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        export.export_saved_model(config, variables, str(tmp_path / "file"), model=model)

    sm = tmp_path / "sm"
    sm.mkdir()
    (sm / "saved_model.pb").write_bytes(b"old")

    def save_writing(content, fail):
        def save(module, path, **kwargs):
            os.makedirs(path)
            with open(os.path.join(path, "saved_model.pb"), "wb") as f:
                f.write(content)
            if fail:
                raise RuntimeError("disk full")

        return save

    monkeypatch.setattr(tf.saved_model, "save", save_writing(b"partial", fail=True))
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_saved_model(config, variables, str(sm), model=model)
    assert (sm / "saved_model.pb").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["file", "mine", "sm"]  # nothing staged is left
    monkeypatch.setattr(tf.saved_model, "save", save_writing(b"new", fail=False))
    assert export.export_saved_model(config, variables, str(sm), model=model) == str(sm)
    assert os.listdir(sm) == ["saved_model.pb"] and (sm / "saved_model.pb").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["file", "mine", "sm"]


@pytest.mark.slow
def test_saved_model_matches_jax(tiny, tmp_path):
    import tensorflow as tf

    from daipnet_jax import data
    from daipnet_jax.evaluation.loop import make_predict_fn
    from daipnet_jax.export import export_saved_model
    from daipnet_jax.predict import resize_images

    config, model, variables = tiny["config"], tiny["model"], tiny["variables"]
    data.label_map(config)  # writes the generated dataset, whose categories are checked below
    # Random He-initialised loc heads give offsets in the hundreds; exp-decoding then turns the
    # ~1e-6 relative difference between TF's and JAX's float32 convolutions into ~1e-3 in box
    # coordinates. Scale them down so boxes are O(1), as in a trained model.
    heads = {
        k: ({**v, "kernel": v["kernel"] * 1e-2} if k.startswith("loc") else v)
        for k, v in variables["params"]["heads"].items()
    }
    variables = {**variables, "params": {**variables["params"], "heads": heads}}
    path = export_saved_model(config, variables, str(tmp_path / "sm"), model=model)
    loaded = tf.saved_model.load(path)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 120, 170, 3), dtype=np.uint8)
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    ref = jax.jit(make_predict_fn(config, model))(variables, np.asarray(resize_images(images, 300)))
    boxes, scores, classes, valid = (np.asarray(x) for x in ref)
    assert valid.sum() > 0
    np.testing.assert_array_equal(out["valid"].numpy(), valid)
    np.testing.assert_allclose(out["scores"].numpy(), scores, atol=1e-5)
    # Random weights give huge loc offsets (exp-decoded boxes up to ~1e18): relative tolerance.
    np.testing.assert_allclose(out["boxes"].numpy(), boxes, rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(out["classes"].numpy(), classes)
    np.testing.assert_array_equal(out["num_detections"].numpy(), valid.sum(1))
    # One image of another size through the single-image signature.
    single = rng.integers(0, 256, (77, 301, 3), dtype=np.uint8)
    o1 = loaded.signatures["serve_single"](image=tf.constant(single))
    r1 = jax.jit(make_predict_fn(config, model))(variables, np.asarray(resize_images(single, 300)))
    d = config.postprocess.max_detections
    assert o1["boxes"].shape == (d, 4) and o1["num_detections"].shape == ()
    for key in ("scores", "classes", "valid"):
        assert o1[key].shape == (d,), key
    np.testing.assert_allclose(o1["scores"].numpy(), np.asarray(r1[1])[0], atol=1e-5)
    np.testing.assert_array_equal(o1["classes"].numpy(), np.asarray(r1[2])[0])
    assert int(o1["num_detections"]) == int(np.asarray(r1[3])[0].sum())
    # The label map travels with the model: a signature and an asset file.
    with open(os.path.join(config.data.data_dir, "instances_val.json")) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    assert len(cats) == 3
    table = loaded.signatures["label_map"]()
    assert [n.decode() for n in table["class_names"].numpy()] == [c["name"] for c in cats]
    assert table["category_ids"].numpy().tolist() == [c["id"] for c in cats]
    assert table["labels"].numpy().tolist() == [1, 2, 3]
    with open(os.path.join(path, "assets", "label_map.json")) as f:
        asset = json.load(f)
    assert asset["class_names"] == [c["name"] for c in cats]
    assert asset["category_ids"] == [c["id"] for c in cats]
