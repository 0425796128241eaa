"""Aggregate img2dataset's per-shard stats into the manifest's counts: {total, success, failed: {reason: n}}."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from components.ingest.egress import refusal_kind

SUCCESS = "success"  # img2dataset's status_dict key for a sample written to the shard
# A sample img2dataset counted but gave no status (an exception while writing it; its parquet row tells more).
UNRECORDED = "error while writing the sample"


def bomb_reason(max_image_pixels: int) -> str:
    return f"image larger than max_image_pixels={max_image_pixels} (decompression bomb guard)"


def normalise_reason(reason: str, max_image_pixels: int) -> str:
    """One stable reason per cause: OpenCV's size assertion and img2dataset's area check are the same refusal, and
    every egress refusal counts as ``refused: scheme``, ``refused: address`` or ``refused: size`` (egress.py)."""
    refused = refusal_kind(reason)
    if refused:
        return refused
    if "CV_IO_MAX_IMAGE_PIXELS" in reason or reason == "image area too large":
        return bomb_reason(max_image_pixels)
    return reason


def aggregate(stats: Iterable[dict[str, Any]], max_image_pixels: int) -> dict[str, Any]:
    total = success = 0
    failed: Counter[str] = Counter()
    for shard in stats:
        total += shard["count"]
        success += shard["successes"]
        for reason, n in shard["status_dict"].items():
            if reason != SUCCESS:
                failed[normalise_reason(reason, max_image_pixels)] += n
    unrecorded = total - success - sum(failed.values())
    if unrecorded > 0:
        failed[UNRECORDED] += unrecorded
    return {"total": total, "success": success, "failed": dict(failed.most_common())}


def success_rate(counts: dict[str, Any]) -> float:
    return counts["success"] / counts["total"] if counts["total"] else 0.0


def top_reasons(counts: dict[str, Any], k: int = 3) -> str:
    top = list(counts["failed"].items())[:k]
    return "; ".join(f"{reason!r} x{n}" for reason, n in top) or "none recorded"
