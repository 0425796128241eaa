"""The settings users tune for an ingest run (validated, frozen; loadable from YAML via components.common.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from components.common.config import Config
from components.ingest.egress import DEFAULT_MAX_BYTES, networks

InputFormat = Literal["parquet", "csv", "tsv", "jsonl"]
ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]

# Pillow's default decompression-bomb limit (about 9,459 px squared): large enough for any real photo, small enough
# that a tiny PNG claiming 20,000 x 20,000 pixels is refused before its 1.2 GB of pixels are allocated.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
DEFAULT_MAX_IMAGE_BYTES = DEFAULT_MAX_BYTES  # egress.py's cap, the one the download guard enforces


class IngestOptions(Config):
    """``allow_networks`` is normalised to CIDRs (``192.0.2.7`` -> ``192.0.2.7/32``); a bad one names itself."""

    # What the shards hold: every image is re-encoded as JPEG at this size (img2dataset's resize modes).
    image_size: int = Field(256, ge=8, le=8192)
    resize_mode: ResizeMode = "border"
    number_sample_per_shard: int = Field(10_000, ge=1)
    # Filters applied after download; a rejected image counts as a failure with its reason.
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(None, gt=1.0)  # None: no limit
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # A response larger than this is dropped before decoding ("refused: size"): no image of a training set is near.
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)
    # Networks fetched from although they are not public (components/ingest/egress.py refuses loopback, private,
    # link-local, CGNAT, multicast, ... by default): CIDRs of your own image servers, e.g. ["10.20.0.0/16"].
    allow_networks: tuple[str, ...] = ()

    # How fast: worker processes (None: one per CPU, at most one per shard) and download threads per process.
    processes: int | None = Field(None, ge=1)
    threads: int = Field(32, ge=1)
    timeout: int = Field(10, ge=1)  # seconds per request
    retries: int = Field(0, ge=0)  # extra attempts per URL after a failed download

    # The URL list: columns and format (None: inferred from the file name).
    url_col: str = "url"
    caption_col: str = "caption"
    extra_columns: tuple[str, ...] = ()  # copied into each sample's .json (e.g. a label for evaluation)
    input_format: InputFormat | None = None

    # A rerun skips shards already committed under the output prefix; False deletes them and starts over.
    incremental: bool = True
    # Below this fraction of successful downloads the run fails and writes no manifest.
    min_success_rate: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("allow_networks", mode="before")
    @classmethod
    def _cidrs(cls, value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else list(value or ())
        return networks(str(item) for item in items)
