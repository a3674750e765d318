"""The benchmarks still run end to end: quick runs of bench/receive.py and bench/send.py.

Correctness only (every receiver stored every instance, the tables are printed); the
timings of a quick run mean nothing and are not checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from peers import REPO_ROOT, require_tools

BENCH = REPO_ROOT / "bench"
RECEIVERS = ("dcmtk storescp", "Orthanc", "dicom_node")


def _run_quick(script: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{script.name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def _table_rows(out: str, name: str) -> list[str]:
    """Lines of the rates tables for ``name``: border, name, median, rounds, ratios."""
    return re.findall(rf"^\W+{re.escape(name)}\W.*\d+\.\d+x.*$", out, flags=re.MULTILINE)


def _verdicts(out: str, target: str) -> list[str]:
    return re.findall(rf"{re.escape(target)}\W.*\b(PASS|FAIL)\b", out)


@pytest.mark.timeout(150)
def test_receive_quick_stores_all_on_every_receiver() -> None:
    require_tools("storescu", "storescp", "echoscu", "Orthanc")
    out = _run_quick(BENCH / "receive.py")
    for name in RECEIVERS:
        for level in (1, 2):
            assert f"{name:<15} x{level}: stored all 20/20" in out
        assert len(_table_rows(out, name)) == 2  # one row in each load's table
    assert "node peak RSS (VmHWM) x1:" in out
    for target in (
        "1 assoc: node vs storescp",
        "1 assoc: node vs Orthanc",
        "2 assoc: node vs storescp",
    ):
        assert len(_verdicts(out, target)) == 1


@pytest.mark.timeout(90)
def test_send_quick_stores_all_from_both_senders() -> None:
    require_tools("storescu", "storescp", "echoscu")
    out = _run_quick(BENCH / "send.py")
    for name in ("dcmtk storescu", "dicom_node"):
        assert f"{name:<15}: stored all 20/20" in out
        assert len(_table_rows(out, name)) == 1
    assert len(_verdicts(out, "send: node vs storescu")) == 1
