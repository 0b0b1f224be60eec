"""The train loop: `train_and_evaluate(config, workdir)` (issue 9; SPEC §6).

Order of work: validate the config (before anything is built or compiled), build the mesh,
model, priors, schedule and optimiser; initialise (from converted VGG-16 weights when
`config.init.vgg` names them, else from scratch) or resume from `WORKDIR/checkpoints`; then
run the jitted data-parallel step until `total_steps`, with metrics, progress, periodic and
final checkpoints and evaluation.

Resume is exact: the checkpoint stores the number of batches consumed (`data_position`); a
resumed run rebuilds the deterministic input pipeline and skips that many batches (or passes the
position to the pipeline when it accepts a `start_batch` argument), so an interrupted and an
uninterrupted run see the same batches and reach the same parameters.

Stopping: SIGTERM (preemption) or `train.max_train_seconds` saves a checkpoint and returns
normally; with several processes the stop request is agreed on (all-gathered) at log steps so
every process saves the same step. A non-finite loss or gradient (NaN guard, see `step.py`)
raises `NonFiniteError` naming the step and term, without saving; the last good checkpoint
stays the latest.

Metrics (clu metric writers: TensorBoard in WORKDIR and the log): `loss`, `loc`, `conf`,
`pos_per_image`, `lr`, `grad_norm`, `images_per_sec`, `step_time` (s), `data_wait` (s per step)
averaged over each log window; a progress line on stdout with the ETA computed from training
time only (the clock pauses during evaluation and checkpointing).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
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

from daipnet_jax.training import checkpoint as ckpt_lib
from daipnet_jax.training import schedule as schedule_lib
from daipnet_jax.training import state as state_lib
from daipnet_jax.training import step as step_lib
from daipnet_jax.training.validate import validate_config

log = logging.getLogger(__name__)

TrainIterFn = Callable[[ml_collections.ConfigDict, int, int], Iterator[dict[str, Any]]]
EvalFn = Callable[[ml_collections.ConfigDict, dict[str, Any], int], dict[str, float]]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss term or gradient; the message names step and term."""


class _StopRequest:
    """Set by SIGTERM; installed only in the main thread, previous handler restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        print("SIGTERM received: saving a checkpoint and stopping", flush=True)
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (collective when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def num_train_examples(config: ml_collections.ConfigDict) -> int:
    """Epoch size: `train.train_examples` if > 0, else asked of the data package."""
    if config.train.train_examples > 0:
        return int(config.train.train_examples)
    from daipnet_jax import data

    return int(data.num_train_examples(config))


def _default_train_iter(
    config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> Iterator[dict[str, Any]]:
    from daipnet_jax import data

    return data.make_train_iterator(config, process_index, process_count)


def _positioned_iter(
    make: TrainIterFn, config: ml_collections.ConfigDict, position: int
) -> Iterator[dict[str, Any]]:
    """The process's local batches starting at batch `position` of the deterministic stream."""
    args = (config, jax.process_index(), jax.process_count())
    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "start_batch" in params:
        return make(*args, start_batch=position)  # type: ignore[call-arg]
    it = make(*args)
    return _Skipped(it, position) if position else it


class _Skipped(Iterator[dict[str, Any]]):
    """`it` after dropping its first `n` items (keeps `it` reachable for its `stats`)."""

    def __init__(self, it: Iterator[dict[str, Any]], n: int):
        self._source = it
        self._it = itertools.islice(it, n, None)

    def __next__(self) -> dict[str, Any]:
        return next(self._it)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    from daipnet_jax import models

    return models.build(config)


def initial_variables(
    config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array
) -> dict[str, Any]:
    """From scratch, then overwritten by converted VGG-16 weights when `config.init.vgg` is set
    (or by a full converted checkpoint with `config.init.checkpoint`)."""
    variables = state_lib.init_variables(model, config, rng)
    if config.init.vgg or config.init.checkpoint:
        from daipnet_jax import convert

        if config.init.vgg:
            vgg = convert.load_variables(config.init.vgg)
            variables = convert.merge_vgg(variables, vgg)
        else:
            variables = convert.merge_checkpoint(
                variables, convert.load_variables(config.init.checkpoint)
            )
    return jax.tree_util.tree_map(np.asarray, variables)


def _put_replicated(tree: Any, sharding: jax.sharding.NamedSharding) -> Any:
    """Host arrays (identical on every process) → replicated global `jax.Array`s."""

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


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

    `model`, `train_iter_fn(config, process_index, process_count)` (local batches, see
    CONTRIBUTING) and `eval_fn(config, variables, step) -> metrics` default to the package's
    `models.build`, `data.make_train_iterator` and evaluator; they are parameters so that
    experiments and tests can swap them.
    """
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    workdir_p = Path(workdir)
    workdir_p.mkdir(parents=True, exist_ok=True)
    t = config.train
    is_chief = jax.process_index() == 0

    mesh = step_lib.make_mesh()
    rep = step_lib.replicated(mesh)
    model = build_model(config) if model is None else model
    from daipnet_jax import boxes as boxes_lib

    priors = boxes_lib.prior_boxes(config)
    spe = schedule_lib.steps_per_epoch(config, num_train_examples(config))
    total = schedule_lib.total_steps(config, spe)
    schedule = schedule_lib.learning_rate_schedule(config, spe)
    tx = schedule_lib.make_optimizer(config, schedule)

    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, state_rng = jax.random.split(rng)
    # Shapes only: the real initial state is made below unless a checkpoint exists.
    abstract_vars = state_lib.abstract_variables(model, config)
    abstract_state = jax.eval_shape(
        lambda v, r: state_lib.create_train_state(v, tx, r), abstract_vars, state_rng
    )
    abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract_state
    )

    checkpointer = ckpt_lib.Checkpointer(
        workdir_p / ckpt_lib.CHECKPOINT_DIR, keep=int(t.keep_checkpoints)
    )
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(abstract_state, latest)
        position = int(meta["data_position"])
        print(f"resumed from {checkpointer.directory}/{latest} (data position {position})")
    else:
        variables = initial_variables(config, model, init_rng)
        state = jax.jit(lambda v, r: state_lib.create_train_state(v, tx, r), out_shardings=rep)(
            _put_replicated(variables, rep), _put_replicated(np.asarray(state_rng), rep)
        )
        position = 0
    step = int(jax.device_get(state.step))

    train_step = step_lib.make_train_step(config, model, tx, schedule, priors, mesh)
    make_iter = _default_train_iter if train_iter_fn is None else train_iter_fn
    batches = _positioned_iter(make_iter, config, position)
    source_iter = getattr(batches, "_source", batches)

    from clu import metric_writers

    writer = metric_writers.create_default_writer(
        str(workdir_p), just_logging=not is_chief, asynchronous=True
    )
    if step == 0:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items() if _scalar(v)})

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

    def save() -> None:
        check_finite()
        meta = {"data_position": position, "step": step, "config": config.to_json_best_effort()}
        checkpointer.save(step, state, meta)

    def evaluate() -> None:
        fn = eval_fn if eval_fn is not None else _default_eval_fn(str(workdir_p))
        if fn is None:
            return
        results = fn(config, jax.device_get(state.variables()), step)
        if is_chief and results:
            numbers = {k: float(v) for k, v in results.items() if _number(v)}
            writer.write_scalars(step, {f"eval/{k}": v for k, v in numbers.items()})
            print(
                f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()),
                flush=True,
            )

    window: list[dict[str, jax.Array]] = []
    data_wait = 0.0
    timed = 0  # steps of the window that count for the timings (not the compiling one)
    first = True
    paused = 0.0  # evaluation/checkpoint time inside the current window (not training time)
    window_start = run_start = time.perf_counter()
    stopped_early = False
    with _StopRequest() as stop:
        while step < total:
            t0 = time.perf_counter()
            try:
                local = next(batches)
            except StopIteration as e:
                raise RuntimeError(
                    f"the training iterator ended after {position} batches; it must repeat"
                ) from e
            batch = step_lib.global_batch(local, mesh)
            data_wait += time.perf_counter() - t0
            with jax.transfer_guard(t.transfer_guard):
                state, metrics = train_step(state, batch)
            step += 1
            position += 1
            window.append(metrics)
            if first:
                # The first step of a run compiles: report it apart, keep it out of the timings.
                first = False
                jax.block_until_ready(metrics)
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
            # Stop requests: checked every step with one process, agreed at log steps with several.
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
        if window:
            check_finite(jax.device_get(window[-1]))
        if checkpointer.latest_step() != step:
            save()
        checkpointer.wait()
    if not stopped_early:
        evaluate()
    writer.flush()
    checkpointer.close()
    return state


def _default_eval_fn(workdir: str) -> EvalFn | None:
    """The evaluation package's in-training hook `evaluate_during_training`, if present, writing
    its metrics files under `workdir/eval` like `evaluate.py`."""
    try:
        from daipnet_jax.evaluation import loop as eval_loop
    except ImportError:
        return None
    fn = getattr(eval_loop, "evaluate_during_training", None)
    return None if fn is None else functools.partial(fn, workdir=workdir)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, np.floating, np.integer))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


__all__ = ["NonFiniteError", "initial_variables", "num_train_examples", "train_and_evaluate"]
