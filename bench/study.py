"""Study benchmark: a study's SEG + SR latency, the node's memory under many studies at once,
and receive time against a study's size (issue #5).

    .venv/bin/python bench/study.py [--rounds 3] [--idle 2] [--quick] [--check-targets]

1. Latency: the node (a child process) routes every CT series to ct-chest and sends SEG +
   SR to a dcmtk storescp. Each round sends a new copy (new UIDs) of the real Philips chest
   CT with storescu and times from storescu's exit (the last C-STORE response) until both
   results are files in storescp's folder. Slack = latency - idle window - analysis time
   (analyse + encode, as the node journals them); target: median slack <= 1 s.
2. Memory: N distinct synthetic studies sent by N storescu processes at once, to a node
   that only receives and to one that also analyses every study and sends the results;
   the node's peak RSS (VmHWM) at each N. Targets: <= 1 GiB at the largest N, and the
   peak at the largest N <= 1.25x the peak at the smallest ("flat").
3. Scaling: one study of 100 / 300 / 900 synthetic slices to a fresh receive-only node;
   target: seconds per slice at the largest size <= 1.25x that at the smallest (linear).

Every measurement must store everything (instances in the journal and as files, every job
done, SEG + SR at the destination), or the run stops with exit status 1. ``--quick`` is the
smoke run of ``tests/test_bench_smoke.py`` (tiny sizes, one round; its timings mean
nothing); ``--check-targets`` exits 3 when a target is missed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from common import (
    PeerError,
    console,
    ct_series,
    ct_studies,
    dicom_files,
    machine,
    restamp_series,
    run_storescu,
    settle,
    wait_stored,
    warm_page_cache,
)
from peers import GE_3SLICE, PHILIPS_L
from rich.table import Table
from study_node import (
    MAX_ASSOCIATIONS,
    NODE_AET,
    Check,
    StudyNode,
    checks_table,
    finished_job,
    wait_jobs_done,
    wait_results,
)

SLACK_S = 1.0
PEAK_LIMIT_MIB = 1024.0
FLAT_FACTOR = 1.25
LINEAR_FACTOR = 1.25


# --------------------------------------------------------------------------- 1. latency


@dataclass(frozen=True)
class Latency:
    """One study's timings in seconds (the breakdown from the journal's clock)."""

    latency: float
    idle: float
    analyse: float
    encode: float
    completion: float  # storescu's exit -> study complete (the idle window and its timer)
    queue: float  # study complete -> job claimed by the worker
    send: float  # results journaled -> both files at the destination
    peak_mib: float  # the node's VmHWM so far (it analysed this study and the earlier ones)

    @property
    def analysis(self) -> float:
        return self.analyse + self.encode

    @property
    def slack(self) -> float:
        return self.latency - self.idle - self.analysis


def latency_round(node: StudyNode, source: Sequence[Path], idle: float, workdir: Path) -> Latency:
    """Send a new copy of ``source``; time until its SEG and SR are at the destination."""
    assert node.pacs is not None
    files = restamp_series(source, workdir / "study", f"latency {time.time_ns()}")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    before = set(node.pacs.received_files())
    settle()
    run_storescu(NODE_AET, node.port, [files], workdir / "logs")
    sent = time.time()
    arrived, results = wait_results(node, before, study_uid)
    job = finished_job(node.journal, study_uid)  # done: storescp has answered both C-STOREs
    modalities = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in results)
    if modalities != ["SEG", "SR"]:
        raise PeerError(f"the destination received {modalities}, expected SEG and SR")
    study = next(s for s in node.journal.recent_studies() if s.study_uid == study_uid)
    return Latency(
        latency=arrived - sent,
        idle=idle,
        analyse=float(job.analysis_seconds),
        encode=float(job.encode_seconds),
        completion=float(study.completed_at) - sent,
        queue=float(job.started_at) - float(study.completed_at),
        send=arrived - float(job.analysed_at),
        peak_mib=node.rss_kib("VmHWM") / 1024,
    )


def run_latency(source: Sequence[Path], rounds: int, idle: float, tmp: Path) -> list[Latency]:
    node = StudyNode(tmp / "latency-node", idle, analyse=True)
    node.start()
    found = []
    try:
        for number in range(1, rounds + 1):
            item = latency_round(node, source, idle, tmp / f"latency-{number}")
            print(
                f"  latency round {number}/{rounds}: SEG + SR stored {item.latency:.2f} s after "
                f"the last C-STORE (analysis {item.analysis:.2f} s, slack {item.slack:.2f} s)",
                flush=True,
            )
            found.append(item)
            shutil.rmtree(tmp / f"latency-{number}")
    finally:
        node.stop()
    return found


def latency_table(rounds: Sequence[Latency], what: str) -> Table:
    table = Table(title=f"latency: {what}, last C-STORE response -> SEG + SR at storescp (s)")
    names = ("round", "latency", "idle window", "analyse+encode", "slack")
    for name in (*names, "completion", "queue", "send", "node VmHWM"):
        table.add_column(name, justify="right")
    for number, item in enumerate(rounds, 1):
        values = [getattr(item, name) for name in _LATENCY_FIELDS]
        table.add_row(str(number), *(f"{v:.2f}" for v in values), f"{item.peak_mib:.0f} MiB")
    medians = [statistics.median(getattr(r, n) for r in rounds) for n in _LATENCY_FIELDS]
    peak = max(item.peak_mib for item in rounds)
    table.add_row("median", *(f"{v:.2f}" for v in medians), f"max {peak:.0f} MiB")
    return table


_LATENCY_FIELDS = ("latency", "idle", "analysis", "slack", "completion", "queue", "send")


# --------------------------------------------------------------------------- 2. memory


@dataclass(frozen=True)
class Load:
    studies: int
    seconds: float
    start_kib: int  # VmRSS of the started, idle node
    peak_kib: int  # VmHWM once everything is stored (and analysed and sent)


def memory_run(
    studies: Sequence[Sequence[Path]], analyse: bool, idle: float, workdir: Path
) -> Load:
    """All ``studies`` at once, one storescu each; with ``analyse``, until every job is done."""
    node = StudyNode(workdir, idle, analyse=analyse, fork=True)
    node.start()
    expected = sum(len(files) for files in studies)
    try:
        start_kib = node.rss_kib("VmRSS")
        settle()
        seconds = run_storescu(NODE_AET, node.port, studies, workdir / "logs")
        stored = wait_stored(node, expected)
        if stored != expected:
            raise PeerError(f"node stored {stored} of {expected} instances")
        if analyse:
            wait_jobs_done(node, len(studies))
        peak_kib = node.rss_kib("VmHWM")
    finally:
        node.stop()
    shutil.rmtree(workdir)
    return Load(len(studies), seconds, start_kib, peak_kib)


def memory_table(title: str, loads: dict[int, list[Load]], slices: int) -> Table:
    table = Table(title=title)
    for name in ("studies at once", "instances", "median s", "img/s", "idle node RSS"):
        table.add_column(name, justify="right")
    table.add_column("peak RSS (VmHWM)", justify="right")
    table.add_column("vs fewest", justify="right")
    base = max(item.peak_kib for item in next(iter(loads.values())))
    for level, items in loads.items():
        seconds = statistics.median(item.seconds for item in items)
        peak = max(item.peak_kib for item in items)
        table.add_row(
            f"{level} x {slices} slices",
            str(level * slices),
            f"{seconds:.2f}",
            f"{level * slices / seconds:.1f}",
            f"{max(item.start_kib for item in items) / 1024:.0f} MiB",
            f"{peak / 1024:.0f} MiB",
            f"{peak / base:.2f}x",
        )
    return table


# --------------------------------------------------------------------------- 3. scaling


def scaling_run(files: Sequence[Path], workdir: Path) -> tuple[float, int]:
    """Seconds to receive one study of ``files`` on a fresh receive-only node, and its peak RSS."""
    load = memory_run([files], analyse=False, idle=1.0, workdir=workdir)
    return load.seconds, load.peak_kib


def scaling_table(times: dict[int, list[float]], peaks: dict[int, int]) -> Table:
    """Seconds per slice of each size; ``marginal`` is the slope from the next smaller size,
    which leaves out the fixed cost (storescu's start, the association) that flatters the
    per-slice time of large studies."""
    table = Table(title="scaling: one study, one storescu, receive-only node")
    names = ("slices", "median s", "rounds s", "ms per slice", "vs smallest", "marginal ms")
    for name in (*names, "peak RSS"):
        table.add_column(name, justify="right")
    base = _per_slice(times, min(times))
    previous: int | None = None
    for slices in sorted(times):
        per = _per_slice(times, slices)
        median = statistics.median(times[slices])
        marginal = "-"
        if previous is not None:
            slope = (median - statistics.median(times[previous])) / (slices - previous)
            marginal = f"{slope * 1000:.1f}"
        table.add_row(
            str(slices),
            f"{median:.2f}",
            " ".join(f"{t:.2f}" for t in times[slices]),
            f"{per * 1000:.1f}",
            f"{per / base:.2f}x",
            marginal,
            f"{peaks[slices] / 1024:.0f} MiB",
        )
        previous = slices
    return table


def _per_slice(times: dict[int, list[float]], slices: int) -> float:
    return statistics.median(times[slices]) / slices


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurements per load")
    parser.add_argument("--idle", type=float, default=2.0, help="study_idle_seconds (latency)")
    parser.add_argument("--studies", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--study-slices", type=int, default=40, help="slices per study (memory)")
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300, 900])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one round")
    parser.add_argument("--check-targets", action="store_true", help="exit 3 if a target fails")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if max(args.studies) > MAX_ASSOCIATIONS:
        raise SystemExit(f"--studies: at most {MAX_ASSOCIATIONS} at once")
    if args.quick:
        args.rounds, args.idle, args.studies = 1, 1.0, [1, 2]
        args.study_slices, args.slices = 5, [10, 40]
    out = console()
    out.print(f"machine: {machine()}")
    source, what = _latency_source(args.quick)
    studies = ct_studies(max(args.studies), args.study_slices)
    series = {n: ct_series(n) for n in args.slices}
    for files in (source, *studies, *series.values()):
        warm_page_cache(files)
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-study-") as tmp:
            results = _measure(args, source, studies, series, Path(tmp))
    except PeerError as exc:
        print(f"study benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    latency, received, analysed, times, peaks = results
    out.print(latency_table(latency, what))
    slices = args.study_slices
    out.print(memory_table("memory: receive only, studies at once", received, slices))
    out.print(memory_table("memory: receive + ct-chest + send SEG/SR", analysed, slices))
    out.print(scaling_table(times, peaks))
    checks = _checks(latency, received, analysed, times)
    out.print(checks_table(checks))
    out.print(f"machine after the run: {machine()}")
    passed = all(check.passed for check in checks)
    return 3 if args.check_targets and not passed and not args.quick else 0


def _latency_source(quick: bool) -> tuple[list[Path], str]:
    """The real Philips CT (GE's 3 slices for --quick); the synthetic series if missing."""
    folder, name = (GE_3SLICE, "GE CT") if quick else (PHILIPS_L, "Philips chest CT")
    if folder.is_dir():
        files = dicom_files(folder)
        return files, f"{name}, {len(files)} slices"
    files = ct_series(20 if quick else 64)
    return files, f"synthetic CT, {len(files)} slices ({folder} is missing)"


def _measure(
    args: argparse.Namespace,
    source: list[Path],
    studies: list[list[Path]],
    series: dict[int, list[Path]],
    tmp: Path,
) -> tuple[list[Latency], dict[int, list[Load]], dict[int, list[Load]], dict, dict]:
    print("1. latency", flush=True)
    latency = run_latency(source, args.rounds, args.idle, tmp)
    print("2. memory", flush=True)
    received: dict[int, list[Load]] = {level: [] for level in args.studies}
    analysed: dict[int, list[Load]] = {level: [] for level in args.studies}
    for round_no in range(1, args.rounds + 1):
        for level in args.studies:
            load = memory_run(studies[:level], False, args.idle, tmp / f"m{round_no}-{level}")
            _report_load("receive", level, load)
            received[level].append(load)
    for level in args.studies:  # one round: every study is analysed, which takes a while
        load = memory_run(studies[:level], True, args.idle, tmp / f"a-{level}")
        _report_load("analyse", level, load)
        analysed[level].append(load)
    print("3. scaling", flush=True)
    times: dict[int, list[float]] = {n: [] for n in series}
    peaks: dict[int, int] = {}
    for round_no in range(1, args.rounds + 1):
        for slices, files in series.items():
            seconds, peak = scaling_run(files, tmp / f"s{round_no}-{slices}")
            print(f"  {slices:>4} slices: stored all in {seconds:.2f} s", flush=True)
            times[slices].append(seconds)
            peaks[slices] = max(peak, peaks.get(slices, 0))
    return latency, received, analysed, times, peaks


def _report_load(kind: str, level: int, load: Load) -> None:
    done = ", every job done, SEG + SR at storescp" if kind == "analyse" else ""
    print(
        f"  {kind} x{level}: stored all in {load.seconds:.2f} s{done}, "
        f"peak RSS {load.peak_kib / 1024:.0f} MiB",
        flush=True,
    )


def _checks(
    latency: Sequence[Latency],
    received: dict[int, list[Load]],
    analysed: dict[int, list[Load]],
    times: dict[int, list[float]],
) -> list[Check]:
    slack = statistics.median(item.slack for item in latency)
    found = [Check("latency: median slack over idle + analysis", slack, SLACK_S, " s")]
    for kind, loads in (("receive", received), ("analyse", analysed)):
        most, fewest = max(loads), min(loads)
        mib = _peak(loads, most) / 1024
        label = f"memory ({kind}): peak RSS at {most} studies"
        found.append(Check(label, mib, PEAK_LIMIT_MIB, " MiB"))
        label = f"memory ({kind}): peak {most} / peak {fewest} studies"
        found.append(Check(label, _peak(loads, most) / _peak(loads, fewest), FLAT_FACTOR, "x"))
    label = f"scaling: s/slice at {max(times)} / at {min(times)} slices"
    ratio = _per_slice(times, max(times)) / _per_slice(times, min(times))
    found.append(Check(label, ratio, LINEAR_FACTOR, "x"))
    return found


def _peak(loads: dict[int, list[Load]], level: int) -> float:
    return max(item.peak_kib for item in loads[level])


if __name__ == "__main__":
    sys.exit(main())
