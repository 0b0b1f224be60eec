"""The train loop: `train_and_evaluate(config, workdir, eval_fn=...)`.

Validate the config, build mesh, model, priors, schedule and optimiser, initialise (or resume
from `WORKDIR/checkpoints`), then run the jitted step until `total_steps` on batches moved to
the devices ahead of time (`sharding.DevicePrefetch`), with metrics, checkpoints and the
caller's `eval_fn` (`train.py` passes the evaluation package's; training never imports it).

Resume is exact and costs O(1) in the position: a checkpoint stores, per process, the record
index of its stream that follows the consumed batches (`meta['record_index']`), and the data
iterator starts there without producing what came before. The newest step that restores is
used; damaged steps are moved to `WORKDIR/checkpoints_unreadable/` with a warning. The first run
writes the resolved config to `WORKDIR/config.json`; a resume refuses a config that differs
outside `config.RESUME_MAY_CHANGE`. SIGTERM during the steps saves and returns (agreed across
processes at log steps); before the first step has run (compilation) and during evaluation it
ends the process at once. `train.max_train_seconds` saves and returns. A non-finite loss or
gradient raises `NonFiniteError` naming step and term without saving. With evaluation, the best
step by AP is copied to `WORKDIR/checkpoints_best/` (`best.json` names it).

The chief prints one progress line per log step on stdout; the metrics of each log window go
to TensorBoard only: `loss`, `loc`, `conf`, `pos_per_image`, `lr`, `grad_norm`,
`images_per_sec`, `step_time`, `data_wait`; the ETA counts training time only.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from daipnet_jax import boxes as boxes_lib
from daipnet_jax import checkpoints, models, sharding
from daipnet_jax import config as config_lib
from daipnet_jax.training import schedule as schedule_lib
from daipnet_jax.training import state as state_lib
from daipnet_jax.training import step as step_lib
from daipnet_jax.validate import check_writable, validate_config, validate_inputs

log = logging.getLogger(__name__)

TrainIterFn = Callable[[ml_collections.ConfigDict, int, int], Iterator[dict[str, Any]]]
EvalFn = Callable[[ml_collections.ConfigDict, dict[str, Any], int], dict[str, float]]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss term or gradient; the message names step and term."""


class _StopNow(Exception):
    """Raised by the SIGTERM handler while the loop waits for data (one process)."""


class _StopRequest:
    """SIGTERM while training steps: set `requested` (saved and stopped at the next check); while
    `waiting` for data with one process, stop at once. `armed(False)` restores the default
    action (the process ends at once) for compilation and evaluation, where nothing is lost
    that a handler could save. Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.waiting = False
        self._main = threading.current_thread() is threading.main_thread()

    def armed(self, on: bool) -> None:
        if self._main:
            signal.signal(signal.SIGTERM, self._handle if on else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        print("SIGTERM received: saving a checkpoint and stopping", flush=True)
        self.requested = True
        if self.waiting and jax.process_count() == 1:
            raise _StopNow

    def __enter__(self) -> _StopRequest:
        self._previous = signal.getsignal(signal.SIGTERM) if self._main else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._main and self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (collective when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _default_train_iter(
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    *,
    start_index: int = 0,
) -> Iterator[dict[str, Any]]:
    from daipnet_jax import data  # tf.data only when the package's pipeline is used

    # `start_index` is what makes `_positioned_iter` resume by record index (not by replay).
    return data.make_train_iterator(config, process_index, process_count, start_index=start_index)


def _source_examples(config: ml_collections.ConfigDict) -> int:
    from daipnet_jax import data

    return data.num_examples(config, "train")


def _positioned_iter(
    make: TrainIterFn, config: ml_collections.ConfigDict, batches: int, record: int | None
) -> Iterator[dict[str, Any]]:
    """The process's local batches from the checkpointed position: record index `record` of its
    stream when `make` takes `start_index` (the package's iterator), else after skipping
    `batches` batches."""
    args = (config, jax.process_index(), jax.process_count())
    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "start_index" in params and (record is not None or not batches):
        return make(*args, start_index=int(record or 0))  # type: ignore[call-arg]
    it = make(*args)
    return _Skipped(it, batches) if batches else it


class _Skipped(Iterator[dict[str, Any]]):
    """`it` after dropping its first `n` items (keeps `it` reachable for its `stats`)."""

    def __init__(self, it: Iterator[dict[str, Any]], n: int):
        self._source = it
        self._it = itertools.islice(it, n, None)

    def __next__(self) -> dict[str, Any]:
        return next(self._it)


def _gather_ints(value: int) -> list[int]:
    """`value` of every process, indexed by process (collective when there are several)."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in multihost_utils.process_allgather(np.asarray(value, np.int64))]


BEST_FILE = "best.json"
BEST_METRICS = ("AP", "mAP_voc07")  # COCO AP (IoU .50:.95), VOC07 mAP


def _best_metric(results: dict[str, Any]) -> tuple[str, float] | None:
    for k in BEST_METRICS:
        if k in results:
            return k, float(results[k])
    return None


def _best_paths(workdir: Path) -> tuple[Path, Path, Path, Path, Path]:
    """checkpoints_best/, best.json and the staged / previous copies of both."""
    best_dir, best_file = workdir / checkpoints.BEST_DIR, workdir / BEST_FILE
    return (
        best_dir,
        best_file,
        workdir / f".{checkpoints.BEST_DIR}.tmp",
        workdir / f".{checkpoints.BEST_DIR}.old",
        workdir / f".{BEST_FILE}.tmp",
    )


def _publish_best(workdir: Path, step_dir: Path, record: dict[str, Any]) -> Path:
    """Copy the saved step `step_dir` to `WORKDIR/checkpoints_best/` and name it in best.json.

    Both are staged first (the copy and `.best.json.tmp`), so a copy that fails (disk full)
    changes neither; then three renames put them in place. A run killed between the renames
    is completed or undone by `_recover_best`. A failure is an `OSError` naming the folder and
    step (one line through the CLI)."""
    best_dir, best_file, tmp, old, best_tmp = _best_paths(workdir)
    step = int(record["step"])
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(step_dir, tmp / str(step))
        best_tmp.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        best_tmp.unlink(missing_ok=True)
        # shutil.Error (the copy) lists (source, target, reason) per file: the first one
        why = e.args[0][0][2] if isinstance(e, shutil.Error) and e.args[0] else e.strerror or e
        raise OSError(
            e.errno,
            f"{why} (copying the best checkpoint, step {step}; the previous best stays)",
            str(best_dir),
        ) from e
    shutil.rmtree(old, ignore_errors=True)
    if best_dir.exists():
        os.replace(best_dir, old)
    os.replace(tmp, best_dir)
    os.replace(best_tmp, best_file)
    shutil.rmtree(old, ignore_errors=True)
    return best_dir


def _recover_best(workdir: Path) -> None:
    """Undo or complete a `_publish_best` that a kill interrupted between its renames, so that
    best.json names the step in checkpoints_best/ (chief only)."""
    best_dir, best_file, tmp, old, best_tmp = _best_paths(workdir)
    if not best_dir.exists() and old.exists():
        os.replace(old, best_dir)  # killed after moving the previous best aside
    if best_tmp.exists():
        staged = json.loads(best_tmp.read_text())
        if (best_dir / str(staged["step"])).is_dir():
            os.replace(best_tmp, best_file)  # killed before renaming best.json
        else:
            best_tmp.unlink()
    if best_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def initial_variables(
    config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array
) -> dict[str, Any]:
    """From scratch, then overwritten by converted VGG-16 weights when `config.init.vgg` is set
    (or by a full converted checkpoint with `config.init.checkpoint`)."""
    variables = state_lib.init_variables(model, config, rng)
    if config.init.vgg:
        vgg = checkpoints.load_variables(config.init.vgg)
        variables = checkpoints.merge_vgg(variables, vgg)
    elif config.init.checkpoint:
        loaded = checkpoints.load_variables(config.init.checkpoint)
        variables = checkpoints.merge_checkpoint(variables, loaded)
    return jax.tree_util.tree_map(np.asarray, variables)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model: nn.Module | None = None,
    train_iter_fn: TrainIterFn | None = None,
    eval_fn: EvalFn | None = None,
) -> state_lib.TrainState:
    """Train `config` in `workdir` (resuming from its checkpoints) and return the final state.

    `model` and `train_iter_fn(config, process_index, process_count)` (local batches, see
    CONTRIBUTING; with a `start_index` keyword it resumes by record index) default to
    `models.build` and `data.make_train_iterator`; `eval_fn(config, variables, step) ->
    metrics` runs every `train.eval_every_steps` and at the end (None: no evaluation).
    """
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    workdir_p = Path(workdir).resolve()
    is_chief = jax.process_index() == 0
    created = not workdir_p.exists()
    if is_chief:
        check_writable(workdir_p)
    try:
        checkpoints.check_saved_config(workdir_p, config, "resume")
        if train_iter_fn is None:
            # Files, folders, classes and usable examples: before anything is compiled.
            validate_inputs(config, evaluate=eval_fn is not None, process_count=jax.process_count())
    except Exception:
        if is_chief and created and workdir_p.is_dir() and not any(workdir_p.iterdir()):
            workdir_p.rmdir()  # a refused run leaves no empty workdir behind
        raise
    # One training per workdir (docs/design.md): the chief holds the lock, every process
    # learns whether it got it (the others would otherwise wait in the first collective).
    lock, refused = None, None
    if is_chief:
        try:
            lock = checkpoints.WorkdirLock(workdir_p)
        except config_lib.ConfigError as e:
            refused = e
    if _any_process(refused is not None):
        raise refused or config_lib.ConfigError(
            "--workdir", f"process 0 could not lock {workdir_p} (in use by another training)"
        )
    try:
        return _train_locked(config, workdir_p, model, train_iter_fn, eval_fn)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    config: ml_collections.ConfigDict,
    workdir_p: Path,
    model: nn.Module | None,
    train_iter_fn: TrainIterFn | None,
    eval_fn: EvalFn | None,
) -> state_lib.TrainState:
    """`train_and_evaluate` after its checks, with the workdir locked."""
    is_chief = jax.process_index() == 0
    t = config.train

    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    model = models.build(config) if model is None else model
    priors = boxes_lib.prior_boxes(config)
    spe = config_lib.steps_per_epoch(config, lambda: _source_examples(config))
    total = config_lib.total_steps(config, spe)
    schedule = schedule_lib.learning_rate_schedule(config, spe)
    tx = schedule_lib.make_optimizer(config, schedule)

    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, state_rng = jax.random.split(rng)
    # Shapes only: the real initial state is made below unless a checkpoint exists.
    abstract_vars = checkpoints.abstract_variables(model, config)
    abstract_state = jax.eval_shape(
        lambda v, r: state_lib.create_train_state(v, tx, r), abstract_vars, state_rng
    )
    abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract_state
    )

    checkpointer = checkpoints.Checkpointer(
        workdir_p / checkpoints.CHECKPOINT_DIR, keep=int(t.keep_checkpoints)
    )
    restored = checkpointer.restore_newest(abstract_state, move_unreadable=True)
    record: int | None = None
    if restored is not None:
        latest, state, meta = restored
        position = int(meta["data_position"])
        records = meta.get("record_index")
        if isinstance(records, list) and len(records) == jax.process_count():
            record = int(records[jax.process_index()])
        elif records is not None:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: the data "
                "stream restarts at batch %d of the new layout",
                len(records),
                jax.process_count(),
                position,
            )
        if is_chief:
            where = f", record {record}" if record is not None else ""
            print(
                f"resumed from {checkpointer.directory}/{latest} (data position {position}{where})",
                flush=True,
            )
    else:
        variables = initial_variables(config, model, init_rng)
        state = jax.jit(lambda v, r: state_lib.create_train_state(v, tx, r), out_shardings=rep)(
            sharding.put_replicated(variables, rep),
            sharding.put_replicated(np.asarray(state_rng), rep),
        )
        position = 0
    if is_chief:
        checkpoints.write_config(workdir_p, config)
    step = int(jax.device_get(state.step))
    if step >= total and is_chief:
        print(
            f"step {step} already reaches the run's {total} steps: nothing to train"
            + (" (the final evaluation runs again)" if eval_fn is not None else ""),
            flush=True,
        )

    train_step = step_lib.make_train_step(config, model, tx, schedule, priors, mesh)
    make_iter = _default_train_iter if train_iter_fn is None else train_iter_fn
    if record is None and position and make_iter is _default_train_iter:
        record = position * (int(t.batch_size) // jax.process_count())  # older checkpoints
    local_batches = _positioned_iter(make_iter, config, position, record)
    source_iter = getattr(local_batches, "_source", local_batches)
    batches = sharding.DevicePrefetch(local_batches, mesh, step_lib.TRAIN_KEYS, size=2)
    consumed = 0  # batches taken by steps in this run

    from clu import metric_writers

    # Metrics to TensorBoard only (the progress line is the one stdout line per log step).
    writer: Any = (
        metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir_p)))
        if is_chief
        else metric_writers.MultiWriter([])
    )
    if step == 0:
        writer.write_hparams({k: v for k, v in config_lib.flat_items(config).items() if _scalar(v)})

    def check_finite(metrics: dict[str, Any] | None = None) -> None:
        source = (
            metrics
            if metrics is not None
            else {"bad_step": state.bad_step, "bad_term": state.bad_term}
        )
        bad_step, bad_term = (
            int(x) for x in jax.device_get((source["bad_step"], source["bad_term"]))
        )
        if bad_step >= 0:
            checkpointer.wait()
            last = checkpointer.latest_step()
            writer.flush()
            raise NonFiniteError(
                f"non-finite {state_lib.describe_bad_term(bad_term)} at step {bad_step} "
                f"(update {bad_step + 1}); training stopped. The last good checkpoint is "
                f"{checkpointer.directory / str(last) if last is not None else 'none'}"
            )

    saved = [checkpointer.latest_step()]

    def save() -> None:
        if saved[0] == step:
            return
        check_finite()
        saved[0] = step
        next_index = getattr(source_iter, "next_index", None)
        meta: dict[str, Any] = {"data_position": position, "step": step}
        if callable(next_index):
            meta["record_index"] = _gather_ints(next_index(consumed))
        checkpointer.save(step, state, meta)

    best_file = workdir_p / BEST_FILE
    if is_chief:
        _recover_best(workdir_p)

    def keep_best(results: dict[str, Any]) -> None:
        """Copy this step's checkpoint to checkpoints_best/ when its AP is the best so far."""
        metric = _best_metric(results)
        if metric is None:
            return
        name, value = metric
        best = json.loads(best_file.read_text()) if best_file.exists() else None
        if best is not None and not value > float(best["value"]):
            return
        save()
        checkpointer.wait()
        if not is_chief:
            return
        record_ = {"step": step, "metric": name, "value": value}
        best_dir = _publish_best(workdir_p, checkpointer.directory / str(step), record_)
        print(f"best {name} {value:.4f} at step {step}: {best_dir}/{step}", flush=True)

    def evaluate() -> None:
        if eval_fn is None:
            return
        stop.armed(False)  # SIGTERM during evaluation ends the process at once
        results = eval_fn(config, jax.device_get(state.variables()), step)
        stop.armed(True)
        if results:
            numbers = {k: float(v) for k, v in results.items() if _number(v)}
            writer.write_scalars(step, {f"eval/{k}": v for k, v in numbers.items()})
            if is_chief:
                print(
                    f"eval at step {step}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()),
                    flush=True,
                )
            keep_best(numbers)

    window: list[dict[str, jax.Array]] = []
    data_wait = 0.0
    timed = 0  # steps of the window that count for the timings (not the compiling one)
    first = True
    paused = 0.0  # evaluation/checkpoint time inside the current window (not training time)
    window_start = run_start = time.perf_counter()
    stopped_early = False
    with _StopRequest() as stop:
        stop.armed(False)  # until the first step has compiled and run
        try:
            while step < total:
                t0 = time.perf_counter()
                stop.waiting = True
                try:
                    batch = next(batches)
                except StopIteration as e:
                    raise RuntimeError(
                        f"the training iterator ended after {position} batches; it must repeat"
                    ) from e
                finally:
                    stop.waiting = False
                data_wait += time.perf_counter() - t0
                with jax.transfer_guard(t.transfer_guard):
                    state, metrics = train_step(state, batch)
                step += 1
                position += 1
                consumed += 1
                window.append(metrics)
                if first:
                    # The first step of a run compiles: report it apart, keep it out of the
                    # timings.
                    first = False
                    jax.block_until_ready(metrics)
                    stop.armed(True)
                    if is_chief:
                        print(
                            f"first step (with compilation): {time.perf_counter() - t0:.1f}s",
                            flush=True,
                        )
                    window_start, data_wait, paused = time.perf_counter(), 0.0, 0.0
                else:
                    timed += 1

                at_log = step % t.log_every_steps == 0 or step == total
                if at_log:
                    fetched = jax.device_get(window)
                    elapsed = max(time.perf_counter() - window_start - paused, 1e-9)
                    check_finite(fetched[-1])
                    n = max(timed, 1)  # a window of only the compiling step has no timings
                    scalars = {
                        k: float(np.mean([m[k] for m in fetched]))
                        for k in ("loss", "loc", "conf", "pos_per_image", "grad_norm")
                    }
                    scalars["lr"] = float(fetched[-1]["lr"])
                    if timed:
                        scalars["step_time"] = elapsed / n
                        scalars["data_wait"] = data_wait / n
                        scalars["images_per_sec"] = timed * int(t.batch_size) / elapsed
                    stats = getattr(source_iter, "stats", None)
                    if isinstance(stats, dict):
                        scalars.update({f"data/{k}": float(v) for k, v in stats.items()})
                    writer.write_scalars(step, scalars)
                    if is_chief:
                        eta = (total - step) * elapsed / timed if timed else math.nan
                        print(
                            f"step {step}/{total} ({100 * step / total:.1f}%) "
                            f"loss {scalars['loss']:.4f} (loc {scalars['loc']:.4f} "
                            f"conf {scalars['conf']:.4f}) lr {scalars['lr']:.3g} "
                            f"{scalars.get('images_per_sec', math.nan):.1f} img/s "
                            f"step {scalars.get('step_time', math.nan):.3f}s "
                            f"data {scalars.get('data_wait', math.nan):.3f}s "
                            f"ETA {_fmt_time(eta)}",
                            flush=True,
                        )
                    window, data_wait, paused, timed = [], 0.0, 0.0, 0
                    window_start = time.perf_counter()
                # Stop requests: checked every step with one process, agreed at log steps with
                # several.
                if (jax.process_count() == 1 or at_log) and step < total:
                    over_time = (
                        t.max_train_seconds > 0
                        and time.perf_counter() - run_start > t.max_train_seconds
                    )
                    if _any_process(stop.requested or over_time):
                        stopped_early = True
                        why = "SIGTERM" if stop.requested else "train.max_train_seconds"
                        print(f"stopping at step {step} ({why})", flush=True)
                        break
                t_pause = time.perf_counter()
                if t.eval_every_steps and step % t.eval_every_steps == 0 and step < total:
                    evaluate()
                if step % t.checkpoint_every_steps == 0 and step < total:
                    save()
                paused += time.perf_counter() - t_pause
        except _StopNow:
            stopped_early = True
            print(f"stopping at step {step} (SIGTERM while waiting for data)", flush=True)
        stop.armed(not first)
        if window:
            check_finite(jax.device_get(window[-1]))
        save()
        checkpointer.wait()
        close = getattr(source_iter, "close", None)
        if callable(close):
            close()
        if not stopped_early:
            evaluate()
    writer.flush()
    writer.close()
    checkpointer.close()
    return state


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, np.floating, np.integer))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


__all__ = ["EvalFn", "NonFiniteError", "initial_variables", "train_and_evaluate"]
