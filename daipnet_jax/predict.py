"""Run a detector on image files: detections drawn as PNG plus one JSON per image.

    python -m daipnet_jax.predict --config configs/coco.py:daipnet300 \\
        --checkpoint WORKDIR_OR_CONVERTED_DIR [--step N] IMAGES_OR_FOLDERS... --out DIR \\
        [--score_threshold 0.3] [--max_boxes N] [--classes name1,name2] [--recursive] \\
        [--batch_size 8] [--config.key=value ...]

For each input image `name.ext`: `DIR/name.png` (boxes, class names and scores drawn on the
original-size image) and `DIR/name.json` ({image, width, height, detections: [{label,
class_name, score, bbox: [xmin, ymin, xmax, ymax] absolute pixels, bbox_normalized}]}). The
JSON lists exactly the drawn detections: score ≥ `--score_threshold`, of the `--classes` named
(default all), the best `--max_boxes` (default all), best first.

Inputs: image files and folders (their images; with `--recursive` also those of sub-folders).
Each image is processed once, however often it is named (duplicates, overlapping folders and
symbolic links are merged by resolved path). Output names are the file stems; same-named files
get their parent folder or their extension added (`a/x.jpg`, `b/x.jpg` → `a_x`, `b_x`;
`x.jpg`, `x.png` → `x_jpg`, `x_png`), so no output overwrites another.

Pre-processing (`resize_images`): uint8 RGB → float32, bilinear resize to S×S with half-pixel
centres and no antialiasing (`tf.image.resize`), aspect ratio not kept, as the evaluation
pipeline. The exported SavedModel (`daipnet_jax.export`) uses the same function, so
predictions and the SavedModel agree.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

if __name__ == "__main__":
    from daipnet_jax import platform

    platform.setup()  # before JAX starts and TensorFlow loads (below)

from daipnet_jax import cli
from daipnet_jax.data.coco_folder import TF_FORMATS
from daipnet_jax.data.tfds_sources import COCO_CATEGORY_IDS, COCO_NAMES, VOC_NAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class InputError(cli.InputError):
    """An input path that cannot be used (missing, empty folder, unreadable image)."""


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, saturated colours for labels 1..K (index 0 unused): golden-ratio hue steps
    (neighbouring labels far apart on the hue circle), two lightness levels."""
    cols = [(0, 0, 0)]
    for k in range(1, num_classes + 1):
        h = (k * 0.618033988749895) % 1.0
        light = 0.45 if k % 2 else 0.6
        r, g, b = colorsys.hls_to_rgb(h, light, 0.9)
        cols.append((int(r * 255), int(g * 255), int(b * 255)))
    return cols


def label_map_for(config: Any) -> tuple[list[int], list[str]]:
    """(category ids, names) of labels 1..K: the data source's own table (`data.label_map`,
    the one training used) when its files are there; the generator's shape names for a
    generated dataset not written yet (nothing is generated just for names); else the COCO / VOC
    names for 81 / 21 classes, else `class k`, with ids 1..K."""
    from daipnet_jax.data import sources

    k = int(config.model.num_classes) - 1
    ids: list[int] = []
    names: list[str] = []
    source = sources.get(config) if config.data.source in sources.SOURCES else None
    try:
        if isinstance(source, sources.GeneratedSource) and not source.written(config):
            from daipnet_jax.data.generated import SHAPES

            ids, names = list(range(1, k + 1)), list(SHAPES[:k])
        elif source is not None:
            ids, names = source.label_map(config)
    except (OSError, ValueError):  # names are cosmetic: the data may be gone; fall back below
        ids, names = [], []
    if len(names) == k and len(ids) == k:
        return [int(i) for i in ids], [str(n) for n in names]
    if k == 80:
        return list(COCO_CATEGORY_IDS), list(COCO_NAMES)
    if k == 20:
        return list(range(1, k + 1)), list(VOC_NAMES)
    return list(range(1, k + 1)), [f"class {i}" for i in range(1, k + 1)]


def class_names_for(config: Any) -> list[str]:
    """Names of labels 1..K (see `label_map_for`)."""
    return label_map_for(config)[1]


def parse_class_filter(spec: str, class_names: Sequence[str]) -> set[int] | None:
    """`name1,name2` → their labels (1..K); '' → None (all). Unknown names raise InputError
    listing the valid ones."""
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    if not wanted:
        return None
    index = {n: k for k, n in enumerate(class_names, start=1)}
    unknown = [n for n in wanted if n not in index]
    if unknown:
        raise InputError(
            f"--classes: unknown class {', '.join(map(repr, unknown))}; valid names: "
            + ", ".join(class_names)
        )
    return {index[n] for n in wanted}


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(q for q in found if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())


def collect_images(inputs: Sequence[str], *, recursive: bool = False) -> list[Path]:
    """Image files named in `inputs`: files, and folders scanned for image extensions (sorted;
    sub-folders too when `recursive`). Each file once, by resolved path (first mention kept)."""
    if not inputs:
        raise InputError("no input images given")
    out: list[Path] = []
    seen: set[Path] = set()
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = _images_in(p, recursive)
            if not found:
                where = " or its sub-folders" if recursive else ""
                raise InputError(
                    f"folder {s!r}{where} contains no images ({', '.join(IMAGE_EXTENSIONS)})"
                )
        elif p.is_file():
            found = [p]
        else:
            raise InputError(f"input {s!r} does not exist")
        for q in found:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out


def output_names(paths: Sequence[Path]) -> list[str]:
    """Distinct output stems for `paths`: the stem, and for stems shared by several files the
    first of parent_stem, stem_ext, parent_stem_ext that tells them apart, else a counter."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(p.stem, []).append(i)
    names = [p.stem for p in paths]
    for members in groups.values():
        if len(members) < 2:
            continue
        for level in range(3):
            cand = []
            for i in members:
                p = paths[i]
                parent = p.resolve().parent.name or "root"
                ext = p.suffix.lstrip(".").lower()
                cand.append(
                    [f"{parent}_{p.stem}", f"{p.stem}_{ext}", f"{parent}_{p.stem}_{ext}"][level]
                )
            if len(set(cand)) == len(cand):
                break
        for i, c in zip(members, cand, strict=True):
            names[i] = c
    used: set[str] = set()
    for i, n in enumerate(names):  # still equal (or equal to another file's plain stem)
        base, k = n, 1
        while n in used:
            n, k = f"{base}_{k}", k + 1
        used.add(n)
        names[i] = n
    return names


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] with the pixels evaluation sees; raises InputError naming the file
    when it cannot be decoded.

    The formats the data pipeline reads are decoded by it (`data.pipeline.decode`): PIL's
    `convert("RGB")` clips a 16-bit PNG to white where TensorFlow scales it to 8 bits, and its
    JPEG decoder rounds differently. PIL reads the rest (TIFF, ...) and the few variants
    TensorFlow refuses (1-bit BMP, WebP with alpha)."""
    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt not in TF_FORMATS:
                return np.asarray(im.convert("RGB"), np.uint8)
        import tensorflow as tf

        from daipnet_jax.data import pipeline

        try:
            return np.asarray(pipeline.decode({"path": tf.constant(str(path))}).numpy())
        except tf.errors.OpError:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"cannot read image {str(path)!r}: {e}") from e


def resize_images(images: Any, size: int) -> Any:
    """uint8 [B, H, W, 3] (or [H, W, 3]) → float32 [B, S, S, 3] in 0..255 (tf.image.resize,
    bilinear, half-pixel centres, no antialiasing). Works on numpy and inside a tf.function.

    The same formula as the evaluation pipeline (`data.augment.resize_plain`, whose clip to
    [0, 255] is a no-op for bilinear interpolation of uint8 values)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(images)
    if x.shape.rank == 3:
        x = x[None]
    x = tf.cast(x, tf.float32)
    return tf.image.resize(x, [size, size], method="bilinear", antialias=False)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `background` (WCAG relative luminance)."""

    def lin(c: int) -> float:
        v = c / 255.0
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    lum = 0.2126 * lin(background[0]) + 0.7152 * lin(background[1]) + 0.0722 * lin(background[2])
    # Contrast ratio with black (lum + .05) / .05 vs with white 1.05 / (lum + .05).
    return (0, 0, 0) if (lum + 0.05) ** 2 > 0.05 * 1.05 else (255, 255, 255)


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray | None = None,
    *,
    max_boxes: int | None = None,
) -> Image.Image:
    """Boxes ([N, 4] absolute pixel corners) with `name score` tags (`name` without scores,
    e.g. ground truth) drawn on a copy of `image` [H, W, 3] uint8; the `max_boxes` best.

    Tags: the class colour behind black or white text (the higher contrast), at least 12 px
    high, kept inside the image, drawn after every outline so no line crosses a tag; above the
    box, or where it overlaps no better box's tag (inside the top, below, inside the bottom);
    the best box's tag on top when all spots are taken."""
    im = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(im)
    colours = palette(len(class_names))
    h, w = im.height, im.width
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    order = np.arange(len(labels))
    if scores is not None:
        scores = np.asarray(scores, np.float64).reshape(-1)
        order = np.argsort(-scores, kind="stable")  # best first
    if max_boxes is not None and max_boxes >= 0:
        order = order[:max_boxes]
    order = order[::-1]  # drawn worst first: the best ends up on top
    line = max(2, round(max(h, w) / 300))
    font = _font(max(12, round(max(h, w) / 45)))

    def colour(lab: int) -> tuple[int, int, int]:
        return colours[lab] if 0 < lab < len(colours) else (255, 255, 255)

    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=colour(int(labels[i])), width=line)
    # Tags placed best first, each at the first free spot of: above the box, inside its top,
    # below it, inside its bottom (the first one if none is free); drawn worst first.
    placed: list[tuple[int, str, float, float, float, float, Any]] = []
    for i in order[::-1]:
        lab = int(labels[i])
        x0, y0, _, y1 = (float(v) for v in boxes[i])
        name = class_names[lab - 1] if 0 < lab <= len(class_names) else str(lab)
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0] + 4, tb[3] - tb[1] + 4
        tx = min(max(x0, 0.0), max(w - tw, 0))
        spots = [min(max(y, 0.0), max(h - th, 0)) for y in (y0 - th, y0, y1, y1 - th)]
        if y0 - th < 0:
            spots = spots[1:]

        def free(ty: float, tx: float = tx, tw: float = tw, th: float = th) -> bool:
            return all(
                tx + tw <= px or px + pw <= tx or ty + th <= py or py + ph <= ty
                for _, _, px, py, pw, ph, _ in placed
            )

        ty = next((y for y in spots if free(y)), spots[0])
        placed.append((lab, text, tx, ty, tw, th, tb))
    for lab, text, tx, ty, tw, th, tb in placed[::-1]:
        col = colour(lab)
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=col)
        draw.text((tx + 2 - tb[0], ty + 2 - tb[1]), text, fill=_text_colour(col), font=font)
    return im


def select_detections(
    scores: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    *,
    score_threshold: float = 0.0,
    classes_kept: set[int] | None = None,
    max_boxes: int | None = None,
) -> np.ndarray:
    """Indices of one image's detections to report, best first: valid, score ≥ threshold, of
    `classes_kept` (None: all), at most `max_boxes` (None: all)."""
    keep = np.asarray(valid, bool) & (np.asarray(scores) >= score_threshold)
    if classes_kept is not None:
        keep &= np.isin(np.asarray(classes), sorted(classes_kept))
    idx = np.nonzero(keep)[0]
    idx = idx[np.argsort(-np.asarray(scores)[idx], kind="stable")]
    return idx if max_boxes is None else idx[:max_boxes]


def predict_files(
    config: Any,
    variables: Any,
    paths: Sequence[Path],
    out_dir: str,
    *,
    score_threshold: float = 0.3,
    batch_size: int = 8,
    model: Any = None,
    images: Sequence[np.ndarray] | None = None,
    classes: set[int] | None = None,
    max_boxes: int | None = None,
) -> list[dict[str, Any]]:
    """Runs the detector on `paths`, writes PNG + JSON per image to `out_dir`, returns the JSONs.

    `images`: the already decoded images of `paths` (default: read here). Batches are padded
    to `batch_size` so one compiled function serves every batch. `classes` (labels 1..K) and
    `max_boxes` filter what is drawn and written (see `select_detections`).
    """
    import jax

    from daipnet_jax.evaluation.loop import make_predict_fn

    if model is None:
        from daipnet_jax import models

        model = models.build(config)
    size = int(config.model.image_size)
    fn = jax.jit(make_predict_fn(config, model))
    category_ids, names = label_map_for(config)
    os.makedirs(out_dir, exist_ok=True)
    if images is None:
        images = [load_image(p) for p in paths]  # fail early, before any compute
    stems = output_names(paths)
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = images[start : start + batch_size]
        batch = np.zeros((batch_size, size, size, 3), np.float32)
        for j, im in enumerate(chunk):
            batch[j] = np.asarray(resize_images(im, size))[0]
        boxes, scores, labels, valid = jax.device_get(fn(variables, batch))
        for j, im in enumerate(chunk):
            path = paths[start + j]
            h, w = im.shape[:2]
            keep = select_detections(
                scores[j],
                labels[j],
                valid[j],
                score_threshold=score_threshold,
                classes_kept=classes,
                max_boxes=max_boxes,
            )
            nb = np.clip(boxes[j][keep], 0.0, 1.0)
            px = nb * np.array([w, h, w, h], np.float32)
            dets = [
                {
                    "label": int(c),
                    "category_id": category_ids[int(c) - 1],  # the dataset's own id
                    "class_name": names[int(c) - 1],
                    "score": float(s),
                    "bbox": [round(float(v), 2) for v in b],
                    "bbox_normalized": [float(v) for v in n],
                }
                for b, n, s, c in zip(px, nb, scores[j][keep], labels[j][keep], strict=True)
            ]
            stem = stems[start + j]
            draw_boxes(im, px, labels[j][keep], names, scores[j][keep]).save(
                os.path.join(out_dir, f"{stem}.png")
            )
            record = {"image": str(path), "width": w, "height": h, "detections": dets}
            with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
                json.dump(record, f, indent=1)
            results.append(record)
    return results


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from daipnet_jax.checkpoints import (
        check_checkpoint_path,
        check_saved_config,
        restore_variables,
    )

    FLAGS = flags.FLAGS
    config = FLAGS.config
    if not FLAGS.checkpoint:
        raise InputError("--checkpoint is required (a training workdir or a converted checkpoint)")
    check_saved_config(FLAGS.checkpoint, config, "eval")  # the trained model, overrides included
    check_checkpoint_path(FLAGS.checkpoint, FLAGS.step)  # before reading every input image
    out = Path(FLAGS.out).resolve()
    paths = [
        p
        for p in collect_images(argv[1:], recursive=FLAGS.recursive)
        if out not in p.resolve().parents  # earlier outputs inside a scanned folder
    ]
    if not paths:
        raise InputError(f"no input images outside the output folder {FLAGS.out!r}")
    classes = parse_class_filter(FLAGS.classes, class_names_for(config))
    if FLAGS.max_boxes < 0:
        raise InputError(f"--max_boxes must be >= 0 (0: no cap), got {FLAGS.max_boxes}")
    if FLAGS.batch_size < 0:
        raise InputError(
            f"--batch_size must be >= 0 (0: train.eval_batch_size), got {FLAGS.batch_size}"
        )
    images = [load_image(p) for p in paths]  # unreadable files fail before any compute
    variables = restore_variables(config, FLAGS.checkpoint, FLAGS.step)
    batch = FLAGS.batch_size or int(config.train.eval_batch_size)
    results = predict_files(
        config,
        variables,
        paths,
        FLAGS.out,
        score_threshold=FLAGS.score_threshold,
        batch_size=min(batch, len(paths)),
        images=images,
        classes=classes,
        max_boxes=FLAGS.max_boxes or None,
    )
    n = sum(len(r["detections"]) for r in results)
    counted = f"{len(results)} image" + ("" if len(results) == 1 else "s")
    dets = f"{n} detection" + ("" if n == 1 else "s")
    print(f"{counted}, {dets} (score >= {FLAGS.score_threshold}) → {FLAGS.out}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (file.py:arg)", lock_config=False)
    flags.DEFINE_string("checkpoint", None, "training workdir or converted checkpoint directory")
    flags.DEFINE_integer("step", None, "checkpoint step (workdir only; default latest)")
    flags.DEFINE_string("out", "predictions", "output folder for PNG + JSON")
    flags.DEFINE_float("score_threshold", 0.3, "draw / write detections scoring at least this")
    flags.DEFINE_integer("max_boxes", 0, "draw / write at most this many per image, best first")
    flags.DEFINE_string("classes", "", "comma-separated class names to keep (default: all)")
    flags.DEFINE_boolean("recursive", False, "also read the images of sub-folders")
    flags.DEFINE_integer("batch_size", 0, "images per forward pass (0: train.eval_batch_size)")


def run(argv: Sequence[str] | None = None) -> None:
    """The CLI: `--config` defaults to the config saved with `--checkpoint`'s training run."""
    _define_flags()
    cli.run(main, dir_flags=("checkpoint",), argv=argv)


if __name__ == "__main__":
    run()
