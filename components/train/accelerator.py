"""What the training device changes, in one place: precision, TF32, torch.compile, and batches moved ahead.

A recipe leaves ``precision`` and ``compile`` at ``auto`` unless it has a reason: on CUDA that is bf16 autocast
(the objectives compute their logits in fp32 regardless, ``objectives.base.fp32_logits``), TF32 for the matmuls
that stay in fp32, and a compiled model; on a CPU it is fp32 and eager (bf16 is emulated and slow on most CPUs,
and compiling a short CPU run costs more than it saves). The optimizer's fused CUDA kernel is chosen in ``optim``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import ContextManager, Iterable, Iterator

import torch

from components.common.recipe import Recipe
from components.train.data import Batch


def configure(device: torch.device) -> None:
    """Process-wide settings for ``device``: fp32 matmuls and convolutions may use TF32 on CUDA (Ampere and later),
    which keeps 10 mantissa bits in the products and fp32 accumulation, as open_clip_train and torchtitan do."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def precision(recipe: Recipe, device: torch.device) -> str:
    """The recipe's precision with ``auto`` resolved: amp_bf16 on a GPU that has bf16, fp32 otherwise."""
    if recipe.precision != "auto":
        return recipe.precision
    return "amp_bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(recipe: Recipe, device: torch.device) -> ContextManager:
    return precision_autocast(precision(recipe, device), device)


def precision_autocast(resolved: str, device: torch.device) -> ContextManager:
    """The autocast context of a resolved precision (``amp_bf16`` or ``fp32``): the recipe's, or a benchmark's."""
    if resolved == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiles(recipe: Recipe, device: torch.device) -> bool:
    return device.type == "cuda" if recipe.compile == "auto" else recipe.compile


def on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """The batches with their tensors on ``device``. On CUDA the copy of batch i+1 (from the loader's pinned memory)
    runs on a side stream while step i computes, so a step never waits for its input; on a CPU they pass through."""
    if device.type != "cuda":
        yield from batches
        return
    copies = torch.cuda.Stream(device)

    def start(batch: Batch) -> tuple[Batch, torch.cuda.Event]:
        with torch.cuda.stream(copies):
            moved = replace(batch, images=batch.images.to(device, non_blocking=True),
                            texts=batch.texts.to(device, non_blocking=True),
                            indices=batch.indices.to(device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(copies)
        return moved, done

    def ready(moved: Batch, copied: torch.cuda.Event) -> Batch:
        compute = torch.cuda.current_stream(device)
        compute.wait_event(copied)
        for tensor in (moved.images, moved.texts, moved.indices):
            tensor.record_stream(compute)  # the allocator must not reuse their memory while compute reads it
        return moved

    pending = None
    for batch in batches:
        started = start(batch)
        if pending is not None:
            yield ready(*pending)
        pending = started
    if pending is not None:
        yield ready(*pending)
