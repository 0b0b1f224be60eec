"""The registry of data sources: `config.data.source` is resolved here, once.

A source answers, for a config: its label table, the size of a split, the evaluation ground
truth (COCO-format dict), this process's shard of a split as tf.data record dicts (`path` or
`encoded` image, `boxes` [N, 4] normalised corners, `labels` [N] 1..K, `crowd` [N],
`image_id`) and, for folders, the build-time `DataStats`.

- `generated`: the built-in dataset, a COCO-format folder written on first use into
  `data.data_dir`;
- `coco_folder`: `data.annotation_file` / `data.image_dir` (train) and the `eval_` pair;
- `tfds`: `data.tfds_name` (`coco/2017`, `voc/2007+voc/2012`, ...).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import tensorflow as tf

from daipnet_jax.config import ConfigError
from daipnet_jax.data import coco_folder, tfds_sources


@functools.lru_cache(maxsize=16)
def _load_folder(
    annotation_file: str, image_dir: str, category_ids: tuple[int, ...], validate: bool
) -> coco_folder.FolderRecords:
    return coco_folder.load_folder(
        annotation_file, image_dir, category_ids=list(category_ids), validate=validate
    )


def file_categories(annotation_file: str) -> tuple[list[int], list[str]]:
    """`coco_folder.categories` of an annotation file, parsed once per version of the file
    (path, size, modification time): the label table is asked for many times while a run
    starts, and a COCO-size instances file takes seconds to parse."""
    st = os.stat(annotation_file)
    ids, names = _file_categories(annotation_file, st.st_size, st.st_mtime_ns)
    return list(ids), list(names)


@functools.lru_cache(maxsize=16)
def _file_categories(
    annotation_file: str, size: int, mtime_ns: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    ids, names = coco_folder.categories(coco_folder.load_json(annotation_file))
    return tuple(ids), tuple(names)


def _folder_dataset(rec: coco_folder.FolderRecords) -> tf.data.Dataset:
    lengths = rec.counts.astype(np.int64)
    return tf.data.Dataset.from_tensor_slices(
        dict(
            path=tf.constant(rec.paths.astype(str), tf.string),
            boxes=tf.RaggedTensor.from_row_lengths(rec.boxes, lengths),
            labels=tf.RaggedTensor.from_row_lengths(rec.labels, lengths),
            crowd=tf.RaggedTensor.from_row_lengths(rec.crowd, lengths),
            image_id=rec.image_ids,
        )
    )


def _folder_lookup(rec: coco_folder.FolderRecords):
    """`record(r)` for a scalar int64 index r into the shard: the folder's arrays held as
    in-memory tensors, so any record is reached without reading the ones before it."""
    splits = np.concatenate([[0], np.cumsum(rec.counts)]).astype(np.int64)
    t = dict(
        path=tf.constant(rec.paths.astype(str), tf.string),
        splits=tf.constant(splits),
        boxes=tf.constant(rec.boxes.reshape(-1, 4), tf.float32),
        labels=tf.constant(rec.labels, tf.int32),
        crowd=tf.constant(rec.crowd, tf.bool),
        image_id=tf.constant(rec.image_ids, tf.int64),
    )

    def record(r: tf.Tensor) -> dict[str, tf.Tensor]:
        a, b = t["splits"][r], t["splits"][r + 1]
        return dict(
            path=t["path"][r],
            boxes=t["boxes"][a:b],
            labels=t["labels"][a:b],
            crowd=t["crowd"][a:b],
            image_id=t["image_id"][r],
        )

    return record


class CocoFolderSource:
    """A COCO-format folder: instances JSON + image directory per split."""

    def files(self, config: Any, split: str) -> tuple[str, str]:
        """(annotation JSON, image dir) of split 'train' | 'eval'."""
        if split == "train":
            return config.data.annotation_file, config.data.image_dir
        return config.data.eval_annotation_file, config.data.eval_image_dir

    def label_map(self, config: Any) -> tuple[list[int], list[str]]:
        ann, _ = self.files(config, "train")
        if not ann:
            ann, _ = self.files(config, "eval")
        return file_categories(ann)

    def folder_records(self, config: Any, split: str) -> coco_folder.FolderRecords:
        """Validated records of a split (cached per file)."""
        ann, img_dir = self.files(config, split)
        if not ann:
            raise ValueError(
                f"config.data: no annotation file for the {split} split of {config.data.source}"
            )
        ids, _ = self.label_map(config)
        validate = bool(config.data.get("validate_files", True))
        rec = _load_folder(ann, img_dir, tuple(ids), validate)
        limit = int(config.data.get("eval_max_images", 0))
        if split != "train" and 0 < limit < len(rec.paths):
            rec = rec.head(limit)
        return rec

    def num_examples(self, config: Any, split: str) -> int:
        return len(self.folder_records(config, split).paths)

    def ground_truth(self, config: Any) -> dict[str, Any]:
        ann, _ = self.files(config, "eval")
        return coco_folder.ground_truth(ann, self.folder_records(config, "eval"))

    def records(
        self, config: Any, split: str, process_index: int, process_count: int, shuffle_seed: Any
    ) -> tuple[tf.data.Dataset, int | None]:
        rec = self.folder_records(config, split).shard(process_index, process_count)
        return _folder_dataset(rec), len(rec.paths)

    def lookup(
        self, config: Any, split: str, process_index: int, process_count: int
    ) -> tuple[Any, int]:
        """(record(r) for an int64 index r, shard size): random access into this process's
        shard (the O(1) resume of the training stream)."""
        rec = self.folder_records(config, split).shard(process_index, process_count)
        return _folder_lookup(rec), len(rec.paths)

    def build_stats(self, config: Any, split: str) -> coco_folder.DataStats | None:
        return self.folder_records(config, split).stats


class GeneratedSource(CocoFolderSource):
    """The generated dataset: a COCO-format folder written with the `data.generated_*` keys."""

    def files(self, config: Any, split: str) -> tuple[str, str]:
        d = self.directory(config)
        name = "train" if split == "train" else "val"
        return os.path.join(d, f"instances_{name}.json"), os.path.join(d, "images", name)

    @staticmethod
    def _wanted(config: Any) -> tuple[str, dict[str, Any]]:
        d = config.data.data_dir or os.path.join(
            os.path.expanduser("~"), ".cache", "daipnet_jax", "generated"
        )
        return d, dict(
            num_train=config.data.generated_num_train,
            num_val=config.data.generated_num_val,
            num_classes=config.data.generated_num_classes,
            image_size=config.data.generated_image_size,
            seed=config.data.get("generated_seed", 0),
        )

    @classmethod
    def written(cls, config: Any) -> bool:
        """Whether the folder holds a generated dataset (any parameters)."""
        return os.path.exists(os.path.join(cls._wanted(config)[0], "meta.json"))

    @classmethod
    def warn_if_different(cls, config: Any) -> None:
        """Log (once per call; `validate_inputs` calls it once per run) when the existing
        folder was written with other `data.generated_*` values than the config's."""
        d, wanted = cls._wanted(config)
        meta = os.path.join(d, "meta.json")
        if os.path.exists(meta):
            written = coco_folder.load_json(meta)
            if any(written.get(k) != v for k, v in wanted.items()):
                logging.warning(
                    "generated dataset %s was written with %s; config asks %s (used as it is)",
                    d,
                    written,
                    wanted,
                )

    @classmethod
    def directory(cls, config: Any) -> str:
        """The folder, written if missing. An existing folder (e.g. written by the CLI with
        another seed) is used as it is, never overwritten (`warn_if_different`)."""
        d, wanted = cls._wanted(config)
        if os.path.exists(os.path.join(d, "meta.json")):
            return d
        if os.path.lexists(d) and (not os.path.isdir(d) or os.listdir(d)):
            raise ConfigError(
                "data.data_dir",
                f"{d} holds other files and no generated dataset (meta.json); not writing the "
                "generated dataset into it (give a new or empty folder)",
            )
        # imported here: `python -m daipnet_jax.data.generated` must not find itself imported
        from daipnet_jax.data import generated

        generated.write_dataset(d, **wanted)
        return d


class TfdsSource:
    """A tfds builder (or `+`-joined builders) named by `data.tfds_name`."""

    @staticmethod
    def _split(config: Any, split: str) -> str:
        if split == "train":
            return config.data.train_split
        limit = int(config.data.get("eval_max_images", 0))
        return f"{config.data.eval_split}[:{limit}]" if limit > 0 else config.data.eval_split

    def label_map(self, config: Any) -> tuple[list[int], list[str]]:
        return tfds_sources.label_map(config.data.tfds_name)

    def num_examples(self, config: Any, split: str) -> int:
        return tfds_sources.num_examples(
            config.data.tfds_name,
            self._split(config, split),
            config.data.data_dir,
            first_only=split != "train",
        )

    def ground_truth(self, config: Any) -> dict[str, Any]:
        return tfds_sources.ground_truth(
            config.data.tfds_name, self._split(config, "eval"), config.data.data_dir
        )

    def records(
        self, config: Any, split: str, process_index: int, process_count: int, shuffle_seed: Any
    ) -> tuple[tf.data.Dataset, int | None]:
        ds = tfds_sources.records(
            config.data.tfds_name,
            self._split(config, split),
            config.data.data_dir,
            process_index=process_index,
            process_count=process_count,
            shuffle_seed=shuffle_seed,
            first_only=split != "train",
        )
        return ds.map(lambda r: {k: v for k, v in r.items() if k != "area"}), None

    def build_stats(self, config: Any, split: str) -> None:
        return None


SOURCES: dict[str, Any] = {
    "generated": GeneratedSource(),
    "coco_folder": CocoFolderSource(),
    "tfds": TfdsSource(),
}


def get(config: Any) -> Any:
    """The source named by `config.data.source`."""
    name = config.data.source
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is not one of {', '.join(SOURCES)}")
    return SOURCES[name]
