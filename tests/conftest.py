"""Shared fixtures: one real embedded S3 server (SeaweedFS) per test session; no mocks of the object store."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from components.common import embedded_store


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 server; its endpoint and credentials are exported for the whole session."""
    state_dir = tmp_path_factory.mktemp("s3store")
    with embedded_store.running(state_dir) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh s3:// prefix for one test."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"s3://{s3_server.bucket}/tests/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["s3", "file"])
def any_prefix(request, tmp_path: Path) -> str:
    """The same test against both backends."""
    if request.param == "s3":
        return request.getfixturevalue("s3_prefix")
    return (tmp_path / "store").as_uri()
