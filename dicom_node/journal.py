"""The journal: studies, series, instances, jobs and deliveries in SQLite (WAL).

Every state change goes through :mod:`dicom_node.domain`'s transition checks
inside one write transaction, so a crash leaves either the old or the new
state. Writers are serialised by a lock, across processes too
(:class:`dicom_node.database.WriterLock`); readers run concurrently (WAL).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dicom_node import intake
from dicom_node.database import create_engine, describe, migrate, writer_lock
from dicom_node.domain import (
    DeliveryState,
    IllegalTransition,
    JobState,
    StudyState,
    check_delivery,
    check_study,
)
from dicom_node.intake import ReceivedInstance as ReceivedInstance
from dicom_node.intake import Recorded as Recorded
from dicom_node.intake import UIDConflict as UIDConflict
from dicom_node.intake import patient_id_of
from dicom_node.journal_sending import HAS_RESULTS, JournalDeliveries, set_job_state, settle_job
from dicom_node.leases import JournalLeases
from dicom_node.reports import JournalReports
from dicom_node.schema import JournalSchemaError as JournalSchemaError  # re-exported for app
from dicom_node.schema import (
    deliveries,
    instances,
    jobs,
    meta_table,
    series,
    studies,
)


@dataclass(frozen=True)
class JobSpec:
    series_id: int
    route: str
    pipeline: str
    send_to: tuple[str, ...]
    instance_count: int
    uids: tuple[str, str, str, str]  # seg series, seg sop, sr series, sr sop
    priority: str = "normal"  # one of schema.PRIORITIES, from the route


@dataclass(frozen=True)
class DeliverySpec:
    destination: str
    ae_title: str
    host: str
    port: int
    state: DeliveryState = DeliveryState.PENDING
    error: str | None = None


Row = sa.Row[Any]


@dataclass(frozen=True)
class StudySnapshot:
    study: Row
    series: tuple[Row, ...]
    first_relpath: dict[int, str]  # series id -> one of its instances
    jobs: tuple[Row, ...]


class Journal(JournalReports, JournalLeases, JournalDeliveries):
    """SQLite journal. ``now`` values are passed in so tests control time."""

    def __init__(self, location: Path | str) -> None:
        """``location``: a SQLite file, or a ``postgresql+psycopg://`` URL (docs/scale-out.md)."""
        self.location = location
        self.path = describe(location)  # for messages: never the password
        # Recording a received instance in SQLite does not sync the WAL (SQLiteIntake):
        # the instance file is fsynced before the success status, and a row lost to a
        # power failure is written again from the file at start
        # (dicom_node.reindex.reindex_orphans). Every other commit is synchronous=FULL,
        # which also syncs these rows.
        self._engine = create_engine(location)
        self.shared = self._engine.dialect.name != "sqlite"  # other processes write too
        self._intake = intake.statements(self._engine.dialect.name)
        # Writers of this process and, on SQLite, of every process on this host
        # (node.receive_processes) take it before they begin a transaction.
        self._write_lock = writer_lock(location)
        self._receiving = (
            None if self.shared else intake.ReceivingJournal(Path(location), self._write_lock)
        )
        self._identity: tuple[int, int] | None = None  # the SQLite file (see intact)

    def create(self) -> None:
        """Create the tables of a new journal, upgrade an older one (see :mod:`database`)."""
        migrate(self._engine, self.location)
        if not self.shared:
            self._identity = intake.file_identity(Path(self.location))

    def close(self) -> None:
        if self._receiving is not None:
            self._receiving.close()
        self._engine.dispose()
        self._write_lock.close()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    # -- node identity ------------------------------------------------------

    def meta_value(self, key: str, default_factory: Any) -> str:
        """Read ``key``; store ``default_factory()`` first if it is missing.

        Processes starting together on a new journal agree: the first insert wins,
        and the others read its value.
        """
        query = sa.select(meta_table.c.value).where(meta_table.c.key == key)
        with self._read() as conn:
            value = conn.scalar(query)
        if value is not None:
            return str(value)
        candidate = str(default_factory())
        try:
            with self._write() as conn:
                conn.execute(meta_table.insert().values(key=key, value=candidate))
            return candidate
        except sa.exc.IntegrityError:
            with self._read() as conn:
                return str(conn.scalar(query))

    # -- receiving ----------------------------------------------------------

    def record_instance(self, inst: ReceivedInstance) -> Recorded:
        """Record a stored instance; a known SOP Instance UID is a duplicate."""
        if self._receiving is not None:
            return self._receiving.record_instance(inst)
        for attempt in range(3):
            try:
                with self._write_lock, self._engine.begin() as conn:
                    return intake.record(conn.exec_driver_sql, inst, self._intake)
            except sa.exc.IntegrityError:
                # Another receiver inserted the same new study, series or instance between
                # our look-up and our insert (PostgreSQL); the next try finds its row.
                if attempt == 2 or not self.shared:
                    raise
        raise AssertionError("unreachable")

    def intact(self) -> bool:
        """Whether a SQLite journal's file is still the one created or opened by
        :meth:`create` (not removed or replaced while the node runs); a shared journal is
        the database server's to keep."""
        if self.shared or self._identity is None:
            return True
        return intake.file_identity(Path(self.location)) == self._identity

    def has_instance(self, sop_uid: str) -> bool:
        return self.stored_patient_id(sop_uid) is not None

    def stored_patient_id(self, sop_uid: str) -> str | None:
        """The Patient ID recorded with stored instance ``sop_uid``'s study ("" for none),
        or None when it is not stored."""
        if self._receiving is not None:
            return self._receiving.stored_patient_id(sop_uid)
        with self._engine.connect() as conn:
            row = conn.exec_driver_sql(self._intake.instance_patient, (sop_uid,)).first()
        return None if row is None else patient_id_of(row[0])

    # -- completion ---------------------------------------------------------

    def open_studies(self) -> list[Row]:
        with self._read() as conn:
            query = sa.select(studies).where(studies.c.state == StudyState.OPEN)
            return list(conn.execute(query))

    def study(self, study_id: int) -> Row:
        with self._read() as conn:
            return conn.execute(sa.select(studies).where(studies.c.id == study_id)).one()

    def study_snapshot(self, study_id: int) -> StudySnapshot:
        """The study with its series (and one instance path each) and its jobs so far."""
        with self._read() as conn:
            study = conn.execute(sa.select(studies).where(studies.c.id == study_id)).one()
            series_rows = list(
                conn.execute(
                    sa.select(series).where(series.c.study_id == study_id).order_by(series.c.id)
                )
            )
            first_paths = {
                row.series_id: row.relpath
                for row in conn.execute(
                    sa.select(
                        instances.c.series_id, sa.func.min(instances.c.relpath).label("relpath")
                    )
                    .where(instances.c.series_id.in_([s.id for s in series_rows]))
                    .group_by(instances.c.series_id)
                )
            }
            job_rows = list(conn.execute(sa.select(jobs).where(jobs.c.study_id == study_id)))
            return StudySnapshot(study, tuple(series_rows), first_paths, tuple(job_rows))

    def complete_study(
        self,
        study_id: int,
        seen_last_received_at: float,
        now: float,
        specs: list[JobSpec],
        seen_instances: int | None = None,
    ) -> list[int] | None:
        """Mark the study COMPLETE and create its jobs in one transaction.

        Nothing happens (None) when the study is no longer open, or received an
        instance after the snapshot the caller planned from: its last_received_at
        moved, or (``seen_instances``, the snapshot's count) an instance stamped
        earlier came in, e.g. a re-indexed file or another receiver's lagging clock.
        """
        with self._write() as conn:
            # locked: another receiver may record an instance of this study right now
            query = sa.select(studies).where(studies.c.id == study_id).with_for_update()
            study = conn.execute(query).one()
            if study.state != StudyState.OPEN or study.last_received_at != seen_last_received_at:
                return None
            if seen_instances is not None and seen_instances != _instance_count(conn, study_id):
                return None
            check_study(StudyState(study.state), StudyState.COMPLETE)
            conn.execute(
                studies.update()
                .where(studies.c.id == study_id)
                .values(state=StudyState.COMPLETE, completed_at=now)
            )
            previous = list(conn.execute(sa.select(jobs).where(jobs.c.study_id == study_id)))
            return [_insert_job(conn, study_id, spec, previous, now) for spec in specs]

    def instance_relpaths(self, series_id: int) -> list[str]:
        with self._read() as conn:
            query = sa.select(instances.c.relpath).where(instances.c.series_id == series_id)
            return list(conn.scalars(query.order_by(instances.c.id)))

    def all_instance_relpaths(self, prefix: str = "") -> set[str]:
        """The relative paths of the recorded instances (those starting with ``prefix``)."""
        with self._read() as conn:
            query = sa.select(instances.c.relpath)
            if prefix:
                query = query.where(instances.c.relpath.startswith(prefix, autoescape=True))
            return set(conn.scalars(query))

    # -- jobs ---------------------------------------------------------------

    def resume(self, now: float) -> int:
        """After a restart, jobs caught mid-analysis go back to the queue."""
        with self._write() as conn:
            rows = list(conn.execute(sa.select(jobs).where(jobs.c.state == JobState.ANALYSING)))
            for row in rows:
                set_job_state(conn, row, JobState.QUEUED, now)
            return len(rows)

    def job(self, job_id: int) -> Row:
        with self._read() as conn:
            return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()

    def job_context(self, job_id: int) -> tuple[Row, Row, Row]:
        """The job with its study and series rows."""
        with self._read() as conn:
            job = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
            study = conn.execute(sa.select(studies).where(studies.c.id == job.study_id)).one()
            ser = conn.execute(sa.select(series).where(series.c.id == job.series_id)).one()
            return job, study, ser

    def job_analysed(
        self,
        job_id: int,
        specs: list[DeliverySpec],
        now: float,
        timings: tuple[float, float] | None = None,
        owner: str | None = None,
    ) -> None:
        """Results are on disk: move to SENDING and create one delivery per destination.

        ``timings`` are the (analysis, encode) durations in seconds. ``owner``: the
        worker's lease, checked first (:class:`dicom_node.leases.LeaseLost`).
        """
        with self._write() as conn:
            row = self.check_lease(conn, job_id, owner)
            set_job_state(conn, row, JobState.SENDING, now)
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(lease_until=None))
            if timings is not None:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(analysis_seconds=timings[0], encode_seconds=timings[1])
                )
            for spec in specs:
                conn.execute(
                    deliveries.insert().values(
                        job_id=job_id,
                        destination=spec.destination,
                        ae_title=spec.ae_title,
                        host=spec.host,
                        port=spec.port,
                        state=spec.state,
                        attempts=0,
                        next_attempt_at=now,
                        last_error=spec.error,
                        updated_at=now,
                    )
                )
            settle_job(conn, job_id, now)

    def job_failed(self, job_id: int, error: str, now: float, owner: str | None = None) -> None:
        with self._write() as conn:
            row = self.check_lease(conn, job_id, owner)
            set_job_state(conn, row, JobState.FAILED, now, error=error)
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(lease_until=None))

    def retry_job(self, job_id: int, now: float) -> str:
        """Operator retry: a FAILED job is analysed again, a DEAD_LETTER job resent.

        Returns what was done; raises :class:`IllegalTransition` for other states
        and ``LookupError`` for an unknown job.
        """
        with self._write() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one_or_none()
            if row is None:
                raise LookupError(f"no job {job_id}")
            if row.state == JobState.FAILED:
                set_job_state(conn, row, JobState.QUEUED, now)
                return "queued for analysis again"
            if row.state != JobState.DEAD_LETTER:  # only failed or dead-lettered work is retried
                raise IllegalTransition("job retry", JobState(row.state), JobState.SENDING)
            set_job_state(conn, row, JobState.SENDING, now)
            dead = list(
                conn.execute(
                    sa.select(deliveries)
                    .where(deliveries.c.job_id == job_id)
                    .where(deliveries.c.state == DeliveryState.DEAD)
                )
            )
            for delivery in dead:
                check_delivery(DeliveryState(delivery.state), DeliveryState.PENDING)
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id.in_([d.id for d in dead]))
                .values(
                    state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, updated_at=now
                )
            )
            return f"{len(dead)} delivery(ies) pending again"


def _instance_count(conn: Connection, study_id: int) -> int:
    query = sa.select(sa.func.coalesce(sa.func.sum(series.c.instance_count), 0)).where(
        series.c.study_id == study_id
    )
    return int(conn.scalar(query) or 0)


def _insert_job(
    conn: Connection, study_id: int, spec: JobSpec, previous: list[Row], now: float
) -> int:
    """Insert a job; queued jobs it replaces are superseded, the last result is its predecessor."""
    same = [j for j in previous if j.series_id == spec.series_id and j.route == spec.route]
    for old in same:
        if old.state == JobState.QUEUED:
            set_job_state(conn, old, JobState.SUPERSEDED, now)
    # The newest earlier job that has (or, being analysed now, will have) results.
    with_results = [j for j in same if j.state in HAS_RESULTS or j.state == JobState.ANALYSING]
    predecessor = max((j.id for j in with_results), default=None)
    seg_series, seg_sop, sr_series, sr_sop = spec.uids
    result = conn.execute(
        jobs.insert().values(
            study_id=study_id,
            series_id=spec.series_id,
            route=spec.route,
            pipeline=spec.pipeline,
            send_to=list(spec.send_to),
            state=JobState.QUEUED,
            instance_count=spec.instance_count,
            seg_series_uid=seg_series,
            seg_sop_uid=seg_sop,
            sr_series_uid=sr_series,
            sr_sop_uid=sr_sop,
            predecessor_id=predecessor,
            priority=spec.priority,
            created_at=now,
            updated_at=now,
        )
    )
    return _inserted_id(result)


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None  # single-row INSERT
    return int(key[0])
