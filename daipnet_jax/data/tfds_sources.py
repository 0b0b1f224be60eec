"""tfds sources: `coco/2017`, `coco/2014`, `voc/2007`, `voc/2012` and unions such as
`voc/2007+voc/2012`.

Images stay encoded (`SkipDecoding`) for the shared pipeline; labels become 1..K.
choices (VOC difficult, image ids, `trainval`): docs/design.md, tfds sources.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from daipnet_jax import config as config_lib

COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
assert len(COCO_CATEGORY_IDS) == len(COCO_NAMES) == 80

SPLIT_ALIASES = {"trainval": "train+validation"}


names = config_lib.tfds_names


def is_voc(tfds_name: str) -> bool:
    return names(tfds_name)[0].startswith("voc")


def label_map(tfds_name: str) -> tuple[list[int], list[str]]:
    """(category id per label 1..K, class names)."""
    if is_voc(tfds_name):
        return list(range(1, 21)), list(VOC_NAMES)
    return list(COCO_CATEGORY_IDS), list(COCO_NAMES)


def _builders(tfds_name: str, data_dir: str) -> list[tfds.core.DatasetBuilder]:
    """The prepared builders of `tfds_name`; one not prepared is a `ConfigError` saying how to
    prepare it (training never downloads: COCO is ~25 GB, and a machine without network
    would retry for minutes before a traceback)."""
    from daipnet_jax.config import ConfigError

    out = []
    for n in names(tfds_name):
        b = tfds.builder(n, data_dir=data_dir or None)
        if not b.is_prepared():
            where = data_dir or str(b.data_dir).split(os.sep + n.split("/")[0])[0]
            raise ConfigError(
                "data.data_dir",
                f"tfds dataset {n} is not prepared in {where}; prepare it once with "
                f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{n}', "
                f"data_dir='{where}').download_and_prepare()\" (README, COCO and VOC)",
            )
        out.append(b)
    return out


def _parts(split: str) -> list[str]:
    return SPLIT_ALIASES.get(split, split).split("+")


def num_examples(tfds_name: str, split: str, data_dir: str, first_only: bool = False) -> int:
    bs = _builders(tfds_name, data_dir)
    bs = bs[:1] if first_only else bs
    return sum(b.info.splits[p].num_examples for b in bs for p in _parts(split))


def image_id_from_filename(filename: tf.Tensor) -> tf.Tensor:
    """VOC ids: the digits of the file name as int64."""
    stem = tf.strings.regex_replace(filename, r"\.[^.]*$", "")
    return tf.strings.to_number(tf.strings.regex_replace(stem, r"[^0-9]", ""), tf.int64)


def _to_record(voc: bool):
    def fn(ex: dict[str, Any]) -> dict[str, tf.Tensor]:
        obj = ex["objects"]
        yx = obj["bbox"]  # [N, 4] (ymin, xmin, ymax, xmax)
        boxes = tf.stack([yx[:, 1], yx[:, 0], yx[:, 3], yx[:, 2]], axis=1)
        if voc:
            image_id = image_id_from_filename(ex["image/filename"])
            crowd = obj["is_difficult"]
        else:
            image_id = ex["image/id"]
            crowd = obj["is_crowd"]
        return dict(
            encoded=ex["image"],
            boxes=tf.cast(boxes, tf.float32),
            labels=tf.cast(obj["label"], tf.int32) + 1,
            crowd=tf.cast(crowd, tf.bool),
            image_id=tf.cast(image_id, tf.int64),
            # COCO's segmentation area (pixels) for the GT; -1: use the box area (VOC).
            area=tf.cast(obj["area"], tf.float32) if not voc else -tf.ones_like(yx[:, 0]),
        )

    return fn


def records(
    tfds_name: str,
    split: str,
    data_dir: str,
    *,
    process_index: int,
    process_count: int,
    shuffle_seed: int | None,
    first_only: bool = False,
) -> tf.data.Dataset:
    """This process's `tfds.even_splits` shard of every split part: record dicts (`encoded`,
    `boxes` [N, 4], `labels` [N] 1..K, `crowd` [N], `image_id`, `area` [N])."""
    datasets = []
    bs = _builders(tfds_name, data_dir)
    for b in bs[:1] if first_only else bs:
        voc = b.name == "voc"
        for part in _parts(split):
            sub = tfds.even_splits(part, n=process_count)[process_index]
            ds = b.as_dataset(
                split=sub,
                shuffle_files=shuffle_seed is not None,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
            )
            datasets.append(ds.map(_to_record(voc)))
    out = datasets[0]
    for d in datasets[1:]:
        out = out.concatenate(d)
    return out


def _image_shape(encoded: tf.Tensor) -> tf.Tensor:
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int32),
        lambda: tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2],
    )


def ground_truth(tfds_name: str, split: str, data_dir: str) -> dict[str, Any]:
    """COCO-format ground truth of the eval split (first builder of a union); difficult → iscrowd."""
    voc = is_voc(tfds_name)
    cat_ids, cat_names = label_map(tfds_name)
    ds = records(
        tfds_name,
        split,
        data_dir,
        process_index=0,
        process_count=1,
        shuffle_seed=None,
        first_only=True,
    )
    ds = ds.map(
        lambda r: dict(
            hw=_image_shape(r["encoded"]),
            boxes=r["boxes"],
            labels=r["labels"],
            crowd=r["crowd"],
            image_id=r["image_id"],
            area=r["area"],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for ex in ds.as_numpy_iterator():
        h, w = (int(v) for v in ex["hw"])
        iid = int(ex["image_id"])
        images.append({"id": iid, "height": h, "width": w, "file_name": str(iid)})
        for box, lab, cr, area in zip(
            ex["boxes"], ex["labels"], ex["crowd"], ex["area"], strict=True
        ):
            x0, y0, x1, y1 = (float(v) for v in box * np.array([w, h, w, h]))
            ann = {
                "id": len(annotations) + 1,
                "image_id": iid,
                "category_id": cat_ids[int(lab) - 1],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(area) if area >= 0 else (x1 - x0) * (y1 - y0),
                "iscrowd": int(cr),
            }
            if voc:
                ann["difficult"] = int(cr)
            annotations.append(ann)
    categories = [{"id": i, "name": n} for i, n in zip(cat_ids, cat_names, strict=True)]
    return {
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "info": {},
        "licenses": [],
    }
