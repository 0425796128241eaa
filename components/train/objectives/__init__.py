"""Training objectives, registered by name (``objective.name`` in a recipe).

    clip      OpenCLIP's InfoNCE (the baseline)
    siglip    pairwise sigmoid loss
    fastclip  FastCLIP v0-v3; SogCLR / iSogCLR with gamma_schedule: constant
    amorlip   AmorLIP with log_l2, kl_div_asym or js_div amortisation
"""

from __future__ import annotations

from typing import get_args

from components.common.recipe import ObjectiveName, ObjectiveSpec
from components.train.objectives.base import Objective, ObjectiveContext, ObjectiveOutput

__all__ = ["NAMES", "Objective", "ObjectiveContext", "ObjectiveOutput", "build_objective"]

NAMES = get_args(ObjectiveName)


def build_objective(spec: ObjectiveSpec, context: ObjectiveContext) -> Objective:
    """The objective a recipe names, with its settings block."""
    if spec.name == "clip":
        from components.train.objectives.clip import ClipObjective

        return ClipObjective(context)
    if spec.name == "siglip":
        from components.train.objectives.siglip import SigLipObjective

        return SigLipObjective(context, spec.siglip)
    if spec.name == "fastclip":
        from components.train.objectives.fastclip import FastClipObjective

        return FastClipObjective(context, spec.fastclip)
    if spec.name == "amorlip":
        from components.train.objectives.amorlip import AmorLipObjective

        return AmorLipObjective(context, spec.amorlip)
    raise ValueError(f"unknown objective {spec.name!r}; allowed: {', '.join(NAMES)}")
