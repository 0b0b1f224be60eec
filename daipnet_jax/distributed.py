"""Multi-process flags and the `jax.distributed` call of train.py and evaluate.py.

`--coordinator_address HOST:PORT --num_processes N --process_id I`, or `--distributed` to let
`jax.distributed.initialize()` read the environment (SLURM, Cloud TPU, Open MPI, ...).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import flags


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    coordinator_address: flags.FlagHolder[str | None]
    num_processes: flags.FlagHolder[int | None]
    process_id: flags.FlagHolder[int | None]
    local_device_ids: flags.FlagHolder[str | None]
    distributed: flags.FlagHolder[bool]

    def requested(self) -> bool:
        """Whether this run is one of several processes (flags or `JAX_COORDINATOR_ADDRESS`)."""
        return bool(
            self.coordinator_address.value
            or self.num_processes.value is not None
            or self.distributed.value
            or os.environ.get("JAX_COORDINATOR_ADDRESS")
        )

    def initialize(self) -> bool:
        """`jax.distributed.initialize` when `requested()`, before any JAX call; whether called."""
        if not self.requested():
            return False
        import jax

        kwargs: dict[str, Any] = {}
        if self.coordinator_address.value:
            kwargs["coordinator_address"] = self.coordinator_address.value
        if self.num_processes.value is not None:
            kwargs["num_processes"] = self.num_processes.value
        if self.process_id.value is not None:
            kwargs["process_id"] = self.process_id.value
        if self.local_device_ids.value:
            kwargs["local_device_ids"] = [int(i) for i in self.local_device_ids.value.split(",")]
        jax.distributed.initialize(**kwargs)
        return True


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> DistributedFlags:
    return DistributedFlags(
        coordinator_address=flags.DEFINE_string(
            "coordinator_address",
            None,
            "multi-process: HOST:PORT of process 0",
            flag_values=flag_values,
        ),
        num_processes=flags.DEFINE_integer(
            "num_processes", None, "multi-process: number of processes", flag_values=flag_values
        ),
        process_id=flags.DEFINE_integer(
            "process_id", None, "multi-process: this process's index", flag_values=flag_values
        ),
        local_device_ids=flags.DEFINE_string(
            "local_device_ids",
            None,
            "multi-process: comma-separated local device ids of this process",
            flag_values=flag_values,
        ),
        distributed=flags.DEFINE_bool(
            "distributed",
            False,
            "call jax.distributed.initialize() with the environment's settings",
            flag_values=flag_values,
        ),
    )
