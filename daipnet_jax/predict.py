"""Run a detector on image files: detections drawn as PNG plus one JSON per image.

    python -m daipnet_jax.predict --config configs/coco.py:daipnet300 \\
        --checkpoint WORKDIR_OR_CONVERTED_DIR [--step N] IMAGES_OR_FOLDERS... --out DIR \\
        [--score_threshold 0.3] [--batch_size 8] [--config.key=value ...]

For each input image `name.ext`: `DIR/name.png` (boxes, class names and scores drawn on the
original-size image) and `DIR/name.json` ({image, width, height, detections: [{label,
class_name, score, bbox: [xmin, ymin, xmax, ymax] absolute pixels, bbox_normalized}]}).

Pre-processing (`resize_images`): uint8 RGB → float32, bilinear resize to S×S with half-pixel
centres and no antialiasing (`tf.image.resize`), aspect ratio not kept, as the evaluation
pipeline (SPEC §5). The exported SavedModel (`daipnet_jax.export`) uses the same function, so
predictions and the SavedModel agree.
"""

from __future__ import annotations

import colorsys
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

if __name__ == "__main__":
    from daipnet_jax import platform

    platform.setup()  # before JAX starts and TensorFlow loads (below)

from daipnet_jax.data.tfds_sources import COCO_NAMES, VOC_NAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class InputError(ValueError):
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


def class_names_for(config: Any) -> list[str]:
    """Names of labels 1..K, in the data package's label order (`data.label_map`): the tfds
    builder's table, or the categories of the folder source's annotation file when it exists
    (read directly: no dataset is generated just for names); else the COCO / VOC lists for
    81 / 21 classes, else `class k`."""
    k = int(config.model.num_classes) - 1
    names: list[str] = []
    d = config.data
    try:
        if d.source == "tfds":
            from daipnet_jax.data import tfds_sources

            names = list(tfds_sources.label_map(d.tfds_name)[1])
        else:
            from daipnet_jax.data import coco_folder

            if d.source == "generated":
                root = d.data_dir or os.path.join(
                    os.path.expanduser("~"), ".cache", "daipnet_jax", "generated"
                )
                candidates = [os.path.join(root, f"instances_{s}.json") for s in ("val", "train")]
            else:
                candidates = [d.get("eval_annotation_file", ""), d.get("annotation_file", "")]
            for ann in candidates:
                if ann and os.path.exists(ann):
                    names = coco_folder.categories(coco_folder.load_json(ann))[1]
                    break
    except Exception:  # names are cosmetic: fall back below
        names = []
    if len(names) == k:
        return names
    if k == 80:
        return list(COCO_NAMES)
    if k == 20:
        return list(VOC_NAMES)
    return [f"class {i}" for i in range(1, k + 1)]


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named in `inputs` (files, or folders scanned for image extensions, sorted)."""
    if not inputs:
        raise InputError("no input images given")
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise InputError(f"folder {s!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"input {s!r} does not exist")
    return out


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]; raises InputError naming the file when it cannot be decoded."""
    try:
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


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
) -> Image.Image:
    """Draws boxes ([N,4] absolute pixel corners) with `name score` tags on a copy of `image`."""
    im = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(im)
    colours = palette(len(class_names))
    h, w = image.shape[:2]
    line = max(2, round(max(h, w) / 250))
    font_size = max(11, round(max(h, w) / 45))
    try:
        font: Any = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    # Lowest score first so the best boxes end up on top.
    for i in np.argsort(scores, kind="stable"):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        lab = int(labels[i])
        col = colours[lab] if 0 < lab < len(colours) else (255, 255, 255)
        draw.rectangle([x0, y0, x1, y1], outline=col, width=line)
        text = f"{class_names[lab - 1] if 0 < lab <= len(class_names) else lab} {scores[i]:.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0
        draw.rectangle([x0, ty, x0 + tw + 4, ty + th + 4], fill=col)
        lum = 0.299 * col[0] + 0.587 * col[1] + 0.114 * col[2]
        draw.text(
            (x0 + 2 - tb[0], ty + 2 - tb[1]),
            text,
            fill=(0, 0, 0) if lum > 140 else (255, 255, 255),
            font=font,
        )
    return im


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
) -> list[dict[str, Any]]:
    """Runs the detector on `paths`, writes PNG + JSON per image to `out_dir`, returns the JSONs.

    `images`: the already decoded images of `paths` (default: read here). Batches are padded
    to `batch_size` so one compiled function serves every batch.
    """
    import jax

    from daipnet_jax.evaluation.loop import make_predict_fn

    if model is None:
        from daipnet_jax import models

        model = models.build(config)
    size = int(config.model.image_size)
    fn = jax.jit(make_predict_fn(config, model))
    names = class_names_for(config)
    os.makedirs(out_dir, exist_ok=True)
    if images is None:
        images = [load_image(p) for p in paths]  # fail early, before any compute
    results = []
    stems: dict[str, int] = {}
    for start in range(0, len(paths), batch_size):
        chunk = images[start : start + batch_size]
        batch = np.zeros((batch_size, size, size, 3), np.float32)
        for j, im in enumerate(chunk):
            batch[j] = np.asarray(resize_images(im, size))[0]
        boxes, scores, classes, valid = jax.device_get(fn(variables, batch))
        for j, im in enumerate(chunk):
            path = paths[start + j]
            h, w = im.shape[:2]
            keep = valid[j] & (scores[j] >= score_threshold)
            nb = np.clip(boxes[j][keep], 0.0, 1.0)
            px = nb * np.array([w, h, w, h], np.float32)
            dets = [
                {
                    "label": int(c),
                    "class_name": names[int(c) - 1],
                    "score": float(s),
                    "bbox": [round(float(v), 2) for v in b],
                    "bbox_normalized": [float(v) for v in n],
                }
                for b, n, s, c in zip(px, nb, scores[j][keep], classes[j][keep], strict=True)
            ]
            stem = path.stem
            if stem in stems:  # two inputs with the same name from different folders
                stems[stem] += 1
                stem = f"{stem}_{stems[path.stem]}"
            else:
                stems[stem] = 0
            draw_detections(im, px, scores[j][keep], classes[j][keep], names).save(
                os.path.join(out_dir, f"{stem}.png")
            )
            record = {"image": str(path), "width": w, "height": h, "detections": dets}
            with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
                json.dump(record, f, indent=1)
            results.append(record)
    return results


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from daipnet_jax.evaluation.loop import restore_variables

    FLAGS = flags.FLAGS
    config = FLAGS.config
    paths = collect_images(argv[1:])
    images = [load_image(p) for p in paths]  # unreadable files fail before any compute
    if not FLAGS.checkpoint:
        raise InputError("--checkpoint is required (a training workdir or a converted checkpoint)")
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
    )
    n = sum(len(r["detections"]) for r in results)
    print(f"{len(results)} images, {n} detections (score >= {FLAGS.score_threshold}) → {FLAGS.out}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (file.py:arg)", lock_config=False)
    flags.DEFINE_string("checkpoint", None, "training workdir or converted checkpoint directory")
    flags.DEFINE_integer("step", None, "checkpoint step (workdir only; default latest)")
    flags.DEFINE_string("out", "predictions", "output folder for PNG + JSON")
    flags.DEFINE_float("score_threshold", 0.3, "draw / write detections scoring at least this")
    flags.DEFINE_integer("batch_size", 0, "images per forward pass (0: train.eval_batch_size)")
    flags.mark_flags_as_required(["config"])


def run(argv: Sequence[str] | None = None) -> None:
    from absl import app

    from daipnet_jax.evaluation.loop import CheckpointError

    _define_flags()

    def _main(args: Sequence[str]) -> None:
        try:
            main(args)
        except (InputError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    run()
