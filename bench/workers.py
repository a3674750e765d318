"""Scale-out benchmark (issue #7): analysis throughput with 1 and with 2 ``dicom-node worker``s.

    .venv/bin/python bench/workers.py [--studies 8] [--slices S] [--rounds 3] [--quick]
                                      [--no-pin] [--check-targets]

Each measurement starts from nothing: a new PostgreSQL database (one server for the run), a
new redis-server, one receiver (``dicom-node serve`` with ``cluster.journal_url`` and
``broker_url``; route CT -> ct-chest -> a dcmtk storescp) and empty shared storage. The
studies (copies of the real Philips chest CT with new UIDs, or ``--slices`` synthetic slices
each) are sent while no worker runs, until every job is queued and handed to Redis; the
queue is then held aside, K workers start (one thread each, pinned to CPU 0, 1, ... with
``taskset``), and once every worker has loaded ct-chest (and run it once on a synthetic
chest CT, as every ``dicom-node worker`` does at start) and waits on the broker, the queue is
released. Throughput = jobs / (last ``analysed_at`` - first ``started_at``), both from the
journal. K = 1 and K = 2 alternate over ``--rounds``; target: the median at K = 2 >= 1.8x
the median at K = 1.

Every job must be done, each delivery sent, and storescp must hold exactly one SEG and one
SR per study, or the run stops with exit status 1. ``--quick`` is the smoke run of
``tests/test_bench_workers_smoke.py`` (2 studies of 5 synthetic slices, one round; its
rates mean nothing); ``--check-targets`` exits 3 when the target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import yaml
from cluster_services import (
    BenchWorker,
    CpuUse,
    PostgresServer,
    QueueGate,
    RedisServer,
    require_services,
    wait_workers_ready,
)
from common import (
    LOCALHOST,
    PeerError,
    Series,
    Storescp,
    Target,
    console,
    ct_studies,
    dicom_files,
    machine,
    node_settings,
    restamp_series,
    run_storescu,
    targets_table,
    wait_until,
    warm_page_cache,
)
from nodes import NodeProcess, chest_route
from peers import PHILIPS_L
from rich.table import Table

from dicom_node.domain import JobState
from dicom_node.journal import Journal

NODE_AET = "AINODE"
PACS_AET = "PACS"
PIPELINE = "ct-chest"
TARGET_FACTOR = 1.8
LEVELS = (1, 2)


@dataclass(frozen=True)
class Round:
    """One measurement: K workers on a queue of ``jobs`` jobs (seconds on the journal's clock)."""

    workers: int
    jobs: int
    span: float  # first started_at -> last analysed_at
    delivered: float  # queue released -> last finished_at (SEG + SR stored at storescp)
    per_job: float  # median analysis + encode seconds of one job
    first: float  # longest started_at -> analysed_at among the workers' first jobs
    between: float  # median idle time of a worker between its jobs (0.0: one job each)
    split: dict[str, int]  # jobs per worker
    cpu: CpuUse  # from the release until the bench saw every job done

    @property
    def rate_per_cpu(self) -> float:
        """Jobs per CPU-minute of the workers: what the throughput would be per whole CPU."""
        return 60.0 * self.jobs / self.cpu.workers

    @property
    def rate(self) -> float:
        """Jobs per minute."""
        return 60.0 * self.jobs / self.span


# --------------------------------------------------------------------------- one round


def measure(
    workers: int,
    studies: Sequence[Sequence[Path]],
    postgres: PostgresServer,
    workdir: Path,
    pin: bool,
) -> Round:
    """Queue every study's job, then let ``workers`` warm workers take them all."""
    journal_url = postgres.new_database()
    with (
        RedisServer(workdir / "redis") as broker,
        Storescp(workdir / "pacs", aet=PACS_AET, extra_args=("+xa", "--fork")) as pacs,
    ):
        settings = _settings(workdir / "shared", journal_url, broker.url, pacs.port)
        receiver = NodeProcess(settings, workdir / "receiver")
        config = workdir / "worker.yaml"
        config.write_text(yaml.safe_dump(settings))
        cpus = sorted(os.sched_getaffinity(0))
        team = [
            BenchWorker(
                config,
                f"w{n}",
                workdir / f"worker-{n}.log",
                cpus[(n - 1) % len(cpus)] if pin else None,
            )
            for n in range(1, workers + 1)
        ]
        gate = QueueGate(broker.url)
        journal: Journal | None = None
        try:
            receiver.start()
            journal = Journal(journal_url)
            run_storescu(NODE_AET, receiver.port, studies, workdir / "storescu")
            _wait_queued(journal, gate, len(studies))
            if (held := gate.hold()) != len(studies):
                raise PeerError(f"{held} messages in the broker, expected {len(studies)}")
            for worker in team:
                worker.start()
            wait_workers_ready(team, PIPELINE, gate)
            assert receiver.proc is not None
            receiver_pid = receiver.proc.pid
            before = CpuUse.sample(team, receiver_pid)
            released = time.time()
            gate.release()
            rows = _wait_done(journal, len(studies))
            usage = CpuUse.sample(team, receiver_pid).since(before)
            _verify(journal, rows, pacs, studies)
        finally:
            codes = [worker.stop() for worker in team]
            if journal is not None:
                journal.close()
            gate.close()
            if receiver.proc is not None:
                receiver.stop()
    if any(codes):
        raise PeerError(f"workers exited with {codes}:\n{team[0].tail()}")
    return _round(workers, rows, released, usage)


def _settings(storage: Path, journal_url: str, broker_url: str, pacs_port: int) -> dict[str, Any]:
    return node_settings(
        storage,
        # every storescu is on loopback (one source host) and all start at once
        node={"ae_title": NODE_AET, "max_associations_per_source": 32},
        destinations={"pacs": {"ae_title": PACS_AET, "host": LOCALHOST, "port": pacs_port}},
        routes=[chest_route(["pacs"])],
        cluster={
            "journal_url": journal_url,
            "broker_url": broker_url,
            "node_name": "rx",
            "poll_seconds": 0.5,
            "redispatch_seconds": 3600,  # no second message for a job that waits its turn
        },
        analysis={"device": "cpu", "warm_up": True},
    )


def _wait_queued(journal: Journal, gate: QueueGate, count: int) -> None:
    """Every study's job queued and handed to the broker (journal and Redis agree)."""

    def queued() -> bool:
        jobs = journal.recent_jobs(limit=count + 10)
        if any(job.state != JobState.QUEUED for job in jobs):
            raise PeerError(f"jobs before any worker ran: {Counter(j.state for j in jobs)}")
        dispatched = sum(job.dispatched_at is not None for job in jobs)
        return len(jobs) == count and dispatched == count and gate.queued() == count

    try:
        wait_until(queued, 60.0 + 5.0 * count, 0.1, f"{count} jobs queued and dispatched")
    except TimeoutError as exc:
        raise PeerError(f"{exc}: {len(journal.recent_jobs(limit=count + 10))} jobs") from exc


def _wait_done(journal: Journal, count: int) -> list[Any]:
    """Every job done (its SEG and SR sent); a failed one is an error."""

    def done() -> list[Any] | None:
        jobs = journal.recent_jobs(limit=count + 10)
        bad = [j for j in jobs if j.state in (JobState.FAILED, JobState.DEAD_LETTER)]
        if bad:
            raise PeerError(f"jobs failed: {[(j.id, j.state, j.error) for j in bad]}")
        finished = len(jobs) == count and all(j.state == JobState.DONE for j in jobs)
        return jobs if finished else None

    try:
        found = wait_until(done, 120.0 + 60.0 * count, 0.25, f"{count} jobs done")
    except TimeoutError as exc:
        states = Counter(j.state for j in journal.recent_jobs(limit=count + 10))
        raise PeerError(f"{exc}: jobs {dict(states)}") from exc
    assert isinstance(found, list)
    return found


def _verify(
    journal: Journal, rows: Sequence[Any], pacs: Storescp, studies: Sequence[Sequence[Path]]
) -> None:
    """Each job's deliveries sent; storescp holds one SEG and one SR per study, nothing else."""
    for job in rows:
        states = [d.state for d in journal.job_deliveries(job.id)]
        if not states or any(state != "sent" for state in states):
            raise PeerError(f"job {job.id}: deliveries {states}, expected all sent")
    found: dict[str, list[str]] = {}
    for path in pacs.received_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.Modality))
    expected = {_study_uid(files) for files in studies}
    if set(found) != expected:
        raise PeerError(f"storescp has results of {len(found)} studies, expected {len(expected)}")
    wrong = {uid: kinds for uid, kinds in found.items() if sorted(kinds) != ["SEG", "SR"]}
    if wrong:
        raise PeerError(f"storescp: not one SEG + one SR per study: {list(wrong.values())}")


def _study_uid(files: Sequence[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _round(workers: int, rows: Sequence[Any], released: float, usage: CpuUse) -> Round:
    first = min(float(job.started_at) for job in rows)
    analysed = max(float(job.analysed_at) for job in rows)
    finished = max(float(job.finished_at) for job in rows)
    split = Counter(str(job.lease_owner).split("@", 1)[0] for job in rows)
    if len(rows) >= workers and len(split) != workers:
        raise PeerError(f"{workers} workers but jobs done by {dict(split)}")
    return Round(
        workers=workers,
        jobs=len(rows),
        span=analysed - first,
        delivered=finished - released,
        per_job=statistics.median(
            float(job.analysis_seconds) + float(job.encode_seconds) for job in rows
        ),
        between=_between(rows),
        first=_first_jobs(rows),
        split=dict(sorted(split.items())),
        cpu=usage,
    )


def _by_worker(rows: Sequence[Any]) -> list[list[Any]]:
    """The jobs of each worker (by lease owner), in the order it started them."""
    jobs: dict[str, list[Any]] = {}
    for job in sorted(rows, key=lambda job: float(job.started_at)):
        jobs.setdefault(str(job.lease_owner), []).append(job)
    return list(jobs.values())


def _first_jobs(rows: Sequence[Any]) -> float:
    """The longest started -> analysed time among the jobs each worker ran first."""
    return max(float(jobs[0].analysed_at) - float(jobs[0].started_at) for jobs in _by_worker(rows))


def _between(rows: Sequence[Any]) -> float:
    """Median time a worker spent between one job analysed and its next job started."""
    gaps = [
        float(b.started_at) - float(a.analysed_at)
        for jobs in _by_worker(rows)
        for a, b in zip(jobs, jobs[1:], strict=False)
    ]
    return statistics.median(gaps) if gaps else 0.0


# --------------------------------------------------------------------------- report


def rounds_table(rounds: Sequence[Round]) -> Table:
    table = Table(
        title="rounds: K workers, one CPU and one thread each",
        caption="span: first job started -> last analysed; to sent: queue released -> last SEG + "
        "SR at storescp (journal clock); per job: analysis + encoding (median); first: the "
        "slowest of the workers' first jobs, started -> analysed; between: a worker's idle time "
        "between two of its jobs (medians); CPUs: average use by the workers / the receiver / "
        "everything else (database, broker, this script, other users) / stolen by the "
        "hypervisor, from the release until every job was done",
    )
    numbers = ("round", "K", "jobs/min", "span s", "to sent s", "per job s", "first s")
    for name in (*numbers, "between s", "CPUs"):
        table.add_column(name, justify="right")
    table.add_column("jobs per worker", no_wrap=True)
    for index, item in enumerate(rounds):
        table.add_row(
            str(index // len(LEVELS) + 1),
            str(item.workers),
            f"{item.rate:.2f}",
            f"{item.span:.2f}",
            f"{item.delivered:.2f}",
            f"{item.per_job:.2f}",
            f"{item.first:.2f}",
            f"{item.between:.2f}",
            item.cpu.cores(),
            ", ".join(f"{name}: {count}" for name, count in item.split.items()),
        )
    return table


def summary_table(series: dict[int, Series], rounds: Sequence[Round], what: str) -> Table:
    table = Table(title=f"analysis throughput: {what}")
    table.caption = (
        "per CPU: jobs per minute of the workers' own CPU time (a diagnostic, not the target): "
        "it stays near the 1-worker figure if two workers scale, however much CPU they got"
    )
    names = ("workers", "median jobs/min", "rounds jobs/min", "vs 1 worker", "per job (median)")
    for name in (*names, "per CPU jobs/min", "per CPU vs 1"):
        table.add_column(name, justify="right")
    per_cpu = {
        level: statistics.median(r.rate_per_cpu for r in rounds if r.workers == level)
        for level in series
    }
    for level, item in series.items():
        per_job = statistics.median(r.per_job for r in rounds if r.workers == level)
        table.add_row(
            str(level),
            f"{item.median:.2f}",
            " ".join(f"{rate:.2f}" for rate in item.rates),
            f"{item.median / series[1].median:.2f}x",
            f"{per_job:.2f} s",
            f"{per_cpu[level]:.2f}",
            f"{per_cpu[level] / per_cpu[1]:.2f}x",
        )
    return table


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="jobs per measurement")
    parser.add_argument(
        "--slices", type=int, help="synthetic studies of this many slices (default: Philips CT)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="measurements per worker count")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 tiny studies, 1 round")
    parser.add_argument("--no-pin", action="store_true", help="do not pin workers with taskset")
    parser.add_argument("--check-targets", action="store_true", help="exit 3 if a target fails")
    return parser


def _studies(count: int, slices: int | None, tmp: Path) -> tuple[list[list[Path]], str]:
    """``count`` new-UID copies of the Philips chest CT, or synthetic studies of ``slices``."""
    if slices is None and PHILIPS_L.is_dir():
        source = dicom_files(PHILIPS_L)
        studies = [
            restamp_series(source, tmp / "studies" / f"{n:03d}", f"bench workers {n} {tmp}")
            for n in range(count)
        ]
        return studies, f"{count} copies of the Philips chest CT ({len(source)} slices)"
    size = slices or 64
    missing = "" if slices else f" ({PHILIPS_L} is missing)"
    return ct_studies(count, size), f"{count} synthetic CT studies of {size} slices{missing}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.studies, args.slices, args.rounds = 2, 5, 1
    if args.studies < max(LEVELS) or args.rounds < 1:
        raise SystemExit(f"--studies must be at least {max(LEVELS)}, --rounds at least 1")
    require_services()
    out = console()
    out.print(f"machine: {machine()}")
    pin = not args.no_pin
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-workers-") as name:
            tmp = Path(name)
            studies, what = _studies(args.studies, args.slices, tmp)
            warm_page_cache([path for files in studies for path in files])
            out.print(f"{what}; workers pinned with taskset: {'yes' if pin else 'no'}")
            try:
                with PostgresServer(tmp / "postgres") as postgres:
                    rounds = _measure(args.rounds, studies, postgres, tmp, pin)
            except PeerError:
                kept = _keep_logs(tmp)
                print(f"the logs of the failed run are kept in {kept}", file=sys.stderr)
                raise
    except PeerError as exc:
        print(f"workers benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    series = {level: Series(f"{level} worker(s)") for level in LEVELS}
    for item in rounds:
        series[item.workers].rates.append(item.rate)
    out.print(rounds_table(rounds))
    out.print(summary_table(series, rounds, what))
    target = Target("2 workers vs 1 worker (jobs/min)", series[2], series[1], TARGET_FACTOR)
    out.print(targets_table([target]))
    verdict = "PASS" if target.passed else "FAIL"
    out.print(
        f"ratio 2 workers / 1 worker: {target.ratio:.2f}x (target >= {TARGET_FACTOR}x): {verdict}"
    )
    out.print(f"machine after the run: {machine()}")
    return 3 if args.check_targets and not target.passed and not args.quick else 0


def _keep_logs(tmp: Path) -> Path:
    """Copy every ``*.log`` of a failed run (receivers, workers, storescu, PostgreSQL) out
    of the temporary folder, which is removed on exit; their folder."""
    kept = Path(tempfile.mkdtemp(prefix="dicom-node-bench-workers-failed-"))
    for log in tmp.rglob("*.log"):
        target = kept / log.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, target)
    return kept


def _measure(
    rounds: int, studies: list[list[Path]], postgres: PostgresServer, tmp: Path, pin: bool
) -> list[Round]:
    found = []
    for number in range(1, rounds + 1):
        order = LEVELS if number % 2 else tuple(reversed(LEVELS))
        for level in order:
            item = measure(level, studies, postgres, tmp / f"round-{number}-k{level}", pin)
            print(
                f"  round {number}/{rounds}, {level} worker(s): {item.jobs} jobs done, SEG + SR "
                f"at storescp; {item.rate:.2f} jobs/min ({item.span:.2f} s, per job "
                f"{item.per_job:.2f} s)",
                flush=True,
            )
            found.append(item)
    return found


if __name__ == "__main__":
    sys.exit(main())
