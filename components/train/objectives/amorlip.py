"""AmorLIP (Sun et al. 2025): a small network per modality amortises each anchor's partition function.

Every training step runs two stages on the batch (docs/objectives.md B.7, the README configuration with ``--fit_w_prev``
and ``--calculate_full``):

Stage I (amortisation). For each anchor, the exact weighted partition sum over the *global* batch,
``Zhat_i = c e^{d_ii} + sum_{j != i} e^{d_ij}`` (c = ``pos_coef``, d = s x.y), is blended in log space with the
previous epoch's frozen network: ``log Zc = logaddexp(log beta_e + log lambda_prev, log(1 - beta_e) + log Zhat)``.
The online networks regress ``log Zc`` with ``lambda_steps`` inner Adam steps (every ``lambda_every`` steps); an EMA
copy follows them every ``target_every`` steps; at each epoch start the EMA copy is frozen into ``lambda_prev`` and,
every ``reinit_every_epochs`` epochs, the online networks, the EMA copy and the inner Adam start afresh.

Stage II (encoder). With the detached normaliser Lambda = Zc,
``L = [-2 s mean_i x_i.y_i + mean_i sum_j w_ij e^{d_ij} / Lambda^I_i + mean_j sum_i w_ij e^{d_ij} / Lambda^T_j] / sg(s)
+ rho_e / s``, i.e. the FastCLIP-v3 loss scaling (multiply by sg(tau), add rho tau).

Choices, and where they differ from the reference code (AL-code) or the paper:

- Lambda = Zc, as the released code does with ``--fit_w_prev``; the paper substitutes the EMA target network. Only
  the former is offered. The EMA network's role is then to be frozen into ``lambda_prev`` at each epoch start.
- Exact, world-size invariant sums: each rank gathers both modalities' features *with* autograd and scores its local
  anchors (rows) against all global features (columns), as open_clip's ClipLoss. The targets are the detached
  log-sums of the same logits, so no second exchange is needed, and at beta = 0 the ratio is exactly 1 and the
  gradient is that of symmetric InfoNCE with a c-weighted positive. AL-code splits the text direction differently
  (remote text columns against local images); the sum over ranks is the same.
- Log space throughout: the blend uses logaddexp and each ratio is exp(LSE - log Lambda), so nothing overflows at
  s = 100 (AL-code exponentiates and blends in linear space).
- ``pos_coef`` weights the positive in the targets and in the numerator alike, also at c = 0 (AL-code then keeps
  the positive at weight 1 in the numerator).
- The divergence losses (``kl_div_asym``, ``js_div``) are single-GPU in AL-code, built on local-batch sums over
  B^2 elements. Here they use the global sums Zhat and a 1/G normalisation, so W ranks equal one process on the
  global batch; for W = 1 they are the code's formulas. ``js_div`` uses the same c-weighted sums as ``kl_div_asym``.
  Their factor Zhat/lambda is e^100 when a fresh network meets s = 100, beyond fp32; the log-ratio is capped at
  ``MAX_LOG_RATIO`` so losses, gradients and Adam's squared moments stay finite. The cap only binds while lambda
  underestimates Zhat by more than e^30 (the first steps after a re-initialisation, late in training); those
  samples still push lambda up with a gradient of e^30, and Adam's step size does not depend on the gradient's
  scale. AL-code instead clips the lambda networks' gradient norm (with the encoder's --grad-clip-norm); nothing
  is clipped here.
- The lambda loss is a mean over the local batch; its gradients are averaged over ranks before each inner Adam step
  (what DDP does to the lambda networks in AL-code). AL-code also multiplies the lambda lr by the world size at each
  re-initialisation; we do not, so the result does not depend on the world size. Its early stopping of the inner
  loop (5 consecutive changes below a tolerance) cannot trigger with 5 or fewer inner steps (default 3) and is left
  out.
- ``lambda_every`` and ``target_every`` count steps within the epoch, from 0 at its start.
- ``rho`` is split into contiguous blocks of max(1, E // len(rho)) epochs; the last block absorbs the remainder (with
  fewer epochs than entries, each epoch takes the next entry).
- The temperature's lr follows ``step_thresh``: lr_tau while tau > 0.03, lr_tau / 3 once tau <= 0.03, checked
  after every step (so it holds for the next one) and set from the initial tau for the first.
- Not offered: a logit bias, ``adaptive_tau``, ``lambda_eps``, ``denormalize_features``, ``lambda_fit_neg_only``,
  ``kl_div_sym``.

Checkpoints: the three network copies are submodules; the inner Adam state and the step counters are extra state
(tensors and numbers only). Move the objective to the training device before loading a checkpoint, so that the
inner Adam's state lands on it. ``on_epoch_start`` is a no-op for the epoch already under way (construction starts
epoch 0), so a run resumed mid-epoch may call it again.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from components.common.recipe import AmorLipSettings
from components.train.distributed import all_gather_nograd, all_gather_with_grad, all_reduce_mean
from components.train.objectives.base import (
    TEMPERATURE_GROUP,
    Objective,
    ObjectiveContext,
    ObjectiveOutput,
    fp32_logits,
)

MAX_LOG_RATIO = 30.0  # cap on log(Zhat / lambda) in the divergence losses; see the module docstring


class LambdaNetworks(nn.Module):
    """Both modalities' lambda networks (B.3): Linear-ReLU-LayerNorm twice, a skip from the input, ReLU, Linear to 1.

    The two networks' weights are stacked on a leading modality axis (0 image, 1 text) so that one batched pass
    evaluates both: the inner loop runs ``lambda_steps`` times every training step on small matrices, where the
    number of operations, not their size, sets the cost."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.b1 = self._linear(dim, hidden)
        self.w2, self.b2 = self._linear(hidden, dim)
        self.w3, self.b3 = self._linear(dim, 1)
        self.norm1_weight = nn.Parameter(torch.ones(2, 1, hidden))
        self.norm1_bias = nn.Parameter(torch.zeros(2, 1, hidden))
        self.norm2_weight, self.norm2_bias = nn.Parameter(torch.ones(2, 1, dim)), nn.Parameter(torch.zeros(2, 1, dim))

    @staticmethod
    def _linear(fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, for each modality
        return (nn.Parameter(torch.empty(2, fan_in, fan_out).uniform_(-bound, bound)),
                nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features[m]`` holds modality m's (B, d) embeddings; returns log lambda of shape (2, B)."""
        h = torch.baddbmm(self.b1, features, self.w1).relu()
        h = F.layer_norm(h, h.shape[-1:]) * self.norm1_weight + self.norm1_bias
        h = torch.baddbmm(self.b2, h, self.w2).relu()
        h = F.layer_norm(h, h.shape[-1:]) * self.norm2_weight + self.norm2_bias
        return torch.baddbmm(self.b3, (h + features).relu(), self.w3).squeeze(-1)


def blend_log_target(log_zhat: torch.Tensor, log_lambda_prev: torch.Tensor | None, beta: float) -> torch.Tensor:
    """log(beta lambda_prev + (1 - beta) Zhat), computed in log space."""
    if beta == 0.0:
        return log_zhat
    log_one_minus_beta = math.log(1.0 - beta) if beta < 1.0 else -math.inf
    return torch.logaddexp(log_lambda_prev + math.log(beta), log_zhat + log_one_minus_beta)


def amortisation_loss(divergence: str, log_lambda: torch.Tensor, log_target: torch.Tensor, log_zhat: torch.Tensor,
                      global_batch: int, reg_coef: float) -> torch.Tensor:
    """Stage I loss: per modality a mean over the local anchors of what B.5 sums over the global batch, summed over
    the modalities (the leading axis of shape (2, B); the loss of one modality alone for shape (B,)).

    ``log_lambda`` is a = log lambda (with grad), ``log_target`` c = log Zc and ``log_zhat`` log Zhat (detached)."""
    l2log = (log_lambda - log_target).square().mean(dim=-1).sum()
    if divergence == "log_l2":
        return l2log
    # Zhat / lambda is sum_j p_ij, the row mass of p_ij = w_ij e^{d_ij} / lambda_i; the /G turns the code's mean
    # over B^2 elements into one over the global G^2.
    p_mass = torch.exp((log_zhat - log_lambda).clamp(max=MAX_LOG_RATIO))
    if divergence == "kl_div_asym":
        div = p_mass * (log_target - log_lambda)  # f(t) = t log t at t = Z / lambda, as coded
    elif divergence == "js_div":
        # With q_ij = w_ij e^{d_ij} / Zc and m = (p + q) / 2, p/m and q/m do not depend on j:
        # log(p/m) = log 2 - softplus(a - c), log(q/m) = log 2 - softplus(c - a).
        q_mass = torch.exp((log_zhat - log_target).clamp(max=MAX_LOG_RATIO))
        div = 0.5 * (p_mass * (math.log(2.0) - F.softplus(log_lambda - log_target))
                     + q_mass * (math.log(2.0) - F.softplus(log_target - log_lambda)))
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return reg_coef * l2log + div.mean(dim=-1).sum() / global_batch


@dataclass(frozen=True)
class _Prepared:
    log_targets: torch.Tensor  # (2, B) log Zc per modality and local anchor, detached
    lambda_loss: torch.Tensor  # the amortisation loss before this step's inner updates (for the logs)


class AmorLipObjective(Objective):
    name = "amorlip"
    temperature_lr_rule = True

    def __init__(self, context: ObjectiveContext, settings: AmorLipSettings):
        super().__init__(context)
        if context.embed_dim <= 0:
            raise ValueError("amorlip needs the embedding width (context.embed_dim) to build its lambda networks")
        self.settings = settings
        self.hidden = int(settings.hidden_factor * context.embed_dim)
        self.online = self._fresh_networks(epoch=0)
        self.target = copy.deepcopy(self.online).requires_grad_(False)  # EMA of the online networks
        self.prev = copy.deepcopy(self.target)  # the EMA networks frozen at the start of this epoch
        self.lambda_optimizer = self._fresh_optimizer()
        self.epoch, self.epoch_step = 0, 0

    # Schedules ----------------------------------------------------------------------------------------------------

    @property
    def beta(self) -> float:
        """Weight of lambda_prev in the blended target: a cosine ramp from 0 at epoch 0 to beta_max."""
        s = self.settings
        if self.epoch >= s.beta_ramp_epochs:
            return s.beta_max
        return s.beta_max * 0.5 * (1.0 - math.cos(math.pi * self.epoch / s.beta_ramp_epochs))

    @property
    def rho(self) -> float:
        values = self.settings.rho
        block = max(1, self.context.total_epochs // len(values))
        return values[min(self.epoch // block, len(values) - 1)]

    def _fresh_networks(self, epoch: int) -> LambdaNetworks:
        # The same seed on every rank gives every rank the same networks without a broadcast; fork_rng leaves the
        # global generator (data order, dropout) untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1_000_003 * self.context.seed + epoch)
            return LambdaNetworks(self.context.embed_dim, self.hidden)

    def _fresh_optimizer(self) -> torch.optim.Adam:
        # fused: one kernel per step instead of a loop over parameters (the inner steps run every training step)
        return torch.optim.Adam(self.online.parameters(), lr=self.settings.lambda_lr, fused=True)

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch, self.epoch_step = epoch, 0
        self.prev.load_state_dict(self.target.state_dict())
        if epoch % self.settings.reinit_every_epochs == 0:
            self.online.load_state_dict(self._fresh_networks(epoch).state_dict())
            self.target.load_state_dict(self.online.state_dict())
            self.lambda_optimizer = self._fresh_optimizer()

    # Temperature --------------------------------------------------------------------------------------------------

    def init_model(self, model: nn.Module) -> None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / self.settings.temperature_init))

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        # A constant lr_tau; the step_thresh rule scales the temperature's step (base.step_thresh_lr).
        return [{"params": [model.logit_scale], "lr": self.settings.lr_tau, "weight_decay": 0.0,
                 "name": TEMPERATURE_GROUP, "managed": True}]

    # Stage I ------------------------------------------------------------------------------------------------------

    def _lambda_loss(self, feats: torch.Tensor, log_targets: torch.Tensor, log_zhats: torch.Tensor,
                     global_batch: int) -> torch.Tensor:
        return amortisation_loss(self.settings.divergence, self.online(feats), log_targets, log_zhats, global_batch,
                                 self.settings.div_reg_coef)

    def _fit_lambda(self, feats: torch.Tensor, log_targets: torch.Tensor, log_zhats: torch.Tensor,
                    global_batch: int) -> torch.Tensor:
        """The inner Adam steps; returns the loss before the first one (detached)."""
        params = list(self.online.parameters())
        first = torch.full((), math.nan)
        with torch.enable_grad():
            for i in range(self.settings.lambda_steps):
                loss = self._lambda_loss(feats, log_targets, log_zhats, global_batch)
                if i == 0:
                    first = loss.detach()
                grads = torch.autograd.grad(loss, params)
                if self.world.size > 1:
                    # One collective per inner step: the mean over ranks of per-rank means is the global gradient.
                    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]), self.world)
                    grads = flat.split([p.numel() for p in params])
                for p, g in zip(params, grads):
                    p.grad = g.view_as(p)
                self.lambda_optimizer.step()
        return first

    @torch.no_grad()
    def _update_target(self) -> None:
        targets, online = list(self.target.state_dict().values()), list(self.online.state_dict().values())
        torch._foreach_lerp_(targets, online, 1.0 - self.settings.ema_decay)

    # The step -----------------------------------------------------------------------------------------------------

    def prepare(self, image_features, text_features, logit_scale, logit_bias, indices) -> _Prepared:
        """Stage I: the normalisers Zhat of every local anchor, their blended targets, and the lambda networks'
        inner steps (every ``lambda_every`` steps) and EMA update (every ``target_every``)."""
        if logit_bias is not None:
            raise ValueError("amorlip has no logit bias: build the model without init_logit_bias")
        settings, world = self.settings, self.world
        with fp32_logits(image_features.device):
            x, y, s = image_features.float(), text_features.float(), logit_scale.float()
            all_x, all_y = all_gather_nograd(x, world), all_gather_nograd(y, world)
            feats = torch.stack([x, y])
            log_zhats = torch.stack(self._log_numerators(x, y, all_x, all_y, s))
            log_targets = blend_log_target(log_zhats, self.prev(feats) if self.beta > 0 else None, self.beta)
            global_batch = x.shape[0] * world.size
            k = self.epoch_step
            if k % settings.lambda_every == 0:
                lambda_loss = self._fit_lambda(feats, log_targets, log_zhats, global_batch)
            else:
                lambda_loss = self._lambda_loss(feats, log_targets, log_zhats, global_batch)
            if k % settings.target_every == 0:
                self._update_target()
            self.epoch_step += 1
        return _Prepared(log_targets, lambda_loss)

    def loss(self, image_features, text_features, logit_scale, logit_bias, indices, prepared) -> ObjectiveOutput:
        """Stage II: the encoders' loss against the prepared targets."""
        with fp32_logits(image_features.device):
            x, y, s = image_features.float(), text_features.float(), logit_scale.float()
            # Rows: local anchors; columns: every rank's features, with autograd so that remote features get their
            # gradient as negatives.
            all_x, all_y = all_gather_with_grad(x, self.world), all_gather_with_grad(y, self.world)
            log_num_image, log_num_text = self._log_numerators(x, y, all_x, all_y, s)
            positive = (x * y).sum(dim=1).mean()
            targets = prepared.log_targets
            ratios = torch.exp(log_num_image - targets[0]).mean() + torch.exp(log_num_text - targets[1]).mean()
            loss = (-2.0 * s * positive + ratios) / s.detach() + self.rho / s
        return ObjectiveOutput(loss, {"loss": loss.detach(), "lambda_loss": prepared.lambda_loss, "beta": self.beta,
                                      "rho": self.rho, "tau": 1.0 / s.detach()})

    def _log_numerators(self, x, y, all_x, all_y, s) -> tuple[torch.Tensor, torch.Tensor]:
        """log sum_j w_ij exp(s x_i . y_j) per local image anchor, and the same per text anchor; the positive's
        weight is pos_coef (0: left out)."""
        b, rank, pos_coef = x.shape[0], self.world.rank, self.settings.pos_coef
        log_w = torch.zeros(b, all_y.shape[0], device=x.device)
        rows = torch.arange(b, device=x.device)
        log_w[rows, rows + rank * b] = math.log(pos_coef) if pos_coef > 0 else -math.inf
        return torch.logsumexp(s * x @ all_y.T + log_w, dim=1), torch.logsumexp(s * y @ all_x.T + log_w, dim=1)

    # Checkpoints --------------------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step,
                "lambda_optimizer": self.lambda_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.epoch, self.epoch_step = int(state["epoch"]), int(state["epoch_step"])
        self.lambda_optimizer = self._fresh_optimizer()
        self.lambda_optimizer.load_state_dict(state["lambda_optimizer"])
