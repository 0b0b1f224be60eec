"""The batched evaluation loop of `evaluate.py` and of the `eval_fn` `train.py` passes to
training (`training_eval_fn`).

One jitted forward + `postprocess.detect` (static shapes), data parallel over the mesh when the
batch divides the devices; the host accumulates batch n while batch n+1 runs. Metrics go to
`WORKDIR/eval/metrics.json`, `metrics_<step>.json` and TensorBoard under `eval/`; a partial
evaluation (`data.eval_max_images`) only to `eval/metrics_partial.json`. Zero images evaluated
is an error (`ConfigError`) and writes nothing.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from daipnet_jax import boxes as boxes_lib
from daipnet_jax import checkpoints, postprocess, sharding
from daipnet_jax.config import ConfigError
from daipnet_jax.evaluation.coco import CocoEvaluator
from daipnet_jax.evaluation.voc import VocEvaluator

Detections = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


Evaluator = CocoEvaluator | VocEvaluator  # `add_batch(...)`, then `evaluate()`


def detect_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`postprocess.detect` keyword arguments from `config.postprocess` and `config.priors`."""
    p = config.postprocess
    return dict(
        variances=tuple(config.priors.variances),
        score_threshold=float(p.score_threshold),
        nms_iou=float(p.nms_iou),
        per_class_max=int(p.per_class_max),
        max_detections=int(p.max_detections),
        pre_nms_top_k=int(p.pre_nms_top_k),
    )


def make_predict_fn(
    config: ml_collections.ConfigDict, model: Any
) -> Callable[[Any, jax.Array], Detections]:
    """Pure (un-jitted) `(variables, images [B,S,S,3] f32 0..255) → detect(...)` outputs.

    Returns (boxes [B,D,4] normalised corners, scores [B,D], classes [B,D] int32 1..K,
    valid [B,D] bool), D = `postprocess.max_detections`.
    """
    priors = jnp.asarray(boxes_lib.prior_boxes(config))
    kwargs = detect_kwargs(config)

    def predict(variables: Any, images: jax.Array) -> Detections:
        loc, logits = model.apply(variables, images, train=False)
        return postprocess.detect(loc, logits, priors, **kwargs)

    return predict


def make_eval_step(
    config: ml_collections.ConfigDict,
    model: Any,
    batch_size: int,
    mesh: Mesh | None = None,
) -> Callable[[Any, Any], Detections]:
    """Jitted predict function; batch axis sharded over `mesh` when `batch_size` divides it.

    choice: when the batch does not divide the device count the computation is replicated
    (correct, just not parallel) rather than padded: eval batches are fixed-size, so this is a
    configuration matter, logged once.
    """
    predict = make_predict_fn(config, model)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    n = mesh.devices.size
    replicated = sharding.replicated(mesh)
    if batch_size % n == 0:
        data = sharding.batch_sharding(mesh)
    else:
        logging.warning(
            "eval batch %d does not divide %d devices: running replicated", batch_size, n
        )
        data = replicated
    return jax.jit(predict, in_shardings=(replicated, data), out_shardings=data)


def _progress(message: str) -> None:
    """Progress lines on the first process (stdout, flushed: visible under any launcher)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def evaluate(
    config: ml_collections.ConfigDict,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    evaluator: Evaluator,
    *,
    model: Any = None,
    workdir: str | None = None,
    step: int | None = None,
    num_batches: int | None = None,
    writer: Any = None,
    eval_step: Callable[[Any, Any], Detections] | None = None,
    log_every_seconds: float = 30.0,
) -> dict[str, Any]:
    """Run the model over `batches`, accumulate detections in `evaluator`, return its metrics
    plus `num_images`, `seconds` and `images_per_s`.

    batches: eval batches (`image [b,S,S,3] f32`, `image_id [b]`, `orig_size [b,2]`,
    `valid [b]`), this process's slice; `workdir`: where to write the metrics (None: nowhere);
    `eval_step`: a prepared `make_eval_step(...)` (reused across evaluations in training).
    """
    if model is None:
        from daipnet_jax import models

        model = models.build(config)
    if num_batches is None and hasattr(batches, "__len__"):
        num_batches = len(batches)  # type: ignore[arg-type]
    mesh = sharding.make_mesh()
    variables = jax.device_put(variables, sharding.replicated(mesh))
    start = time.perf_counter()
    last_log = start
    pending: tuple[Detections, Mapping[str, Any]] | None = None
    done = 0
    images = 0

    def consume(out: Detections, batch: Mapping[str, Any]) -> int:
        boxes, scores, classes, valid = (_to_host(x) for x in out)
        ex_valid = np.asarray(batch.get("valid", np.ones(boxes.shape[0], bool)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            meta = multihost_utils.process_allgather(
                {
                    "image_id": np.asarray(batch["image_id"]),
                    "orig_size": np.asarray(batch["orig_size"]),
                    "valid": ex_valid,
                },
                tiled=True,
            )
            ids, sizes, ex_valid = meta["image_id"], meta["orig_size"], meta["valid"]
        else:
            ids, sizes = np.asarray(batch["image_id"]), np.asarray(batch["orig_size"])
        evaluator.add_batch(boxes, scores, classes, valid, ids, sizes, ex_valid)
        return int(np.sum(ex_valid))

    for batch in batches:
        local = np.asarray(batch["image"], np.float32)
        if eval_step is None:
            global_b = local.shape[0] * jax.process_count()
            eval_step = make_eval_step(config, model, global_b, mesh)
        if jax.process_count() > 1:
            images_in: Any = sharding.global_batch({"image": local}, mesh)["image"]
        else:
            images_in = local
        out = eval_step(variables, images_in)  # async: runs while the host consumes `pending`
        if pending is not None:
            images += consume(*pending)
            done += 1
        pending = (out, batch)
        now = time.perf_counter()
        if now - last_log >= log_every_seconds and done:
            rate = images / (now - start)
            eta = ""
            if num_batches:
                left = (num_batches - done) * (now - start) / done
                eta = f", ETA {left / 60:.1f} min"
            _progress(f"eval: {done}/{num_batches or '?'} batches, {rate:.1f} images/s{eta}")
            last_log = now
    if pending is not None:
        images += consume(*pending)
        done += 1
    seconds = time.perf_counter() - start
    if images == 0:
        raise ConfigError(
            "data.eval_split" if config.data.source == "tfds" else "data.eval_image_dir",
            "the evaluation data yielded no image; no metrics were written",
        )
    lost = evaluator.leave_out_unevaluated() if hasattr(evaluator, "leave_out_unevaluated") else []
    if lost:
        logging.warning(
            "evaluation: %d images could not be decoded and are left out of the metrics (ids %s%s)",
            len(lost),
            lost[:10],
            " ..." if len(lost) > 10 else "",
        )
    metrics = dict(evaluator.evaluate())
    metrics["num_images"] = images
    if lost:
        metrics["images_not_decoded"] = len(lost)
    metrics["seconds"] = seconds
    metrics["images_per_s"] = images / seconds if seconds > 0 else 0.0
    noun = "image" if images == 1 else "images"
    _progress(f"eval: {images} {noun} in {seconds:.1f} s ({metrics['images_per_s']:.1f} images/s)")
    partial = int(config.data.get("eval_max_images", 0)) > 0
    if partial:
        metrics["partial"] = True
    if workdir is not None and jax.process_index() == 0:
        write_metrics(metrics, workdir, step, evaluator=evaluator, writer=writer, partial=partial)
    return metrics


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite scalar numbers of `metrics` (per-class tables and undefined -1 excluded)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)):
            if float(v) == -1.0:  # pycocotools' "undefined" (e.g. no small objects)
                continue
            out[k] = float(v)
    return out


def write_metrics(
    metrics: Mapping[str, Any],
    workdir: str,
    step: int | None,
    *,
    evaluator: Any = None,
    writer: Any = None,
    partial: bool = False,
) -> str:
    """Writes `WORKDIR/eval/metrics.json` (+ `metrics_<step>.json`), the evaluator's results
    JSON (COCO) and TensorBoard scalars under `eval/`. Returns the metrics file path.

    `partial` (a subset of the images): `eval/metrics_partial.json` only. Each file is
    replaced whole or not at all, `metrics.json` last: a write that fails (`OSError` naming the
    file and step) leaves the earlier metrics as they were."""
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    payload = dict(metrics)
    if step is not None:
        payload["step"] = int(step)
    text = json.dumps(payload, indent=2, sort_keys=True, default=float)
    doing = f"writing the evaluation of step {int(step)}" if step is not None else ""
    if partial:
        path = os.path.join(eval_dir, "metrics_partial.json")
        checkpoints.write_text_atomic(path, text, doing)
        return path
    if evaluator is not None and hasattr(evaluator, "write_results"):
        write = functools.partial(checkpoints.write_text_atomic, doing=doing)
        evaluator.write_results(eval_dir, write=write)
    own_writer = writer is None
    if own_writer:
        from clu import metric_writers

        writer = metric_writers.SummaryWriter(workdir)  # the caller prints the metrics
    writer.write_scalars(
        int(step or 0), {f"eval/{k}": v for k, v in scalar_metrics(metrics).items()}
    )
    if evaluator is not None and hasattr(evaluator, "chart_data"):
        from daipnet_jax.evaluation import charts

        try:
            charts.write_charts(evaluator.chart_data(), eval_dir, writer, int(step or 0))
        except OSError as e:  # matplotlib's error does not name the file
            png = e.filename or os.path.join(eval_dir, "*.png")
            raise checkpoints.named_os_error(e, png, doing) from e
    writer.flush()
    if own_writer:
        writer.close()
    if step is not None:
        step_file = os.path.join(eval_dir, f"metrics_{int(step)}.json")
        checkpoints.write_text_atomic(step_file, text, doing)
    path = os.path.join(eval_dir, "metrics.json")
    checkpoints.write_text_atomic(path, text, doing)
    return path


# ------------------------------------------------------------------ entry points
def make_evaluator_for(
    config: ml_collections.ConfigDict,
    ground_truth: Mapping[str, Any] | None = None,
    label_map: tuple[list[int], list[str]] | None = None,
) -> Any:
    """The evaluator of `config`'s evaluation split, from the data package's ground truth and
    label table (COCO test-dev: ground truth without annotations → results file only).
    `ground_truth` / `label_map` may be passed in to skip re-reading them."""
    from daipnet_jax import data
    from daipnet_jax.evaluation import make_evaluator

    category_ids, names = label_map if label_map is not None else data.label_map(config)
    gt = ground_truth if ground_truth is not None else data.eval_ground_truth(config)
    if config.data.source != "tfds" and gt.get("images") and not gt.get("annotations"):
        # COCO test-dev mode is meant for tfds' test split; for a folder it is likely the
        # wrong file, and the run would otherwise end without metrics and without saying why.
        logging.warning(
            "%s has no annotations: the evaluation writes detections only, no metrics",
            config.data.eval_annotation_file or config.data.source,
        )
    return make_evaluator(config, gt, [0, *category_ids], class_names=names)


def run_evaluation(
    config: ml_collections.ConfigDict,
    variables: Any,
    *,
    workdir: str | None = None,
    step: int | None = None,
    model: Any = None,
    writer: Any = None,
) -> dict[str, Any]:
    """Evaluate `variables` on `config`'s evaluation split (data package iterator + evaluator)."""
    from daipnet_jax import data

    batches = data.make_eval_iterator(config)
    evaluator = make_evaluator_for(config)
    return evaluate(
        config,
        variables,
        batches,
        evaluator,
        model=model,
        workdir=workdir,
        step=step,
        num_batches=len(batches),
        writer=writer,
    )


def training_eval_fn(
    workdir: str | None = None,
) -> Callable[[ml_collections.ConfigDict, Any, int], dict[str, float]]:
    """The `eval_fn` that `train.py` passes to the train loop: `eval_fn(config, variables, step)`
    returns the scalar metrics (the trainer writes them to TensorBoard under `eval/`); with
    `workdir`, it also writes `eval/metrics.json`, `eval/metrics_<step>.json` and the results
    file, as `evaluate.py` does. The model, the jitted step, the data iterator and the ground
    truth are built at the first call and kept by this function for the later ones (a changed
    config builds them anew)."""
    built: dict[str, tuple[Any, ...]] = {}

    def eval_fn(config: ml_collections.ConfigDict, variables: Any, step: int) -> dict[str, float]:
        from clu import metric_writers

        key = config.to_json_best_effort()
        if key not in built:
            from daipnet_jax import data, models

            model = models.build(config)
            batches = data.make_eval_iterator(config)
            b = int(config.train.eval_batch_size)
            gt, labels = data.eval_ground_truth(config), data.label_map(config)
            built.clear()  # one run, one config: nothing stale is kept
            built[key] = (model, batches, make_eval_step(config, model, b), gt, labels)
        model, batches, step_fn, gt, labels = built[key]
        metrics = evaluate(
            config,
            variables,
            batches,
            make_evaluator_for(config, gt, labels),
            model=model,
            workdir=workdir,
            step=step,
            num_batches=len(batches),
            # No TensorBoard writer here: the trainer writes the returned numbers itself.
            writer=metric_writers.MultiWriter([]),
            eval_step=step_fn,
        )
        return scalar_metrics({k: v for k, v in metrics.items() if k != "seconds"})

    return eval_fn
