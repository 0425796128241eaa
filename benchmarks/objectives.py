"""Step time of every objective against clip on the same model and batch, and the memory of their state.

    .venv/bin/python benchmarks/objectives.py [--batch 256] [--rounds 5] [--steps 6]

One training step = model forward, objective, backward, AdamW step, objective hooks. The model is the tiny CPU
CLIP of platform-facts (ViT 2x64 at 32 px, text 2x64 at 16 tokens); images and tokens are random, which does not
change the cost. Overheads are ratios measured in this one run, so they compare like with like on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import get_args

import torch
from open_clip.model import CLIP

from components.common.recipe import AmorLipSettings, Divergence, FastClipSettings, FastClipVersion, ObjectiveSpec
from components.train.objectives import ObjectiveContext, build_objective
from components.train.objectives.fastclip import table_memory

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


class Runner:
    """One objective's model, optimizer and data, stepped on demand so that cases can be timed in turns."""

    def __init__(self, spec: ObjectiveSpec, batch: int):
        torch.manual_seed(0)
        self.model = CLIP(**TINY, init_logit_bias=-10.0 if spec.name == "siglip" else None, output_dict=True)
        self.objective = build_objective(spec, ObjectiveContext(
            dataset_size=DATASET_SIZE, embed_dim=TINY["embed_dim"], total_epochs=2, run_id=f"bench-{time.time_ns()}"))
        self.objective.init_model(self.model)
        groups = self.objective.param_groups(self.model, lr=1e-3)
        claimed = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in claimed]
        self.optimizer = torch.optim.AdamW([{"params": rest}, *groups], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.2)
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, 32, 32, generator=gen)
        self.texts = torch.randint(0, 49408, (batch, 16), generator=gen)
        self.order = torch.randperm(DATASET_SIZE, generator=gen)
        self.batch, self.step_count = batch, 0
        self.objective.on_epoch_start(0)

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        indices = self.order[(self.step_count * self.batch) % DATASET_SIZE:][: self.batch]
        self.step_count += 1
        start = time.perf_counter()
        out = self.model(self.images, self.texts)
        loss = self.objective(out["image_features"], out["text_features"], out["logit_scale"],
                              out.get("logit_bias"), indices).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.objective.optimizer_step(self.model, self.optimizer)
        return time.perf_counter() - start


def measure(cases: dict[str, ObjectiveSpec], batch: int, rounds: int, steps: int) -> dict[str, tuple[float, int]]:
    """Median step time per case, timed in interleaved rounds so that machine noise hits every case alike."""
    runners = {name: Runner(spec, batch) for name, spec in cases.items()}
    for runner in runners.values():  # warm-up in epoch 0, then time the steady state of epoch 1
        for _ in range(3):
            runner.step()
        runner.objective.on_epoch_start(1)
        runner.step()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name] += [runner.step() for _ in range(steps)]
    return {name: (statistics.median(t), state_bytes(runners[name].objective)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6, help="steps per case per round")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only or k.startswith("clip")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, median of "
          f"{args.rounds} x {args.steps} interleaved steps per objective, dataset size {DATASET_SIZE:,}")
    results = measure(cases, args.batch, args.rounds, args.steps)
    base = results["clip"][0]
    print(f"{'objective':<22}{'step ms':>10}{'vs clip':>10}{'state bytes':>14}")
    for name, (seconds, nbytes) in results.items():
        print(f"{name:<22}{seconds * 1e3:>10.1f}{(seconds / base - 1) * 100:>+9.1f}%{nbytes:>14,}")
    print("\nFastCLIP per-sample tables for 400M samples on an 8-GPU node (one copy per node vs one per rank):")
    for version in ("v0", "v1", "v3", "v2"):
        m = table_memory(version)
        print(f"  {version}: {m['bytes_per_sample']} B/sample, {m['node_shared'] / 1e9:.1f} GB per node shared, "
              f"{m['node_replicated'] / 1e9:.1f} GB if replicated per rank")


if __name__ == "__main__":
    main()
