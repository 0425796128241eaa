"""Every torch.distributed detail the objectives need, in one place. All of it also works without a process group
(world size 1), so the same code runs in a single process, under torchrun with gloo on CPU, and with NCCL on GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank within this node
    local_size: int = 1  # ranks on this node

    @classmethod
    def current(cls) -> "World":
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        size = dist.get_world_size()
        # torchrun sets LOCAL_RANK / LOCAL_WORLD_SIZE; without them every rank is taken to be on its own node.
        return cls(
            rank=dist.get_rank(),
            size=size,
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            local_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        )

    @property
    def node(self) -> int:
        return self.rank // self.local_size


def _gather(t: torch.Tensor, world: World) -> list[torch.Tensor]:
    chunks = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(chunks, t.contiguous())
    return chunks


def all_gather_nograd(t: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order, without autograd."""
    if world.size == 1:
        return t.detach()
    with torch.no_grad():
        return torch.cat(_gather(t.detach(), world))


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, world: World) -> torch.Tensor:
        ctx.world, ctx.rows = world, t.shape[0]
        return torch.cat(_gather(t, world))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank holds gradients for all gathered rows; each rank needs the sum over ranks of its own rows.
        world, rows = ctx.world, ctx.rows
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out, None
        dist.all_reduce(grad)
        return grad[world.rank * rows : (world.rank + 1) * rows], None


def all_gather_with_grad(t: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0; gradients flow back to each rank's own rows (summed over ranks)."""
    if world.size == 1:
        return t
    return _AllGatherWithGrad.apply(t, world)


def all_reduce_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean over ranks of a (detached) tensor."""
    if world.size == 1:
        return t.detach()
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / world.size


def barrier(world: World) -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if world.size > 1:
        dist.barrier()
