"""The benchmarks still run end to end: quick runs of bench/receive.py, send.py and study.py.

Correctness only (every receiver stored every instance, the tables are printed); the
timings of a quick run mean nothing and are not checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peers import REPO_ROOT, require_tools

BENCH = REPO_ROOT / "bench"
RECEIVERS = ("dcmtk storescp", "Orthanc", "dicom_node", "dicom_node x2")


def _run_quick(script: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(script), *(args or ("--quick",))],
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
    pattern = rf"^\W+{re.escape(name)}\s+[│|].*\d+\.\d+x.*$"
    return re.findall(pattern, out, flags=re.MULTILINE)


def _cpu_rows(out: str, name: str) -> list[tuple[float, float, float, float, int, int]]:
    """The CPU tables' rows for ``name``: senders' and receiver's ms per image (the
    receiver's with the kernel's work for it, then its own user and system time), the
    CPUs' busy share (%) and the CPU-bound rate."""
    number = r"\s+[│|]\s+(\d+\.\d\d)"
    own = r"\s+[│|]\s+(\d+\.\d\d) / (\d+\.\d\d)"
    share = r"\s+[│|]\s+(\d+) %"
    pattern = rf"^\W+{re.escape(name)}{number}{number}{own}{share}\s+[│|]\s+(\d+){share}"
    return [
        (float(senders), float(others), float(user), float(system), int(busy), int(bound))
        for senders, others, user, system, busy, bound, _stolen in re.findall(
            pattern, out, re.MULTILINE
        )
    ]


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
        # one row in each load's CPU table, with the receiver's own time read (a number
        # where it is known; 20 slices may take storescp less than a 10 ms tick)
        cpu = _cpu_rows(out, name)
        assert len(cpu) == 2, f"{name}: one row in each load's CPU table"
        for senders, _others, _user, _system, _busy, bound in cpu:
            assert senders > 0 and bound > 0  # storescu ran, on these CPUs
    creation = re.search(r"empty file in the benchmark's folder: (\d+) us before .* (\d+) us", out)
    assert creation is not None and all(int(value) > 0 for value in creation.groups())
    for node in ("dicom_node", "dicom_node x2"):
        assert f"{node} peak RSS (VmHWM, all its processes) x1:" in out
        for target in (
            f"1 assoc: {node} vs storescp",
            f"1 assoc: {node} vs Orthanc",
            f"2 assoc: {node} vs storescp",
        ):
            assert len(_verdicts(out, target)) == 1


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
@pytest.mark.timeout(150)
def test_associations_quick_stores_all_on_every_receiver() -> None:
    require_tools("storescu", "storescp", "echoscu", "Orthanc")
    out = _run_quick(BENCH / "associations.py", "--quick", "--receive-processes", "1")
    for name in ("dcmtk storescp", "Orthanc", "dicom_node"):
        assert f"{name:<15}: stored all 5/5" in out
        assert len(_table_rows(out, name)) == 1
        (row,) = _cpu_rows(out, name)
        assert row[0] > 0  # the storescu runs were counted


def test_the_cpu_clock_counts_a_sender_and_the_machine() -> None:
    sys.path.insert(0, str(BENCH))
    from common import CpuClock

    clock = CpuClock()
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    use = clock.stop()
    # the waited-for child's CPU time: what it burnt, less times()'s rounding to 10 ms ticks
    assert use.senders >= 0.28
    assert use.machine >= 0.25  # /proc/stat counts in ticks (10 ms)
    assert use.seconds >= 0.3 and use.cpus >= 1
    assert 0 < use.share(use.machine) <= 1.05


_FORKING_RECEIVER = """
import os, sys, time
sys.stdin.readline()
for _ in range(2):  # a child per association, waited for, as storescp --fork does
    pid = os.fork()
    if pid == 0:
        end = time.process_time() + 0.2
        while time.process_time() < end:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc (Linux)")
def test_the_cpu_clock_counts_the_receivers_own_time_with_the_children_it_waited_for() -> None:
    sys.path.insert(0, str(BENCH))
    from common import CpuClock

    with subprocess.Popen(
        [sys.executable, "-c", _FORKING_RECEIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as receiver:
        assert receiver.stdin is not None and receiver.stdout is not None
        try:
            clock = CpuClock(receiver.pid)
            receiver.stdin.write("go\n")
            receiver.stdin.flush()
            assert receiver.stdout.readline() == "done\n"
            use = clock.stop()
        finally:
            receiver.kill()
    assert use.receiver_user is not None and use.receiver_system is not None
    # two children of 0.2 s each, in 10 ms ticks (their clock reads are system calls: about
    # half of it is system time)
    assert use.receiver_user + use.receiver_system >= 0.35
    assert use.receiver_user > 0.05 and use.receiver_system > 0.05
    assert use.senders < 0.1  # the receiver is not a waited-for child of this process


@pytest.mark.timeout(150)
def test_receive_measures_a_baseline_checkout_in_the_same_alternation(tmp_path: Path) -> None:
    require_tools("storescu", "storescp", "echoscu", "Orthanc")
    baseline = tmp_path / "before"
    shutil.copytree(
        REPO_ROOT / "dicom_node",
        baseline / "dicom_node",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    out = _run_quick(
        BENCH / "receive.py", "--slices", "5", "--rounds", "1", "--concurrency", "1",
        "--receive-processes", "1", "--baseline", str(baseline),
    )  # fmt: skip
    assert f"dicom_node: runs {REPO_ROOT / 'dicom_node'}" in out
    assert f"dicom_node @before: runs {baseline / 'dicom_node'}" in out
    measured = re.findall(r"^  (.+?)\s+x1: stored all 5/5", out, flags=re.MULTILINE)
    assert measured == ["dcmtk storescp", "Orthanc", "dicom_node", "dicom_node @before"]
    assert len(_table_rows(out, "dicom_node @before")) == 1
    assert len(_verdicts(out, "1 assoc: dicom_node @before vs storescp")) == 1


@pytest.mark.timeout(90)
def test_send_quick_stores_all_from_both_senders() -> None:
    require_tools("storescu", "storescp", "echoscu")
    out = _run_quick(BENCH / "send.py")
    for name in ("dcmtk storescu", "dicom_node"):
        assert f"{name:<15}: stored all 20/20" in out
        assert len(_table_rows(out, name)) == 1
    assert len(_verdicts(out, "send: node vs storescu")) == 1


@pytest.mark.timeout(150)
def test_study_quick_stores_results_and_every_instance() -> None:
    require_tools("storescu", "storescp", "echoscu")
    out = _run_quick(BENCH / "study.py")
    assert re.search(r"latency round 1/1: SEG \+ SR stored \d+\.\d+ s after", out)
    assert re.search(r"^\W+median\W+\d+\.\d+\W+1\.00\W", out, flags=re.MULTILINE)  # idle 1 s
    for level in (1, 2):
        assert f"receive x{level}: stored all in" in out
        assert re.search(rf"analyse x{level}: stored all in .* every job done, SEG \+ SR", out)
        assert re.search(rf"^\W+{level} x 5 slices\W+{5 * level}\W.*MiB", out, flags=re.MULTILINE)
    for slices in (10, 40):
        assert re.search(rf"^ +{slices} slices: stored all in", out, flags=re.MULTILINE)
    for target in (
        "latency: median slack over idle + analysis",
        "memory (receive): peak RSS at 2 studies",
        "memory (receive): peak 2 / peak 1 studies",
        "memory (analyse): peak RSS at 2 studies",
        "memory (analyse): peak 2 / peak 1 studies",
        "scaling: s/slice at 40 / at 10 slices",
    ):
        assert len(_verdicts(out, target)) == 1


def test_analysis_quick_prints_the_stage_split() -> None:
    """bench/analysis.py --quick: a small phantom and the Philips CT through ct-chest + encode."""
    out = _run_quick(BENCH / "analysis.py")
    for stage in ("load", "preprocess", "infer", "postprocess", "encode", "peak RSS"):
        assert stage in out
    assert "phantom" in out and "Philips" in out
    assert re.search(r"ct-chest \+ encode on (cpu|cuda)", out)
