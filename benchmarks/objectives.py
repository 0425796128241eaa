"""Step time of every objective against clip on the same model and batch, and the memory of their state.

    .venv/bin/python benchmarks/objectives.py [--batch 256] [--steps 20]

One training step = model forward, objective, backward, AdamW step, objective hooks. The model is the tiny CPU
CLIP of platform-facts (ViT 2x64 at 32 px, text 2x64 at 16 tokens); images and tokens are random, which does not
change the cost. Overheads are ratios measured in this one run, so they compare like with like on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from open_clip.model import CLIP

from components.common.recipe import AmorLipSettings, FastClipSettings, ObjectiveSpec
from components.train.objectives import ObjectiveContext, build_objective

TINY = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2),
)
DATASET_SIZE = 100_000

CASES = {
    "clip": ObjectiveSpec(name="clip"),
    "siglip": ObjectiveSpec(name="siglip"),
    **{f"fastclip-{v}": ObjectiveSpec(name="fastclip", fastclip=FastClipSettings(version=v)) for v in ("v0", "v1", "v2", "v3")},
    **{f"amorlip-{d}": ObjectiveSpec(name="amorlip", amorlip=AmorLipSettings(divergence=d, lambda_steps=3))
       for d in ("log_l2", "kl_div_asym", "js_div")},
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


def time_objective(spec: ObjectiveSpec, batch: int, steps: int, warmup: int = 3) -> tuple[float, int]:
    torch.manual_seed(0)
    model = CLIP(**TINY, init_logit_bias=-10.0 if spec.name == "siglip" else None, output_dict=True)
    objective = build_objective(spec, ObjectiveContext(dataset_size=DATASET_SIZE, embed_dim=TINY["embed_dim"],
                                                       total_epochs=2, run_id=f"bench-{time.time_ns()}"))
    objective.init_model(model)
    groups = objective.param_groups(model, lr=1e-3)
    claimed = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    optimizer = torch.optim.AdamW([{"params": rest}, *groups], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.2)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    texts = torch.randint(0, 49408, (batch, 16), generator=gen)
    order = torch.randperm(DATASET_SIZE, generator=gen)
    objective.on_epoch_start(0)
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            objective.on_epoch_start(1)  # time the steady state: moving averages and ramps active
        indices = order[(step * batch) % DATASET_SIZE:][:batch]
        start = time.perf_counter()
        out = model(images, texts)
        loss = objective(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"),
                         indices).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_optimizer_step(model, optimizer)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), state_bytes(objective)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only or k == "clip"}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.steps} steps, dataset size {DATASET_SIZE:,}")
    results = {name: time_objective(spec, args.batch, args.steps) for name, spec in cases.items()}
    base = results["clip"][0]
    print(f"{'objective':<22}{'step ms':>10}{'vs clip':>10}{'state bytes':>14}")
    for name, (seconds, nbytes) in results.items():
        print(f"{name:<22}{seconds * 1e3:>10.1f}{(seconds / base - 1) * 100:>+9.1f}%{nbytes:>14,}")


if __name__ == "__main__":
    main()
