"""Shared fixtures. Logic lives in tests/peers.py; fixtures only start and stop peers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import Orthanc, Storescp, require_tools


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
