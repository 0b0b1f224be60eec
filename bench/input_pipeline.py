"""Training input pipeline throughput at 300: our tf.data pipeline vs an OpenCV/NumPy reference.

The reference implements the same recipe (RFBNet's `preproc`, the data code LRF trains with, as
ssd.pytorch-style per-image NumPy/OpenCV code): decode with cv2, IoU-constrained crop (7 modes,
50 tries, redrawn until success), photometric distortion in HSV, expand onto a mean-filled
canvas, mirror, resize with a random cv2 interpolation, drop boxes < 0.01, fall back to the
plain image, pad to max_boxes, stack into a batch. It runs the way a PyTorch DataLoader would on
this machine: `--ref_workers` processes (default: the number of CPU cores) each producing whole
batches.

Data: a generated COCO-format folder of 640×480-like images (the typical COCO size), written
once into `--data_dir`.

    python bench/input_pipeline.py            # ~2 min on 2 cores
    python bench/input_pipeline.py --quick    # smoke test

Also ours with tf.data limited to 1 and 2 host threads (`threading.private_threadpool_size`,
no intra-op parallelism): the rate per host core, from which the cores one accelerator needs
follow (README, "Input pipeline and host cores").

Last line: `RESULT input_pipeline_speedup=<ours / reference> input_images_per_s=<ours>
input_images_per_s_1core=... input_images_per_s_2cores=...`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

S = 300
MEAN = (123.0, 117.0, 104.0)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_data(root: str, num: int) -> str:
    """A COCO-format folder of `num` 640×480 JPEGs (generated shapes, 3 classes)."""
    from PIL import Image

    from daipnet_jax.data import generated

    meta = os.path.join(root, "bench_meta.json")
    if os.path.exists(meta) and _read_json(meta) == {"num": num}:
        return root
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(num):
        rng = np.random.default_rng([7, i])
        pixels, objects = generated.render_image(rng, 480, 3)
        pixels = np.asarray(Image.fromarray(pixels).resize((640, 480)))
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, "images", name), quality=90)
        images.append({"id": i + 1, "file_name": name, "height": 480, "width": 640})
        for (x, y, w, h), c in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [x * 4 / 3, y, w * 4 / 3, h],
                    "area": w * h * 4 / 3,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(3)]
    with open(os.path.join(root, "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    with open(meta, "w") as f:
        json.dump({"num": num}, f)
    return root


# ------------------------------------------------------------------ the OpenCV/NumPy reference
def _iou(boxes: np.ndarray, roi: np.ndarray) -> np.ndarray:
    lt = np.maximum(boxes[:, :2], roi[:2])
    rb = np.minimum(boxes[:, 2:], roi[2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) + np.prod(roi[2:] - roi[:2])
    return inter / (area - inter)


def ref_crop(rng, image, boxes, labels):
    h, w, _ = image.shape
    modes = (None, (0.1, None), (0.3, None), (0.5, None), (0.7, None), (0.9, None), (None, None))
    while True:
        mode = modes[rng.integers(len(modes))]
        if mode is None:
            return image, boxes, labels
        min_iou = -np.inf if mode[0] is None else mode[0]
        for _ in range(50):
            scale = rng.uniform(0.3, 1.0)
            lo, hi = max(0.5, scale * scale), min(2.0, 1.0 / scale / scale)
            ratio = np.sqrt(rng.uniform(lo, hi))
            cw, ch = int(scale * ratio * w), int(scale / ratio * h)
            left, top = rng.integers(w - cw + 1), rng.integers(h - ch + 1)
            roi = np.array([left, top, left + cw, top + ch], np.float32)
            if _iou(boxes, roi).min() < min_iou:
                continue
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2
            m = np.all((roi[:2] < centre) & (centre < roi[2:]), axis=1)
            if not m.any():
                continue
            b = boxes[m].copy()
            b[:, :2] = np.maximum(b[:, :2], roi[:2]) - roi[:2]
            b[:, 2:] = np.minimum(b[:, 2:], roi[2:]) - roi[:2]
            return image[top : top + ch, left : left + cw], b, labels[m]


def ref_distort(rng, image):
    import cv2

    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x = np.clip(x + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5
    alpha = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    if contrast_first:
        x = np.clip(x * alpha, 0, 255)
    hsv = cv2.cvtColor(x.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    if rng.random() < 0.5:
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
    if rng.random() < 0.5:
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-9, 9)) % 180  # ±18° in OpenCV's 0..180 hue
    x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first:
        x = np.clip(x * alpha, 0, 255)
    return x


def ref_expand(rng, image, boxes, prob=0.6, max_ratio=4.0):
    if rng.random() >= prob:
        return image, boxes
    h, w, c = image.shape
    r = rng.uniform(1, max_ratio)
    left, top = int(rng.uniform(0, w * r - w)), int(rng.uniform(0, h * r - h))
    canvas = np.empty((int(h * r), int(w * r), c), np.float32)
    canvas[:] = MEAN
    canvas[top : top + h, left : left + w] = image
    return canvas, boxes + np.array([left, top, left, top], np.float32)


def ref_example(rng, path, boxes_px, labels, max_boxes):
    import cv2

    image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    image, boxes, lab = ref_crop(rng, image, boxes_px, labels)
    image = ref_distort(rng, image)
    image, boxes = ref_expand(rng, image, boxes)
    h, w, _ = image.shape
    if rng.random() < 0.5:
        image = image[:, ::-1]
        boxes = boxes.copy()
        boxes[:, 0::2] = w - boxes[:, 2::-2]
    interp = (
        cv2.INTER_LINEAR,
        cv2.INTER_CUBIC,
        cv2.INTER_AREA,
        cv2.INTER_NEAREST,
        cv2.INTER_LANCZOS4,
    )
    image = cv2.resize(np.ascontiguousarray(image), (S, S), interpolation=interp[rng.integers(5)])
    boxes = boxes / np.array([w, h, w, h], np.float32)
    keep = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 0.01
    boxes, lab = boxes[keep], lab[keep]
    if len(boxes) == 0:
        o = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        image = cv2.resize(o, (S, S)).astype(np.float32)
        boxes, lab = boxes_px / np.array([o.shape[1], o.shape[0]] * 2, np.float32), labels
    out_b = np.zeros((max_boxes, 4), np.float32)
    out_l = np.zeros((max_boxes,), np.int32)
    k = min(len(boxes), max_boxes)
    out_b[:k], out_l[:k] = boxes[:k], lab[:k]
    return np.clip(image, 0, 255).astype(np.float32), out_b, out_l


def _load(root: str):
    gt = _read_json(os.path.join(root, "instances.json"))
    per = {}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        per.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], a["category_id"]))
    items = []
    for img in gt["images"]:
        objs = per.get(img["id"], [])
        items.append(
            (
                os.path.join(root, "images", img["file_name"]),
                np.array([o[0] for o in objs], np.float32).reshape(-1, 4),
                np.array([o[1] for o in objs], np.int32),
            )
        )
    return items


def _ref_worker(args):
    root, worker, num_batches, batch = args
    import cv2

    cv2.setNumThreads(1)
    items = _load(root)
    rng = np.random.default_rng(worker)
    for _ in range(num_batches):
        ex = [ref_example(rng, *items[rng.integers(len(items))], 16) for _ in range(batch)]
        _ = (
            np.stack([e[0] for e in ex]),
            np.stack([e[1] for e in ex]),
            np.stack([e[2] for e in ex]),
        )
    return num_batches * batch


def bench_reference(root: str, workers: int, batches_per_worker: int, batch: int) -> float:
    _ref_worker((root, 0, 1, batch))  # warm-up (imports, page cache)
    t = time.perf_counter()
    if workers == 1:
        n = _ref_worker((root, 0, batches_per_worker, batch))
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_ref_worker, [(root, w, 1, 1) for w in range(workers)])  # start + import
            t = time.perf_counter()
            n = sum(
                pool.map(
                    _ref_worker, [(root, w, batches_per_worker, batch) for w in range(workers)]
                )
            )
    return n / (time.perf_counter() - t)


def bench_ours(root: str, num_batches: int, batch: int, threads: int | None = None) -> float:
    """Images/s of `pipeline.train_dataset`; `threads` caps tf.data to that many host threads
    (private thread pool, no intra-op parallelism, as many parallel calls) for a per-core rate."""
    import tensorflow as tf

    from daipnet_jax.config import base_config
    from daipnet_jax.data import pipeline

    c = base_config("daipnet300", "coco_folder", width=0.25)
    c.data.source = "coco_folder"
    c.data.annotation_file = os.path.join(root, "instances.json")
    c.data.image_dir = os.path.join(root, "images")
    c.data.max_boxes = 16
    c.train.batch_size = batch
    if threads:
        c.data.num_parallel_calls = threads
    ds = pipeline.train_dataset(c, 0, 1)
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    it = ds.as_numpy_iterator()
    for _ in range(3):  # warm-up: tracing, autotune
        next(it)
    t = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "daipnet_bench_input"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ref_workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    num_images, ours_batches, ref_batches = (64, 2, 1) if a.quick else (400, 20, 6)
    batch = 8 if a.quick else a.batch
    root = write_data(a.data_dir + ("_quick" if a.quick else ""), num_images)
    ours = bench_ours(root, ours_batches, batch)
    print(f"tf.data pipeline: {ours:.1f} images/s (batch {batch}, {os.cpu_count()} cores)")
    ref = bench_reference(root, a.ref_workers, max(1, ref_batches // a.ref_workers), batch)
    print(f"OpenCV/NumPy reference ({a.ref_workers} worker processes): {ref:.1f} images/s")
    print(f"speedup {ours / ref:.2f}x")
    per_thread = {n: bench_ours(root, ours_batches, batch, threads=n) for n in (1, 2)}
    for n, rate in per_thread.items():
        print(
            f"tf.data pipeline on {n} host thread(s): {rate:.1f} images/s ({rate / n:.1f} per core)"
        )
    print(
        f"RESULT input_pipeline_speedup={ours / ref:.2f} input_images_per_s={ours:.1f} "
        f"input_images_per_s_1core={per_thread[1]:.1f} input_images_per_s_2cores={per_thread[2]:.1f}"
    )


if __name__ == "__main__":
    main()
