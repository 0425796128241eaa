"""Shared by the stages: object store, embedded S3 server, config loading, recipe schema, manifests."""
