"""tf.data input pipelines: source records → repair → augment → pad → batch, per process.

Batch contract (CONTRIBUTING.md; `b` = this process's part of the global batch, `G` =
`config.data.max_boxes`, `S` = `config.model.image_size`):

- train: `image [b,S,S,3] f32 RGB 0..255`, `boxes [b,G,4] f32` normalised corners,
  `labels [b,G] int32 1..K`, `mask [b,G] bool`;
- eval: `image`, `image_id [b] int64`, `orig_size [b,2] int32 (h, w)`, `valid [b] bool`.

Bad input is repaired or skipped and counted, never fatal: unreadable folder files are dropped
at build time (`DataStats`), boxes are repaired by `sanitize`, crowd boxes and examples left
without boxes are skipped, undecodable images are dropped by `ignore_errors`; the counts are
`TrainIterator.stats`. Per-example seeds `[seed, i · process_count + process_index]` make the
batches independent of the parallelism.

The training stream is addressed by record index i (docs/design.md, resume by record index):
folder sources gather record `perm_e[i mod n]` of the shard, a stateless permutation per epoch
e = i div n, so `make_train_iterator(..., start_index=i0)` starts at i0 producing nothing before
it; `TrainIterator.next_index(k)` is the index that follows k batches (what a checkpoint keeps).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from daipnet_jax import config as config_lib
from daipnet_jax.data import augment as aug
from daipnet_jax.data import sources

# Cumulative per-example counters carried by the `_cum` field (see `sanitize`).
COUNTERS = ("examples", "skipped_no_boxes", "crowd_boxes", "clipped_boxes", "invalid_boxes")


# ------------------------------------------------------------------------------ sources
def label_map(config) -> tuple[list[int], list[str]]:
    """(category_ids, names): label k ∈ 1..K is category `category_ids[k-1]`, named `names[k-1]`."""
    return sources.get(config).label_map(config)


def num_examples(config, split: str = "train") -> int:
    """Examples in the whole split (all processes; folder files that failed validation excluded)."""
    return sources.get(config).num_examples(config, split)


def num_train_examples(config) -> int:
    """The epoch size for epoch-based schedules (`config.train.train_examples` when > 0)."""
    return config_lib.epoch_size(config, lambda: num_examples(config, "train"))


def eval_ground_truth(config) -> dict[str, Any]:
    """The evaluation split's ground truth as a COCO-format dict (crowd boxes kept)."""
    return sources.get(config).ground_truth(config)


def records(config, split: str, process_index: int, process_count: int, shuffle_seed: int | None):
    """This process's shard of `split` as record dicts and the shard's size (None if unknown)."""
    return sources.get(config).records(config, split, process_index, process_count, shuffle_seed)


# ------------------------------------------------------------------------------ per example
def decode(record: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """Image [H, W, 3] uint8 RGB: greyscale, alpha, CMYK and palette images are converted."""
    data = tf.io.read_file(record["path"]) if "path" in record else record["encoded"]
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def sanitize(
    boxes: tf.Tensor, labels: tf.Tensor, crowd: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """Training targets from raw boxes [N, 4] (normalised corners), labels [N], crowd [N].

    Non-finite boxes are dropped; the others are clipped to [0, 1]; boxes with zero or negative
    width or height after clipping (zero-area, inverted, fully outside) are dropped; crowd boxes
    are dropped. Returns (boxes [M, 4], labels [M], counts) with counts of `crowd_boxes`,
    `clipped_boxes` (valid boxes that needed clipping) and `invalid_boxes` (dropped).
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    finite = tf.reduce_all(tf.math.is_finite(boxes), axis=1)
    safe = tf.where(finite[:, None], boxes, 0.0)
    clipped = tf.clip_by_value(safe, 0.0, 1.0)
    valid = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    changed = tf.reduce_any(tf.not_equal(clipped, safe), axis=1) & valid
    crowd = tf.cast(crowd, tf.bool)
    keep = valid & ~crowd
    counts = dict(
        crowd_boxes=tf.reduce_sum(tf.cast(crowd, tf.int64)),
        clipped_boxes=tf.reduce_sum(tf.cast(changed & ~crowd, tf.int64)),
        invalid_boxes=tf.reduce_sum(tf.cast(~valid & ~crowd, tf.int64)),
    )
    return tf.boolean_mask(clipped, keep), tf.boolean_mask(tf.cast(labels, tf.int32), keep), counts


def pad_targets(boxes: tf.Tensor, labels: tf.Tensor, max_boxes: int):
    """Pad / truncate boxes [M, 4], labels [M] to [G, 4], [G] with mask [G]; also the number
    of boxes truncated (choice: the first G boxes are kept)."""
    n = tf.shape(labels)[0]
    k = tf.minimum(n, max_boxes)
    pad = max_boxes - k
    b = tf.pad(boxes[:k], [[0, pad], [0, 0]])
    lab = tf.pad(labels[:k], [[0, pad]])
    mask = tf.range(max_boxes) < k
    b = tf.ensure_shape(b, [max_boxes, 4])
    lab = tf.ensure_shape(lab, [max_boxes])
    return b, lab, mask, tf.cast(n - k, tf.int32)


def example_seed(seed: int, index: tf.Tensor, process_index: int, process_count: int) -> tf.Tensor:
    """Per-example stateless seed [2] int64."""
    return tf.stack([tf.constant(seed, tf.int64), index * process_count + process_index])


# ------------------------------------------------------------------------------ datasets
def _options() -> tf.data.Options:
    o = tf.data.Options()
    o.deterministic = True
    o.experimental_optimization.map_parallelization = True
    o.experimental_optimization.inject_prefetch = False
    return o


def _parallel(config) -> int:
    n = int(config.data.num_parallel_calls)
    return tf.data.AUTOTUNE if n <= 0 else n


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by {process_count} processes")
    return global_batch // process_count


def _index_stream(n: int, seed: int, start: int) -> tf.data.Dataset:
    """(i, record) for i = start, start + 1, …: record `perm_e[i mod n]` of the shard, where
    `perm_e` is a stateless permutation of epoch e = i // n seeded by (seed, e). Starting at any
    i costs O(1): nothing before `start` is produced."""
    e0, off = divmod(int(start), n)
    seed_t = tf.constant(int(seed), tf.int64)

    def epoch(e):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([seed_t, e])
        )
        first = tf.where(tf.equal(e, e0), tf.constant(off, tf.int64), tf.constant(0, tf.int64))
        return tf.data.Dataset.from_tensor_slices((e * n + tf.range(first, n), perm[first:]))

    return tf.data.Dataset.range(e0, 2**62).flat_map(epoch)


def _record_stream(config, process_index: int, process_count: int, start: int) -> tf.data.Dataset:
    """(i, record) of this process's endless training stream from record index `start`.

    Random-access sources (folders) gather record `perm(i // n)[i % n]` from in-memory tensors
    (`sources.*.lookup`); others (tfds) shuffle with a seeded buffer and skip `start` raw
    records before anything is decoded (reading them costs I/O, decoding nothing)."""
    src = sources.get(config)
    lookup = getattr(src, "lookup", None)
    if lookup is not None:
        fn, n = lookup(config, "train", process_index, process_count)
        if n == 0:
            raise ValueError(f"process {process_index} has no training image in its shard")
        return _index_stream(n, int(config.seed), start).map(lambda i, r: (i, fn(r)))
    ds, n = records(config, "train", process_index, process_count, shuffle_seed=config.seed)
    if config.data.cache:
        ds = ds.cache()
    buf = n if n is not None else int(config.data.shuffle_buffer)
    ds = ds.shuffle(max(buf, 1), seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()
    if start:
        logging.warning(
            "resuming a %s stream at record %d: the skipped records are read (not decoded); "
            "random-access sources (folders) skip for free",
            config.data.source,
            start,
        )
        ds = ds.skip(int(start))
    return ds


def train_dataset(
    config,
    process_index: int = 0,
    process_count: int = 1,
    *,
    batch: bool = True,
    start_index: int = 0,
) -> tf.data.Dataset:
    """This process's endless training stream (batched to its part of the global batch, with the
    private `_cum`, `_truncated`, `_fallback` counter fields and `_index`, each example's record
    index in the stream), starting at record index `start_index` of the stream."""
    ds = _record_stream(config, process_index, process_count, int(start_index))

    def repair(i, r):
        boxes, labels, c = sanitize(r["boxes"], r["labels"], r["crowd"])
        out = {k: v for k, v in r.items() if k not in ("boxes", "labels", "crowd")}
        out.update(
            boxes=boxes,
            labels=labels,
            seed=example_seed(config.seed, i, process_index, process_count),
            _index=i,
        )
        empty = tf.cast(tf.equal(tf.shape(labels)[0], 0), tf.int64)
        inc = tf.stack(
            [
                tf.constant(1, tf.int64),
                empty,
                c["crowd_boxes"],
                c["clipped_boxes"],
                c["invalid_boxes"],
            ]
        )
        return out, inc

    def count(state, elem):
        r, inc = elem
        state = state + inc
        return state, dict(r, _cum=state, _empty=inc[1] > 0)

    ds = ds.map(repair).scan(tf.zeros([len(COUNTERS)], tf.int64), count)
    ds = ds.filter(lambda r: ~r["_empty"])
    size = int(config.model.image_size)
    mean = tuple(float(v) for v in config.model.pixel_mean)

    def prepare(r):
        image = tf.cast(decode(r), tf.float32)
        if config.data.augment:
            image, boxes, labels, fell_back = aug.augment(
                image,
                r["boxes"],
                r["labels"],
                r["seed"],
                size=size,
                pixel_mean=mean,
                expand_prob=float(config.data.expand_prob),
                max_expand_ratio=float(config.data.max_expand_ratio),
            )
        else:
            image, boxes, labels = aug.resize_plain(image, size), r["boxes"], r["labels"]
            fell_back = tf.constant(False)
        boxes, labels, mask, truncated = pad_targets(boxes, labels, int(config.data.max_boxes))
        return dict(
            image=image,
            boxes=boxes,
            labels=labels,
            mask=mask,
            _cum=r["_cum"],
            _index=r["_index"],
            _truncated=truncated,
            _fallback=fell_back,
        )

    ds = ds.map(prepare, num_parallel_calls=_parallel(config))
    ds = ds.ignore_errors(log_warning=True)
    if batch:
        b = local_batch_size(int(config.train.batch_size), process_count)
        ds = ds.batch(b, drop_remainder=True)
    ds = ds.prefetch(int(config.data.prefetch) if config.data.prefetch > 0 else tf.data.AUTOTUNE)
    return ds.with_options(_options())


def eval_num_batches(num: int, batch: int, process_count: int) -> int:
    """Batches per process: the same on every process (largest shard, rounded up)."""
    per_process = -(-num // process_count)
    return max(1, -(-per_process // batch))


def eval_dataset(
    config, process_index: int = 0, process_count: int = 1
) -> tuple[tf.data.Dataset, int]:
    """This process's evaluation batches (finite) and their number."""
    size = int(config.model.image_size)
    b = local_batch_size(int(config.train.eval_batch_size), process_count)
    nb = eval_num_batches(num_examples(config, "eval"), b, process_count)
    ds, _ = records(config, "eval", process_index, process_count, shuffle_seed=None)

    def prepare(r):
        img = decode(r)
        return dict(
            image=aug.resize_plain(tf.cast(img, tf.float32), size),
            image_id=tf.cast(r["image_id"], tf.int64),
            orig_size=tf.shape(img)[:2],
            valid=tf.constant(True),
        )

    ds = ds.map(prepare, num_parallel_calls=_parallel(config)).ignore_errors(log_warning=True)
    dummy = dict(
        image=tf.zeros([size, size, 3], tf.float32),
        image_id=tf.constant(-1, tf.int64),
        orig_size=tf.constant([1, 1], tf.int32),
        valid=tf.constant(False),
    )
    # Padding examples fill the last batch and any shard shorter than the longest: every
    # process yields exactly `nb` batches of static shape.
    ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy).repeat()).take(nb * b)
    ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options()), nb


# ------------------------------------------------------------------------------ iterators
def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class _Reader(threading.Thread):
    """Pulls numpy batches from a tf.data iterator into a small queue on a daemon thread, so
    the consumer waits in Python (where signals are handled) rather than inside tf.data."""

    _END = object()

    def __init__(self, dataset: tf.data.Dataset, size: int = 2):
        super().__init__(daemon=True, name="train-data")
        self._dataset = dataset
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(size, 1))
        self.stopped = threading.Event()

    def _put(self, item: Any) -> bool:
        """Queue `item`, waiting for room until stopped; False once stopped."""
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            for item in self._dataset.as_numpy_iterator():
                if not self._put(item):
                    return
            last = self._END
        except Exception as e:  # re-raised in the consumer
            last = e
        self._put(last)

    def next(self) -> Any:
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is self._END:
                raise StopIteration
            if isinstance(item, Exception):
                raise item
            return item


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless iterator of this process's training batches (numpy dicts of the contract).

    `stats` holds running counts since the iterator started: `examples` read,
    `skipped_no_boxes`, `crowd_boxes`, `clipped_boxes`, `invalid_boxes`, `truncated_boxes`,
    `fallback_unaugmented`, plus the build-time `DataStats` of folder sources (`build`).
    `next_index(k)`: the record index of the stream that follows the first k batches this
    iterator produced (what a checkpoint stores to resume there; filtered examples make it
    differ from k · batch).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        num_examples: int,
        build_stats: Any = None,
        start_index: int = 0,
    ):
        self.dataset = dataset
        self.num_examples = num_examples
        self.build_stats = build_stats
        self.start_index = int(start_index)
        self._reader = _Reader(dataset)
        self._reader.start()
        self._cum = np.zeros([len(COUNTERS)], np.int64)
        self._truncated = 0
        self._fallback = 0
        self._produced = 0
        self._next: dict[int, int] = {0: self.start_index}

    def __next__(self) -> dict[str, np.ndarray]:
        b = self._reader.next()
        self._cum = np.maximum(self._cum, b.pop("_cum").max(axis=0))
        self._truncated += int(b.pop("_truncated").sum())
        self._fallback += int(b.pop("_fallback").sum())
        self._produced += 1
        self._next[self._produced] = int(b.pop("_index")[-1]) + 1
        return b

    def next_index(self, batches: int) -> int:
        """Record index after the first `batches` batches (older entries are forgotten)."""
        out = self._next[int(batches)]
        for k in [k for k in self._next if k < batches]:
            del self._next[k]
        return out

    def close(self) -> None:
        """Stops the reader thread (it ends after the batch it is reading)."""
        self._reader.stopped.set()

    @property
    def stats(self) -> dict[str, int]:
        out = {k: int(v) for k, v in zip(COUNTERS, self._cum, strict=True)}
        out.update(truncated_boxes=self._truncated, fallback_unaugmented=self._fallback)
        return out


class EvalIterator:
    """Re-iterable: each `iter()` is one full pass over this process's evaluation shard."""

    def __init__(self, dataset: tf.data.Dataset, num_batches: int):
        self.dataset = dataset
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset.as_numpy_iterator())


def make_train_iterator(
    config,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    start_index: int = 0,
) -> TrainIterator:
    """This process's endless, shuffled, augmented training batches of
    `config.train.batch_size // process_count` examples (see the module docstring), from record
    index `start_index` of its stream (a checkpoint's `TrainIterator.next_index`)."""
    pi, pc = _process(process_index, process_count)
    build = sources.get(config).build_stats(config, "train")
    if build is not None:
        logging.info(build.report("train"))
    ds = train_dataset(config, pi, pc, start_index=start_index)
    return TrainIterator(ds, num_train_examples(config), build, start_index)


def make_eval_iterator(
    config, process_index: int | None = None, process_count: int | None = None
) -> EvalIterator:
    """This process's evaluation batches of `config.train.eval_batch_size // process_count`,
    the last ones padded with `valid=False` examples."""
    pi, pc = _process(process_index, process_count)
    build = sources.get(config).build_stats(config, "eval")
    if build is not None:
        logging.info(build.report("eval"))
    ds, nb = eval_dataset(config, pi, pc)
    return EvalIterator(ds, nb)
