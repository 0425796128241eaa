"""Stage 2: filter bad samples, give each a dense index, resize, precompute syntax-mask ranks, re-shard."""
