"""Shared test set-up: JAX compilation cache, float32 precision, tiny configs.

Sections below are owned by different parts of the code base; add fixtures by appending a
labelled section, never by re-making one in a test file.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"),
)

from daipnet_jax import platform

# Before the JAX backend starts, as every entry point: XLA:CPU flag, quiet logs, compile cache.
platform.setup(compilation_cache=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- configs
@pytest.fixture
def tiny_config():
    """Factory: a width-reduced config for `variant` (e.g. `daipnet300`) on `dataset`."""
    from daipnet_jax.config import base_config

    def make(variant: str = "daipnet300", dataset: str = "coco", width: float = 0.125):
        return base_config(variant, dataset, width=width)

    return make


# ---------------------------------------------------------------- data (owner: input pipelines)
# `generated_data`: a small generated dataset (COCO-format folder) shared by the session;
# `generated_config(**overrides)`: configs/generated.py pointed at it (use this, not a new folder,
# so nothing is regenerated); `coco_folder_data`: a tiny hand-made COCO-format folder with
# non-contiguous category ids, non-square images and one crowd box.
GENERATED_PARAMS = dict(num_train=48, num_val=10, num_classes=3, image_size=300, seed=0)


@pytest.fixture(scope="session")
def generated_data(tmp_path_factory):
    from daipnet_jax.data.generated import write_dataset

    out = str(tmp_path_factory.mktemp("generated") / "data")
    write_dataset(out, **GENERATED_PARAMS)
    return dict(dir=out, **GENERATED_PARAMS)


@pytest.fixture
def generated_config(generated_data):
    """Factory: `configs/generated.py:<arg>` using the session's generated folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "configs_generated", REPO / "configs" / "generated.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make(arg: str | None = None, **data_overrides):
        c = module.get_config(arg)
        c.data.data_dir = generated_data["dir"]
        c.data.generated_num_train = generated_data["num_train"]
        c.data.generated_num_val = generated_data["num_val"]
        c.data.generated_num_classes = generated_data["num_classes"]
        c.data.generated_image_size = generated_data["image_size"]
        c.data.generated_seed = generated_data["seed"]
        for k, v in data_overrides.items():
            c.data[k] = v
        return c

    return make


COCO_FOLDER_CATEGORIES = [(3, "car"), (7, "train"), (18, "dog")]


def write_coco_folder(root, split: str, sizes, seed: int = 0, crowd_on: int | None = None):
    """A COCO-format split under `root`: `images/<split>/NNN.jpg` + `instances_<split>.json`.

    Image i is sizes[i] = (h, w), with i % 3 + 1 solid rectangles; category ids cycle through
    COCO_FOLDER_CATEGORIES; image `crowd_on` gets an extra iscrowd=1 box. Returns the JSON path.
    """
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = pathlib.Path(root) / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        pixels = np.full((h, w, 3), rng.integers(0, 80, 3), np.uint8)
        boxes = []
        for j in range(i % 3 + 1):
            bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = rng.integers(150, 255, 3)
            boxes.append(([x, y, bw, bh], COCO_FOLDER_CATEGORIES[(i + j) % 3][0], 0))
        if crowd_on == i:
            boxes.append(([0, 0, w // 2, h // 2], COCO_FOLDER_CATEGORIES[0][0], 1))
        name = f"{i:03d}.jpg"
        Image.fromarray(pixels).save(img_dir / name, quality=95)
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        for bbox, cat, crowd in boxes:
            anns.append(
                {"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat, "bbox": bbox,
                 "area": bbox[2] * bbox[3], "iscrowd": crowd}
            )  # fmt: skip
    cats = [{"id": c, "name": n, "supercategory": "x"} for c, n in COCO_FOLDER_CATEGORIES]
    path = pathlib.Path(root) / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


@pytest.fixture(scope="session")
def coco_folder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_folder")
    train_sizes = [(120, 160), (200, 150), (90, 90), (160, 240), (100, 130), (140, 110), (130, 170)]
    val_sizes = [(110, 150), (150, 100), (120, 120), (90, 140), (100, 100)]
    return dict(
        root=str(root),
        annotation_file=write_coco_folder(root, "train", train_sizes, seed=1, crowd_on=2),
        image_dir=str(root / "images" / "train"),
        eval_annotation_file=write_coco_folder(root, "val", val_sizes, seed=2, crowd_on=0),
        eval_image_dir=str(root / "images" / "val"),
    )


@pytest.fixture
def coco_folder_config(coco_folder_data):
    """Factory: a `coco_folder` config (3 classes) reading `coco_folder_data`."""
    from daipnet_jax.config import base_config

    def make(variant: str = "daipnet300", width: float = 0.125, **data_overrides):
        c = base_config(variant, "coco_folder", width=width)
        c.data.source = "coco_folder"
        c.model.num_classes = len(COCO_FOLDER_CATEGORIES) + 1
        c.data.max_boxes = 8
        for k in ("annotation_file", "image_dir", "eval_annotation_file", "eval_image_dir"):
            c.data[k] = coco_folder_data[k]
        for k, v in data_overrides.items():
            c.data[k] = v
        return c

    return make
