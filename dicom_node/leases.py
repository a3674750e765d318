"""Work shared between processes: job leases, dispatch bookkeeping and delivery claims.

With one node the journal belongs to one process and a restart puts every job
caught mid-analysis back in the queue. With several receivers and workers
(docs/scale-out.md) no process may do that for the others. Instead:

- a worker **claims** a job with a lease (``lease_owner``, ``lease_until``) and
  renews it while it works (:class:`LeaseKeeper`); a job whose lease ran out (its
  worker was killed, or lost the database) is **queued again** by any receiver;
- writing a job's outcome is **fenced**: only the lease's owner may, so a worker
  that was presumed dead and comes back cannot overwrite its successor's state;
- a queued job is **dispatched** (handed to the broker) and stamped with the time;
  one never stamped, or stamped long ago and still queued (the message was lost),
  is dispatched again - a second message for a job is harmless: claiming is atomic;
- a delivery is **claimed** by a sender for a bounded time before it is attempted,
  so two receivers never send the same results at once.

Mixed into :class:`dicom_node.journal.Journal`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dicom_node.domain import DeliveryState, JobState, StudyState, check_job
from dicom_node.schema import PRIORITIES, deliveries, jobs, studies

log = logging.getLogger(__name__)

Row = sa.Row[Any]


class LeaseLost(Exception):
    """The job is no longer this worker's: its lease ran out and it was queued again."""


class JournalLeases:
    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    # -- workers --------------------------------------------------------------------------

    def claim_job(
        self, now: float, owner: str | None = None, until: float | None = None
    ) -> Row | None:
        """Take the next queued job, urgent before normal, then oldest first; mark it analysing.

        ``owner`` and ``until``: the lease, when other processes share the journal.
        """
        rank = sa.case({p: i for i, p in enumerate(PRIORITIES)}, value=jobs.c.priority)
        with self._write() as conn:
            row = conn.execute(
                sa.select(jobs)
                .where(jobs.c.state == JobState.QUEUED)
                .order_by(rank, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)  # PostgreSQL: other nodes' claims
            ).one_or_none()
            return None if row is None else _claim(conn, row.id, now, owner, until)

    def claim_job_by_id(self, job_id: int, owner: str, now: float, until: float) -> Row | None:
        """Take job ``job_id`` if it is queued (a broker message names it); else None."""
        with self._write() as conn:
            query = sa.select(jobs).where(jobs.c.id == job_id).with_for_update()
            row = conn.execute(query).one_or_none()
            if row is None or row.state != JobState.QUEUED:
                return None
            return _claim(conn, job_id, now, owner, until)

    def renew_leases(self, owner: str, job_ids: list[int], until: float) -> set[int]:
        """Extend the leases ``owner`` still holds; returns the ids it still holds."""
        if not job_ids:
            return set()
        with self._write() as conn:
            held = set(
                conn.scalars(
                    sa.select(jobs.c.id)
                    .where(jobs.c.id.in_(job_ids))
                    .where(jobs.c.state == JobState.ANALYSING)
                    .where(jobs.c.lease_owner == owner)
                )
            )
            if held:
                conn.execute(jobs.update().where(jobs.c.id.in_(held)).values(lease_until=until))
            return held

    def check_lease(self, conn: Connection, job_id: int, owner: str | None) -> Row:
        """The job's row, locked; raises :class:`LeaseLost` unless ``owner`` holds it.

        ``owner`` None: the single-node worker, which holds every job it runs.
        """
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).one()
        if owner is not None and (row.state != JobState.ANALYSING or row.lease_owner != owner):
            raise LeaseLost(f"job {job_id} is no longer held by {owner} (state {row.state})")
        return row

    # -- receivers: recovery and dispatch -------------------------------------------------

    def requeue_expired(self, now: float) -> list[int]:
        """Queue again every job being analysed whose lease has run out."""
        with self._write() as conn:
            rows = list(
                conn.execute(
                    sa.select(jobs)
                    .where(jobs.c.state == JobState.ANALYSING)
                    # no lease: claimed by a single-node worker before the journal was shared
                    .where(sa.or_(jobs.c.lease_until < now, jobs.c.lease_until.is_(None)))
                    .with_for_update(skip_locked=True)
                )
            )
            for row in rows:
                check_job(JobState.ANALYSING, JobState.QUEUED)
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == row.id)
                    .values(
                        state=JobState.QUEUED,
                        updated_at=now,
                        dispatched_at=None,
                        lease_owner=None,
                        lease_until=None,
                    )
                )
            return [row.id for row in rows]

    def jobs_to_dispatch(self, now: float, redispatch_after: float, limit: int = 200) -> list[Row]:
        """Queued jobs never handed to the broker, or handed over ``redispatch_after`` s ago."""
        with self._read() as conn:
            stale = now - redispatch_after
            query = (
                sa.select(jobs)
                .where(jobs.c.state == JobState.QUEUED)
                .where(sa.or_(jobs.c.dispatched_at.is_(None), jobs.c.dispatched_at < stale))
                .order_by(jobs.c.id)
                .limit(limit)
            )
            return list(conn.execute(query))

    def mark_dispatched(self, job_id: int, seen: float | None, now: float) -> bool:
        """Stamp the job as handed to the broker, unless another receiver just did (False)."""
        with self._write() as conn:
            condition = (
                jobs.c.dispatched_at.is_(None) if seen is None else jobs.c.dispatched_at == seen
            )
            result = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .where(jobs.c.state == JobState.QUEUED)
                .where(condition)
                .values(dispatched_at=now)
            )
            return result.rowcount == 1

    def undo_dispatch(self, job_id: int, stamp: float) -> None:
        """The broker did not take the job stamped at ``stamp``: dispatch it again next round."""
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .where(jobs.c.dispatched_at == stamp)
                .values(dispatched_at=None)
            )

    def overdue_open_studies(self, now: float, idle_seconds: float) -> list[Row]:
        """Open studies idle for longer than ``idle_seconds`` (their receiver may be gone)."""
        with self._read() as conn:
            query = (
                sa.select(studies)
                .where(studies.c.state == StudyState.OPEN)
                .where(studies.c.last_received_at < now - idle_seconds)
            )
            return list(conn.execute(query))

    # -- senders --------------------------------------------------------------------------

    def claim_delivery(self, delivery_id: int, now: float, until: float) -> bool:
        """Reserve a due delivery until ``until``; False if another sender has it."""
        with self._write() as conn:
            result = conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .where(deliveries.c.state == DeliveryState.PENDING)
                .where(deliveries.c.next_attempt_at <= now)
                .values(next_attempt_at=until)
            )
            return result.rowcount == 1


def _claim(
    conn: Connection, job_id: int, now: float, owner: str | None, until: float | None
) -> Row:
    """Mark the queued job ``job_id`` analysing, under ``owner``'s lease when given."""
    check_job(JobState.QUEUED, JobState.ANALYSING)
    conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id)
        .values(
            state=JobState.ANALYSING,
            started_at=now,
            updated_at=now,
            lease_owner=owner,
            lease_until=until,
        )
    )
    return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()


class LeaseKeeper:
    """Renews the leases of the jobs a worker process is running, every third of a lease.

    A lease this process no longer holds (the database was unreachable for longer
    than a lease, and a receiver queued the job again) is dropped and logged; the
    job's own outcome write then fails with :class:`LeaseLost`.
    """

    def __init__(
        self,
        journal: JournalLeases,
        owner: str,
        lease_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._journal = journal
        self._clock = clock
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def until(self) -> float:
        return self._clock() + self.lease_seconds

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)

    @contextmanager
    def holding(self, job_id: int) -> Iterator[None]:
        with self._lock:
            self._held.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(job_id)

    def renew(self) -> None:
        with self._lock:
            held = sorted(self._held)
        if not held:
            return
        kept = self._journal.renew_leases(self.owner, held, self.until())
        for job_id in set(held) - kept:
            log.warning("job %d: lease lost (queued again elsewhere); result dropped", job_id)

    def _loop(self) -> None:
        while not self._stopping.wait(self.lease_seconds / 3):
            try:
                self.renew()
            except Exception as exc:  # the database is away: try again next round
                log.error("renewing job leases failed: %s", type(exc).__name__)
