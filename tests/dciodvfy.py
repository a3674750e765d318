"""Run dciodvfy (dicom3tools) on a file and collect what it reports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def dciodvfy_path() -> Path:
    """dciodvfy on PATH, else the one next to the running interpreter (the venv's bin)."""
    found = shutil.which("dciodvfy")
    if found:
        return Path(found)
    candidate = Path(sys.executable).parent / "dciodvfy"
    if not candidate.exists():
        raise FileNotFoundError(f"dciodvfy neither on PATH nor at {candidate}")
    return candidate


def dciodvfy_report(path: Path) -> list[str]:
    """Every non-empty line dciodvfy prints for ``path`` (stdout and stderr)."""
    completed = subprocess.run(
        [str(dciodvfy_path()), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    return [line for line in output.splitlines() if line.strip()]


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines starting with "Error"; the warnings are printed for the test log."""
    lines = dciodvfy_report(path)
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {Path(path).name}: {line}")
    return [line for line in lines if line.startswith("Error")]
