"""AmorLIP against direct float64 implementations of docs/objectives.md B.4-B.6; schedules; numerics; checkpoints.

The world-size equivalence (1 vs 2 vs 4 ranks) is in test_objectives_distributed.py."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.common.recipe import AmorLipSettings
from components.train.objectives import ObjectiveContext
from components.train.objectives.amorlip import AmorLipObjective

D, B = 8, 6
DIVERGENCES = ("log_l2", "kl_div_asym", "js_div")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _objective(total_epochs: int = 4, seed: int = 0, dim: int = D, **settings) -> AmorLipObjective:
    return AmorLipObjective(ObjectiveContext(embed_dim=dim, total_epochs=total_epochs, seed=seed),
                            AmorLipSettings(**settings))


def _features(seed: int, b: int = B, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=gen), dim=-1), F.normalize(torch.randn(b, d, generator=gen), dim=-1)


def _advance_to_epoch_1(objective: AmorLipObjective, s: float = 5.0) -> None:
    """Two steps of epoch 0 (so lambda_prev is a trained EMA network, not the initial one), then start epoch 1."""
    for seed in (10, 11):
        objective(*_features(seed), torch.tensor(s))
    objective.on_epoch_start(1)


def _direct_targets(objective: AmorLipObjective, x: torch.Tensor, y: torch.Tensor, s: float):
    """B.4 in linear float64: Zhat (c-weighted sums) and Zc = beta lambda_prev + (1 - beta) Zhat, per modality."""
    c, beta = objective.settings.pos_coef, objective.beta
    x64, y64 = x.double(), y.double()
    w = torch.ones(len(x), len(x), dtype=torch.float64) - (1 - c) * torch.eye(len(x), dtype=torch.float64)
    weighted = w * torch.exp(s * x64 @ y64.T)  # [image i, text j]
    zhat_image, zhat_text = weighted.sum(1), weighted.sum(0)
    with torch.no_grad():
        prev_image, prev_text = torch.exp(objective.prev(torch.stack([x, y])).double())
    return (weighted, (zhat_image, zhat_text),
            (beta * prev_image + (1 - beta) * zhat_image, beta * prev_text + (1 - beta) * zhat_text))


def _direct_lambda_loss(divergence: str, reg: float, lam: torch.Tensor, zc: torch.Tensor, zhat: torch.Tensor,
                        weighted_rows: torch.Tensor) -> torch.Tensor:
    """B.5 for one modality on a single process; ``weighted_rows[i, j]`` = w_ij e^{d_ij} with i the anchor."""
    b = len(lam)
    l2log = ((lam.log() - zc.log()) ** 2).mean()
    if divergence == "log_l2":
        return l2log
    if divergence == "kl_div_asym":
        return reg * l2log + (zhat / lam * (zc.log() - lam.log())).sum() / b**2
    p, q = weighted_rows / lam[:, None], weighted_rows / zc[:, None]
    m = (p + q) / 2
    return reg * l2log + 0.5 * (p * (p / m).log() + q * (q / m).log()).mean()


def _direct_encoder_loss(x, y, s, s_stopped, lam_image, lam_text, c, rho):
    """B.6 on a single process, in linear space, with the normalisers given (they are detached)."""
    w = torch.ones(len(x), len(x), dtype=x.dtype) - (1 - c) * torch.eye(len(x), dtype=x.dtype)
    e = w * torch.exp(s * x @ y.T)
    inner = -2 * s * (x * y).sum(1).mean() + (e.sum(1) / lam_image).mean() + (e.sum(0) / lam_text).mean()
    return inner / s_stopped + rho / s


def test_beta_ramp_and_rho_blocks():
    objective = _objective(total_epochs=10, beta_max=0.8, beta_ramp_epochs=4, rho=[1.0, 2.0, 3.0])
    betas, rhos = [], []
    for epoch in range(10):
        objective.on_epoch_start(epoch)
        betas.append(objective.beta)
        rhos.append(objective.rho)
    assert betas[0] == 0.0  # the first epoch is purely in-batch
    assert betas[:4] == pytest.approx([0.8 * 0.5 * (1 - math.cos(math.pi * e / 4)) for e in range(4)])
    assert betas[4:] == [0.8] * 6
    assert rhos == [1.0] * 3 + [2.0] * 3 + [3.0] * 4  # blocks of 10 // 3 epochs; the last absorbs the remainder
    readme = _objective(total_epochs=33)  # rho [8.5, -8.5, -8.5]: -8.5 from epoch 11 on
    readme_rhos = []
    for epoch in range(33):
        readme.on_epoch_start(epoch)
        readme_rhos.append(readme.rho)
    assert readme_rhos == [8.5] * 11 + [-8.5] * 22
    short = _objective(total_epochs=2)  # fewer epochs than entries: one entry per epoch
    short.on_epoch_start(1)
    assert short.rho == -8.5


def test_epoch_start_snapshots_the_target_and_reinitialises():
    objective = _objective(reinit_every_epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(objective.online.state_dict().values(),
                                                 _objective().online.state_dict().values()))  # same seed, same nets
    assert not torch.equal(objective.online.w3, _objective(seed=1).online.w3)
    objective(*_features(0), torch.tensor(5.0))
    online, target = copy.deepcopy(objective.online), copy.deepcopy(objective.target)
    objective.on_epoch_start(1)  # no re-initialisation: lambda_prev <- target, the rest carries on
    assert all(torch.equal(a, b) for a, b in zip(objective.prev.state_dict().values(), target.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(objective.online.state_dict().values(), online.state_dict().values()))
    assert objective.lambda_optimizer.state
    objective.on_epoch_start(1)  # the epoch under way: nothing happens
    assert objective.lambda_optimizer.state
    objective(*_features(1), torch.tensor(5.0))
    target = copy.deepcopy(objective.target)
    objective.on_epoch_start(2)  # re-initialisation after the snapshot, from (seed, epoch); a fresh inner Adam
    assert all(torch.equal(a, b) for a, b in zip(objective.prev.state_dict().values(), target.state_dict().values()))
    fresh = objective._fresh_networks(2)
    assert all(torch.equal(a, b) for a, b in zip(objective.online.state_dict().values(), fresh.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(objective.target.state_dict().values(), fresh.state_dict().values()))
    assert not objective.lambda_optimizer.state


@pytest.mark.parametrize("divergence,reg", [("log_l2", 0.1), ("kl_div_asym", 0.1), ("kl_div_asym", 0.0),
                                            ("js_div", 0.1), ("js_div", 0.0)])
def test_lambda_update_matches_the_direct_formulas(divergence, reg):
    """Targets (Zhat with pos_coef, the Zc blend) and the lambda loss's value and gradient, against B.4/B.5.

    After one inner Adam step from a fresh optimizer, its first moment is (1 - beta1) times the gradient."""
    s = 5.0
    objective = _objective(divergence=divergence, div_reg_coef=reg, pos_coef=0.3, beta_ramp_epochs=2,
                           lambda_steps=1)
    _advance_to_epoch_1(objective, s)
    assert objective.beta == pytest.approx(0.4)
    online = copy.deepcopy(objective.online).double()
    x, y = _features(0)
    out = objective(x, y, torch.tensor(s))

    weighted, (zhat_i, zhat_t), (zc_i, zc_t) = _direct_targets(objective, x, y, s)
    lam_i, lam_t = torch.exp(online(torch.stack([x, y]).double()))
    direct = (_direct_lambda_loss(divergence, reg, lam_i, zc_i, zhat_i, weighted)
              + _direct_lambda_loss(divergence, reg, lam_t, zc_t, zhat_t, weighted.T))
    assert float(out.metrics["lambda_loss"]) == pytest.approx(direct.item(), rel=1e-5)
    expected = torch.autograd.grad(direct, list(online.parameters()))
    moments = [objective.lambda_optimizer.state[p]["exp_avg"] for p in objective.online.parameters()]
    for name_param, g, m in zip(online.named_parameters(), expected, moments):
        atol = 1e-5 * float(g.abs().max())  # fp32 against fp64: near-zero elements carry the rows' rounding
        torch.testing.assert_close(m.double() / 0.1, g, rtol=1e-4, atol=atol, msg=lambda e: f"{name_param[0]}: {e}")  # noqa: B023


def test_encoder_loss_and_temperature_gradient_match_b6():
    """Value, feature gradients and a finite-difference temperature gradient of B.6, with the Zc normaliser."""
    s0, c, rho = 12.0, 0.3, -3.0
    objective = _objective(total_epochs=2, pos_coef=c, beta_ramp_epochs=2, rho=[2.0, rho])
    _advance_to_epoch_1(objective)
    x, y = _features(0)
    _, _, (zc_i, zc_t) = _direct_targets(objective, x, y, s0)

    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    theta = torch.tensor(math.log(s0), requires_grad=True)
    out = objective(xg, yg, theta.exp())
    grads = torch.autograd.grad(out.loss, (xg, yg, theta))
    assert out.metrics["rho"] == rho and out.metrics["beta"] == pytest.approx(0.4)
    assert float(out.metrics["tau"]) == pytest.approx(1 / s0)

    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    direct = _direct_encoder_loss(x64, y64, torch.tensor(s0, dtype=torch.float64), s0, zc_i, zc_t, c, rho)
    torch.testing.assert_close(out.loss.double(), direct, rtol=1e-5, atol=0)
    for got, want in zip(grads[:2], torch.autograd.grad(direct, (x64, y64))):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)

    def loss_at(t: float) -> float:  # sg(s) stays s0 and the normalisers stay fixed: both are detached
        s = torch.tensor(math.exp(t), dtype=torch.float64)
        return _direct_encoder_loss(x.double(), y.double(), s, s0, zc_i, zc_t, c, rho).item()

    h = 1e-5
    finite_difference = (loss_at(math.log(s0) + h) - loss_at(math.log(s0) - h)) / (2 * h)
    assert grads[2].item() == pytest.approx(finite_difference, rel=1e-4)


def test_first_epoch_gradient_is_symmetric_infonce_with_weighted_positive():
    """beta = 0: Lambda is the exact in-batch sum, so the feature gradient is (2 / s) grad of the InfoNCE mean."""
    s, c = 9.0, 0.3
    objective = _objective(pos_coef=c)
    x, y = (t.requires_grad_() for t in _features(0))
    grads = torch.autograd.grad(objective(x, y, torch.tensor(s)).loss, (x, y))
    logits = s * x @ y.T + math.log(c) * torch.eye(B)
    labels = torch.arange(B)
    infonce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2 - math.log(c)
    for got, want in zip(grads, torch.autograd.grad(infonce, (x, y))):
        torch.testing.assert_close(got, 2 / s * want, rtol=1e-4, atol=1e-6)


def _adversarial_features(b: int = 8, d: int = 16):
    x, _ = _features(3, b, d)
    y = -x.clone()  # positives maximally dissimilar ...
    y[1:] = x[:-1]  # ... and every negative identical to its anchor
    x[5], y[5] = x[4], y[4]  # a duplicated sample
    return x, y


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("autocast", [False, True])
def test_adversarial_numerics(divergence, autocast):
    """Scale 100, negatives closer than positives, duplicates, bf16 autocast: finite losses and gradients throughout,
    including the first lambda fits, where lambda underestimates Zhat by ~e^100."""
    objective = _objective(dim=16, divergence=divergence, beta_ramp_epochs=2)
    x, y = _adversarial_features()
    for epoch in range(3):
        objective.on_epoch_start(epoch)
        for _ in range(2):
            theta = torch.tensor(math.log(100.0), requires_grad=True)
            xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                features = (xg.bfloat16(), yg.bfloat16()) if autocast else (xg, yg)
                out = objective(*features, theta.exp())
            grads = torch.autograd.grad(out.loss, (xg, yg, theta))
            assert torch.isfinite(out.loss)
            assert all(bool(torch.isfinite(g).all()) for g in grads)
            assert any(float(g.abs().sum()) > 0 for g in grads)
            assert all(math.isfinite(float(v)) for v in out.metrics.values())
    assert all(bool(torch.isfinite(t).all()) for t in objective.state_dict().values() if isinstance(t, torch.Tensor))


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.0))


def test_temperature_init_group_and_clamp():
    """The step_thresh rule itself: tests/test_objectives.py::test_step_thresh_rule_scales_the_temperature_step."""
    model, objective = _Temperature(), _objective(lr_tau=1e-4, temperature_init=0.07)
    objective.init_model(model)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    (group,) = objective.param_groups(model, lr=1e-3)
    assert group["params"] == [model.logit_scale] and group["weight_decay"] == 0.0 and group["managed"]
    assert group["lr"] == 1e-4
    optimizer = torch.optim.SGD([group], lr=1.0)
    with torch.no_grad():
        model.logit_scale.fill_(4.55)  # s = 94.6
    model.logit_scale.grad = torch.tensor(-1e4)  # lr 1e-4: a step to 4.55 + 1/3 (tau <= 0.03), beyond s = 100
    objective.optimizer_step(model, optimizer)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def _tensors(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _tensors(value, f"{prefix}.{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _tensors(value, f"{prefix}.{i}").items()}
    return {prefix: tree}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_save_and_restore_continue_identically(divergence):
    settings = dict(divergence=divergence, beta_ramp_epochs=2, target_every=2, lambda_every=2)
    original = _objective(**settings)
    _advance_to_epoch_1(original)
    original(*_features(12), torch.tensor(5.0))  # mid-epoch: the step counters are odd
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = _objective(**settings)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.on_epoch_start(1)  # a resumed run may start the epoch it resumes in again: a no-op
    for seed in (13, 14, 15):
        a, b = original(*_features(seed), torch.tensor(5.0)), restored(*_features(seed), torch.tensor(5.0))
        assert torch.equal(a.loss, b.loss) and a.metrics == b.metrics
    want, got = _tensors(original.state_dict()), _tensors(restored.state_dict())
    assert want.keys() == got.keys()
    for key in want:
        assert (torch.equal(got[key], want[key]) if isinstance(want[key], torch.Tensor)
                else got[key] == want[key]), key
