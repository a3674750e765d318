"""Shared fixtures. Logic lives in tests/peers.py; fixtures only start and stop peers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import Orthanc, Storescp, require_tools
from pynetdicom import AE
from requestors import associate_keeping_responses
from services import PostgresServer, RedisServer, require_services


@pytest.fixture(autouse=True)
def _requestors_keep_their_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pynetdicom requestor of a test keeps its responses (tests/requestors.py)."""
    monkeypatch.setattr(AE, "associate", associate_keeping_responses)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc (AET "ORTHANC", no modalities) for one test."""
    require_tools("Orthanc")
    with Orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Storescp]:
    """A dcmtk storescp (AET "STORESCP", all transfer syntaxes) for one test."""
    require_tools("storescp", "echoscu")
    with Storescp(tmp_path / "storescp") as scp:
        yield scp


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL server for a test module; each test takes a database with new_database()."""
    require_services()
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server (the Celery broker) for one test."""
    require_services()
    with RedisServer(tmp_path / "redis") as server:
        yield server
