"""Orbax checkpoints of training, and `load_variables` for evaluation and prediction (item 5).

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`; `state` holds the whole `TrainState`
(params, batch stats, optimiser state, step, RNG key, NaN-guard record), `meta` a JSON with the
data position (number of training batches consumed, so a resumed run skips exactly those), the
step and the config. Saves are atomic (orbax writes to a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint as the latest);
`max_to_keep` = `train.keep_checkpoints`.

Public:
- `Checkpointer(directory, keep)`: `.save(step, state, meta)`, `.latest_step()`,
  `.restore(abstract_state, step=None) -> (state, meta)`, `.wait()`, `.close()`.
- `load_variables(workdir, step=None) -> {'params', 'batch_stats'}` (host numpy arrays) from the
  latest (or the given) checkpoint of `WORKDIR/checkpoints`, for `evaluate.py`; `workdir` may also
  be the `checkpoints` directory itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from daipnet_jax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike[str]) -> Path:
    """`WORKDIR/checkpoints` (or `workdir` itself when it is already a checkpoints directory)."""
    path = Path(workdir).resolve()
    if path.name == CHECKPOINT_DIR or (
        not (path / CHECKPOINT_DIR).exists() and any(p.name.isdigit() for p in path.glob("*"))
    ):
        return path
    return path / CHECKPOINT_DIR


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with items `state` (pytree) and `meta` (JSON)."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3, *, create: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=create)
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Start an (asynchronous) save; device buffers are copied before this returns."""
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) of a pytree of arrays."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def load_variables(workdir: str | os.PathLike[str], step: int | None = None) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of a training checkpoint as host numpy arrays.

    workdir: the training `--workdir` (or its `checkpoints` subdirectory); step: a saved step,
    default the latest. Independent of how many devices wrote it. Raises FileNotFoundError when
    there is no checkpoint.
    """
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False),
    )
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        tree = manager.item_metadata(step)["state"].tree
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            tree,
            is_leaf=lambda x: isinstance(x, ocp.metadata.value.Metadata),
        )
        out = manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=restore_args)),
        )
    finally:
        manager.close()
    state = out["state"]
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
