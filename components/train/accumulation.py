"""The gradients of one optimizer step, the per-rank batch split into micro-batches when the recipe asks for it.

``grad_accumulation: k`` lets a global batch that does not fit in memory train as if it did, with every objective
(open_clip_train's ``--accum-freq`` idea, made exact for objectives with state):

1. every micro-batch is run forward without gradients and its features are kept (B x embed_dim per modality: small;
   activations are what does not fit);
2. ``objective.prepare`` runs once on the whole batch's features: FastCLIP's u update and AmorLIP's lambda fit see
   the whole batch, exactly as without accumulation, and happen once per step;
3. per micro-batch j: forward again with gradients, the whole batch's features with j's live in place of its cached
   ones, ``objective.loss`` with the prepared state, backward. The loss is a function of all the features, so the
   sum over j of these backward passes is the gradient of one pass over the whole batch. The logit scale and bias
   take part with gradients in the last pass only: otherwise theirs would count k times (as it does in
   open_clip_train), and DDP, which reduces in the last pass, needs every parameter's gradient there.

Pass j's features must equal the cached ones: the random streams the model draws from (image token masks) are
replayed from their state before the cached pass, and left where the cached passes left them. DDP reduces the
gradients once, in the last backward (``no_sync`` before it). Cost: k forwards more than one big batch, as in
open_clip_train. tests/test_accumulation.py checks the equivalence with one big batch for every objective.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from components.train.objectives import Objective, ObjectiveOutput

Forward = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def gradients(forward: Forward, objective: Objective, images: torch.Tensor, texts: torch.Tensor,
              indices: torch.Tensor, *, micro_batches: int = 1, autocast: ContextManager | None = None,
              no_sync: Callable[[], ContextManager] = contextlib.nullcontext) -> ObjectiveOutput:
    """Backward of the objective's loss on this rank's batch into the parameters' ``.grad``; returns the loss."""
    autocast = autocast or contextlib.nullcontext()
    if micro_batches == 1:
        with autocast:
            out = forward(images, texts)
        result = objective(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"),
                           indices)
        result.loss.backward()
        return result
    if len(images) % micro_batches:
        raise ValueError(f"a batch of {len(images)} does not split into {micro_batches} equal micro-batches")
    chunks = list(zip(images.chunk(micro_batches), texts.chunk(micro_batches)))
    streams, cached = [], []
    with torch.no_grad():
        for chunk_images, chunk_texts in chunks:
            streams.append(_rng_state(images.device))
            with autocast:
                cached.append(forward(chunk_images, chunk_texts))
    after = _rng_state(images.device)
    image_cache = [out["image_features"] for out in cached]
    text_cache = [out["text_features"] for out in cached]
    bias = cached[0].get("logit_bias")
    prepared = objective.prepare(torch.cat(image_cache), torch.cat(text_cache), cached[0]["logit_scale"], bias,
                                 indices)
    for j, (chunk_images, chunk_texts) in enumerate(chunks):
        _set_rng_state(streams[j], images.device)
        last = j == micro_batches - 1
        with contextlib.nullcontext() if last else no_sync():
            with autocast:
                out = forward(chunk_images, chunk_texts)
            scale, bias = out["logit_scale"], out.get("logit_bias")
            if not last:
                scale, bias = scale.detach(), None if bias is None else bias.detach()
            result = objective.loss(torch.cat([*image_cache[:j], out["image_features"], *image_cache[j + 1:]]),
                                    torch.cat([*text_cache[:j], out["text_features"], *text_cache[j + 1:]]),
                                    scale, bias, indices, prepared)
            result.loss.backward()
    _set_rng_state(after, images.device)
    return result


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Host-side generator states (a CUDA generator's is its seed and offset): reading them waits for nothing.
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
