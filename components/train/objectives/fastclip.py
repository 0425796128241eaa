"""FastCLIP (Wei et al. 2024, arXiv:2407.01445): contrastive learning with per-sample moving-average estimators.

Every sample i has two inner functions over the whole dataset (image and text anchor),
g1(i) = mean_{j != i} exp((a_ij - a_ii) / tau), and g2 likewise with the roles swapped, where a_ij = x_i . y_j.
The global contrastive loss GCL = tau/n sum_i [log(eps + g1(i)) + log(eps + g2(i))] is optimised with FCCO: a
per-sample table u tracks g, u_i <- (1 - gamma) u_i + gamma ghat_i with ghat the mini-batch estimate over the global
batch (positive excluded), and the encoder follows the gradient of ghat_i / (u_i + eps) with the *updated* u.

Versions (docs/objectives.md A.2, A.3):
    v0  GCL, one learnable temperature: theta = model.logit_scale in its own group, trainer's cosine schedule.
    v1  GCL, constant temperature: theta frozen at ln(1 / temperature_init).
    v2  RGCL, a learnable temperature per sample and modality, updated here by a per-sample Adam; theta unused.
    v3  RGCL-g: L / sg(s) + rho / s + 0.5 mean(log u1 + log u2) / s; theta with lr_tau, divided by 3 once
        tau <= 0.03 (checked every step), no warmup.
    SogCLR / iSogCLR are v1 / v2 with gamma_schedule "constant".
gamma is 1 in epoch 0 (u = ghat on the first visit), then follows a cosine down to gamma_min over
gamma_decay_epochs, or is gamma_min at once ("constant").

Distributed pattern (A.3, A.6): features, the updated u and the indices are all-gathered WITHOUT autograd; there is
no reduce_scatter of feature gradients. Rank k builds L_k = 1/2 [anchor side + negative side]:
    anchor side    its B anchors against the G gathered (detached) features; gradient into x_i, y_i via a_ii only;
    negative side  all G anchors (detached) against its B local negatives; gradient into the local y_j / x_j only,
                   weighted G / (B (G - 1)) so that DDP's mean over ranks completes the sum over negatives.
Averaged over ranks, the encoder gradient is 1/2 (1/G) sum_i [grad ghat1(i) / (u1_i + eps) + grad ghat2(i) / (u2_i +
eps)] (times tau in v3), the same for every world size.

Temperature gradient, code vs paper (``tau_gradient``):
    v3 "code" (default)  both sides carry the full dependence on s, so DDP's mean gives
                         tau dV/dtau + 0.5 mean(log u1 + log u2) + rho, with V = (1/G) sum_i (ghat1/u1 + ghat2/u2):
                         twice the V term of d/dtau (RGCL-g / 2). The published rho and lr_tau were tuned with it.
    v3 "paper"           s is detached in the negative side: (tau/2) dV/dtau + 0.5 mean(log u1 + log u2) + rho.
    v2 "code" (default)  each anchor's surrogate is not multiplied by its tau_i: the encoder weights anchor i by
                         1/tau_i relative to the RGCL gradient.
    v2 "paper"           each anchor's surrogate is multiplied by its own tau_i (the RGCL gradient).
    v0 / v1 have no such choice: v0's theta follows the autograd gradient of the surrogate, as OpenCLIP's does.

Numerics (A.8 item 2): u is stored as log u and averaged with logaddexp, so it neither overflows nor underflows.
Ratios are exp(logit - log(G - 1) - log(u + eps)) per negative, each at most G / (B gamma) because the updated u is
at least gamma ghat: nothing overflows at s = 100 even when negatives beat the positive. Positives are masked with
-inf before exp (exp(-inf) = 0, zero gradient). Log space makes v2's running bound b of the reference unnecessary
(its eps then applies to u rather than to u e^-b). v3's log u term has no eps, as in the reference; in log space it
stays finite. Logits are fp32 under autocast. Duplicated indices in a global batch: every occurrence reads the same
old row and uses its own update; the last occurrence in global batch order is stored, whatever the world size.

State: the tables live on CPU, one copy per node (sample_tables.py); ``state_dict()`` holds them with the epoch
and gamma and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from components.common.recipe import FastClipSettings
from components.train.distributed import all_gather_nograd
from components.train.objectives.base import (
    TEMPERATURE_GROUP,
    Objective,
    ObjectiveContext,
    ObjectiveOutput,
    fp32_logits,
)
from components.train.objectives.sample_tables import SampleTables, node_table_bytes

TAU_MIN, TAU_MAX = 0.01, 1.0  # v2's per-sample bounds: the same range as the global versions' clamp of theta
TAU_GRAD_CLIP = 5.0  # v2: the per-sample temperature gradient is clipped to [-5, 5]
UNSEEN_LOG_U = math.log(1e-35)  # an old estimate below this (never written: -inf; inf; NaN) is replaced by ghat
LOG_U = ("log_u_image", "log_u_text")
V2_STATE = ("tau_image", "tau_text", "m_image", "m_text", "v_image", "v_text")


def table_columns(version: str) -> tuple[str, ...]:
    """Per-sample float32 columns: log u per modality; v2 adds tau and its Adam moments m, v per modality."""
    return LOG_U + V2_STATE if version == "v2" else LOG_U


def table_memory(version: str, num_samples: int = 400_000_000, ranks_per_node: int = 8) -> dict[str, int]:
    """Bytes of the per-sample tables: per sample, per node with one shared copy, per node if every rank had one."""
    columns = len(table_columns(version))
    return {
        "bytes_per_sample": node_table_bytes(columns, 1, 1),
        "node_shared": node_table_bytes(columns, num_samples, ranks_per_node, shared=True),
        "node_replicated": node_table_bytes(columns, num_samples, ranks_per_node, shared=False),
    }


def gamma_at(epoch: int, settings: FastClipSettings) -> float:
    """The inner learning rate of the u update during ``epoch`` (0-based)."""
    if epoch == 0:
        return 1.0
    if settings.gamma_schedule == "constant" or epoch >= settings.gamma_decay_epochs:
        return settings.gamma_min
    cosine = 0.5 * (1 + math.cos(math.pi * epoch / settings.gamma_decay_epochs))
    return settings.gamma_min + (1 - settings.gamma_min) * cosine


def update_log_u(log_u_old: torch.Tensor, log_g: torch.Tensor, gamma: float) -> torch.Tensor:
    """log((1 - gamma) u_old + gamma ghat), or log ghat where the old estimate is unusable."""
    keep = math.log1p(-gamma) if gamma < 1 else -math.inf
    averaged = torch.logaddexp(log_u_old + keep, log_g + math.log(gamma))
    usable = torch.isfinite(log_u_old) & (log_u_old >= UNSEEN_LOG_U)
    return torch.where(usable, averaged, log_g)


def log_plus_eps(log_u: torch.Tensor, eps: float) -> torch.Tensor:
    """log(u + eps) from log u, without leaving log space."""
    return torch.logaddexp(log_u, torch.full_like(log_u, math.log(eps)))


@dataclass(frozen=True)
class _Prepared:
    """What ``prepare`` hands to ``loss``: the gathered batch (detached), the positives mask (B x G), this rank's
    updated log u (B x 2), v2's pre-update temperatures (B x 2) and the gathered new rows (G x columns [+ tau_old])."""

    all_x: torch.Tensor
    all_y: torch.Tensor
    positives: torch.Tensor
    log_u: torch.Tensor
    tau_old: torch.Tensor
    shared: torch.Tensor


def _anchor_logits(x, y, all_x, all_y, scale, positives) -> tuple[torch.Tensor, torch.Tensor]:
    """Per modality, each local anchor's scaled similarities to every gathered negative minus its positive's (B x G),
    the positive itself at -inf: image anchors against all texts, then text anchors against all images."""
    pos = (x * y).sum(1)
    sims = (x @ all_y.T, y @ all_x.T)
    return tuple((scale[:, m, None] * (sims[m] - pos[:, None])).masked_fill(positives, -math.inf) for m in range(2))


class FastClipObjective(Objective):
    name = "fastclip"

    def __init__(self, context: ObjectiveContext, settings: FastClipSettings):
        super().__init__(context)
        self.settings = settings
        self.epoch = 0
        self.gamma = gamma_at(0, settings)
        self.lr_tau = settings.lr_tau  # None until param_groups tells the model's lr
        initial = dict.fromkeys(table_columns(settings.version), 0.0)
        initial.update(dict.fromkeys(LOG_U, -math.inf))  # unseen
        if settings.version == "v2":
            initial.update(tau_image=settings.temperature_init, tau_text=settings.temperature_init)
        self.tables = SampleTables(initial, context.dataset_size, context.world, f"{context.run_id}-fastclip",
                                   device=context.device)
        self.temperature_lr_rule = settings.version == "v3"

    def init_model(self, model: nn.Module) -> None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / self.settings.temperature_init))
        model.logit_scale.requires_grad_(self.settings.version in ("v0", "v3"))

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        self.lr_tau = self.settings.lr_tau or lr
        version = self.settings.version
        if version not in ("v0", "v3"):
            return []
        group = {"params": [model.logit_scale], "weight_decay": 0.0, "name": TEMPERATURE_GROUP}
        # v0 follows the trainer's schedule; v3's lr is constant, its step scaled by the step_thresh rule.
        return [{**group, "lr": self.lr_tau, "managed": version == "v3"}]

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.gamma = gamma_at(epoch, self.settings)

    def get_extra_state(self) -> dict:
        return {"epoch": self.epoch, "gamma": self.gamma, **self.tables.state()}

    def set_extra_state(self, state: dict) -> None:
        self.epoch, self.gamma = int(state["epoch"]), float(state["gamma"])
        self.tables.load(state)

    def prepare(self, image_features, text_features, logit_scale, logit_bias, indices) -> _Prepared:
        """Gather the batch, update every anchor's u (and v2's temperature) from the old rows, store the new ones."""
        if indices is None:
            raise ValueError("fastclip needs the samples' dataset indices")
        settings, v2 = self.settings, self.settings.version == "v2"
        device = image_features.device
        with fp32_logits(device):
            x, y = image_features.float(), text_features.float()
            b, d = x.shape
            # The features travel in their own dtype (half the bytes under bf16); the fp32 copies below are exact.
            everyone = all_gather_nograd(torch.cat([image_features, text_features], 1), self.world).float()
            all_x, all_y = everyone[:, :d], everyone[:, d:]
            g = everyone.shape[0]
            if g < 2:
                raise ValueError("fastclip needs a global batch of at least 2")
            # Read after the all_gather above: each rank finished its writes of earlier steps before entering it.
            old = self.tables.read(indices).to(device)
            # Rank k's anchors are rows k*B.. of the gathered batch: every rank has the same B (full batches).
            positives = torch.zeros(b, g, dtype=torch.bool, device=device)
            rows = torch.arange(b, device=device)
            positives[rows, rows + self.world.rank * b] = True
            tau_old, m_old, v_old = old[:, 2:4], old[:, 4:6], old[:, 6:8]  # v2 (columns as table_columns)
            log_u, tau_grads = [], []
            for m, logits in enumerate(_anchor_logits(x, y, all_x, all_y, self._scale(logit_scale, tau_old),
                                                      positives)):
                log_g = torch.logsumexp(logits, 1) - math.log(g - 1)
                log_u.append(update_log_u(old[:, m], log_g, self.gamma))
                if v2:
                    log_u_eps = log_plus_eps(log_u[m], settings.eps)
                    terms = torch.exp(logits - math.log(g - 1) - log_u_eps[:, None])
                    tau_grads.append(self._tau_gradient(terms, logits.masked_fill(positives, 0.0), log_u_eps))

            # Share the new rows (and v2's pre-update tau for the negative side) and store the global batch. Every
            # rank read its old rows before contributing to these gathers, so no write can overtake a read.
            new = torch.stack(log_u, 1)
            if v2:  # the order of table_columns
                new = torch.cat([new, *self._tau_step(tau_old, m_old, v_old, torch.stack(tau_grads, 1))], 1)
            shared = all_gather_nograd(torch.cat([new, tau_old], 1) if v2 else new, self.world)
            all_indices = all_gather_nograd(indices.to(device), self.world)
            self.tables.write(all_indices, shared[:, : new.shape[1]])
        return _Prepared(all_x, all_y, positives, torch.stack(log_u, 1), tau_old, shared)

    def loss(self, image_features, text_features, logit_scale, logit_bias, indices, prepared) -> ObjectiveOutput:
        settings, v2, p = self.settings, self.settings.version == "v2", prepared
        with fp32_logits(image_features.device):
            x, y = image_features.float(), text_features.float()
            b, g = x.shape[0], p.all_x.shape[0]
            # Anchor side: local anchors (rows) against every gathered feature of the other modality (columns).
            ratios = []
            for m, logits in enumerate(_anchor_logits(x, y, p.all_x, p.all_y, self._scale(logit_scale, p.tau_old),
                                                      p.positives)):
                log_u_eps = log_plus_eps(p.log_u[:, m], settings.eps)
                ratios.append(torch.exp(logits - math.log(g - 1) - log_u_eps[:, None]).sum(1))  # ghat_i/(u_i+eps)

            # Negative side: every global anchor (detached) against this rank's negatives. Orientation:
            # (y @ all_x.T).T[i, j] = x_i . y_j for global image anchor i and local text j: the image side.
            sims = (y @ p.all_x.T, x @ p.all_y.T)
            all_pos = (p.all_x * p.all_y).sum(1)
            if v2:
                all_tau_old = p.shared[:, -2:]
                all_scale = 1 / all_tau_old
            else:
                paper_v3 = settings.version == "v3" and settings.tau_gradient == "paper"
                s = logit_scale.float().detach() if paper_v3 else logit_scale.float()
                all_scale = s.expand(g, 2)
            log_weight = math.log(g / (b * (g - 1)))  # G/B: the ranks' means over their B negatives sum to one mean
            negative_ratios = []
            for m in range(2):
                logits = all_scale[:, m, None] * (sims[m].T - all_pos[:, None])
                logits = logits.masked_fill(p.positives.T, -math.inf)
                all_log_u_eps = log_plus_eps(p.shared[:, m], settings.eps)
                negative_ratios.append(torch.exp(logits + log_weight - all_log_u_eps[:, None]).sum(1))

            if v2 and settings.tau_gradient == "paper":
                ratios = [r * p.tau_old[:, m] for m, r in enumerate(ratios)]
                negative_ratios = [r * all_tau_old[:, m] for m, r in enumerate(negative_ratios)]
            loss = 0.5 * ((ratios[0] + ratios[1]).mean() + (negative_ratios[0] + negative_ratios[1]).mean())
            if settings.version == "v3":
                s = logit_scale.float()
                loss = loss / s.detach() + settings.rho / s + 0.5 * (p.log_u[:, 0] + p.log_u[:, 1]).mean() / s
        tau = p.tau_old.mean() if v2 else 1 / logit_scale.detach().float()
        return ObjectiveOutput(loss, {"loss": loss.detach(), "gamma": self.gamma, "tau": tau})

    def _scale(self, logit_scale: torch.Tensor, tau_old: torch.Tensor) -> torch.Tensor:
        """(B, 2): each anchor's scale per modality: v2's per-sample 1/tau, else the model's s."""
        if self.settings.version == "v2":
            return 1 / tau_old
        return logit_scale.float().expand(tau_old.shape[0], 2)

    def _tau_gradient(self, terms: torch.Tensor, logits: torch.Tensor, log_u_eps: torch.Tensor) -> torch.Tensor:
        """v2: d/dtau_i [tau_i (log g_i + rho)] for every anchor, with g estimated by the updated u, clipped to [-5, 5]:
        log(u_i + eps) + rho - sum_j [exp(logit_ij) / ((G - 1)(u_i + eps))] logit_ij. ``terms`` holds the bracket,
        ``logits`` the (a_ij - a_ii) / tau_i with 0 at the positive."""
        grad = log_u_eps + self.settings.rho - (terms * logits).sum(1)
        return grad.clamp(-TAU_GRAD_CLIP, TAU_GRAD_CLIP)

    def _tau_step(self, tau, m, v, grad) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v2: one Adam step on every anchor's temperatures (B x 2); returns the new (tau, m, v).

        The step count for the bias correction is epoch + 1 (each sample is seen about once per epoch), and
        beta1 = beta2 = 0 in epoch 0, so the first visit steps by about lr_tau * sign(grad). lr_tau is constant."""
        if self.lr_tau is None:
            raise ValueError("fastclip v2 needs lr_tau, or param_groups(model, lr) to have been called")
        beta1, beta2 = self.context.optimizer_betas if self.epoch > 0 else (0.0, 0.0)
        step = self.epoch + 1
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
        tau = (tau - self.lr_tau * m_hat / (v_hat.sqrt() + self.context.optimizer_eps)).clamp(TAU_MIN, TAU_MAX)
        return tau, m, v
