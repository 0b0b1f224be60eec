"""Sources and batching: generated dataset, COCO-format folder, process shards, determinism."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from daipnet_jax import data
from daipnet_jax.data import generated, pipeline


def _json(path: str):
    return json.loads(pathlib.Path(path).read_text())


def _check_train_batch(b, batch: int, size: int, max_boxes: int, num_classes: int) -> None:
    assert set(b) == {"image", "boxes", "labels", "mask"}
    assert b["image"].shape == (batch, size, size, 3) and b["image"].dtype == np.float32
    assert b["boxes"].shape == (batch, max_boxes, 4) and b["boxes"].dtype == np.float32
    assert b["labels"].shape == (batch, max_boxes) and b["labels"].dtype == np.int32
    assert b["mask"].shape == (batch, max_boxes) and b["mask"].dtype == bool
    assert np.isfinite(b["image"]).all() and b["image"].min() >= 0 and b["image"].max() <= 255
    assert b["mask"].any(axis=1).all()  # every training example has a box
    lab, box = b["labels"][b["mask"]], b["boxes"][b["mask"]]
    assert lab.min() >= 1 and lab.max() <= num_classes
    assert (b["labels"][~b["mask"]] == 0).all()
    assert np.all((box >= 0) & (box <= 1)) and np.all(box[:, 2:] - box[:, :2] >= 0.01)


def test_generated_dataset_files(generated_data, tmp_path):
    d = generated_data["dir"]
    gt = _json(os.path.join(d, "instances_train.json"))
    assert len(gt["images"]) == generated_data["num_train"]
    assert [c["name"] for c in gt["categories"]] == ["rectangle", "ellipse", "triangle"]
    boxes = np.array([a["bbox"] for a in gt["annotations"]])
    side = generated_data["image_size"]
    assert boxes[:, 2:].min() >= 0.1 * side * np.sqrt(0.5) - 1 and boxes[:, 2:].max() <= 0.6 * side
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, :2] + boxes[:, 2:] <= side)
    assert len({a["category_id"] for a in gt["annotations"]}) == 3
    # Deterministic by seed, idempotent, and the seed matters.
    params = {k: v for k, v in generated_data.items() if k != "dir"} | dict(num_train=4, num_val=2)
    a = generated.write_dataset(str(tmp_path / "a"), **params)
    b = generated.write_dataset(str(tmp_path / "b"), **params)
    c = generated.write_dataset(str(tmp_path / "c"), **(params | dict(seed=1)))
    read = lambda root, f: pathlib.Path(root, f).read_bytes()  # noqa: E731
    for f in ("instances_train.json", "instances_val.json", "images/train/000003.jpg"):
        assert read(a, f) == read(b, f)
        assert read(a, f) != read(c, f)
    # The CLI writes the same folder.
    generated.main(
        ["--out", str(tmp_path / "cli"), "--num_train", "4", "--num_val", "2", "--seed", "0"]
    )
    assert read(tmp_path / "cli", "images/train/000003.jpg") == read(a, "images/train/000003.jpg")
    mtime = os.path.getmtime(os.path.join(a, "images/train/000000.jpg"))
    generated.write_dataset(a, **params)
    assert os.path.getmtime(os.path.join(a, "images/train/000000.jpg")) == mtime
    # The drawn object is where its box says: inside the box differs from the border around it.
    img = np.asarray(
        __import__("PIL.Image").Image.open(os.path.join(d, "images/train/000000.jpg"))
    ).astype(float)
    ann = next(
        x for x in gt["annotations"] if x["image_id"] == 1 and x["category_id"] == 1
    )  # rectangle
    x, y, w, h = (round(v) for v in ann["bbox"])
    inner = img[y + 3 : y + h - 3, x + 3 : x + w - 3].reshape(-1, 3)
    assert inner.std(axis=0).max() < 15  # a flat fill (plus sensor noise)


def test_generated_dataset_never_overwrites(generated_config, tmp_path, capsys):
    """A folder of the user's files, or a generated dataset with other parameters, is refused
    (the writer, its CLI with exit 2, and training's `data.data_dir` as a ConfigError) and left
    as it was; an empty folder is filled."""
    from daipnet_jax.config import ConfigError
    from daipnet_jax.data.sources import GeneratedSource

    params = dict(num_train=4, num_val=2, num_classes=3, image_size=300, seed=0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an empty folder or a generated dataset"):
        generated.write_dataset(str(mine), **params)
    with pytest.raises(SystemExit) as exit_info:
        generated.main(["--out", str(mine), "--num_train", "4", "--num_val", "2"])
    assert exit_info.value.code == 2 and "error: " in capsys.readouterr().err
    c = generated_config()
    c.data.data_dir = str(mine)
    with pytest.raises(ConfigError, match=r"data\.data_dir: .*holds other files"):
        GeneratedSource.directory(c)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert generated.write_dataset(str(empty), **params) == str(empty)
    before = {p: p.read_bytes() for p in sorted(empty.rglob("*")) if p.is_file()}
    assert len(before) == 4 + 2 + 3  # images, two annotation files, meta.json
    with pytest.raises(ValueError, match=r"num_train=4 \(asked 8\)"):
        generated.write_dataset(str(empty), **(params | dict(num_train=8)))
    assert {p: p.read_bytes() for p in sorted(empty.rglob("*")) if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["empty", "mine"]  # no staging folder left


def test_generated_source_batches(generated_config):
    c = generated_config()
    c.train.batch_size = 4
    it = data.make_train_iterator(c, 0, 1)
    assert it.num_examples == 48 == data.num_train_examples(c)
    for _ in range(3):
        _check_train_batch(next(it), 4, 300, c.data.max_boxes, 3)
    assert it.stats["examples"] >= 12 and it.stats["skipped_no_boxes"] == 0
    ids, names = data.label_map(c)
    assert ids == [1, 2, 3] and names == ["rectangle", "ellipse", "triangle"]
    gt = data.eval_ground_truth(c)
    assert len(gt["images"]) == 10
    # The GT loads in pycocotools and scores itself perfectly.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    dets = coco.loadRes(
        [
            dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
            for a in gt["annotations"]
        ]
    )
    ev = COCOeval(coco, dets, "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)


def test_same_seed_same_batch(generated_config):
    def first_two(seed):
        c = generated_config()
        c.seed = seed
        c.train.batch_size = 2
        it = data.make_train_iterator(c, 0, 1)
        return [next(it) for _ in range(2)]

    a, b, other = first_two(0), first_two(0), first_two(1)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["image"], other[0]["image"])


def test_coco_folder_targets_match_json(coco_folder_config, coco_folder_data):
    c = coco_folder_config(augment=False)
    gt = _json(coco_folder_data["annotation_file"])
    n = len(gt["images"])
    c.train.batch_size = n
    it = data.make_train_iterator(c, 0, 1)
    b = next(it)
    _check_train_batch(b, n, 300, 8, 3)
    # One epoch = every image once (full shuffle): the targets equal the JSON's non-crowd boxes,
    # normalised by each image's size, with category ids 3, 7, 18 → labels 1, 2, 3.
    size = {i["id"]: (i["width"], i["height"]) for i in gt["images"]}
    label = {3: 1, 7: 2, 18: 3}
    want = sorted(
        (
            label[a["category_id"]],
            *np.round(
                np.array(a["bbox"][:2] + [a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
                / np.tile(size[a["image_id"]], 2),
                5,
            ),
        )
        for a in gt["annotations"]
        if not a["iscrowd"]
    )
    got = sorted(
        (int(lab), *np.round(box.astype(np.float64), 5))
        for lab, box in zip(b["labels"][b["mask"]], b["boxes"][b["mask"]], strict=True)
    )
    assert len(got) == len(want)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5)
    assert it.stats["crowd_boxes"] == 1 and it.stats["examples"] == n
    assert data.label_map(c) == ([3, 7, 18], ["car", "train", "dog"])
    # Eval GT keeps the crowd box; eval batches carry image ids and original sizes.
    egt = data.eval_ground_truth(c)
    assert sum(a["iscrowd"] for a in egt["annotations"]) == 1
    c.train.eval_batch_size = 2
    ev = data.make_eval_iterator(c, 0, 1)
    batches = list(ev)
    assert len(ev) == len(batches) == 3  # 5 images → 2 + 2 + (1 + 1 padding)
    for e in batches:
        assert e["image"].shape == (2, 300, 300, 3) and e["image_id"].dtype == np.int64
        assert e["orig_size"].dtype == np.int32 and e["valid"].dtype == bool
    valid = np.concatenate([e["valid"] for e in batches])
    assert valid.tolist() == [True] * 5 + [False]
    sizes = {
        int(i): tuple(s)
        for e in batches
        for i, s, v in zip(e["image_id"], e["orig_size"], e["valid"], strict=True)
        if v
    }
    assert sizes == {i["id"]: (i["height"], i["width"]) for i in egt["images"]}


def test_coco_folder_augmented_batches(coco_folder_config):
    c = coco_folder_config()
    c.train.batch_size = 4
    it = data.make_train_iterator(c, 0, 1)
    for _ in range(3):
        _check_train_batch(next(it), 4, 300, 8, 3)


def test_two_processes_disjoint_shards(coco_folder_config, coco_folder_data):
    c = coco_folder_config()
    all_ids = sorted(i["id"] for i in _json(coco_folder_data["annotation_file"])["images"])
    shards = []
    for pi in range(2):
        ds, n = pipeline.records(c, "train", pi, 2, shuffle_seed=None)
        shards.append([int(r["image_id"]) for r in ds.as_numpy_iterator()])
        assert n == len(shards[-1])
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == all_ids
    # Each process's local batch is half the global one; streams differ.
    c.train.batch_size = 4
    b0 = next(data.make_train_iterator(c, 0, 2))
    b1 = next(data.make_train_iterator(c, 1, 2))
    assert b0["image"].shape[0] == b1["image"].shape[0] == 2
    assert not np.array_equal(b0["image"], b1["image"])
    with pytest.raises(ValueError, match="not divisible"):
        data.make_train_iterator(c, 0, 3)
    # Eval: equal batch counts; valid ids partition the split.
    c.train.eval_batch_size = 2
    val = sorted(i["id"] for i in _json(coco_folder_data["eval_annotation_file"])["images"])
    ids, counts = [], []
    for pi in range(2):
        batches = list(data.make_eval_iterator(c, pi, 2))
        counts.append(len(batches))
        ids += [
            int(i) for e in batches for i, v in zip(e["image_id"], e["valid"], strict=True) if v
        ]
    assert counts == [3, 3] and sorted(ids) == val


def test_generated_parameter_mismatch_is_warned_once(generated_config, caplog):
    """A generated folder written with other `data.generated_*` values is used as it is, with
    one warning per run (from `validate_inputs`), not one per file access."""
    import logging

    from daipnet_jax.data.sources import GeneratedSource
    from daipnet_jax.validate import validate_inputs

    c = generated_config()
    c.data.generated_num_train = c.data.generated_num_train + 1
    with caplog.at_level(logging.WARNING):
        validate_inputs(c, train=True, evaluate=True)
        for split in ("train", "eval", "train"):
            GeneratedSource().files(c, split)
    warned = [r for r in caplog.records if "was written with" in r.getMessage()]
    assert len(warned) == 1 and "used as it is" in warned[0].getMessage()
    # The seed is one of those values: other images, other boxes.
    caplog.clear()
    c = generated_config()
    validate_inputs(c, train=True, evaluate=True)
    assert not [r for r in caplog.records if "was written with" in r.getMessage()]
    c.data.generated_seed = c.data.get("generated_seed", 0) + 1
    with caplog.at_level(logging.WARNING):
        validate_inputs(c, train=True, evaluate=True)
    warned = [r.getMessage() for r in caplog.records if "was written with" in r.getMessage()]
    assert len(warned) == 1 and f"'seed': {c.data.generated_seed}" in warned[0], warned


def test_generated_dataset_cli_does_not_start_tensorflow(tmp_path):
    """`python -m daipnet_jax.data.generated` needs NumPy and PIL only: the data package loads
    its tf.data pipeline on first use, so the writer neither waits for TensorFlow nor prints
    its start-up banners."""
    import subprocess
    import sys

    code = (
        "import sys; from daipnet_jax.data import generated; "
        "generated.main(['--out', sys.argv[1], '--num_train', '2', '--num_val', '1']); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == "" and out.stdout.startswith("wrote ")
    assert len(os.listdir(tmp_path / "d" / "images" / "train")) == 2


def test_label_table_is_parsed_once_per_file_version(coco_folder_config, tmp_path, monkeypatch):
    """The label table of a folder source is asked for many times while a run starts (it was
    parsed 14 times from the training file for one small run); each version of the file is
    parsed once, and an edited file is read again."""
    import json

    from daipnet_jax.data import coco_folder, sources

    c = coco_folder_config()
    ann = c.data.annotation_file
    parsed = []
    real = coco_folder.load_json
    monkeypatch.setattr(coco_folder, "load_json", lambda p: parsed.append(p) or real(p))
    sources._file_categories.cache_clear()
    want = coco_folder.categories(real(ann))
    for _ in range(3):
        assert data.label_map(c) == want
    assert parsed == [ann]
    edited = real(ann)
    edited["categories"][0]["name"] = "renamed"
    copy = str(tmp_path / "edited.json")
    with open(copy, "w") as f:
        json.dump(edited, f)
    c.data.annotation_file = copy
    assert data.label_map(c)[1][0] == "renamed"
    edited["categories"][0]["name"] = "renamed again"  # another version of the same path
    with open(copy, "w") as f:
        json.dump(edited, f)
    assert data.label_map(c)[1][0] == "renamed again"
    assert parsed == [ann, copy, copy]
