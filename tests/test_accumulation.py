"""Gradient accumulation gives one big batch's step, for every objective (train/accumulation.py).

A tiny open_clip model (the tests' TINY config) and 16 samples: ``gradients(micro_batches=4)`` against one backward
over the whole batch (``micro_batches=1``): the same loss, parameter gradients (the temperature's counted once) and
objective state afterwards (FastCLIP's u tables and v2 temperatures, AmorLIP's lambda networks and their optimizer).
With a random image-token mask the big-batch reference draws its masks per micro-batch as the cached passes do; the
accumulated step must replay them exactly. On 2 gloo ranks with DDP, 2 micro-batches each equal one process with the
global batch.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from distributed_harness import run_ranks
from test_objectives_distributed import CASES
from test_train import TINY
from torch.nn.parallel import DistributedDataParallel

from components.common.recipe import ImageTokens, ObjectiveSpec
from components.train.accumulation import gradients
from components.train.clipa import build_stage_model
from components.train.distributed import World
from components.train.objectives import ObjectiveContext, build_objective

B, N = 16, 40  # batch, dataset size


def _setup(spec: ObjectiveSpec, mask: ImageTokens, world: World | None = None):
    torch.manual_seed(0)
    kwargs = {"init_logit_bias": -10.0} if spec.name == "siglip" else {}
    model = build_stage_model(TINY, mask, output_dict=True, **kwargs).train()
    context = ObjectiveContext(world=world or World(), dataset_size=N, embed_dim=TINY["embed_dim"],
                               run_id=f"accumulation-{spec.name}")
    objective = build_objective(spec, context)
    objective.init_model(model)
    objective.param_groups(model, 1e-3)  # FastCLIP v2's per-sample lr comes from here
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=gen)
    texts = torch.randint(1, 400, (B, 16), generator=gen)
    indices = torch.randperm(N, generator=gen)[:B]
    indices[7] = indices[3]  # a duplicated sample
    return model, objective, images, texts, indices


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _state(objective) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in _flatten(objective.state_dict()).items()}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}.{key}").items()}
    return {prefix: tree}


def _reference(model, objective, images, texts, indices, micro_batches: int):
    """One backward over the whole batch, the model run per micro-batch in order (so masks are drawn the same)."""
    outs = [model(i, t) for i, t in zip(images.chunk(micro_batches), texts.chunk(micro_batches))]
    result = objective(torch.cat([o["image_features"] for o in outs]), torch.cat([o["text_features"] for o in outs]),
                       outs[0]["logit_scale"], outs[0].get("logit_bias"), indices)
    result.loss.backward()
    return result


def _compare(a_model, a_objective, a_loss, b_model, b_objective, b_loss):
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-6)
    a, b = _grads(a_model), _grads(b_model)
    assert set(a) == set(b) and ("logit_scale" in a) == a_model.logit_scale.requires_grad
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    a_state, b_state = _state(a_objective), _state(b_objective)
    assert set(a_state) == set(b_state)
    for key, value in a_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, b_state[key], rtol=1e-4, atol=1e-6, equal_nan=True, msg=key)
        else:
            assert value == b_state[key], key


@pytest.mark.parametrize("name", list(CASES))
def test_four_micro_batches_equal_one_batch(name):
    spec = CASES[name]
    big_model, big_objective, images, texts, indices = _setup(spec, ImageTokens())
    model, objective = copy.deepcopy(big_model), copy.deepcopy(big_objective)
    big = gradients(big_model, big_objective, images, texts, indices, micro_batches=1)
    accumulated = gradients(model, objective, images, texts, indices, micro_batches=4)
    _compare(big_model, big_objective, big.loss, model, objective, accumulated.loss)
    assert math.isfinite(accumulated.loss.item())


@pytest.mark.parametrize("name", ["clip", "fastclip-v3", "amorlip-kl_div_asym"])
def test_random_token_masks_are_replayed(name):
    spec = CASES[name]
    ref_model, ref_objective, images, texts, indices = _setup(spec, ImageTokens(mask="random", keep=0.5))
    model, objective = copy.deepcopy(ref_model), copy.deepcopy(ref_objective)
    torch.manual_seed(5)
    reference = _reference(ref_model, ref_objective, images, texts, indices, micro_batches=4)
    reference_next = torch.rand(3)
    torch.manual_seed(5)
    accumulated = gradients(model, objective, images, texts, indices, micro_batches=4)
    _compare(ref_model, ref_objective, reference.loss, model, objective, accumulated.loss)
    assert torch.equal(torch.rand(3), reference_next)  # the random stream goes on as after the reference


def test_a_batch_that_does_not_split_is_refused():
    model, objective, images, texts, indices = _setup(CASES["clip"], ImageTokens())
    with pytest.raises(ValueError, match="does not split into 3 equal micro-batches"):
        gradients(model, objective, images, texts, indices, micro_batches=3)


def _two_ranks(name: str) -> dict:
    world = World.current()
    model, objective, images, texts, indices = _setup(CASES[name], ImageTokens(), world)
    rows = slice(world.rank * B // 2, (world.rank + 1) * B // 2)
    ddp = DistributedDataParallel(model)
    result = gradients(ddp, objective, images[rows], texts[rows], indices[rows], micro_batches=2,
                       no_sync=ddp.no_sync)
    loss = result.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    return {"loss": loss / world.size, "grads": _grads(model), "state": _state(objective)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip", "siglip", "fastclip-v3", "amorlip-js_div"])
def test_two_ranks_with_two_micro_batches_equal_one_process(name):
    ranks = run_ranks(2, _two_ranks, name)
    model, objective, images, texts, indices = _setup(CASES[name], ImageTokens())
    one = gradients(model, objective, images, texts, indices)
    torch.testing.assert_close(ranks[0]["loss"], one.loss.detach(), rtol=1e-5, atol=1e-6)
    expected = _grads(model)
    for rank in ranks:
        assert set(rank["grads"]) == set(expected)
        for param, grad in expected.items():
            torch.testing.assert_close(rank["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=param)
    if name.startswith("fastclip"):  # the u tables hold the whole global batch's rows on every rank
        state = _state(objective)
        for key in (k for k in state if "log_u" in k):
            torch.testing.assert_close(ranks[0]["state"][key], state[key], rtol=1e-4, atol=1e-6, equal_nan=True)
