"""One role's samples, from shard bytes to tensors: reading a run of samples out of a shard, decoding and checking
each sample, skipping and counting the corrupt ones (and failing when too many are), and turning good samples into
the batch's image and text tensors (the stage's augmentation and text mask)."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from components.common import datasets, store
from components.common.tars import read_samples
from components.train.data.augment import augment, fit
from components.train.data.sampling import LoaderPlan, Piece, RawSample, role_samples
from components.train.seeds import derive_seed
from components.train.text_masks import text_tokenizer, tokenize

log = logging.getLogger(__name__)

# A worker judges the corrupt fraction only after this many samples, so one bad sample early on is not fatal;
# the main process judges the whole epoch's fraction at its end, however small the epoch.
_MIN_SAMPLES_FOR_RATE = 200


class DataError(RuntimeError):
    """The data cannot be loaded as asked: a manifest that does not fit the request, a broken shard, or too many
    corrupt samples."""


class _CorruptSample(ValueError):
    """One sample is unusable; the message says which field and why."""


@dataclass(frozen=True)
class Sample:
    index: int
    image: Image.Image  # decoded, RGB
    text: str
    words: list[str]
    pos_order: list[int]


def _read_piece(piece: Piece, fields: frozenset[str]) -> Iterator[RawSample]:
    """The raw samples of a run inside one shard, streamed from the store (components/common/tars.py's reader)."""
    end = piece.skip + piece.take
    seen = 0
    try:
        with store.open_read(piece.uri) as stream:
            for sample in read_samples(stream, piece.uri):
                if seen >= piece.skip:
                    # Drop the other resolutions now: the shuffle buffer holds thousands of samples.
                    yield {k: v for k, v in sample.items() if k in fields or k == "__key__"} | {"__url__": piece.uri}
                seen += 1
                if seen == end:
                    return
    except (tarfile.TarError, ValueError) as exc:
        raise DataError(f"shard {piece.uri} is not a readable tar (after {seen} samples): {exc}") from None
    raise DataError(f"shard {piece.uri} holds {seen} samples, but the manifest says at least {end}")


class SampleStream:
    """One role's good samples for one epoch, in order; counts the corrupt samples it skips on the way."""

    def __init__(self, plan: LoaderPlan, epoch: int, role: int):
        self.plan, self.epoch, self.role = plan, epoch, role
        self.image_field = datasets.image_field(plan.image_size)
        self.fields = frozenset({self.image_field, datasets.CAPTION_FIELD, datasets.META_FIELD})
        self.read = self.corrupt = 0
        self._reported = (0, 0)
        self._raw = role_samples(plan, epoch, role, partial(_read_piece, fields=self.fields))

    def take(self, n: int) -> list[Sample]:
        good: list[Sample] = []
        while len(good) < n:
            raw = next(self._raw)
            self.read += 1
            try:
                good.append(self._parse(raw))
            except _CorruptSample as exc:
                self.corrupt += 1
                log.warning("skipping corrupt sample %s in %s: %s", raw["__key__"], raw["__url__"], exc)
                self._check_rate()
        return good

    def counts_since_last_call(self) -> tuple[int, int]:
        read, corrupt = self.read - self._reported[0], self.corrupt - self._reported[1]
        self._reported = (self.read, self.corrupt)
        return read, corrupt

    def close(self) -> None:
        self._raw.close()  # closes the shard stream being read (an S3 connection)

    def _parse(self, raw: RawSample) -> Sample:
        p = self.plan
        for name in sorted(self.fields):
            if name not in raw:
                raise _CorruptSample(f"no {name} field")
        try:
            image = Image.open(io.BytesIO(raw[self.image_field]))
            image = image.convert("RGB")  # decodes the whole image, so a truncated JPEG fails here
        except Exception as exc:  # noqa: BLE001 - PIL raises many types on bad bytes; any of them means corrupt
            raise _CorruptSample(f"undecodable {self.image_field}: {type(exc).__name__}: {exc}") from None
        try:
            text = raw[datasets.CAPTION_FIELD].decode("utf-8").strip()
            meta = json.loads(raw[datasets.META_FIELD])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _CorruptSample(f"bad caption or json: {exc}") from None
        if not text:
            raise _CorruptSample("empty caption")
        index = meta.get("index") if isinstance(meta, dict) else None
        if not isinstance(index, int) or not 0 <= index < p.num_samples:
            raise _CorruptSample(f"json index {index!r} is not a dataset index in [0, {p.num_samples})")
        if datasets.sample_key(index) != raw["__key__"]:
            raise _CorruptSample(f"json index {index} does not match the sample key")
        words, pos_order = meta.get("words"), meta.get("pos_order")
        if p.text_mask == "syntax" and not (
            isinstance(words, list)
            and isinstance(pos_order, list)
            and len(words) == len(pos_order)
            and all(isinstance(w, str) for w in words)
            and all(isinstance(o, int) for o in pos_order)
        ):
            raise _CorruptSample("json words/pos_order missing or mismatched (the syntax mask needs them)")
        return Sample(index, image, text, words or [], pos_order or [])

    def _check_rate(self) -> None:
        fraction = self.plan.max_corrupt_fraction
        if self.read >= _MIN_SAMPLES_FOR_RATE and self.corrupt > fraction * self.read:
            raise DataError(
                f"{self.corrupt} of {self.read} samples read from {self.plan.manifest_uri} by rank {self.plan.rank} "
                f"(worker role {self.role}, epoch {self.epoch}) are corrupt, more than max_corrupt_fraction={fraction}"
            )


class SampleEncoder:
    """Good samples to a batch's tensors: images augmented as the plan's stage asks (``augment.py``), normalised with
    the plan's mean and std; texts tokenised with the plan's text mask at its length."""

    def __init__(self, plan: LoaderPlan):
        self.plan = plan
        self._tokenizer = text_tokenizer(plan.text_mask, plan.text_length)
        self._mean = torch.tensor(plan.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(plan.std).view(1, 3, 1, 1)

    def images(self, samples: Sequence[Sample], seed: int) -> torch.Tensor:
        """(len(samples), 3, S, S) float32; ``seed`` seeds the augmentation, sample i drawing from (seed, i)."""
        size, aug = self.plan.image_size, self.plan.augment
        pixels = [
            fit(s.image, size) if aug is None else augment(s.image, size, aug, random.Random(derive_seed(seed, i)))
            for i, s in enumerate(samples)
        ]
        # uint8 to float and normalised once for the whole batch (what ToTensor + Normalize do per image).
        batch = torch.stack([pil_to_tensor(im) for im in pixels]).float().div_(255)
        return batch.sub_(self._mean).div_(self._std)

    def texts(self, samples: Sequence[Sample], seed: int) -> torch.Tensor:
        """Token ids (len(samples), text_length); ``seed`` seeds the mask's random choices."""
        return tokenize(
            self._tokenizer,
            self.plan.text_mask,
            [s.text for s in samples],
            [s.words for s in samples],
            [s.pos_order for s in samples],
            seed=seed,
        )
