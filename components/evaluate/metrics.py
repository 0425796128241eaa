"""Zero-shot metrics, defined exactly as CLIP_benchmark defines them (clip_benchmark/metrics/zeroshot_*.py).

Classification: the classifier of a class is the mean of its templates' L2-normalised text embeddings, normalised
again; logits = 100 * normalised image embedding @ classifier. acc@k counts a sample when its label is among the k
highest logits (torch.topk, so ties break as there); acc5 exists only with at least 5 classes; mean per-class recall
is scikit-learn's balanced accuracy (the mean recall over the classes that occur in the targets).

Retrieval (scores = texts x images cosine similarities, a text's positive is the image it captions):
image_retrieval_recall@k  text -> image: the share of texts whose image is among their top k images
text_retrieval_recall@k   image -> text: the share of images with at least one of their captions among the top k texts
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def zeroshot_classifier(class_text_embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per class a (templates, dim) tensor of raw text embeddings -> the (dim, classes) classifier."""
    weights = []
    for emb in class_text_embeddings:
        mean = F.normalize(emb.float(), dim=-1).mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


def classification_logits(image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return 100.0 * F.normalize(image_embeddings.float(), dim=-1) @ classifier


def topk_accuracies(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> list[float]:
    # One topk at the largest k, sliced per k: CLIP_benchmark's accuracy(), so ties break identically.
    pred = logits.topk(max(ks), dim=1, largest=True, sorted=True)[1]
    correct = pred == target.view(-1, 1)
    return [correct[:, :k].any(dim=1).float().mean().item() for k in ks]


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true class, predicted class) -> count."""
    flat = target.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict:
    """{"metrics": {acc1, [acc5], mean_per_class_recall}, "per_class_recall": [float | None], "confusion": tensor}.

    A class with no sample has no recall (None) and, as in balanced accuracy, does not enter the mean."""
    num_classes = logits.shape[1]
    ks = (1, 5) if num_classes >= 5 else (1,)
    metrics = dict(zip(("acc1", "acc5"), topk_accuracies(logits, target, ks)))
    confusion = confusion_matrix(target, logits.argmax(dim=1), num_classes)
    support = confusion.sum(dim=1)
    recall = confusion.diagonal().double() / support.clamp(min=1)
    present = support > 0
    metrics["mean_per_class_recall"] = recall[present].mean().item()
    per_class = [recall[i].item() if present[i] else None for i in range(num_classes)]
    return {"metrics": metrics, "per_class_recall": per_class, "confusion": confusion}


def retrieval_recalls(scores: torch.Tensor, positives: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Per row of ``scores`` (queries x candidates): 1.0 when a positive candidate is among the top k, else 0.0.

    CLIP_benchmark's recall_at_k(...) > 0, computed by gathering the positive flags at the top-k indices rather than
    through a (queries, k, candidates) one-hot tensor; the same topk call, so the same tie-breaking. ``k`` above
    the number of candidates is clamped (CLIP_benchmark would fail there)."""
    k = min(k, scores.shape[1])
    hits = []
    for start in range(0, scores.shape[0], chunk):
        top = scores[start:start + chunk].topk(k, dim=1)[1]
        hits.append(positives[start:start + chunk].gather(1, top).any(dim=1))
    return torch.cat(hits).float()


def retrieval_metrics(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                      text_image_index: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    scores = F.normalize(text_embeddings.float(), dim=-1) @ F.normalize(image_embeddings.float(), dim=-1).T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(scores)), text_image_index] = True
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = retrieval_recalls(scores, positives, k).mean().item()
    for k in ks:
        metrics[f"text_retrieval_recall@{k}"] = retrieval_recalls(scores.T, positives.T, k).mean().item()
    return metrics
