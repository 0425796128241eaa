"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), as open_clip's ``SigLipLoss``.

Distributed: each rank gathers the text features of all ranks with autograd and scores its B local images against
all G texts; matched pairs are +1, everything else -1. The loss is normalised by the local batch size, as upstream,
so DDP's average over ranks equals the single-process loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.common.recipe import SigLipSettings
from components.train.distributed import all_gather_with_grad
from components.train.objectives.base import Objective, ObjectiveContext, ObjectiveOutput, fp32_logits


class SigLipObjective(Objective):
    name = "siglip"

    def __init__(self, context: ObjectiveContext, settings: SigLipSettings):
        super().__init__(context)
        self.settings = settings

    def init_model(self, model) -> None:
        if getattr(model, "logit_bias", None) is None:
            raise ValueError("siglip needs a model with a logit_bias: create it with init_logit_bias")
        with torch.no_grad():
            model.logit_scale.fill_(self.settings.init_logit_scale)
            model.logit_bias.fill_(self.settings.init_logit_bias)

    def loss(self, image_features, text_features, logit_scale, logit_bias, indices, prepared) -> ObjectiveOutput:
        if logit_bias is None:
            raise ValueError("siglip needs the model's logit_bias")
        with fp32_logits(image_features.device):
            x, y = image_features.float(), text_features.float()
            all_y = all_gather_with_grad(y, self.world)
            logits = logit_scale.float() * x @ all_y.T + logit_bias.float()
            b = x.shape[0]
            signs = -torch.ones_like(logits)
            rows = torch.arange(b, device=logits.device)
            signs[rows, rows + self.world.rank * b] = 1.0
            loss = -F.logsigmoid(signs * logits).sum() / b
        return ObjectiveOutput(loss, {"loss": loss.detach(), "logit_scale": logit_scale.detach(),
                                      "logit_bias": logit_bias.detach()})
