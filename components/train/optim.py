"""The optimizer and the learning-rate schedule of one stage.

Parameter groups: the objective claims its own (the temperature, usually with its own lr and no weight decay); the
rest of the model splits into "decay" (weight matrices) and "no_decay" (biases, norms, embeddings' scalars, 1-d
parameters), as open_clip_train does. Groups marked ``managed`` are the objective's to steer (FastCLIP v3's and
AmorLIP's temperature lr); every other group follows ``lr_at``: linear warmup, then cosine to zero (CLIPA's
schedule), each group scaled from its own peak lr. The schedule is a pure function of the step, so a checkpoint only
needs the step to restore it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from components.common.recipe import OptimizerSpec
from components.train.objectives import Objective

PEAK_LR = "peak_lr"  # each group's lr at the end of warmup, kept in the group itself


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name or "logit_" in name


def param_groups(model: nn.Module, objective: Objective, lr: float, weight_decay: float) -> list[dict]:
    claimed = objective.param_groups(model, lr)
    claimed_ids = {id(p) for g in claimed for p in g["params"]}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in claimed_ids:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay", "managed": False},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay", "managed": False},
        *claimed,
    ]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group[PEAK_LR] = group["lr"]
    return groups


def build_optimizer(model: nn.Module, objective: Objective, lr: float, spec: OptimizerSpec) -> torch.optim.Optimizer:
    groups = param_groups(model, objective, lr, spec.weight_decay)
    if spec.name == "adamw":
        # On CUDA the fused kernel: one launch for every parameter instead of a loop over them (and no host read
        # of the step count, which the default CPU implementation does).
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=spec.betas, eps=spec.eps, fused=fused or None)
    if spec.name == "lamb":
        from timm.optim import Lamb  # open_clip's own dependency; torch has no LAMB

        return Lamb(groups, lr=lr, betas=spec.betas, eps=spec.eps)
    raise ValueError(f"optimizer.name: unknown optimizer {spec.name!r}")


def schedule_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The fraction of the peak lr at ``step`` (0-based): linear warmup to 1, then a cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Apply the schedule to the unmanaged groups; returns the first unmanaged group's lr (for the logs)."""
    shown = None
    for group in optimizer.param_groups:
        if not group.get("managed", False):
            group["lr"] = group[PEAK_LR] * factor
            shown = group["lr"] if shown is None else shown
    return 0.0 if shown is None else shown
