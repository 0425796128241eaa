"""The interface every training objective implements.

An objective turns one rank's batch of L2-normalised image and text features into that rank's loss. Contract:

- ``forward`` returns this rank's loss. The trainer calls ``backward()`` on it and DDP averages parameter gradients
  over ranks; the result must equal the gradient of one process holding the whole global batch (tested for world
  sizes 1, 2 and 4). Logits are computed in fp32 even under autocast. It is ``prepare`` (no gradients, the step's
  state updates, once per step) followed by ``loss`` (gradients, no state changes), so that gradient accumulation
  can evaluate ``loss`` once per micro-batch with the same prepared state (``train/accumulation.py``).
- ``logit_scale`` is the model's *exponentiated* scale s = exp(theta) (open_clip's forward output), so the learned
  temperature lives in the model and is exported with it. ``logit_bias`` likewise (SigLIP).
- ``indices`` are the samples' dense dataset indices (0..N-1, from preprocess); objectives with per-sample state
  (FastCLIP) need them, the others ignore them.
- State that must survive a checkpoint (u tables, lambda networks, their optimizers, schedules' positions) is in
  ``state_dict()``; restoring it continues bit-for-bit.
- ``param_groups`` returns the optimizer groups the objective claims (e.g. the temperature with its own learning rate
  and no weight decay); the trainer puts every other parameter in its default groups.
- ``on_epoch_start`` is the schedules' hook; ``optimizer_step`` runs the trainer's optimizer step with the
  objective's temperature rules around it (the trainer calls it instead of ``optimizer.step()``).
- Nothing in ``forward`` or the hooks reads a device value on the host (``.item()``, ``float(tensor)``, ``.cpu()``,
  ``if tensor``): on a GPU each such read waits for every queued kernel (tests/test_host_syncs.py checks it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from components.train.distributed import World

MAX_LOGIT_SCALE = math.log(100.0)  # s <= 100, i.e. tau >= 0.01, after every step (OpenCLIP, FastCLIP, AmorLIP)


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective needs to know about the run beyond its own settings."""

    world: World = field(default_factory=World)
    dataset_size: int = 0  # N: dense indices run over 0..N-1
    embed_dim: int = 0
    total_epochs: int = 1  # per-epoch schedules (AmorLIP's rho blocks) are laid out over this many epochs
    seed: int = 0  # every rank derives the same random initialisations (lambda networks) from it
    optimizer_betas: tuple[float, float] = (0.9, 0.95)  # the model optimizer's, reused by per-sample Adam (FastCLIP v2)
    optimizer_eps: float = 1e-6
    device: str = "cpu"  # the training device: per-sample tables live there on CUDA
    run_id: str = "local"  # names node-shared memory so concurrent runs on one node never collide


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # this rank's loss, with grad
    # Figures for the logs: detached tensors (or Python numbers), read on the host only at log steps: an .item() here
    # would make the host wait for the GPU every step.
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Objective(nn.Module):
    name: str = ""
    temperature_lr_rule = False  # True: the temperature's lr follows step_thresh_lr

    def __init__(self, context: ObjectiveContext):
        super().__init__()
        self.context = context
        self.world = context.world

    def init_model(self, model: nn.Module) -> None:
        """Set the model's temperature (and bias) to this objective's initial values; freeze them if constant."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """This rank's loss on one batch: ``prepare`` on the detached features, then ``loss``."""
        prepared = self.prepare(image_features.detach(), text_features.detach(), logit_scale.detach(),
                                None if logit_bias is None else logit_bias.detach(), indices)
        return self.loss(image_features, text_features, logit_scale, logit_bias, indices, prepared)

    def prepare(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None, indices: torch.Tensor | None) -> Any:
        """The step's part without gradients, once per optimizer step on the whole (per-rank) batch's detached
        features: per-sample state read and updated (FastCLIP's u), inner fits (AmorLIP's lambda networks).
        Returns what ``loss`` needs from it. Gradient accumulation calls it once and ``loss`` once per micro-batch."""
        return None

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
             logit_bias: torch.Tensor | None, indices: torch.Tensor | None, prepared: Any) -> ObjectiveOutput:
        """The loss of the whole batch with gradients: a function of its inputs and ``prepared`` only (no state
        changes), so that evaluating it again with another micro-batch's features live gives that micro-batch's part
        of the gradient."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Optimizer groups this objective owns: dicts with "params", "lr", "weight_decay", a "name" and "managed".

        ``managed=True`` means the objective steers that group's lr itself (``optimizer_step``), so the
        trainer's warmup/cosine schedule must leave it alone; ``managed=False`` groups follow the trainer's schedule
        scaled from the lr given here."""
        return []

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of every epoch (0-based)."""

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step with this objective's temperature rules: FastCLIP-v3's and AmorLIP's lr rule
        (``step_thresh_lr``) around it, then the clamp s <= 100."""
        with step_thresh_lr(model) if self.temperature_lr_rule else contextlib.nullcontext():
            optimizer.step()
        clamp_logit_scale(model)


def clamp_logit_scale(model: nn.Module) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


TEMPERATURE_GROUP = "temperature"  # the optimizer group of the model's logit scale, when an objective claims it

# FastCLIP-v3's and AmorLIP's "step_thresh" rule: the temperature's lr drops to a third once tau <= this.
TAU_THRESHOLD = 0.03


@contextlib.contextmanager
def step_thresh_lr(model: nn.Module) -> Iterator[None]:
    """Around an optimizer step: the temperature's lr is lr_tau while tau > TAU_THRESHOLD and lr_tau / 3 from then on,
    checked before every step as both references do (docs/objectives.md).

    Reading tau on the host to set the group's lr would stall the GPU every step, so the group keeps lr_tau and this
    scales the temperature's *step* instead: AdamW's and LAMB's update of a parameter is lr times a direction that
    does not depend on lr (decoupled weight decay included), so theta_before + f * (theta_after - theta_before) with
    f = 1 or 1/3 is the step at lr_tau * f. f is computed on the device from theta_before."""
    before = model.logit_scale.detach().clone()
    yield
    with torch.no_grad():
        factor = torch.where(torch.exp(-before) > TAU_THRESHOLD, 1.0, 1.0 / 3.0)
        model.logit_scale.copy_(before + factor * (model.logit_scale - before))


@contextlib.contextmanager
def fp32_logits(device: torch.device) -> Iterator[None]:
    """Compute logits in fp32 even inside an autocast region: at s = 100, bf16 rounding alone moves a logit by ~0.4.

    Cast the features with ``.float()`` inside the block."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
