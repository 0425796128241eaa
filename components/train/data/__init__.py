"""The training data loader: streams preprocessed training shards (``components.common.datasets``) from the object
store and yields fixed-size batches of normalised images, token ids and dense dataset indices.

What the trainer and the objectives can rely on:

- Full batches only: every rank gets exactly ``batch_size`` samples per step and ``steps_per_epoch`` steps per
  virtual epoch (``epoch_samples // (batch_size * world.size)``), because FastCLIP's and AmorLIP's per-sample
  estimators need the same B on every rank.
- Determinism: every random choice (shard order, shard resampling, shuffle buffer, text mask) draws from a seed
  derived from (seed, epoch, rank, worker role, step), never from process ids, clocks or the trainer's RNG.
- Resumption: ``loader.epoch(e, start_step=k)`` yields exactly the batches an uninterrupted ``loader.epoch(e)``
  yields from step k on (same manifest, seed, batch size, world size, worker count and shuffle buffer).
- Disjoint ranks: without resampling, each (rank, worker) reads its own slice of the epoch's shuffled sequence of
  samples, so no two ranks see the same sample within a virtual epoch.
- Corrupt samples (undecodable JPEG, bad JSON, missing field) are skipped, logged and counted (``loader.stats``);
  more than ``max_corrupt_fraction`` of them fails loudly.

How steps map to worker processes: the DataLoader collects batches from its W workers round-robin, so the batch of
step s comes from the worker playing *role* s mod W. Each role owns one deterministic stream of samples per epoch (its
slice of the shards, or its resampled shards, through its own shuffle buffer) and cuts consecutive batches from it.

Resume cost: to start at step k a role replays its own stream up to its first batch at or after k. The shard bytes
are streamed and the JPEGs decoded again (a corrupt sample shifts every later batch, and only decoding tells a
truncated JPEG from a good one), but nothing is tokenised, normalised or sent to the main process. So resuming costs
at most one virtual epoch of reading and decoding, split over the workers, and nothing at an epoch boundary.

One module per job: ``sampling`` (which samples each rank and worker role reads, in which order), ``samples``
(reading, decoding and checking one sample, skipping corrupt ones, encoding good ones) and ``loader`` (the
DataLoader, its batches and counts, and the functions that build a loader).
"""

from components.train.data.loader import Batch, TrainLoader, stage_loader, train_loader
from components.train.data.samples import DataError

__all__ = ["Batch", "DataError", "TrainLoader", "stage_loader", "train_loader"]
