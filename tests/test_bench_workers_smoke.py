"""bench/workers.py still runs end to end: its quick run (2 tiny studies, 1 and 2 workers).

Correctness only: PostgreSQL, Redis, a receiver, workers and storescp start, every job is
done and every study's SEG + SR reaches storescp (the script exits 1 otherwise), and the
report is printed. The rates of a quick run mean nothing and are not checked.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from peers import REPO_ROOT, require_tools
from services import require_services

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.mark.timeout(150)
def test_workers_quick_measures_one_and_two_workers() -> None:
    require_tools("storescu", "storescp", "echoscu")
    require_services()
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "workers.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=REPO_ROOT,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"workers.py exited {proc.returncode}:\n{out}\n{proc.stderr}"
    for level in (1, 2):
        assert re.search(
            rf"round 1/1, {level} worker\(s\): 2 jobs done, SEG \+ SR at storescp; "
            r"\d+\.\d+ jobs/min",
            out,
        )
    assert re.search(r"w1-1: 2\b", out)  # one worker took both jobs
    assert re.search(r"w1-1: 1, w2-1: 1\b", out)  # two workers took one each
    assert re.search(r"ratio 2 workers / 1 worker: \d+\.\d+x \(target >= 1\.8x\): (PASS|FAIL)", out)
