"""Per-sample state tables (FastCLIP's u, v2's temperatures and their Adam moments): one copy per node.

The tables hold a few float32 numbers per dataset sample, i.e. gigabytes at LAION scale, and every rank of a node
needs the same values. Replicating them per process would cost ``ranks_per_node`` copies, so the node's ranks share
one copy in memory: local rank 0 creates a file in /dev/shm, the others map it, and local rank 0 unlinks it once
everyone has mapped it. The mappings stay valid after the unlink and the memory is freed when the last process of
the node exits, so nothing is left behind even if a process dies.

Consistency without locks (see ``read`` and ``write``): each step every rank reads only its own samples' rows, after
the step's feature all_gather; the new values of the whole global batch are all-gathered and then written, each row
by exactly one local rank. A rank enters the next step's all_gather only after finishing its writes, so every read
sees every write of the previous steps, and a step's writes come after that step's reads (the all_gather of the new
values separates them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from components.train.distributed import World, barrier

SHM_DIR = Path("/dev/shm")
BYTES_PER_VALUE = 4  # float32


def node_table_bytes(columns: int, num_samples: int, ranks_per_node: int, shared: bool = True) -> int:
    """Memory of the tables on one node: one shared copy, or one copy per rank when replicated."""
    return columns * BYTES_PER_VALUE * num_samples * (1 if shared else ranks_per_node)


def last_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of every distinct index, so duplicates resolve the same on any world size."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(len(indices), device=indices.device)
    return torch.full((len(unique),), -1, device=indices.device).scatter_reduce_(0, inverse, positions, "amax")


class SampleTables:
    """An (N x columns) float32 CPU table shared by the ranks of a node; row i belongs to dataset index i."""

    def __init__(self, columns: dict[str, float], num_samples: int, world: World, name: str):
        """``columns`` maps each column's name to its initial value. ``name`` must be unique per run and node."""
        if num_samples < 1:
            raise ValueError("per-sample tables need the dataset size (ObjectiveContext.dataset_size)")
        self.columns = tuple(columns)
        self.world = world
        shape = (num_samples, len(columns))
        if world.local_size == 1:
            self.path = None
            self.data = torch.empty(shape)
            self.data[:] = torch.tensor(list(columns.values()))
            return
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        self.path = SHM_DIR / f"clipline-{safe}-node{world.node}.f32"
        if world.local_rank == 0:
            self.path.unlink(missing_ok=True)  # a stale file of a crashed run with this name must not be reused
            self.data = torch.from_file(str(self.path), shared=True, size=shape[0] * shape[1]).view(shape)
            self.data[:] = torch.tensor(list(columns.values()))
        barrier(world)  # the file exists and is initialised
        if world.local_rank != 0:
            self.data = torch.from_file(str(self.path), shared=True, size=shape[0] * shape[1]).view(shape)
        barrier(world)  # every local rank has mapped it
        if world.local_rank == 0:
            os.unlink(self.path)

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows of ``indices`` (B x columns), a copy.

        Call only after the step's first collective: the other ranks' writes of earlier steps are then visible."""
        return self.data[indices.cpu()]

    def write(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Store the global batch's rows; every rank passes the same ``indices`` (G) and ``values`` (G x columns).

        The last occurrence of a duplicated index wins. Each row is written by one local rank only (the node's
        writes are split between its ranks), which is enough because they share the memory."""
        indices, values = indices.cpu(), values.cpu()
        mine = last_occurrences(indices)[self.world.local_rank :: self.world.local_size]
        self.data[indices[mine]] = values[mine]

    def state(self) -> dict[str, torch.Tensor]:
        """Every column by name: views of the table, no copy (torch.save stores the shared storage once)."""
        return {name: self.data[:, k] for k, name in enumerate(self.columns)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a ``state()`` back in. Every rank calls it (load_state_dict on every rank) and copies its share of the
        node's rows; the next step's all_gather orders these writes before any read."""
        n, ranks = self.data.shape[0], self.world.local_size
        rows = slice(self.world.local_rank * n // ranks, (self.world.local_rank + 1) * n // ranks)
        for k, name in enumerate(self.columns):
            self.data[rows, k] = state[name][rows]
