"""Bad input: each case repaired or skipped, counted and reported; no crash, no NaN."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from daipnet_jax import data
from daipnet_jax.config import base_config
from daipnet_jax.data import coco_folder, pipeline


def _save(path: pathlib.Path, img: Image.Image, fmt: str) -> None:
    img.save(path, fmt)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """A folder with one image per problem. Returns (config, annotation file, the JSON)."""
    root = tmp_path_factory.mktemp("bad")
    imgs = root / "images"
    imgs.mkdir()
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[10:30, 10:40] = (200, 50, 20)
    files = {
        "good.jpg": lambda p: _save(p, Image.fromarray(rgb), "JPEG"),
        "grey.png": lambda p: _save(p, Image.fromarray(np.full((40, 60), 77, np.uint8)), "PNG"),
        "alpha.png": lambda p: _save(
            p, Image.fromarray(np.dstack([rgb, np.full((40, 60), 9, np.uint8)])), "PNG"
        ),
        "cmyk.jpg": lambda p: _save(p, Image.new("CMYK", (60, 40), (0, 255, 255, 0)), "JPEG"),
        "garbage.jpg": lambda p: p.write_bytes(b"this is not an image at all" * 10),
        "tiff.tif": lambda p: _save(p, Image.fromarray(rgb), "TIFF"),
        "noboxes.jpg": lambda p: _save(p, Image.fromarray(rgb), "JPEG"),
        "badboxes.jpg": lambda p: _save(p, Image.fromarray(rgb), "JPEG"),
    }
    for name, write in files.items():
        write(imgs / name)
    names = [*files, "missing.jpg"]
    images = [{"id": i + 1, "file_name": n, "height": 40, "width": 60} for i, n in enumerate(names)]
    good_box = [10, 10, 30, 20]
    anns = []
    for img in images:
        if img["file_name"] == "noboxes.jpg":
            continue
        if img["file_name"] == "badboxes.jpg":
            boxes = [
                [5, 5, 0, 10],
                [30, 5, -10, 10],
                [-10, -5, 30, 20],
                [1, 1, 5, 5],
            ]  # zero-area, inverted, out of range, fine
        else:
            boxes = [good_box]
        for b in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": 5,
                    "bbox": b,
                    "area": 1,
                    "iscrowd": 0,
                }
            )
    anns.append(
        {"id": 999, "image_id": 1, "category_id": 77, "bbox": good_box, "area": 1, "iscrowd": 0}
    )  # unknown category
    anns.append(
        {"id": 1000, "image_id": 4321, "category_id": 5, "bbox": good_box, "area": 1, "iscrowd": 0}
    )  # an image that is not listed
    gt = {"images": images, "annotations": anns, "categories": [{"id": 5, "name": "thing"}]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(gt))
    c = base_config("daipnet300", "coco_folder", width=0.125)
    c.data.source = "coco_folder"
    c.model.num_classes = 2
    c.data.max_boxes = 4
    c.data.annotation_file = c.data.eval_annotation_file = str(ann_file)
    c.data.image_dir = c.data.eval_image_dir = str(imgs)
    c.model.image_size = 300
    return c, gt


def test_build_time_report(bad_folder, caplog):
    c, _ = bad_folder
    rec = coco_folder.load_folder(c.data.annotation_file, c.data.image_dir)
    s = rec.stats
    assert s.images_listed == 9 and s.images_used == 6
    assert (s.missing, s.undecodable, s.converted_to_rgb) == (1, 2, 3)  # garbage + tiff undecodable
    assert s.images_without_boxes == 1 and s.unknown_category == 1
    assert s.annotations_of_unlisted_images == 1 and "unlisted_images=1" in s.report()
    assert (s.boxes_invalid, s.boxes_clipped) == (2, 1)
    assert {pathlib.Path(p).name for p in s.skipped_files} == {
        "missing.jpg",
        "garbage.jpg",
        "tiff.tif",
    }
    assert "missing=1" in s.report() and "undecodable=2" in s.report()
    with caplog.at_level(logging.INFO):
        data.make_train_iterator(c, 0, 1)
    assert any("missing=1" in r.getMessage() for r in caplog.records)


def test_converted_images_decode_to_rgb(bad_folder):
    c, _ = bad_folder
    root = pathlib.Path(c.data.image_dir)
    dec = lambda n: pipeline.decode({"path": str(root / n)}).numpy()  # noqa: E731
    assert dec("grey.png").shape == (40, 60, 3) and (dec("grey.png") == 77).all()
    alpha = dec("alpha.png")
    assert (
        alpha.shape == (40, 60, 3)
        and tuple(alpha[15, 15]) == (200, 50, 20)
        and alpha[0, 0].sum() == 0
    )
    cmyk = dec("cmyk.jpg")
    want = np.asarray(Image.open(root / "cmyk.jpg").convert("RGB"))
    assert cmyk.shape == (40, 60, 3) and np.abs(cmyk.astype(int) - want).max() <= 2


def test_training_over_bad_folder_counts_and_no_nan(bad_folder):
    c, _ = bad_folder
    c = c.copy_and_resolve_references()
    c.train.batch_size = 5
    it = data.make_train_iterator(c, 0, 1)
    batches = [next(it) for _ in range(4)]  # 20 examples from 5 usable images per epoch
    for b in batches:
        assert np.isfinite(b["image"]).all() and np.isfinite(b["boxes"]).all()
        assert b["mask"].any(axis=1).all()
        box = b["boxes"][b["mask"]]
        assert np.all((box >= 0) & (box <= 1)) and np.all(box[:, 2:] > box[:, :2])
    st = it.stats
    epochs = st["examples"] / 6  # 6 listed-and-readable images per pass, one without boxes
    assert st["examples"] >= 24 and st["skipped_no_boxes"] == pytest.approx(epochs, abs=1)
    assert st["invalid_boxes"] == pytest.approx(2 * epochs, abs=2)
    assert st["clipped_boxes"] == pytest.approx(epochs, abs=1)


def test_truncated_jpeg_dropped_not_crashing(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])  # header intact
    gt = {
        "images": [
            {"id": 1, "file_name": "ok.jpg", "height": 64, "width": 64},
            {"id": 2, "file_name": "cut.jpg", "height": 64, "width": 64},
        ],
        "annotations": [
            {
                "id": k,
                "image_id": k,
                "category_id": 1,
                "bbox": [5, 5, 30, 30],
                "area": 900,
                "iscrowd": 0,
            }
            for k in (1, 2)
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(gt))
    rec = coco_folder.load_folder(str(tmp_path / "a.json"), str(tmp_path))
    assert rec.stats.images_used == 2  # the header check cannot see the truncation
    c = base_config("daipnet300", "coco_folder", width=0.125)
    c.data.source = "coco_folder"
    c.data.annotation_file = c.data.eval_annotation_file = str(tmp_path / "a.json")
    c.data.image_dir = c.data.eval_image_dir = str(tmp_path)
    c.train.batch_size = 2
    c.train.eval_batch_size = 2
    b = next(data.make_train_iterator(c, 0, 1))  # the cut file is dropped at decode time
    assert np.isfinite(b["image"]).all() and b["image"].shape == (2, 300, 300, 3)
    (e,) = list(data.make_eval_iterator(c, 0, 1))
    assert e["image_id"].tolist() == [1, -1] and e["valid"].tolist() == [True, False]


def test_missing_annotation_file_and_bad_source(tmp_path):
    c = base_config("daipnet300", "coco_folder", width=0.125)
    c.data.source = "coco_folder"
    c.data.annotation_file = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        data.make_train_iterator(c, 0, 1)
    c.data.annotation_file = ""
    with pytest.raises(ValueError, match="no annotation file"):
        data.num_train_examples(c)
    c.data.source = "imagenet"
    with pytest.raises(ValueError, match="imagenet"):
        data.num_train_examples(c)


# ------------------------------------------------------------------ annotation JSON as users write it
CATS = [1, 7, 90, 1000]  # non-contiguous and large ids


def _user_folder(root: pathlib.Path, n: int = 4, hw: tuple[int, int] = (48, 64)) -> dict:
    """`root/img/<i>.jpg` (n images, one box each, category CATS[i % 4]) and its COCO dict, with
    only the keys many exporters write: no `area`, `iscrowd` or annotation `id`."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    h, w = hw
    images, anns = [], []
    for i in range(n):
        a = np.full((h, w, 3), 30, np.uint8)
        a[6 + i : 26 + i, 8:38] = (200, 100, 50)
        Image.fromarray(a).save(root / "img" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
        anns.append({"image_id": i + 1, "category_id": CATS[i % 4], "bbox": [8, 6 + i, 30, 20]})
    cats = [{"id": c, "name": f"c{c}"} for c in CATS]
    return {"images": images, "annotations": anns, "categories": cats}


def _folder_config(ann: pathlib.Path, img_dir: pathlib.Path, num_classes: int = len(CATS) + 1):
    c = base_config("daipnet300", "coco_folder", width=0.125)
    c.data.source = "coco_folder"
    c.model.num_classes = num_classes
    c.data.annotation_file = c.data.eval_annotation_file = str(ann)
    c.data.image_dir = c.data.eval_image_dir = str(img_dir)
    c.train.batch_size = 2
    return c


def _ap_of_perfect_detections(ground_truth: dict[str, Any], annotations: list[dict]) -> float:
    """pycocotools AP of detections that are `annotations`' boxes (64x48 images, score 0.9)."""
    from daipnet_jax.evaluation.coco import CocoEvaluator

    ev = CocoEvaluator(ground_truth)
    for a in annotations:
        x, y, bw, bh = a["bbox"]
        box = np.array([[x / 64, y / 48, (x + bw) / 64, (y + bh) / 48]])
        label = CATS.index(a["category_id"]) + 1
        ev.add_image(box, np.array([0.9]), np.array([label]), a["image_id"], (48, 64))
    return ev.evaluate()["AP"]


def test_ground_truth_fills_the_keys_pycocotools_reads(tmp_path):
    """No `area`, `iscrowd` or annotation `id` (pycocotools needs all three: the evaluation at
    the end of training raised KeyError), a segmentation-only annotation and a null bbox
    (skipped and counted, in training and in the evaluation ground truth alike)."""

    gt = _user_folder(tmp_path)
    gt["annotations"][1]["id"] = 5
    gt["annotations"][2]["id"] = 5  # a repeated id
    gt["annotations"] += [
        {"image_id": 1, "category_id": 7, "segmentation": [[1, 1, 9, 1, 9, 9]]},
        {"image_id": 2, "category_id": 7, "bbox": None},
    ]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    rec = coco_folder.load_folder(str(ann), str(tmp_path / "img"))
    assert (rec.stats.annotations, rec.stats.no_bbox, len(rec.labels)) == (6, 2, 4)
    assert "no_bbox=2" in rec.stats.report()
    out = coco_folder.ground_truth(str(ann), rec)
    anns = out["annotations"]
    assert len(anns) == 4 and len({a["id"] for a in anns}) == 4
    assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in anns)
    # Perfect detections (the ground-truth boxes themselves, with the user's category ids).
    assert _ap_of_perfect_detections(out, anns) == pytest.approx(1.0)


def test_ground_truth_leaves_out_boxes_training_drops(tmp_path):
    """Zero-width, NaN and wholly-outside boxes are dropped from the training targets and
    counted as invalid; in the evaluation ground truth they could never be matched and
    counted as missed objects (AP 0.81, not 1, for perfect detections of the 4 real ones)."""

    gt = _user_folder(tmp_path, n=4)
    real = [dict(a) for a in gt["annotations"]]
    for bbox in ([10, 10, 0, 5], [float("nan"), 1, 5, 5], [70, 10, 5, 5]):  # image is 64x48
        gt["annotations"].append({"image_id": 2, "category_id": 7, "bbox": bbox})
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    rec = coco_folder.load_folder(str(ann), str(tmp_path / "img"))
    assert (rec.stats.boxes_invalid, rec.stats.boxes_clipped) == (3, 0)
    out = coco_folder.ground_truth(str(ann), rec)
    assert [a["bbox"] for a in out["annotations"]] == [a["bbox"] for a in real]
    assert _ap_of_perfect_detections(out, real) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("top_level_list", r"not a COCO instances file: the top level is a list"),
        ("images_not_list", r"'images' must be a list of objects"),
        ("string_image_id", r"images\[0\]: id 'img1' is not an integer"),
        ("no_image_id", r"annotations\[0\]: image_id None is not an integer"),
        ("no_file_name", r"images\[0\] \(id 1\): file_name None is not a path"),
        ("width_string", r"images\[0\] \(id 1\): width '64' is not a size in pixels"),
        ("repeated_image_id", r"images\[1\]: id 1 \(1\.jpg\) repeats the id of 0\.jpg"),
        ("repeated_category_id", r"categories\[4\]: id 7 \('again'\) repeats 'c7'"),
        ("string_category_id", r"categories\[0\]: id '1' is not an integer"),
    ],
)
def test_malformed_json_stops_at_start_naming_file_and_record(tmp_path, case, message):
    """Before: a traceback (KeyError, TypeError, AttributeError), or silently wrong targets (a
    repeated image id gave the second file the first one's boxes; a repeated category id two
    labels, one of which never trained)."""
    from daipnet_jax.config import ConfigError
    from daipnet_jax.validate import validate_inputs

    gt: Any = _user_folder(tmp_path)
    if case == "top_level_list":
        gt = gt["images"]
    elif case == "images_not_list":
        gt["images"] = {"0.jpg": 1}
    elif case == "string_image_id":
        gt["images"][0]["id"] = "img1"
    elif case == "no_image_id":
        del gt["annotations"][0]["image_id"]
    elif case == "no_file_name":
        del gt["images"][0]["file_name"]
    elif case == "width_string":
        gt["images"][0]["width"] = "64"
    elif case == "repeated_image_id":
        gt["images"][1]["id"] = 1
    elif case == "repeated_category_id":
        gt["categories"].append({"id": 7, "name": "again"})
    elif case == "string_category_id":
        gt["categories"][0]["id"] = "1"
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    c = _folder_config(ann, tmp_path / "img")
    with pytest.raises(ConfigError, match=r"^data\.annotation_file: .*a\.json: " + message):
        validate_inputs(c, evaluate=False)


def test_json_size_unlike_the_file_is_skipped_and_counted(tmp_path, caplog):
    """`width`/`height` that disagree with the image file (here swapped, as for a photo with
    an EXIF rotation annotated upright, and one resized after annotation): the boxes were
    normalised by the JSON's size while the network saw the file's pixels."""
    gt = _user_folder(tmp_path, n=4, hw=(48, 64))
    gt["images"][1].update(width=48, height=64)  # swapped
    gt["images"][2].update(width=128, height=96)  # the file was resized to half
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    with caplog.at_level(logging.WARNING):
        rec = coco_folder.load_folder(str(ann), str(tmp_path / "img"))
    assert rec.image_ids.tolist() == [1, 4]
    assert rec.stats.size_mismatch == 2 and "size_mismatch=2" in rec.stats.report()
    assert {pathlib.Path(p).name for p in rec.stats.skipped_files} == {"1.jpg", "2.jpg"}
    assert any("JSON 48x64, file 64x48" in r.getMessage() for r in caplog.records)
    # The boxes kept are the JSON's pixels over the file's size.
    np.testing.assert_allclose(rec.boxes[1], [8 / 64, 9 / 48, 38 / 64, 29 / 48], rtol=1e-6)
    # Without validation the JSON's sizes are trusted (documented).
    assert len(coco_folder.load_folder(str(ann), str(tmp_path / "img"), validate=False).paths) == 4


def test_exif_orientation_is_not_applied_anywhere(tmp_path):
    """Boxes refer to the stored pixels: the header check, the training / evaluation decoder
    and predict all read an EXIF-rotated JPEG in its stored 60x40 frame (docs/design.md)."""
    from daipnet_jax.predict import load_image

    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :10] = 255  # a bright left band: rotated, it would become a top or bottom band
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    assert coco_folder._check_image(str(path)) == ("ok", 40, 60)
    for got in (pipeline.decode({"path": str(path)}).numpy(), load_image(path)):
        assert got.shape == (40, 60, 3) and got[:, :8].mean() > 240 and got[:, 12:].mean() < 15


def test_multi_picture_jpeg_from_cameras_is_used(tmp_path):
    """PIL names a JPEG with appended frames (many phone photos) MPO; it was skipped as
    undecodable although the pipeline decodes its first frame."""
    gt = _user_folder(tmp_path, n=2)
    first = np.asarray(Image.open(tmp_path / "img" / "0.jpg"))
    Image.fromarray(first).save(
        tmp_path / "img" / "0.jpg", "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))]
    )
    with Image.open(tmp_path / "img" / "0.jpg") as im:
        assert im.format == "MPO"
        frame0 = np.asarray(im.convert("RGB")).astype(int)
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    rec = coco_folder.load_folder(str(ann), str(tmp_path / "img"))
    assert rec.image_ids.tolist() == [1, 2] and rec.stats.undecodable == 0
    got = pipeline.decode({"path": rec.paths[0]}).numpy()
    assert got.shape == (48, 64, 3) and np.abs(got - frame0).max() <= 4  # JPEG decoders differ


def _cut_jpeg(path: pathlib.Path) -> None:
    """A 64x48 JPEG cut after a third: PIL reads its header, tf.io.decode_image fails."""
    import tensorflow as tf

    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    assert coco_folder._check_image(str(path)) == ("ok", 48, 64)
    with pytest.raises(tf.errors.InvalidArgumentError):
        pipeline.decode({"path": str(path)})


def test_evaluation_leaves_out_images_that_could_not_be_decoded(tmp_path):
    """A file whose header PIL reads but TensorFlow cannot decode (a cut JPEG) passes the
    build-time check and is dropped by the evaluation pipeline; its objects counted as missed
    detections (perfect detections on the other images scored AP 0.75 instead of 1)."""
    from daipnet_jax.evaluation import make_evaluator

    gt = _user_folder(tmp_path, n=4)
    _cut_jpeg(tmp_path / "img" / "3.jpg")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    c = _folder_config(ann, tmp_path / "img")
    c.train.eval_batch_size = 2
    out = data.eval_ground_truth(c)
    ev = make_evaluator(c, out, [0, *CATS])
    by_image = {a["image_id"]: a for a in out["annotations"]}
    for b in data.make_eval_iterator(c, 0, 1):
        boxes, labels = np.zeros((2, 1, 4)), np.ones((2, 1), np.int32)
        for j, iid in enumerate(b["image_id"]):
            if b["valid"][j]:
                x, y, bw, bh = by_image[int(iid)]["bbox"]
                boxes[j, 0] = [x / 64, y / 48, (x + bw) / 64, (y + bh) / 48]
                labels[j, 0] = CATS.index(by_image[int(iid)]["category_id"]) + 1
        ev.add_batch(
            boxes, np.full((2, 1), 0.9), labels, np.ones((2, 1), bool),
            b["image_id"], b["orig_size"], b["valid"],
        )  # fmt: skip
    assert sorted(ev.image_ids) == [1, 2, 3]
    assert ev.leave_out_unevaluated() == [4]
    assert ev.evaluate()["AP"] == pytest.approx(1.0)


def test_evaluation_categories_must_be_the_models(tmp_path):
    """An evaluation file with a category the training file lacks: pycocotools averaged AP
    over it (always 0) while the per-class table left it out. A subset is fine."""
    from daipnet_jax.config import ConfigError
    from daipnet_jax.evaluation.coco import CocoEvaluator
    from daipnet_jax.validate import validate_inputs

    gt = _user_folder(tmp_path, n=4)
    train = tmp_path / "train.json"
    train.write_text(json.dumps(gt))
    extra = json.loads(json.dumps(gt))
    extra["categories"].append({"id": 5, "name": "extra"})
    extra["annotations"][0]["category_id"] = 5
    val = tmp_path / "val.json"
    val.write_text(json.dumps(extra))
    # What it did: perfect detections on the other three images, AP 0.75 over four categories.
    ev = CocoEvaluator(coco_folder.ground_truth(str(val)), [0, *CATS])
    for a in extra["annotations"][1:]:
        x, y, bw, bh = a["bbox"]
        box = np.array([[x / 64, y / 48, (x + bw) / 64, (y + bh) / 48]])
        label = CATS.index(a["category_id"]) + 1
        ev.add_image(box, np.array([0.9]), np.array([label]), a["image_id"], (48, 64))
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(0.75)
    assert m["per_class"]["c1"]["AP"] == -1 and m["per_class"]["c7"]["AP"] == pytest.approx(1.0)
    c = _folder_config(train, tmp_path / "img")
    c.data.eval_annotation_file = str(val)
    with pytest.raises(ConfigError, match=r"^data\.eval_annotation_file: .*val\.json: category 5 "
                       r"\('extra'\) is not one of the 4 categories .*train\.json"):  # fmt: skip
        validate_inputs(c)
    subset = json.loads(json.dumps(gt))
    subset["categories"] = subset["categories"][:3]
    subset["annotations"] = subset["annotations"][:3]
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    c.data.eval_annotation_file = str(tmp_path / "subset.json")
    validate_inputs(c)


def test_variants_tensorflow_cannot_decode_are_counted_at_build_time(tmp_path):
    """A 1-bit BMP, a WebP with alpha and an animated WebP: PIL reads them, the pipeline's
    decoder refuses them; they passed the header check and were dropped uncounted later."""
    import tensorflow as tf

    gt = _user_folder(tmp_path, n=5)
    rgb = np.asarray(Image.open(tmp_path / "img" / "0.jpg"))
    writers = {
        "1.bmp": lambda p: Image.fromarray(rgb[..., 0] > 100).save(p),
        "2.webp": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p, lossless=True),
        "3.webp": lambda p: Image.fromarray(rgb).save(
            p, save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())]
        ),
    }
    for k, (name, write) in enumerate(writers.items(), start=1):
        write(tmp_path / "img" / name)
        gt["images"][k]["file_name"] = name
        with pytest.raises(tf.errors.InvalidArgumentError):
            pipeline.decode({"path": str(tmp_path / "img" / name)})
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    rec = coco_folder.load_folder(str(ann), str(tmp_path / "img"))
    assert rec.image_ids.tolist() == [1, 5] and rec.stats.undecodable == 3
    assert {pathlib.Path(p).name for p in rec.stats.skipped_files} == set(writers)


def test_evaluation_file_without_annotations_is_said(tmp_path, caplog):
    """An evaluation JSON with images and no annotations puts the evaluator in COCO test-dev
    mode (detections written, no metrics); training then ended without metrics or a word."""
    from daipnet_jax.evaluation.loop import make_evaluator_for

    gt = _user_folder(tmp_path, n=2)
    train = tmp_path / "train.json"
    train.write_text(json.dumps(gt))
    val = tmp_path / "val.json"
    val.write_text(json.dumps(dict(gt, annotations=[])))
    c = _folder_config(train, tmp_path / "img")
    c.data.eval_annotation_file = str(val)
    with caplog.at_level(logging.WARNING):
        ev = make_evaluator_for(c)
    assert ev.test_dev
    assert any(f"{val} has no annotations" in r.getMessage() for r in caplog.records)


REPO = pathlib.Path(__file__).resolve().parents[1]


def _train_cli(ann: pathlib.Path, img_dir: pathlib.Path, workdir: pathlib.Path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    env.pop("DAIPNET_TRACEBACK", None)
    flags = [
        "--config=configs/coco.py:daipnet300,width=0.0625",
        f"--workdir={workdir}",
        "--config.data.source=coco_folder",
        f"--config.model.num_classes={len(CATS) + 1}",
        "--config.train.batch_size=2",
        "--config.train.eval_batch_size=2",
        "--config.train.total_steps=2",
        "--config.train.warmup_epochs=0",
        "--config.data.max_boxes=8",
    ]
    for prefix in ("", "eval_"):
        flags += [f"--config.data.{prefix}annotation_file={ann}"]
        flags += [f"--config.data.{prefix}image_dir={img_dir}"]
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_train_cli_on_user_json_evaluates_with_the_users_category_ids(tmp_path):
    """train.py (2 steps, evaluation at the end) on a JSON without `area` / `iscrowd` /
    annotation ids and with category ids 1, 7, 90, 1000: it used to train, then stop on a
    KeyError in the final evaluation. The results file carries the user's category ids."""
    gt = _user_folder(tmp_path, n=5)
    _cut_jpeg(tmp_path / "img" / "4.jpg")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    proc = _train_cli(ann, tmp_path / "img", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 images could not be decoded and are left out of the metrics (ids [5])" in proc.stderr
    eval_dir = tmp_path / "run" / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["images_not_decoded"] == 1
    assert 0.0 <= metrics["AP"] <= 1.0
    assert set(metrics["per_class"]) == {f"c{c}" for c in CATS}
    (results,) = eval_dir.glob("detections_*_results.json")
    dets = json.loads(results.read_text())
    assert dets and {d["category_id"] for d in dets} <= set(CATS)
    assert {d["image_id"] for d in dets} <= {1, 2, 3, 4}


def test_train_cli_refuses_a_repeated_image_id_in_one_line(tmp_path):
    gt = _user_folder(tmp_path, n=4)
    gt["images"][2]["id"] = 2
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(gt))
    proc = _train_cli(ann, tmp_path / "img", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"{ann}: images[2]: id 2 (2.jpg) repeats the id of 1.jpg" in line
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_image_headers_are_read_in_order_with_progress(tmp_path, caplog):
    """The threaded header check returns exactly the serial answers, in the images' order, and
    says how far it is on a large folder (docs/design.md, image header check)."""
    paths = []
    for i in range(40):
        path = tmp_path / f"{i}.png"
        if i % 7 == 3:
            path.write_bytes(b"not an image")
        elif i % 11 != 5:  # 5, 16, 27, 38: missing
            Image.new("L" if i % 2 else "RGB", (10 + i, 20)).save(path)
        paths.append(str(path))
    serial = [coco_folder._check_image(p) for p in paths]
    assert {s for s, _, _ in serial} == {"ok", "converted", "missing", "undecodable"}
    with caplog.at_level(logging.INFO):
        threaded = list(coco_folder._check_images(paths, "a.json", log_every_s=0.0))
    assert threaded == serial
    progress = [r.getMessage() for r in caplog.records if "image headers checked" in r.getMessage()]
    assert progress and progress[0].startswith("a.json: image headers checked ")
    assert all("ETA" in m for m in progress) and f"/{len(paths)}" in progress[-1]
