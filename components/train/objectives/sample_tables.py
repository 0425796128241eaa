"""Per-sample state tables (FastCLIP's u, v2's temperatures and their Adam moments).

The tables hold a few float32 numbers per dataset sample, i.e. gigabytes at LAION scale. On CUDA each rank keeps a
copy in GPU memory, so that a step reads and writes them with kernels instead of waiting for a device-to-host copy.
On CPU, replicating them per process would cost ``ranks_per_node`` copies, so the node's ranks share one copy in
memory: local rank 0 creates a file in /dev/shm, the others map it, and local rank 0 unlinks it once everyone has
mapped it. The mappings stay valid after the unlink and the memory is freed when the last process of the node exits,
so nothing is left behind even if a process dies.

Consistency without locks (see ``read`` and ``write``): each step every rank reads only its own samples' rows, after
the step's feature all_gather; the new values of the whole global batch are all-gathered and then written (in a
shared table each position by one local rank; the copies of a duplicated index all carry the same values). A rank
enters the next step's all_gather only after finishing its writes, so every read sees every write of the previous
steps, and a step's writes come after that step's reads (the all_gather of the new values separates them).
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


def last_positions(indices: torch.Tensor) -> torch.Tensor:
    """For every position, the last position holding the same index: duplicates then resolve the same on any world
    size. Sort-based and of fixed size, so it runs on the GPU without a host sync (``torch.unique`` would need one)."""
    n = len(indices)
    order = torch.sort(indices, stable=True).indices  # positions grouped by index, each group in position order
    ordered = indices[order]
    group_end = torch.ones(n, dtype=torch.bool, device=indices.device)
    group_end[:-1] = ordered[1:] != ordered[:-1]
    slots = torch.arange(n, device=indices.device)
    # Each slot's group ends at the first group-end slot at or after it: a reversed running minimum.
    end_slot = torch.where(group_end, slots, n).flip(0).cummin(0).values.flip(0)
    last = torch.empty_like(order)
    last[order] = order[end_slot]
    return last


class SampleTables:
    """An (N x columns) float32 table; row i belongs to dataset index i.

    Training on CUDA, every rank holds its own copy in GPU memory (N x columns x 4 bytes, e.g. 3.2 GB for FastCLIP-v3
    at 400M samples): reads and writes are then GPU kernels, where a host table would cost a device-to-host copy,
    i.e. a wait for the GPU, every step. On CPU the ranks of a node share one copy in /dev/shm."""

    def __init__(self, columns: dict[str, float], num_samples: int, world: World, name: str,
                 device: str | torch.device = "cpu"):
        """``columns`` maps each column's name to its initial value. ``name`` must be unique per run and node."""
        if num_samples < 1:
            raise ValueError("per-sample tables need the dataset size (ObjectiveContext.dataset_size)")
        self.columns = tuple(columns)
        self.world = world
        shape = (num_samples, len(columns))
        device = torch.device(device)
        self.shared = device.type == "cpu" and world.local_size > 1
        if not self.shared:
            self.path = None
            self.data = torch.empty(shape, device=device)
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
        return self.data[indices.to(self.data.device)]

    def write(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Store the global batch's rows; every rank passes the same ``indices`` (G) and ``values`` (G x columns).

        The last occurrence of a duplicated index wins: every copy of it writes that occurrence's values. In a shared
        table each local rank writes every local_size-th position (they share the memory); a copy per rank takes
        them all."""
        indices, values = indices.to(self.data.device), values.to(self.data.device)
        values = values[last_positions(indices)]
        if self.shared:
            indices = indices[self.world.local_rank :: self.world.local_size]
            values = values[self.world.local_rank :: self.world.local_size]
        self.data[indices] = values

    def state(self) -> dict[str, torch.Tensor]:
        """Every column by name: views of the table, no copy (torch.save stores the shared storage once)."""
        return {name: self.data[:, k] for k, name in enumerate(self.columns)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a ``state()`` back in. Every rank calls it (load_state_dict on every rank); in a shared table each
        copies its share of the node's rows, and the next step's all_gather orders these writes before any read."""
        n = self.data.shape[0]
        ranks, rank = (self.world.local_size, self.world.local_rank) if self.shared else (1, 0)
        rows = slice(rank * n // ranks, (rank + 1) * n // ranks)
        for k, name in enumerate(self.columns):
            self.data[rows, k] = state[name][rows].to(self.data.device)
