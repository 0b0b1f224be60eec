"""tfds sources prepared offline from tiny fake COCO / VOC layout folders.

The tensorflow-datasets wheel ships no fake example data and `tfds.testing.mock_data` fills
fields independently at random, so the real `coco/2017` and `voc/2007` builders are prepared
from folders written here, with their download manager pointed at those folders.
"""

from __future__ import annotations

import json
import pathlib
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from daipnet_jax import data
from daipnet_jax.config import base_config
from daipnet_jax.data import tfds_sources

tfds = pytest.importorskip("tensorflow_datasets")


def _jpeg(path: pathlib.Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


# Fake COCO: image id, (h, w), annotations (bbox xywh, category id, iscrowd).
COCO_TRAIN = [
    (11, (80, 120), [([10, 20, 30, 40], 1, 0), ([50, 10, 60, 30], 90, 0)]),
    (12, (100, 100), [([0, 0, 50, 50], 18, 0), ([5, 5, 90, 90], 1, 1)]),
    (13, (60, 90), [([30, 10, 20, 20], 44, 0)]),
    (14, (90, 70), [([10, 10, 40, 60], 90, 0)]),
    (15, (70, 70), [([20, 20, 30, 30], 2, 0)]),
]
COCO_VAL = [
    (21, (90, 110), [([10, 10, 50, 50], 90, 0), ([0, 0, 110, 90], 1, 1)]),
    (22, (80, 80), [([20, 30, 40, 20], 3, 0)]),
    (23, (70, 100), [([5, 5, 20, 20], 18, 0)]),
]


def _write_coco(root: pathlib.Path) -> None:
    cats = [
        {"id": i, "name": n, "supercategory": "x"}
        for i, n in zip(tfds_sources.COCO_CATEGORY_IDS, tfds_sources.COCO_NAMES, strict=True)
    ]
    (root / "annotations").mkdir(parents=True)
    for split, items in (
        ("train2017", COCO_TRAIN),
        ("val2017", COCO_VAL),
        ("test2017", COCO_VAL[:1]),
    ):
        images, anns = [], []
        for iid, (h, w), objs in items:
            _jpeg(root / split / f"{iid:012d}.jpg", h, w, iid)
            images.append({"id": iid, "file_name": f"{iid:012d}.jpg", "height": h, "width": w})
            for bbox, cat, crowd in objs:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": iid,
                        "category_id": cat,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3] - 1.0,
                        "iscrowd": crowd,
                    }
                )
        if split == "test2017":
            content = {"images": images, "categories": cats}
            (root / "annotations" / "image_info_test2017.json").write_text(json.dumps(content))
        else:
            content = {"images": images, "annotations": anns, "categories": cats}
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


# Fake VOC 2007: image id, (h, w), objects (name, xmin, ymin, xmax, ymax, difficult).
VOC = {
    "train": [("000005", (100, 150), [("dog", 10, 20, 60, 80, 0), ("person", 70, 10, 140, 90, 1)])],
    "val": [
        ("000007", (120, 100), [("car", 5, 5, 50, 60, 0)]),
        ("000009", (90, 90), [("tvmonitor", 20, 20, 70, 70, 0)]),
    ],
    "test": [
        ("000001", (110, 130), [("cat", 30, 20, 100, 90, 0), ("bird", 1, 1, 20, 20, 1)]),
        ("000002", (80, 80), [("aeroplane", 10, 10, 70, 70, 0)]),
    ],
}


def _write_voc(root: pathlib.Path) -> None:
    base = root / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir(parents=True)
    for split, items in VOC.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "".join(i + "\n" for i, _, _ in items)
        )
        for iid, (h, w), objs in items:
            _jpeg(base / "JPEGImages" / f"{iid}.jpg", h, w, int(iid))
            xml = f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            for name, x0, y0, x1, y1, diff in objs:
                xml += (
                    f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{diff}</difficult>"
                    f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                )
            (base / "Annotations" / f"{iid}.xml").write_text(xml + "</annotation>")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tfds data_dir with coco/2017 and voc/2007 prepared offline from the fake folders."""
    tmp = tmp_path_factory.mktemp("tfds")
    coco_src, voc_src, data_dir = tmp / "coco_src", tmp / "voc_src", tmp / "tfds"
    _write_coco(coco_src)
    _write_voc(voc_src)
    for name, src in (("coco/2017", coco_src), ("voc/2007", voc_src)):
        fake = lambda self, urls, src=src: dict.fromkeys(urls, src)  # noqa: E731
        with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", fake):
            tfds.builder(name, data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir)


def _config(dataset: str, tfds_dir: str):
    c = base_config("daipnet300", dataset, width=0.125)
    c.data.data_dir = tfds_dir
    c.data.max_boxes = 4
    c.train.batch_size = 4
    c.train.eval_batch_size = 2
    c.data.shuffle_buffer = 16
    if dataset == "voc":
        c.data.tfds_name = "voc/2007"
    return c


def test_coco_tfds(tfds_dir):
    c = _config("coco", tfds_dir)
    it = data.make_train_iterator(c, 0, 1)
    assert it.num_examples == len(COCO_TRAIN)
    b = next(it)
    assert b["image"].shape == (4, 300, 300, 3) and b["image"].dtype == np.float32
    assert b["boxes"].shape == (4, 4, 4) and b["boxes"].dtype == np.float32
    assert b["labels"].dtype == np.int32 and b["mask"].dtype == bool
    labels = b["labels"][b["mask"]]
    # Category ids 1, 2, 18, 44, 90 → contiguous labels 1, 2, 17, 40, 80.
    assert set(labels.tolist()) <= {1, 2, 17, 40, 80}
    # Crowd box of image 12 excluded: 5 train images hold 6 non-crowd boxes in total.
    c.data.augment = False
    c.train.batch_size = 5
    b = next(data.make_train_iterator(c, 0, 1))
    assert b["mask"].sum() == 6
    assert sorted(b["labels"][b["mask"]].tolist()) == [1, 2, 17, 40, 80, 80]
    ids, names = data.label_map(c)
    assert ids[79] == 90 and names[79] == "toothbrush" and ids[16] == 18 and names[16] == "dog"

    gt = data.eval_ground_truth(c)
    assert sorted(i["id"] for i in gt["images"]) == [21, 22, 23]
    assert {(i["id"], i["height"], i["width"]) for i in gt["images"]} == {
        (iid, h, w) for iid, (h, w), _ in COCO_VAL
    }
    got = sorted(
        (a["image_id"], a["category_id"], a["iscrowd"], *np.round(a["bbox"], 3))
        for a in gt["annotations"]
    )
    want = sorted(
        (iid, cat, crowd, *map(float, bbox))
        for iid, _, objs in COCO_VAL
        for bbox, cat, crowd in objs
    )
    assert got == want
    assert {a["area"] for a in gt["annotations"]} == {2499.0, 9899.0, 799.0, 399.0}

    ev = data.make_eval_iterator(c, 0, 1)
    batches = list(ev)
    assert len(ev) == len(batches) == 2
    assert [b["valid"].tolist() for b in batches] == [[True, True], [True, False]]
    sizes = {
        int(i): tuple(s)
        for b in batches
        for i, s, v in zip(b["image_id"], b["orig_size"], b["valid"], strict=True)
        if v
    }
    assert sizes == {iid: hw for iid, hw, _ in COCO_VAL}


def test_voc_tfds(tfds_dir):
    c = _config("voc", tfds_dir)
    assert data.num_train_examples(c) == 3  # trainval = train + validation
    c.data.augment = False
    c.train.batch_size = 3
    b = next(data.make_train_iterator(c, 0, 1))
    # The difficult person is not a training target: dog(12), car(7), tvmonitor(20).
    assert sorted(b["labels"][b["mask"]].tolist()) == [7, 12, 20]
    gt = data.eval_ground_truth(c)
    assert sorted(i["id"] for i in gt["images"]) == [1, 2]
    bird = next(a for a in gt["annotations"] if a["category_id"] == 3)
    assert bird["iscrowd"] == 1 and bird["difficult"] == 1
    cat = next(a for a in gt["annotations"] if a["category_id"] == 8)
    np.testing.assert_allclose(cat["bbox"], [30, 20, 70, 70], atol=1e-3)


def test_tfds_process_shards_disjoint(tfds_dir):
    c = _config("coco", tfds_dir)
    seen = []
    for pi in range(2):
        ds = tfds_sources.records(
            "coco/2017", "train", tfds_dir, process_index=pi, process_count=2, shuffle_seed=None
        )
        seen.append([int(r["image_id"]) for r in ds.as_numpy_iterator()])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [i for i, _, _ in COCO_TRAIN]
    # Evaluation: both processes yield the same number of batches; valid ids partition the split.
    c.train.eval_batch_size = 2
    ids = []
    for pi in range(2):
        batches = list(data.make_eval_iterator(c, pi, 2))
        assert len(batches) == 2
        ids += [
            int(i) for b in batches for i, v in zip(b["image_id"], b["valid"], strict=True) if v
        ]
    assert sorted(ids) == [21, 22, 23]


def test_unprepared_dataset_is_refused_without_a_download(tmp_path):
    """A builder not prepared in data_dir: a ConfigError naming data.data_dir, the builder and
    the command that prepares it, at once (no download is started, nothing is written)."""
    import time

    from daipnet_jax.config import ConfigError
    from daipnet_jax.data import tfds_sources

    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data\.data_dir: tfds dataset voc/2012 is not prepared"):
        tfds_sources.num_examples("voc/2012", "train", str(tmp_path / "none"))
    assert time.perf_counter() - start < 30
    with pytest.raises(ConfigError, match=r"tfds\.builder\('coco/2017', data_dir='"):
        tfds_sources.num_examples("coco/2017", "validation", str(tmp_path / "none"))
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").rglob("*.zip"))
