"""Step time of every objective against clip on the same model and batch, and the memory of their state.

    .venv/bin/python benchmarks/objectives.py [--batch 256] [--rounds 5] [--steps 6]

One training step = the training loop's own ``train_step`` (forward, objective, backward, clipping, AdamW step,
objective hooks) on the model and optimizer the loop builds. The model is the tiny CPU CLIP of platform-facts (ViT
2x64 at 32 px, text 2x64 at 16 tokens); images and tokens are random, which does not change the cost. The figure
per case is the median over rounds of a round's seconds per step. Overheads are ratios measured in this one run, so
they compare like with like on this machine. ``StepSettings`` lets benchmarks/gpu.py time a ViT-B on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import get_args

import torch

from components.common.open_clip_models import model_config, tower_sizes
from components.common.recipe import (
    AmorLipSettings,
    Divergence,
    FastClipSettings,
    FastClipVersion,
    ObjectiveSpec,
    OptimizerSpec,
)
from components.train.accelerator import precision_autocast
from components.train.clipa import build_stage_model
from components.train.data import Batch
from components.train.loop import train_step
from components.train.objectives import ObjectiveContext, build_objective
from components.train.objectives.fastclip import table_memory
from components.train.optim import build_optimizer
from components.train.plan import model_kwargs

TINY = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2),
)
DATASET_SIZE = 100_000

CASES = {
    "clip": ObjectiveSpec(name="clip"),
    "clip (control)": ObjectiveSpec(name="clip"),  # a second, identical run: its "vs clip" is the noise floor
    "siglip": ObjectiveSpec(name="siglip"),
    **{f"fastclip-{v}": ObjectiveSpec(name="fastclip", fastclip=FastClipSettings(version=v))
       for v in get_args(FastClipVersion)},
    **{f"amorlip-{d}": ObjectiveSpec(name="amorlip", amorlip=AmorLipSettings(divergence=d, lambda_steps=3))
       for d in get_args(Divergence)},
}


def state_bytes(objective: torch.nn.Module) -> int:
    """Bytes of the objective's checkpointed state (tables, networks, their optimizer moments)."""
    total = 0

    def walk(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(objective.state_dict())
    return total


@dataclass(frozen=True)
class StepSettings:
    """What a timed step runs on. The defaults are this script's CPU case; benchmarks/gpu.py sets a ViT-B on CUDA."""

    model: str | dict = field(default_factory=lambda: TINY)  # an open_clip config name or an inline config
    device: str = "cpu"
    precision: str = "fp32"  # fp32 or amp_bf16, as a recipe resolves it (accelerator.precision)
    compile: bool = False
    # --quick's CPU check compiles with aot_eager: the same tracing as inductor in seconds, without its C++ build
    compile_backend: str = "inductor"
    warmup: int = 3  # steps before timing (compilation, allocator, AdamW state), the last one in epoch 1


class Runner:
    """One objective's model, optimizer and data, stepped on demand so that cases can be timed in turns. A step is
    the loop's own ``train_step`` on the model and optimizer the loop builds."""

    def __init__(self, spec: ObjectiveSpec, batch: int, settings: StepSettings = StepSettings()):
        self.device = torch.device(settings.device)
        torch.manual_seed(0)
        self.model = build_stage_model(settings.model, device=self.device, output_dict=True, **model_kwargs(spec))
        sizes = tower_sizes(model_config(settings.model))
        self.objective = build_objective(spec, ObjectiveContext(
            dataset_size=DATASET_SIZE, embed_dim=sizes.embed_dim, total_epochs=2, run_id=f"bench-{time.time_ns()}",
            device=str(self.device))).to(self.device)
        self.objective.init_model(self.model)
        self.optimizer = build_optimizer(self.model, self.objective, 1e-3, OptimizerSpec())
        self.forward = (torch.compile(self.model, backend=settings.compile_backend) if settings.compile
                        else self.model)
        self.autocast = precision_autocast(settings.precision, self.device)
        gen = torch.Generator().manual_seed(0)
        side = sizes.image_size
        self.images = torch.randn(batch, 3, side, side, generator=gen).to(self.device)
        self.texts = torch.randint(0, 49408, (batch, sizes.context_length), generator=gen).to(self.device)
        self.order = torch.randperm(DATASET_SIZE, generator=gen).to(self.device)
        self.batch, self.step_count = batch, 0
        self.objective.on_epoch_start(0)

    def step(self, batch: Batch | None = None) -> None:
        """One step on ``batch`` (a loader's, on the device), by default on this runner's random one."""
        if batch is None:
            start = (self.step_count * self.batch) % DATASET_SIZE
            batch = Batch(self.images, self.texts, self.order[start:][: self.batch], epoch=0, step=self.step_count,
                          read=0, corrupt=0)
        self.step_count += 1
        train_step(self.model, self.forward, self.objective, self.optimizer, batch,
                   grad_clip_norm=OptimizerSpec().grad_clip_norm, autocast=self.autocast)

    def warm_up(self, steps: int) -> None:
        """Steps in epoch 0, then one in epoch 1: the steady state is timed, past the objectives' first epoch."""
        for _ in range(max(0, steps - 1)):
            self.step()
        self.objective.on_epoch_start(1)
        self.step()

    def timed(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps, the device synchronised at both ends (the host queues ahead on a
        GPU, so only the block's end says when its work is done)."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class CaseTiming:
    step_s: float  # median over the rounds of the round's seconds per step
    state_bytes: int  # the objective's checkpointed state
    peak_gpu_bytes: int  # the most GPU memory allocated during this case's steps (0 on a CPU)
    resident_gpu_bytes: int  # held between steps by every case of the run together (models, optimizers, tables)


def measure(cases: dict[str, ObjectiveSpec], batch: int, rounds: int, steps: int,
            settings: StepSettings = StepSettings()) -> dict[str, CaseTiming]:
    """Median step time per case, timed in interleaved rounds so that machine noise hits every case alike."""
    runners = {name: Runner(spec, batch, settings) for name, spec in cases.items()}
    for runner in runners.values():
        runner.warm_up(settings.warmup)
    cuda = torch.device(settings.device).type == "cuda"
    resident = torch.cuda.memory_allocated() if cuda else 0
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks = dict.fromkeys(runners, 0)
    for _ in range(rounds):
        for name, runner in runners.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[name].append(runner.timed(steps))
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() if cuda else 0)
    return {name: CaseTiming(statistics.median(t), state_bytes(runners[name].objective), peaks[name], resident)
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6, help="steps per case per round")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only or k.startswith("clip")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, median of "
          f"{args.rounds} rounds of {args.steps} interleaved steps per objective, dataset size {DATASET_SIZE:,}")
    results = measure(cases, args.batch, args.rounds, args.steps)
    base = results["clip"].step_s
    print(f"{'objective':<22}{'step ms':>10}{'vs clip':>10}{'state bytes':>14}")
    for name, timing in results.items():
        print(f"{name:<22}{timing.step_s * 1e3:>10.1f}{(timing.step_s / base - 1) * 100:>+9.1f}%"
              f"{timing.state_bytes:>14,}")
    print("\nFastCLIP per-sample tables for 400M samples on an 8-GPU node (one copy per node vs one per rank):")
    for version in ("v0", "v1", "v3", "v2"):
        m = table_memory(version)
        print(f"  {version}: {m['bytes_per_sample']} B/sample, {m['node_shared'] / 1e9:.1f} GB per node shared, "
              f"{m['node_replicated'] / 1e9:.1f} GB if replicated per rank")


if __name__ == "__main__":
    main()
