"""Training checkpoints in the object store: everything needed to continue a run exactly where it stopped.

Layout under the run's output prefix::

    checkpoints/step-000001200.pt     one per save; the number is the run-wide step count done (all stages)

A checkpoint holds the model, the optimizer (its groups carry their peak lr, so the schedule is a function of the
position), the objective's state (u tables, lambda networks and their optimizer), the position (stage, step within
the stage), every rank's RNG states, the recipe it was trained with, and the world size. Rank 0 writes it; the store
publishes it atomically (staging key + server-side copy), so a run killed mid-save leaves the previous checkpoint as
the latest. Only tensors and plain containers are saved, and loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from components.common import store
from components.train.distributed import World

log = logging.getLogger(__name__)

FORMAT = "clipline-checkpoint/1"
_NAME = re.compile(r"step-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Position:
    stage: int  # index into the recipe's stages
    step: int  # optimizer steps done in that stage


def checkpoint_dir(output: str) -> str:
    return store.join(output, "checkpoints")


def checkpoint_uri(output: str, global_step: int) -> str:
    return store.join(checkpoint_dir(output), f"step-{global_step:09d}.pt")


def list_checkpoints(output: str) -> list[tuple[int, str]]:
    """(global step, uri) of every published checkpoint, oldest first."""
    found = []
    for info in store.list_objects(checkpoint_dir(output) + "/"):
        match = _NAME.search(info.uri)
        if match:
            found.append((int(match.group(1)), info.uri))
    return sorted(found)


def latest_checkpoint(output: str) -> str | None:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def gather_rng_states(world: World) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: every rank must call it)."""
    mine = rng_state()
    if world.size == 1:
        return [mine]
    everyone: list[Any] = [None] * world.size
    dist.all_gather_object(everyone, mine)
    return everyone


# ------------------------------------------------------------------------------------------------------- save / load


def save(
    output: str,
    *,
    global_step: int,
    position: Position,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: torch.nn.Module,
    rng_states: list[dict[str, Any]],
    recipe: dict[str, Any],
    keep: int,
) -> str:
    """Publish a checkpoint (rank 0 only), then delete all but the newest ``keep``; returns its URI."""
    state = {
        "format": FORMAT,
        "global_step": global_step,
        "position": {"stage": position.stage, "step": position.step},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "objective": objective.state_dict(),
        "rng": rng_states,
        "world_size": len(rng_states),
        "recipe": recipe,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    uri = checkpoint_uri(output, global_step)
    store.put_bytes(uri, buffer.getvalue())
    for _, old in list_checkpoints(output)[:-keep]:
        store.delete(old)
    return uri


def load(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(store.get_bytes(uri)), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{uri} is not a loadable checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{uri} is not a {FORMAT} checkpoint")
    return state


def recipe_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between the recipe a checkpoint was trained with and this run's."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += recipe_differences(a, b, name + ".")
        elif a != b:
            diffs.append(f"{name}: checkpoint {a!r}, recipe {b!r}")
    return diffs
