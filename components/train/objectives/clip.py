"""OpenCLIP's symmetric InfoNCE, computed as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``.

Each rank scores its B local anchors against all G gathered features (memory O(B*G), not O(G^2)); gradients flow
back through the gather so every rank's features also receive their gradient as negatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.train.distributed import all_gather_with_grad
from components.train.objectives.base import Objective, ObjectiveOutput, fp32_logits


class ClipObjective(Objective):
    name = "clip"

    def init_model(self, model) -> None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07))

    def loss(self, image_features, text_features, logit_scale, logit_bias, indices, prepared) -> ObjectiveOutput:
        with fp32_logits(image_features.device):
            x, y, s = image_features.float(), text_features.float(), logit_scale.float()
            all_x, all_y = all_gather_with_grad(x, self.world), all_gather_with_grad(y, self.world)
            logits_image = s * x @ all_y.T
            logits_text = s * y @ all_x.T
            if logit_bias is not None:
                logits_image = logits_image + logit_bias
                logits_text = logits_text + logit_bias
            labels = torch.arange(x.shape[0], device=x.device) + self.world.rank * x.shape[0]
            loss = (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
        return ObjectiveOutput(loss, {"loss": loss.detach(), "logit_scale": s.detach()})
