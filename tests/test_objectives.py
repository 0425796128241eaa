"""clip and siglip against open_clip's own losses; numerics under adversarial inputs; the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from components.common.recipe import ObjectiveSpec
from components.train.objectives import NAMES, ObjectiveContext, build_objective


def _features(b=12, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=gen, dtype=dtype), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(b, d, generator=gen, dtype=dtype), dim=-1).requires_grad_()
    return x, y


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_equals_open_clip_cliploss(with_bias):
    x, y = _features()
    s = torch.tensor(14.3, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True) if with_bias else None
    ours = build_objective(ObjectiveSpec(name="clip"), ObjectiveContext())(x, y, s, b).loss
    ref = ClipLoss()(x, y, s, b) if with_bias else ClipLoss()(x, y, s)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    inputs = (x, y, s) + ((b,) if with_bias else ())
    for g_ours, g_ref in zip(_grads(ours, *inputs), _grads(ref, *inputs)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_siglip_equals_open_clip_sigliploss():
    x, y = _features()
    s = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    ours = build_objective(ObjectiveSpec(name="siglip"), ObjectiveContext())(x, y, s, b).loss
    ref = SigLipLoss()(x, y, s, b)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for g_ours, g_ref in zip(_grads(ours, x, y, s, b), _grads(ref, x, y, s, b)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.logit_bias = nn.Parameter(torch.tensor(0.0))


def test_init_and_clamp_of_the_temperature():
    model = _Temperature()
    clip = build_objective(ObjectiveSpec(name="clip"), ObjectiveContext())
    clip.init_model(model)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    siglip = build_objective(ObjectiveSpec(name="siglip"), ObjectiveContext())
    siglip.init_model(model)
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10.0
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clip.optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert model.logit_scale.item() == pytest.approx(math.log(100))


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("autocast", [False, True])
def test_adversarial_numerics(name, autocast):
    """Scale 100, every negative closer than the positive, duplicated samples, bf16 autocast: finite."""
    x, _ = _features(b=8)
    with torch.no_grad():
        y_data = -x.detach().clone()  # positives maximally dissimilar
        y_data[1:] = x.detach()[:-1]  # ... and each negative identical to its anchor
        y_data[3] = y_data[4]  # a duplicated sample
    y = y_data.requires_grad_()
    s = torch.tensor(100.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    objective = build_objective(ObjectiveSpec(name=name), ObjectiveContext())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = objective(x.to(torch.bfloat16) if autocast else x, y, s, b).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = _grads(loss, x, y, s, b) if name == "siglip" else _grads(loss, x, y, s)
    assert all(torch.isfinite(g).all() for g in grads)
    assert loss.item() > 10  # the inputs are adversarial: the loss must say so, not saturate to 0


def test_registry_covers_every_recipe_objective():
    from typing import get_args

    assert set(NAMES) == set(get_args(ObjectiveSpec.model_fields["name"].annotation))


class _TemperatureAt(nn.Module):
    def __init__(self, tau: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / tau)))


@pytest.mark.parametrize("spec", [ObjectiveSpec(name="fastclip", fastclip={"version": "v3", "lr_tau": 1e-2}),
                                  ObjectiveSpec(name="amorlip", amorlip={"lr_tau": 1e-2})],
                         ids=["fastclip-v3", "amorlip"])
@pytest.mark.parametrize("optimizer_name", ["adamw", "lamb"])
@pytest.mark.parametrize("tau", [0.05, 0.0301, 0.03, 0.02])
def test_step_thresh_rule_scales_the_temperature_step(spec, optimizer_name, tau):
    """Four AdamW/LAMB steps with the objective's hooks equal four steps of the same optimizer whose lr is set on the
    host before every step as the references do (lr_tau, or lr_tau / 3 once tau <= 0.03), without reading tau."""
    from timm.optim import Lamb

    objective = build_objective(spec, ObjectiveContext(embed_dim=8, dataset_size=16))
    make = {"adamw": torch.optim.AdamW, "lamb": Lamb}[optimizer_name]
    ours, reference = _TemperatureAt(tau), _TemperatureAt(tau)
    (group,) = objective.param_groups(ours, lr=1.0)
    optimizer = make([group])
    reference_optimizer = make([{"params": [reference.logit_scale], "lr": 1e-2, "weight_decay": 0.0}])
    used = set()
    for step in range(4):
        for model in (ours, reference):
            model.logit_scale.grad = torch.tensor(-1.0 - step)  # towards a lower tau
        objective.optimizer_step(ours, optimizer)
        lr = 1e-2 if math.exp(-reference.logit_scale.item()) > 0.03 else 1e-2 / 3
        reference_optimizer.param_groups[0]["lr"] = lr
        used.add(lr)
        reference_optimizer.step()
        torch.testing.assert_close(ours.logit_scale, reference.logit_scale, rtol=1e-6, atol=1e-6)
    assert used == ({1e-2, 1e-2 / 3} if tau == 0.0301 else {1e-2} if tau > 0.03 else {1e-2 / 3})
