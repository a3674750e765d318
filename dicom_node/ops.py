"""Operator commands: ``rules explain``, ``status`` and ``retry``.

Each takes the loaded config and returns an exit code (0 success, 1 failed). Output
goes to stdout, one fact per line so that it can be grepped; problems go to stderr.
No patient data (names, IDs, birth dates) is printed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import sqlalchemy as sa
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.config import NodeConfig
from dicom_node.database import head_revision
from dicom_node.domain import IllegalTransition, JobState
from dicom_node.journal import Journal, JournalSchemaError, Row
from dicom_node.logs import log_context
from dicom_node.route import explain
from dicom_node.store import Spool

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
ERROR_CHARS = 60
ALL_JOBS = 10_000  # "every" dead-letter/failed job, bounded
PICKUP_NOTE = (
    "a running node picks this up by itself: its worker polls queued jobs every few "
    "seconds (<= 5 s) and its sender checks pending deliveries at least every 60 s; "
    "a stopped node does it when next started"
)


def collect_files(paths: Sequence[Path]) -> list[Path]:
    """Files given, and files under folders given (recursively), in order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


# -- rules explain --------------------------------------------------------------------------


@dataclass
class _SeriesFiles:
    header: Dataset  # the first file's header, as the node tests one instance
    sop_uids: set[str] = field(default_factory=set)


def _read_series(files: Sequence[Path]) -> tuple[dict[str, _SeriesFiles], list[Path]]:
    """Headers grouped by SeriesInstanceUID, and the files that are not DICOM images."""
    found: dict[str, _SeriesFiles] = {}
    skipped: list[Path] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            skipped.append(path)
            continue
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if not series_uid:
            skipped.append(path)
            continue
        entry = found.setdefault(series_uid, _SeriesFiles(ds))
        entry.sop_uids.add(str(ds.get("SOPInstanceUID", path)))
    return found, skipped


def explain_rules(config: NodeConfig, paths: Sequence[Path]) -> int:
    try:
        files = collect_files(paths)
    except FileNotFoundError as exc:  # a usage error, as for send and evaluate
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    found, skipped = _read_series(files)
    for path in skipped:
        print(f"skipped (not a DICOM file): {path}")
    if not config.routes:
        print("no routes configured: nothing would be analysed")
    with_jobs = 0
    for series_uid, entry in found.items():
        with_jobs += _print_series(config, series_uid, entry)
    print(
        f"{len(found)} series, {with_jobs} would create jobs, "
        f"{len(skipped)} file(s) skipped (not DICOM)"
    )
    return EXIT_OK


def _print_series(config: NodeConfig, series_uid: str, entry: _SeriesFiles) -> int:
    header, count = entry.header, len(entry.sop_uids)
    result = explain(config.routes, header, count, config.analysis.models_path)
    description = str(header.get("SeriesDescription", "") or "")
    print(
        f"series {series_uid}: modality {header.get('Modality', '?')}, "
        f"number {header.get('SeriesNumber', '?')}, description {description!r}, "
        f"{count} instance(s)"
    )
    for verdict in result.verdicts:
        if verdict.matches:
            print(f"  route {verdict.route}: MATCH")
        for reason in verdict.reasons:
            print(f"  route {verdict.route}: no match: {reason}")
    if result.skip is not None:
        print(f"  not analysable: {result.skip}")
    print(f"  verdict: {result.verdict}")
    return 1 if result.jobs else 0


# -- status ---------------------------------------------------------------------------------


def _open_journal(config: NodeConfig) -> Journal | None:
    """The existing journal, or None (and a message) when there is none."""
    location = config.cluster.journal_location(Spool(config.storage.path).journal_path)
    if isinstance(location, Path) and not location.is_file():
        print(f"no journal at {location}", file=sys.stderr)
        return None
    journal = Journal(location)
    try:
        journal.create()  # upgrades a journal written by an older version, as serve would
    except JournalSchemaError as exc:
        journal.close()
        print(f"cannot open the journal: {exc}", file=sys.stderr)
        return None
    return journal


def migrate(config: NodeConfig) -> int:
    """``dicom-node migrate``: bring the journal to this version's tables (or create them)."""
    location = config.cluster.journal_location(Spool(config.storage.path).journal_path)
    if isinstance(location, Path):
        location.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(location)
    try:
        journal.create()
    except (JournalSchemaError, sa.exc.OperationalError) as exc:
        text = str(exc)  # a schema error names the journal itself
        where = "" if str(journal.path) in text else f" {journal.path}"
        print(f"cannot migrate{where}: {text}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        journal.close()
    print(f"journal {journal.path}: at revision {head_revision()}")
    return EXIT_OK


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _job_dict(job: Row, now: float, journal: Journal) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": job.id,
        "study_id": job.study_id,
        "series_id": job.series_id,
        "route": job.route,
        "pipeline": job.pipeline,
        "state": job.state,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "age_seconds": round(now - job.created_at, 1),
        "error": job.error,
    }
    if job.state == JobState.DEAD_LETTER:
        entry["deliveries"] = [
            {
                "destination": d.destination,
                "ae_title": d.ae_title,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
            }
            for d in journal.job_deliveries(job.id)
        ]
    return entry


def _status_data(journal: Journal, limit: int, now: float) -> dict[str, Any]:
    def jobs(rows: list[Row]) -> list[dict[str, Any]]:
        return [_job_dict(row, now, journal) for row in rows]

    return {
        "journal": str(journal.path),
        "counts": journal.state_counts(),
        "recent_jobs": jobs(journal.recent_jobs(limit)),
        "dead_letter_jobs": jobs(journal.jobs_in_state(JobState.DEAD_LETTER, ALL_JOBS)),
        "failed_jobs": jobs(journal.jobs_in_state(JobState.FAILED, ALL_JOBS)),
    }


def status(config: NodeConfig, limit: int, as_json: bool) -> int:
    journal = _open_journal(config)
    if journal is None:
        return EXIT_FAILED
    try:
        data = _status_data(journal, limit, time.time())
    except sa.exc.SQLAlchemyError as exc:
        print(f"cannot read journal at {journal.path}: {exc.__class__.__name__}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        journal.close()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _print_status(data)
    return EXIT_OK


def _print_status(data: dict[str, Any]) -> None:
    print(f"journal: {data['journal']}")
    for name, counts in data["counts"].items():
        shown = ", ".join(f"{state} {count}" for state, count in sorted(counts.items()))
        print(f"{name + ':':<12}{shown or 'none'}")
    sections = (
        (f"recent jobs (last {len(data['recent_jobs'])})", data["recent_jobs"]),
        (f"dead-letter jobs ({len(data['dead_letter_jobs'])})", data["dead_letter_jobs"]),
        (f"failed jobs ({len(data['failed_jobs'])})", data["failed_jobs"]),
    )
    for title, jobs in sections:
        print(f"\n{title}:")
        if jobs:
            _print_jobs(jobs)


def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    print(
        f"  {'job':>6} {'study':>6} {'route':<16} {'pipeline':<12} {'state':<12} {'age':>5}  error"
    )
    for job in jobs:
        error = (job["error"] or "").replace("\n", " ")
        if len(error) > ERROR_CHARS:
            error = error[:ERROR_CHARS] + "..."
        print(
            f"  {job['id']:>6} {job['study_id']:>6} {job['route']:<16} {job['pipeline']:<12} "
            f"{job['state']:<12} {_age(job['age_seconds']):>5}  {error}"
        )
        for d in job.get("deliveries", ()):
            # whole, on a line of its own: the reason (errno, TLS alert, status) is at its end
            last_error = (d["last_error"] or "").replace("\n", " ")
            print(
                f"  {'':>6} delivery to {d['destination']} ({d['ae_title']}): {d['state']} "
                f"after {d['attempts']} attempt(s)"
                + (f":\n  {'':>6}   {last_error}" if last_error else "")
            )


# -- retry ----------------------------------------------------------------------------------


def retry(config: NodeConfig, job_ids: Sequence[int], dead_letter: bool, failed: bool) -> int:
    journal = _open_journal(config)
    if journal is None:
        return EXIT_FAILED
    try:
        selected = _select_jobs(journal, job_ids, dead_letter, failed)
        if not selected:
            print("no jobs to retry")
            return EXIT_OK
        outcomes = [_retry_one(journal, job_id, time.time) for job_id in selected]
    finally:
        journal.close()
    if any(outcomes):
        print(PICKUP_NOTE)
    return EXIT_OK if all(outcomes) else EXIT_FAILED


def _select_jobs(
    journal: Journal, job_ids: Sequence[int], dead_letter: bool, failed: bool
) -> list[int]:
    selected = list(dict.fromkeys(job_ids))
    for wanted, state in ((dead_letter, JobState.DEAD_LETTER), (failed, JobState.FAILED)):
        if wanted:
            rows = journal.jobs_in_state(state, ALL_JOBS)
            selected.extend(row.id for row in reversed(rows) if row.id not in selected)
    return selected


def _retry_one(journal: Journal, job_id: int, clock: Callable[[], float]) -> bool:
    with log_context(job_id=job_id):
        try:
            outcome = journal.retry_job(job_id, clock())
        except LookupError:
            print(f"job {job_id}: not retried: no such job")
            return False
        except IllegalTransition as exc:
            print(
                f"job {job_id}: not retried: it is {exc.current.value}; only failed and "
                f"dead_letter jobs can be retried ({exc})"
            )
            return False
        log.info("operator retry: %s", outcome)
    print(f"job {job_id}: retried: {outcome}")
    return True
