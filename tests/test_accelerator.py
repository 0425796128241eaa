"""What the device changes: the recipe's auto precision and compile, and batches passed through on a CPU."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_train import recipe_dict

from components.common.device import DeviceError, resolve_device
from components.common.recipe import parse_recipe
from components.train import accelerator
from components.train.data import Batch

CPU = torch.device("cpu")


def _recipe(**overrides):
    return parse_recipe(yaml.safe_dump({**recipe_dict(), **overrides}))


def test_auto_means_fp32_and_eager_on_a_cpu_and_explicit_values_win():
    assert accelerator.precision(_recipe(), CPU) == "fp32" and not accelerator.compiles(_recipe(), CPU)
    assert accelerator.precision(_recipe(precision="amp_bf16"), CPU) == "amp_bf16"
    assert accelerator.compiles(_recipe(compile=True), CPU)
    with accelerator.autocast(_recipe(precision="amp_bf16"), CPU):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with accelerator.autocast(_recipe(), CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_batches_pass_through_on_a_cpu():
    batches = [Batch(images=torch.zeros(2, 3, 4, 4), texts=torch.zeros(2, 5, dtype=torch.long),
                     indices=torch.tensor([i, i + 1]), epoch=0, step=i, read=2, corrupt=0) for i in range(3)]
    assert [b.step for b in accelerator.on_device(iter(batches), CPU)] == [0, 1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_asking_for_a_missing_gpu_names_the_problem():
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU
    for choice in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="no CUDA device is visible"):
            resolve_device(choice)
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
