"""Manifests: the small JSON documents stages hand each other (URIs, counts, checksums, config, metrics).

A stage writes its big outputs first and its manifest last, so a manifest's presence means the output is complete.
"""

from __future__ import annotations

import time
from typing import Any

from components.common import store

SCHEMA_VERSION = 1


class ManifestError(ValueError):
    pass


def write_manifest(uri: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Publish a manifest of ``kind`` atomically at ``uri``; returns what was written."""
    doc = {"kind": kind, "schema_version": SCHEMA_VERSION, "created_unix": round(time.time(), 3), **body}
    store.put_json(uri, doc)
    return doc


def read_manifest(uri: str, kind: str) -> dict[str, Any]:
    try:
        doc = store.get_json(uri)
    except store.InvalidJSON as exc:
        raise ManifestError(f"{exc} (expected a {kind} manifest)") from None
    if doc.get("kind") != kind:
        raise ManifestError(f"{uri} is a {doc.get('kind')!r} manifest, expected {kind!r}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{uri} has schema_version {doc.get('schema_version')}, "
                            f"this clipline reads {SCHEMA_VERSION}")
    return doc
