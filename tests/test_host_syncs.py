"""No host read of a device value inside a training step, for every objective.

On a GPU, ``.item()``, ``float(t)``, ``.cpu()``, ``.tolist()``, ``if t`` and friends wait for every kernel queued so
far, so one of them per step keeps the GPU idle while the host prepares the next step. This test counts such calls
made from clipline's own code (frames under components/) while the loop's ``train_step`` runs, in a real CPU training
run of each objective; library internals are the GPU check's job (benchmarks/gpu.py runs a step under
``torch.cuda.set_sync_debug_mode("error")``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import recipe_dict
from train_shards import write_shapes_dataset

from components.common import store
from components.common.recipe import parse_recipe
from components.train import loop
from components.train.distributed import World

COMPONENTS = str(Path(__file__).resolve().parents[1] / "components")
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
OBJECTIVES = [
    {"name": "clip"},
    {"name": "siglip"},
    *({"name": "fastclip", "fastclip": {"version": v}} for v in ("v0", "v1", "v2", "v3")),
    {"name": "amorlip", "amorlip": {"divergence": "kl_div_asym"}},
]


@pytest.fixture(scope="module")
def data(s3_server, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("shapes")
    return write_shapes_dataset(f"s3://{s3_server.bucket}/tests/sync-shapes", tmp, shards=2, per_shard=64,
                                resolutions=(16, 32))


class HostReads:
    """Counts the host reads that code under components/ makes while ``active``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.active = False
        self.calls: list[str] = []
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name, original):
        def method(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if self.active and caller.f_code.co_filename.startswith(COMPONENTS):
                self.calls.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return method

    def around(self, step):
        def counted_step(*args, **kwargs):
            self.active = True
            try:
                return step(*args, **kwargs)
            finally:
                self.active = False

        return counted_step


CASES = [(o, 1) for o in OBJECTIVES] + [(OBJECTIVES[0], 2), (OBJECTIVES[5], 4)]  # clip, fastclip-v3 accumulating


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "accumulation"), CASES,
                         ids=[f"{o.get('fastclip', {}).get('version', o['name'])}-x{k}" for o, k in CASES])
def test_a_training_step_reads_nothing_on_the_host(objective, accumulation, data, s3_prefix, monkeypatch):
    reads = HostReads(monkeypatch)
    steps = []
    step = loop.train_step

    def recorded(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", reads.around(recorded))
    doc = recipe_dict(objective, stage1=128, stage2=64)
    doc["checkpoint"] = {"every_steps": None, "every_minutes": None}
    doc["grad_accumulation"] = accumulation
    loop.train(parse_recipe(yaml.safe_dump(doc)),
               loop.RunOptions(data=data, output=store.join(s3_prefix, "train"), interactive=False, log_every=2),
               World(), torch.device("cpu"))
    assert len(steps) == 6  # 4 pretrain + 2 finetune steps all ran through the counted step
    assert reads.calls == []


def test_the_counter_sees_a_host_read(monkeypatch):
    """The check above can fail: a read made in code under components/ is counted, one made elsewhere is not."""
    reads = HostReads(monkeypatch)
    reads.around(lambda: float(torch.tensor(1.0)))()  # from this test file
    assert reads.calls == []
    # The loop's checkpoint-timer agreement reads a flag on the host (at log steps only, outside train_step).
    assert reads.around(loop._minutes_passed)(0.0, 1.0, World(), torch.device("cpu")) is True
    assert len(reads.calls) == 1 and reads.calls[0].startswith("item at ") and "loop.py" in reads.calls[0]
