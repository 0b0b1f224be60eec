"""COCO-format folders (an instances JSON + an image directory), read lazily.

The JSON is parsed on the host (small: ~450 MB for COCO train is the worst case, parsed once);
images travel through tf.data as file paths and are decoded in the pipeline. A cheap validation
pass at build time opens every image header with PIL: missing files, undecodable or unsupported
files are skipped, non-RGB images (greyscale, CMYK, alpha, palette) are counted as converted
(tf.io.decode_image(channels=3) converts them), and box problems are counted for the report.
Everything is summarised in a `DataStats` logged when the pipeline is built.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

# Formats tf.io.decode_image can decode. MPO is a JPEG with further frames appended (PIL's name
# for many phone and stereo-camera photos); TensorFlow decodes its first frame.
TF_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")
#: Threads reading image headers at start-up (docs/design.md, "Image header check").
HEADER_THREADS = 16


@dataclasses.dataclass
class DataStats:
    """Build-time report on a COCO-format folder (counts of images and annotations)."""

    images_listed: int = 0
    images_used: int = 0
    missing: int = 0
    undecodable: int = 0
    size_mismatch: int = 0
    converted_to_rgb: int = 0
    images_without_boxes: int = 0
    annotations: int = 0
    annotations_of_unlisted_images: int = 0
    crowd: int = 0
    unknown_category: int = 0
    no_bbox: int = 0
    boxes_clipped: int = 0
    boxes_invalid: int = 0
    skipped_files: list[str] = dataclasses.field(default_factory=list)

    def report(self, name: str = "") -> str:
        d = dataclasses.asdict(self)
        skipped = d.pop("skipped_files")
        text = f"data {name}: " + ", ".join(f"{k}={v}" for k, v in d.items())
        if skipped:
            text += f"; skipped e.g. {skipped[:5]}"
        return text


@dataclasses.dataclass
class FolderRecords:
    """Per-image arrays of one COCO-format split (after validation), boxes ragged by `counts`.

    paths [I] str, image_ids [I] int64, counts [I] int, boxes [A, 4] float32 normalised corners
    (not yet repaired: the tf-side sanitiser clips and drops), labels [A] int32 1..K,
    crowd [A] bool.
    """

    paths: np.ndarray
    image_ids: np.ndarray
    counts: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    stats: DataStats

    def head(self, n: int) -> FolderRecords:
        """The first `n` images (by id)."""
        m = int(np.sum(self.counts[:n]))  # their boxes
        return FolderRecords(
            self.paths[:n],
            self.image_ids[:n],
            self.counts[:n],
            self.boxes[:m],
            self.labels[:m],
            self.crowd[:m],
            self.stats,
        )

    def shard(self, index: int, count: int) -> FolderRecords:
        """Images `index, index + count, …`: disjoint shards covering the split."""
        sel = np.arange(index, len(self.paths), count)
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        ann = (
            np.concatenate([np.arange(starts[i], starts[i + 1]) for i in sel]).astype(np.int64)
            if len(sel)
            else np.zeros([0], np.int64)
        )
        return FolderRecords(
            self.paths[sel],
            self.image_ids[sel],
            self.counts[sel],
            self.boxes[ann].reshape(-1, 4),
            self.labels[ann],
            self.crowd[ann],
            self.stats,
        )


def usable_images(records: FolderRecords) -> np.ndarray:
    """[I] bool: images with at least one box the training pipeline keeps (non-crowd, finite,
    positive width and height after clipping to the image; the rule of `pipeline.sanitize`)."""
    b = np.clip(np.nan_to_num(records.boxes, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)
    ok = np.isfinite(records.boxes).all(axis=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    ok &= ~records.crowd
    owner = np.repeat(np.arange(len(records.counts)), records.counts)
    out = np.zeros(len(records.counts), bool)
    out[owner[ok]] = True
    return out


def load_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _records(data: Any, key: str) -> list[dict[str, Any]]:
    """`data[key]` as a list of objects; ValueError naming the key otherwise."""
    if not isinstance(data, dict):
        raise ValueError(
            f"not a COCO instances file: the top level is a {type(data).__name__}, not an object "
            "with 'images', 'annotations' and 'categories'"
        )
    out = data.get(key, [])
    if not isinstance(out, list) or not all(isinstance(r, dict) for r in out):
        raise ValueError(f"'{key}' must be a list of objects")
    return out


def _int_id(record: dict[str, Any], where: str, key: str = "id") -> int:
    """An integer id of `record` (pycocotools and the results file need integers)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} {value!r} is not an integer")
    return value


def categories(data: dict[str, Any]) -> tuple[list[int], list[str]]:
    """Contiguous label table: label k (1..K) ↔ the k-th category by ascending id.

    ValueError naming the record for a missing, non-integer or repeated id (a repeated id would
    give two labels one category, and one of them no training target)."""
    cats = _records(data, "categories")
    seen: dict[int, str] = {}
    for i, c in enumerate(cats):
        cid = _int_id(c, f"categories[{i}]")
        name = str(c.get("name", cid))
        if cid in seen:
            raise ValueError(f"categories[{i}]: id {cid} ({name!r}) repeats {seen[cid]!r}")
        seen[cid] = name
    ids = sorted(seen)
    return ids, [seen[c] for c in ids]


def bbox_of(annotation: dict[str, Any]) -> list[float] | None:
    """[x, y, w, h] of an annotation as floats, or None when it has no `bbox` of 4 numbers
    (segmentation-only records, null, strings)."""
    b = annotation.get("bbox")
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b):
        return None
    return [float(v) for v in b]


def box_usable(bbox: list[float], width: float | None, height: float | None) -> bool:
    """The rule of the training targets (`pipeline.sanitize`) on a COCO [x, y, w, h] in pixels:
    finite, positive width and height, not wholly outside the `width`×`height` image (not
    checked when the size is unknown). Other boxes can never be matched."""
    x, y, bw, bh = bbox
    if not all(math.isfinite(v) for v in bbox) or bw <= 0 or bh <= 0:
        return False
    return not (width and height and (x >= width or y >= height or x + bw <= 0 or y + bh <= 0))


def _check_image(path: str) -> tuple[str, int, int]:
    """('ok' | 'converted' | 'missing' | 'undecodable', height, width) from the file header."""
    from PIL import Image

    if not os.path.isfile(path):
        return "missing", 0, 0
    try:
        with Image.open(path) as im:
            if im.format not in TF_FORMATS:
                return "undecodable", 0, 0
            if (im.format == "BMP" and im.mode == "1") or (
                im.format == "WEBP" and (im.mode == "RGBA" or getattr(im, "n_frames", 1) > 1)
            ):
                # Variants PIL reads and tf.io.decode_image refuses (1-bit BMP, WebP with
                # alpha, animated WebP): dropped at decode time, they would go uncounted.
                return "undecodable", 0, 0
            w, h = im.size
            return ("ok" if im.mode == "RGB" else "converted"), h, w
    except Exception:
        return "undecodable", 0, 0


def _check_images(paths: list[str], name: str, log_every_s: float = 10.0) -> Iterator[tuple]:
    """`_check_image` of each path, in order. The headers are read by a pool of threads (the
    work is file opening: on a network file system mostly waiting), with a progress line and
    an ETA every `log_every_s` seconds for a large folder."""
    if not paths:
        return iter(())
    start = last = time.perf_counter()
    out = []
    with concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
        for n, result in enumerate(pool.map(_check_image, paths), 1):
            out.append(result)
            now = time.perf_counter()
            if now - last >= log_every_s and n < len(paths):
                eta = (len(paths) - n) * (now - start) / n
                logging.info(
                    "%s: image headers checked %d/%d, ETA %.0f s", name, n, len(paths), eta
                )
                last = now
    return iter(out)


def load_folder(
    annotation_file: str,
    image_dir: str,
    *,
    category_ids: list[int] | None = None,
    validate: bool = True,
) -> FolderRecords:
    """Parse a COCO instances JSON and validate its images (see the module docstring).

    Labels are contiguous 1..K through `category_ids` (default: this file's categories by id).
    Boxes are normalised by the JSON's width/height (the header's when missing); degenerate,
    inverted, non-finite and out-of-range boxes are counted here and repaired by the pipeline.
    """
    data = load_json(annotation_file)
    if category_ids is None:
        category_ids, _ = categories(data)
    to_label = {cid: k + 1 for k, cid in enumerate(category_ids)}
    images = _records(data, "images")
    stats = DataStats(images_listed=len(images))
    per_image: dict[int, list[dict[str, Any]]] = {}
    for i, a in enumerate(_records(data, "annotations")):
        per_image.setdefault(_int_id(a, f"annotations[{i}]", "image_id"), []).append(a)
    listed: dict[int, str] = {}
    for i, img in enumerate(images):
        iid = _int_id(img, f"images[{i}]")
        if not isinstance(img.get("file_name"), str):
            raise ValueError(
                f"images[{i}] (id {iid}): file_name {img.get('file_name')!r} is not a path"
            )
        for key in ("width", "height"):
            v = img.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"images[{i}] (id {iid}): {key} {v!r} is not a size in pixels")
        if iid in listed:
            # Two files under one id would share one image's boxes (and the evaluation's).
            raise ValueError(
                f"images[{i}]: id {iid} ({img['file_name']}) repeats the id of {listed[iid]}"
            )
        listed[iid] = img["file_name"]
    # An annotation whose image_id names no listed image has no pixels to belong to.
    stats.annotations_of_unlisted_images = sum(
        len(anns) for iid, anns in per_image.items() if iid not in listed
    )
    paths, ids, counts, boxes, labels, crowd = [], [], [], [], [], []
    mismatched: list[str] = []
    images = sorted(images, key=lambda x: x["id"])
    headers = _check_images(
        [
            os.path.join(image_dir, img["file_name"])
            for img in images
            if validate or not (img.get("height") and img.get("width"))
        ],
        annotation_file,
    )
    for img in images:
        path = os.path.join(image_dir, img["file_name"])
        h, w = img.get("height"), img.get("width")
        if validate or not (h and w):
            status, hh, ww = next(headers)
            if status in ("missing", "undecodable"):
                setattr(stats, status, getattr(stats, status) + 1)
                stats.skipped_files.append(path)
                continue
            if h and w and (h, w) != (hh, ww):
                # Boxes are in the JSON's pixel frame, the network sees the file's pixels:
                # normalising by either size would place the boxes wrongly (docs/design.md,
                # image sizes and EXIF orientation).
                stats.size_mismatch += 1
                stats.skipped_files.append(path)
                mismatched.append(f"{path} (JSON {w}x{h}, file {ww}x{hh})")
                continue
            stats.converted_to_rgb += status == "converted"
            h, w = h or hh, w or ww
        n = 0
        for a in per_image.get(img["id"], []):
            stats.annotations += 1
            if a.get("category_id") not in to_label:
                stats.unknown_category += 1
                continue
            bbox = bbox_of(a)
            if bbox is None:
                stats.no_bbox += 1
                continue
            x, y, bw, bh = bbox
            box = [x / w, y / h, (x + bw) / w, (y + bh) / h]
            if not box_usable(bbox, w, h):
                stats.boxes_invalid += 1
            elif min(box) < 0 or max(box) > 1:
                stats.boxes_clipped += 1
            is_crowd = bool(a.get("iscrowd", 0))
            stats.crowd += is_crowd
            boxes.append(box)
            labels.append(to_label[a["category_id"]])
            crowd.append(is_crowd)
            n += 1
        stats.images_without_boxes += n == 0
        paths.append(path)
        ids.append(int(img["id"]))
        counts.append(n)
    if mismatched:
        logging.warning(
            "%s: %d images skipped whose width/height differ from the image file, e.g. %s; "
            "boxes must be in the stored pixels' frame (EXIF orientation is not applied)",
            annotation_file,
            len(mismatched),
            "; ".join(mismatched[:3]),
        )
    stats.images_used = len(paths)
    logging.info(stats.report(annotation_file))
    return FolderRecords(
        np.array(paths, dtype=object).astype(str) if paths else np.zeros([0], str),
        np.array(ids, np.int64),
        np.array(counts, np.int64),
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(labels, np.int32),
        np.array(crowd, bool),
        stats,
    )


def ground_truth(annotation_file: str, records: FolderRecords | None = None) -> dict[str, Any]:
    """The COCO GT dict for pycocotools: the JSON itself (crowd kept), restricted to the images
    the pipeline actually evaluates when `records` is given (skipped files are left out).

    Annotations without a `bbox` of 4 numbers (`DataStats.no_bbox`) or whose box cannot be
    matched (non-finite, zero or negative size, wholly outside the image: `boxes_invalid`) are
    left out, as from the training targets: they counted as missed objects. The keys
    pycocotools reads but COCO exports from other tools often omit get COCO's defaults:
    `iscrowd` 0, `area` w·h, a unique `id`. Without them the evaluation, at the end of
    training, stopped on a KeyError."""
    data = load_json(annotation_file)
    sizes = {i.get("id"): (i.get("width"), i.get("height")) for i in _records(data, "images")}
    anns = [
        (a, b)
        for a in _records(data, "annotations")
        if (b := bbox_of(a)) is not None
        and box_usable(b, *sizes.get(a.get("image_id"), (None, None)))
    ]
    if records is not None:
        keep = set(records.image_ids.tolist())
        data["images"] = [i for i in _records(data, "images") if i["id"] in keep]
        anns = [(a, b) for a, b in anns if a.get("image_id") in keep]
    used = {a["id"] for a, _ in anns if isinstance(a.get("id"), int)}
    next_id = max(used, default=0) + 1
    data["annotations"] = []
    for a, (_, _, w, h) in anns:
        a = dict(a)
        if not isinstance(a.get("id"), int) or a["id"] not in used:
            a["id"], next_id = next_id, next_id + 1
        used.discard(a["id"])  # a repeated id gets a new one
        a["iscrowd"] = int(bool(a.get("iscrowd", 0)))  # as the training targets read it
        if isinstance(a.get("area"), bool) or not isinstance(a.get("area"), (int, float)):
            a["area"] = w * h
        data["annotations"].append(a)
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    return data
