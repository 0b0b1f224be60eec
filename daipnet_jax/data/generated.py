"""A procedurally generated detection dataset written as a COCO-format folder.

One filled shape per class in random colours on textured noise, deterministic by seed (the quick
start and the tests; docs/design.md, Generated dataset). `python -m daipnet_jax.data.generated
--out DIR` writes `images/{train,val}/*.jpg`, `instances_{train,val}.json`, `meta.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from daipnet_jax.boxes import iou

SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "cross", "hexagon", "ring", "star")
FORMAT_VERSION = 1


def _polygon(shape: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """Vertices of `shape` filling the box (x0, y0, x1, y1) so its extent is exactly the box."""
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "hexagon":
        return [
            (x0 + w / 4, y0),
            (x1 - w / 4, y0),
            (x1, cy),
            (x1 - w / 4, y1),
            (x0 + w / 4, y1),
            (x0, cy),
        ]
    if shape == "cross":
        a, b = w / 3, h / 3
        return [
            (x0 + a, y0),
            (x1 - a, y0),
            (x1 - a, y0 + b),
            (x1, y0 + b),
            (x1, y1 - b),
            (x1 - a, y1 - b),
            (x1 - a, y1),
            (x0 + a, y1),
            (x0 + a, y1 - b),
            (x0, y1 - b),
            (x0, y0 + b),
            (x0 + a, y0 + b),
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            ang = -np.pi / 2 + k * np.pi / 5
            r = 1.0 if k % 2 == 0 else 0.45
            pts.append((cx + r * np.cos(ang) * w / 2, cy + r * np.sin(ang) * h / 2))
        # Rescale so the vertex extent equals the box exactly.
        xs, ys = np.array(pts).T
        sx, sy = w / (xs.max() - xs.min()), h / (ys.max() - ys.min())
        return [(x0 + (px - xs.min()) * sx, y0 + (py - ys.min()) * sy) for px, py in pts]
    raise ValueError(shape)


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    direction = rng.uniform(-1, 1, size=2)
    grad = (xx * direction[0] + yy * direction[1])[..., None] * rng.uniform(-40, 40, size=3)
    img = base + grad
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):  # soft blobs and lines: texture, not objects
        c = tuple(int(v) for v in np.clip(base + rng.uniform(-35, 35, size=3), 0, 255))
        x, y = rng.uniform(0, size, size=2)
        r = rng.uniform(0.05, 0.3) * size
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=c)
        else:
            x2, y2 = rng.uniform(0, size, size=2)
            draw.line([x, y, x2, y2], fill=c, width=int(rng.integers(1, 5)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 4.0))))
    return canvas, base


def _object_colour(rng: np.random.Generator, bg: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background mean to be visible (L1 distance ≥ 150)."""
    for _ in range(100):
        c = rng.uniform(0, 255, size=3)
        if np.abs(c - bg).sum() >= 150:
            break
    return tuple(int(v) for v in c)  # type: ignore[return-value]


def render_image(
    rng: np.random.Generator, image_size: int, num_classes: int, max_objects: int = 4
) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    """One image [S, S, 3] uint8 and its objects [(x, y, w, h) pixels, class index 0..K-1]."""
    canvas, bg = _background(rng, image_size)
    draw = ImageDraw.Draw(canvas)
    placed: list[np.ndarray] = []
    objects: list[tuple[list[float], int]] = []
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(n):
        for _try in range(20):
            side = rng.uniform(0.10, 0.50) * image_size
            ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # w / h
            w = min(side * np.sqrt(ratio), 0.6 * image_size)
            h = min(side / np.sqrt(ratio), 0.6 * image_size)
            x0 = rng.uniform(0, image_size - w)
            y0 = rng.uniform(0, image_size - h)
            box = np.array([x0, y0, x0 + w, y0 + h])
            if not placed or iou(np.asarray([box]), np.asarray(placed), xp=np).max() <= 0.4:
                break
        else:
            continue
        cls = int(rng.integers(0, num_classes))
        colour = _object_colour(rng, bg)
        shape = SHAPES[cls]
        x0, y0, x1, y1 = (float(v) for v in box)
        # PIL draws inclusive pixel ends: draw up to x1 - 1 so the extent is [x0, x1).
        if shape == "rectangle":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        elif shape == "ellipse":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
        elif shape == "ring":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
            t = 0.3
            draw.ellipse(
                [x0 + t * (x1 - x0), y0 + t * (y1 - y0), x1 - t * (x1 - x0), y1 - t * (y1 - y0)],
                fill=tuple(int(v) for v in bg),
            )
        else:
            draw.polygon(_polygon(shape, x0, y0, x1 - 1, y1 - 1), fill=colour)
        placed.append(box)
        objects.append(([x0, y0, x1 - x0, y1 - y0], cls))
    img = np.asarray(canvas).astype(np.float32)
    img += rng.normal(0.0, rng.uniform(2.0, 10.0), size=img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _write_split(
    out_dir: str, split: str, num: int, num_classes: int, image_size: int, seed: int
) -> None:
    img_dir = os.path.join(out_dir, "images", split)
    os.makedirs(img_dir, exist_ok=True)
    # One independent stream per (seed, split, index): any image can be regenerated alone.
    split_key = {"train": 0, "val": 1}[split]
    images, annotations = [], []
    ann_id = 1
    for i in range(num):
        rng = np.random.default_rng([seed, split_key, i])
        pixels, objects = render_image(rng, image_size, num_classes)
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(img_dir, name), quality=95)
        images.append({"id": i + 1, "file_name": name, "height": image_size, "width": image_size})
        for (x, y, w, h), cls in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    categories = [
        {"id": k + 1, "name": SHAPES[k], "supercategory": "shape"} for k in range(num_classes)
    ]
    with open(os.path.join(out_dir, f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def write_dataset(
    out_dir: str,
    num_train: int = 2000,
    num_val: int = 200,
    num_classes: int = 3,
    image_size: int = 300,
    seed: int = 0,
) -> str:
    """Write the COCO-format folder (built aside, then renamed into place).

    A no-op when `out_dir` holds a generated dataset with these parameters. Anything else
    already there (another generated dataset, the user's files) is never overwritten: a
    `ValueError` says so. An empty folder is filled.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    meta: dict[str, Any] = dict(
        num_train=num_train,
        num_val=num_val,
        num_classes=num_classes,
        image_size=image_size,
        seed=seed,
        version=FORMAT_VERSION,
    )
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            written = json.load(f)
        if written == meta:
            return out_dir
        differ = ", ".join(
            f"{k}={written.get(k)!r} (asked {v!r})" for k, v in meta.items() if written.get(k) != v
        )
        raise ValueError(
            f"{out_dir} holds a generated dataset written with {differ}; not overwriting it "
            "(choose another folder, or delete this one)"
        )
    if os.path.lexists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(
            f"{out_dir} exists and is not an empty folder or a generated dataset; not writing "
            "into it (choose another folder)"
        )
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_split(tmp, "train", num_train, num_classes, image_size, seed)
    _write_split(tmp, "val", num_val, num_classes, image_size, seed)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)  # also over an empty folder
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num_train", type=int, default=2000)
    p.add_argument("--num_val", type=int, default=200)
    p.add_argument("--num_classes", type=int, default=3)
    p.add_argument("--image_size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        write_dataset(a.out, a.num_train, a.num_val, a.num_classes, a.image_size, a.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
