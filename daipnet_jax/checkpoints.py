"""Checkpoints: the training state's orbax manager and every way variables are read or written.

Two layouts hold model variables `{'params', 'batch_stats'}`:

- a training workdir: `WORKDIR/checkpoints/<step>/{state,meta}` (`Checkpointer`); `state` is
  the whole `TrainState` (params, batch stats, optimiser state, step, RNG key, NaN-guard
  record), `meta` a JSON with the data position (batches consumed, and per process the record
  index its stream resumes at) and the step; the run's config is `WORKDIR/config.json`.
  Saves are atomic (orbax writes a temporary directory and renames it), so a run killed
  mid-save leaves the previous checkpoint as the latest; `max_to_keep` = `train.keep_checkpoints`.
  Steps that do not restore are skipped for the newest one that does (`restore_newest`,
  `load_variables`), named in a warning and never deleted.
- a converted folder (`python -m daipnet_jax.convert`, `save_variables`): one orbax pytree item
  `DIR` holding `{'params', 'batch_stats'}` (float32 leaves; only the backbone for the VGG
  formats) plus `DIR/conversion.json` (format, input, model section, counts).

`load_variables(path, step=None)` reads either as host NumPy arrays, independent of how many
devices wrote it; `check_variables` compares a tree with the model's `abstract_variables`;
`merge_vgg` / `merge_checkpoint` put converted weights into a fresh initialisation.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from daipnet_jax import config as config_lib

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"  # steps that failed to restore, moved aside by training
BEST_DIR = "checkpoints_best"
STATE_ITEM = "state"
METADATA_FILE = "conversion.json"
CONFIG_FILE = "config.json"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the configured model."""


class CheckpointWriteError(CheckpointError):
    """A training checkpoint that could not be written (disk full, file too large, the folder
    gone); the message names the step, the file and the newest complete checkpoint."""


def _first_line(e: BaseException) -> str:
    return config_lib.first_line(e, limit=200)  # orbax's messages can run to pages


class _ClosedLoopNoise(logging.Filter):
    """Drops asyncio's "Exception in callback" records whose exception is "Event loop is
    closed"; every other asyncio record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_closed_loop(record.exc_info[1] if record.exc_info else None)


def _is_closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _drop_closed_loop_noise() -> None:
    """Around reads that may fail, orbax's pending asyncio callbacks report "Event loop is
    closed" (dozens of tracebacks) as unraisable exceptions, through asyncio's logger, or
    printed from native code through `sys.excepthook`; drop exactly those. Idempotent."""
    loop_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _ClosedLoopNoise) for f in loop_log.filters):
        loop_log.addFilter(_ClosedLoopNoise())
    unraisable = sys.unraisablehook
    if not getattr(unraisable, "_daipnet", False):

        def on_unraisable(u: Any) -> None:
            if not _is_closed_loop(u.exc_value):
                unraisable(u)

        on_unraisable._daipnet = True  # type: ignore[attr-defined]
        sys.unraisablehook = on_unraisable
    excepthook = sys.excepthook
    if not getattr(excepthook, "_daipnet", False):

        def on_exception(kind: Any, value: Any, tb: Any) -> None:
            if not _is_closed_loop(value):
                excepthook(kind, value, tb)

        on_exception._daipnet = True  # type: ignore[attr-defined]
        sys.excepthook = on_exception


class _OrbaxErrorsWithoutTraceback(logging.Filter):
    """Keeps the records of orbax's failures to their message: a failed save is reported as
    one `CheckpointWriteError`, and orbax's threads (and asyncio, for its unawaited tasks) log
    its traceback several times."""

    ORBAX = f"{os.sep}orbax{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        tb = record.exc_info[2]
        files = [record.pathname]
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if any(self.ORBAX in f for f in files):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_orbax_tracebacks() -> None:
    """Install `_OrbaxErrorsWithoutTraceback` on the loggers orbax's failures reach (absl's,
    asyncio's). Idempotent."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(_OrbaxErrorsWithoutTraceback())


def unreadable_warning(directory: Path, step: int, error: BaseException, action: str) -> None:
    log.warning(
        "checkpoint %s/%d does not restore (%s); %s",
        directory,
        step,
        _first_line(error),
        action,
    )


# ------------------------------------------------------------------ training state
def checkpoint_dir(workdir: str | os.PathLike[str]) -> Path:
    """`WORKDIR/checkpoints` (or `workdir` itself when it is already a checkpoints directory)."""
    path = Path(workdir).resolve()
    if path.name == CHECKPOINT_DIR or (
        not (path / CHECKPOINT_DIR).exists() and any(p.name.isdigit() for p in path.glob("*"))
    ):
        return path
    return path / CHECKPOINT_DIR


def _write_failure(error: BaseException) -> str:
    """The reason a save failed, short: the OS error and the file when orbax names them."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # an OSError with its file, anywhere in the chain
        seen.add(id(e))
        if isinstance(e, OSError) and e.filename:
            return f"{e.strerror or e}: {e.filename}"
        e = e.__cause__ or e.__context__
    text = str(error)
    code = re.search(r"os_error_code='(\d+)'", text)
    file = re.search(r'Failed writing: "([^"]+)"', text)
    if code and file:  # tensorstore's message holds both
        return f"{os.strerror(int(code.group(1)))}: {file.group(1)}"
    return _first_line(error)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with items `state` (pytree) and `meta` (JSON).

    A save that fails (disk full, file too large, the folder removed) raises
    `CheckpointWriteError` naming the step, the reason and the newest complete checkpoint, and
    its unfinished folder is removed; a writer (`create`) also removes unfinished folders that
    earlier runs left (killed mid-save)."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3, *, create: bool = True):
        if os.path.lexists(directory) and not os.path.isdir(directory):
            # orbax would accept it and fail at the first save, after compilation and steps
            raise CheckpointError(f"{Path(directory).resolve()} is not a folder")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), create=create, cleanup_tmp_directories=create
        )
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE_ITEM, "meta"), options=options
        )
        self._pending: int | None = None  # the step of the save that may still be running
        # a failed asynchronous save reports "Event loop is closed", and orbax logs tracebacks
        _drop_closed_loop_noise()
        _quiet_orbax_tracebacks()

    def _failed(self, error: BaseException) -> CheckpointWriteError:
        step = self._pending
        self._pending = None
        if jax.process_index() == 0:  # an unfinished folder only holds disk space
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        if not self.directory.is_dir():
            state = "is not a folder" if self.directory.exists() else "no longer exists"
            reason = f"the folder {self.directory} {state}"
        else:
            reason = _write_failure(error)
        steps = saved_steps(self.directory)
        last = f"{self.directory}/{steps[-1]}" if steps else "none"
        return CheckpointWriteError(
            f"checkpoint {self.directory}/{step} could not be written ({reason}); "
            f"the newest complete checkpoint is {last}"
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start an (asynchronous) save; device buffers are copied before this returns. Raises
        `CheckpointWriteError` for this save or the previous one (which it waits for)."""
        self.wait()
        self._pending = int(step)
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:
            raise self._failed(e) from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto `abstract_state`'s structure and shardings (`jax.ShapeDtypeStruct`s)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def restore_newest(self, abstract_state: Any, *, move_unreadable: bool = False) -> Any:
        """(step, state, meta) of the newest step that restores, or None when none does.

        A step that fails is named in a one-line warning and never deleted; with
        `move_unreadable` (training, which will save that step number again) it is moved to
        `WORKDIR/checkpoints_unreadable/<step>`.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return (step, *self.restore(abstract_state, step))
            except Exception as e:  # orbax raises assorted errors on damaged steps
                _drop_closed_loop_noise()
                if not move_unreadable:
                    unreadable_warning(self.directory, step, e, "trying the previous step")
                    continue
                target = self.directory.parent / UNREADABLE_DIR / str(step)
                if jax.process_index() == 0:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if target.exists():
                        target = target.with_name(f"{step}.{os.getpid()}")
                    shutil.move(str(self.directory / str(step)), str(target))
                unreadable_warning(
                    self.directory, step, e, f"moved to {target}, trying the previous step"
                )
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices(f"unreadable checkpoint {step}")
                self.manager.reload()
        return None

    def wait(self) -> None:
        """Wait for the running save; `CheckpointWriteError` when it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        self._pending = None

    def close(self) -> None:
        self.wait()
        self.manager.close()


# ------------------------------------------------------------------ model variables
def abstract_variables(model: Any, config: Any) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of `model` as `jax.ShapeDtypeStruct`s (nothing computed)."""
    size = int(config.model.image_size)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), images)
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def _is_training_dir(path: Path) -> bool:
    if (path / CHECKPOINT_DIR).is_dir():
        return True
    return any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


class _DropItemMetadataNotes(logging.Filter):
    """orbax warns that an item directory (`<step>/state`) has no step-level metadata file on
    every read of one; that is the layout, not a problem."""

    NOTES = ("Metadata file does not exist", "Failed to get item metadata")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


def _read_tree(item: Path) -> dict[str, Any]:
    """One orbax pytree item as host NumPy arrays (whatever sharding wrote it)."""
    note_filter = _DropItemMetadataNotes()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for lg in loggers:
        lg.addFilter(note_filter)
    try:
        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(item)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            tree,
            is_leaf=lambda x: isinstance(x, ocp.metadata.value.Metadata),
        )
        return dict(ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args)))
    finally:
        for lg in loggers:
            lg.removeFilter(note_filter)


def saved_steps(directory: Path) -> list[int]:
    """The steps of a checkpoints directory, ascending (whether or not they restore)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def step_dir(path: str | os.PathLike[str]) -> tuple[Path, int] | None:
    """(workdir, step) when `path` is one saved step, `WORKDIR/checkpoints/<step>` (or under
    `checkpoints_best`); else None. Reading it is reading the workdir at that step."""
    p = Path(path).resolve()
    if p.name.isdigit() and p.parent.name in (CHECKPOINT_DIR, BEST_DIR) and p.is_dir():
        return p.parent.parent, int(p.name)
    return None


def _with_step(path: str | os.PathLike[str], step: int | None) -> tuple[Any, int | None]:
    """`path` and `step`, a step directory turned into its checkpoints directory and step."""
    found = step_dir(path)
    if found is None:
        return path, step
    if step is not None and int(step) != found[1]:
        raise CheckpointError(f"step {step} contradicts the step directory {str(path)!r}")
    return Path(path).resolve().parent, found[1]


def check_checkpoint_path(
    path: str | os.PathLike[str], step: int | None = None
) -> tuple[Path, int | None]:
    """The absolute checkpoint path and step to read (a step's folder gives its checkpoints
    directory and step), after the checks that need no read (a `CheckpointError` naming the
    path): it exists, is a readable folder, and a training workdir has saved steps, `step`
    among them; a converted folder takes no `step`. Commands call it before slower set-up
    (data, compilation)."""
    path, step = _with_step(path, step)
    p = Path(path).resolve()  # orbax wants absolute paths; users give relative ones
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a file; expected a directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise CheckpointError(f"checkpoint path {str(path)!r} is not readable")
    if not _is_training_dir(p):
        if step is not None:
            raise CheckpointError(f"a step was given but {str(path)!r} is not a training workdir")
        return p, None
    directory = checkpoint_dir(p)
    steps = saved_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")
    if step is not None and int(step) not in steps:
        raise CheckpointError(
            f"no step {step} in {directory}; saved steps: {', '.join(map(str, steps))}"
        )
    return p, step


def load_variables_and_step(
    path: str | os.PathLike[str], step: int | None = None
) -> tuple[dict[str, Any], int | None]:
    """`load_variables` and the step it read (None for a converted folder).

    Without `step`, a training workdir's newest step that restores is read: steps that fail
    are named in a one-line warning and left on disk. A `step` that does not exist raises
    `CheckpointError` listing the steps that do (`check_checkpoint_path`).
    """
    p, step = check_checkpoint_path(path, step)
    _drop_closed_loop_noise()  # before any read: a failing orbax read may print it at once
    if not _is_training_dir(p):
        try:
            tree = _read_tree(p)
        except FileNotFoundError as e:
            raise CheckpointError(f"no checkpoint found at {str(path)!r}: {_first_line(e)}") from e
        except Exception as e:  # orbax raises assorted errors on non-checkpoint folders
            raise CheckpointError(
                f"cannot read an orbax checkpoint at {str(path)!r}: {_first_line(e)}"
            ) from e
        return _variables_of(tree, path), None
    directory = checkpoint_dir(p)
    steps = saved_steps(directory)
    # the step asked for, else the newest that restores
    for s in [int(step)] if step is not None else reversed(steps):
        try:
            return _variables_of(_read_tree(directory / str(s) / STATE_ITEM), path), s
        except CheckpointError:
            raise
        except Exception as e:
            if step is not None:
                raise CheckpointError(
                    f"checkpoint {directory}/{s} does not restore: {_first_line(e)}"
                ) from e
            unreadable_warning(directory, s, e, "trying the previous step")
    raise CheckpointError(f"none of the steps {', '.join(map(str, steps))} in {directory} restores")


def _variables_of(tree: dict[str, Any], path: Any) -> dict[str, Any]:
    if "params" not in tree:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no 'params' (top-level keys: {sorted(tree)})"
        )
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {}) or {}}


def load_variables(path: str | os.PathLike[str], step: int | None = None) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` (host NumPy) of a training workdir or a converted folder.

    path: a training `--workdir` (or its `checkpoints` directory; `step` a saved step, default
    the newest that restores) or a converted folder. Raises `CheckpointError` naming the path
    when nothing loadable is there.
    """
    return load_variables_and_step(path, step)[0]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in leaves}


def check_variables(
    expected: Any, got: Any, source: str = "checkpoint", *, subset: bool = False
) -> None:
    """Raise `CheckpointError` naming the first missing / unexpected / mis-shaped entry.

    `subset`: `got` may hold only part of `expected` (e.g. a converted backbone).
    """
    want, have = _shapes(expected), _shapes(got)
    for k, shape in want.items():
        if k not in have:
            if subset:
                continue
            raise CheckpointError(f"{source} does not fit the model: missing {k} (shape {shape})")
        if have[k] != shape:
            raise CheckpointError(
                f"{source} does not fit the model: {k} has shape {have[k]}, the model expects "
                f"{shape} (wrong model.width / num_classes / variant?)"
            )
    for k in have:
        if k not in want:
            raise CheckpointError(f"{source} does not fit the model: unexpected entry {k}")


def restore_variables(
    config: Any, path: str | os.PathLike[str], step: int | None = None, model: Any = None
) -> dict[str, Any]:
    """`load_variables` checked against `models.build(config)` (or `model`)."""
    return restore_variables_and_step(config, path, step, model)[0]


def restore_variables_and_step(
    config: Any, path: str | os.PathLike[str], step: int | None = None, model: Any = None
) -> tuple[dict[str, Any], int | None]:
    """`restore_variables` and the step read (None for a converted folder)."""
    if model is None:
        from daipnet_jax import models

        model = models.build(config)
    variables, step = load_variables_and_step(path, step)
    check_variables(abstract_variables(model, config), variables, f"checkpoint {str(path)!r}")
    return variables, step


def _cast_like(loaded: Any, reference: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda new, ref: np.asarray(new, dtype=ref.dtype), loaded, reference
    )


def merge_checkpoint(variables: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
    """A full converted checkpoint in place of `variables` (a fresh init of the same model).

    Both trees must have the same paths and shapes (`CheckpointError` names the first
    difference); leaves are cast to the dtypes of `variables`.
    """
    check_variables(variables, loaded, "the converted checkpoint")
    return {c: _cast_like(loaded[c], variables[c]) for c in variables}


def merge_vgg(variables: Mapping[str, Any], vgg_variables: Mapping[str, Any]) -> dict[str, Any]:
    """Graft converted backbone weights into a full variables tree (e.g. a fresh init).

    Every leaf of `vgg_variables` must exist in `variables` with the same shape (check
    `model.width` otherwise); returns a new tree of host NumPy arrays whose backbone leaves are
    replaced, cast to the target dtype.
    """
    check_variables(variables, vgg_variables, "the converted VGG-16", subset=True)
    given = dict(jax.tree_util.tree_flatten_with_path(vgg_variables)[0])

    def pick(path: Any, leaf: Any) -> np.ndarray:
        new = given.get(path)
        return np.asarray(leaf if new is None else new, dtype=leaf.dtype)

    return {
        c: jax.tree_util.tree_map_with_path(
            lambda p, x, c=c: pick((jax.tree_util.DictKey(c), *p), x), variables[c]
        )
        for c in variables
    }


def publish_folder(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move the finished folder `staged` to `target` (same file system); an earlier folder at
    `target` is removed only after the new one is in place."""
    if not os.path.lexists(target):
        os.replace(staged, target)
        return
    parent = os.path.dirname(os.path.abspath(target))
    old = tempfile.mkdtemp(dir=parent, prefix=".replaced-")
    os.replace(target, os.path.join(old, "previous"))
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def check_conversion_target(directory: str | os.PathLike[str]) -> None:
    """Refuse (`CheckpointError`) an output DIR that exists and is neither an empty folder nor
    an earlier conversion (DIR/conversion.json): `save_variables` replaces it whole."""
    p = Path(directory)
    if not os.path.lexists(p):
        return
    if not p.is_dir() or p.is_symlink():
        raise CheckpointError(f"output {str(directory)!r} exists and is not a folder")
    if any(p.iterdir()) and not (p / METADATA_FILE).is_file():
        raise CheckpointError(
            f"output {str(directory)!r} holds files but no converted checkpoint "
            f"({METADATA_FILE}); not replacing it (choose another folder)"
        )


def save_variables(
    variables: Mapping[str, Any],
    directory: str | os.PathLike[str],
    metadata: Mapping[str, Any],
) -> Path:
    """Write `variables` as the orbax item DIR plus DIR/conversion.json; returns DIR.

    Written beside DIR and moved there when complete, so a failure leaves an earlier
    conversion at DIR as it was; a DIR holding anything else is refused
    (`check_conversion_target`).
    """
    check_conversion_target(directory)
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tree = {
        "params": variables.get("params", {}),
        "batch_stats": variables.get("batch_stats", {}),
    }
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        item = staging / "item"
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(item, tree)
        ckpt.wait_until_finished()
        (item / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True))
        publish_folder(item, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


# ------------------------------------------------------------------ one training per workdir
LOCK_FILE = ".train.lock"


class WorkdirLock:
    """An exclusive `flock` on `WORKDIR/.train.lock`, held by the training that writes the
    workdir until `release()` (or until its process ends, however it ends: a killed run leaves
    no stale lock). A second training on the same workdir is refused with a `ConfigError`
    naming the holder (pid, host, start time, which the holder writes into the file). A file
    system without `flock` gets a warning and no lock (docs/design.md, one training per
    workdir)."""

    def __init__(self, workdir: str | os.PathLike[str]):
        import datetime
        import fcntl
        import socket

        self.path = Path(workdir).resolve() / LOCK_FILE
        self._file: Any = open(self.path, "a+")  # noqa: SIM115 (held open while training)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self.release()
            raise config_lib.ConfigError(
                "--workdir",
                f"{self.path.parent} is in use by another training ({holder}); wait for it "
                "to end or use another --workdir",
            ) from e
        except OSError as e:  # no locks on this file system (ENOLCK, EOPNOTSUPP, ...)
            log.warning(
                "%s: file locks are not supported here (%s); nothing stops a second training "
                "from writing this workdir at the same time",
                self.path,
                e.strerror or e,
            )
        self._file.seek(0)
        self._file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        self._file.flush()

    def release(self) -> None:
        """Close the file, which drops the lock (the file stays: removing it would race)."""
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------ the workdir's config
def saved_config_path(path: str | os.PathLike[str]) -> Path:
    """`WORKDIR/config.json` of a workdir (or of the workdir above a checkpoints directory)."""
    found = step_dir(path)
    p = found[0] if found else Path(path).resolve()
    if p.name in (CHECKPOINT_DIR, BEST_DIR) and not (p / CONFIG_FILE).exists():
        p = p.parent
    return p / CONFIG_FILE


def read_config(path: str | os.PathLike[str]) -> Any:
    """The config saved in a workdir (`ConfigDict`), or None when it has none."""
    import ml_collections

    file = saved_config_path(path)
    if not file.is_file():
        return None
    try:
        return ml_collections.ConfigDict(json.loads(file.read_text()))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable config: {_first_line(e)}") from e


def named_os_error(error: OSError, path: str | os.PathLike[str], doing: str = "") -> OSError:
    """`error` (disk full, file too large, ...) as an `OSError` naming `path` and, in
    parentheses, what was being written: one line through the CLIs (`cli.call`)."""
    why = f"{error.strerror or error}" + (f" ({doing})" if doing else "")
    return OSError(error.errno, why, os.fspath(path))


def write_text_atomic(path: str | os.PathLike[str], text: str, doing: str = "") -> None:
    """Write `text` to `path` through a temporary file beside it, renamed into place: a failed
    write leaves the earlier file as it was and no temporary file; it raises
    `named_os_error(..., path, doing)`."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise named_os_error(e, path, doing) from e


def write_config(workdir: str | os.PathLike[str], config: Any) -> Path:
    """Write the resolved `config` to `WORKDIR/config.json` (indented, sorted; atomic), its
    paths absolute (`config.absolute_paths`): resume and evaluate may run from another folder."""
    file = saved_config_path(workdir)
    tree = config_lib.absolute_paths(config.to_dict())
    text = json.dumps(tree, indent=2, sort_keys=True, default=list) + "\n"
    write_text_atomic(file, text, "writing the run's config")
    return file


def check_saved_config(path: str | os.PathLike[str], config: Any, purpose: str) -> Any:
    """Raise `ConfigError` when `config` conflicts with the config saved in the workdir `path`
    (`config.conflicting_keys`); returns the saved config (None when there is none)."""
    saved = read_config(path)
    if saved is None:
        return None
    keys = config_lib.conflicting_keys(saved, config, purpose)
    if keys:
        raise config_lib.ConfigError(
            keys[0],
            config_lib.describe_conflict(keys, saved, config, str(saved_config_path(path)))
            + (
                "; use another --workdir for a different run"
                if purpose == "resume"
                else "; the checkpoint was trained with the saved values"
            ),
        )
    return saved
