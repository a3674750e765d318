"""The journal's sending side: deliveries, storage commitment, and the job states they settle.

Mixed into :class:`dicom_node.journal.Journal`; :func:`set_job_state` is the one place a
job row changes state, for the rest of the journal too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dicom_node.domain import (
    DeliveryState,
    JobState,
    check_delivery,
    check_job,
    job_state_after_deliveries,
)
from dicom_node.schema import deliveries, jobs

Row = sa.Row[Any]


class JournalDeliveries:
    """Delivery and storage commitment rows; mixed into :class:`dicom_node.journal.Journal`."""

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def due_deliveries(self, now: float, limit: int = 32) -> list[Row]:
        with self._read() as conn:
            query = (
                sa.select(deliveries)
                .where(deliveries.c.state == DeliveryState.PENDING)
                .where(deliveries.c.next_attempt_at <= now)
                .order_by(deliveries.c.next_attempt_at)
                .limit(limit)
            )
            return list(conn.execute(query))

    def next_delivery_at(self) -> float | None:
        """When the sender has work next: a retry, or a storage commitment running out."""
        with self._read() as conn:
            due = sa.case(
                (deliveries.c.state == DeliveryState.COMMITTING, deliveries.c.commit_deadline),
                else_=deliveries.c.next_attempt_at,
            )
            query = sa.select(sa.func.min(due)).where(
                deliveries.c.state.in_([DeliveryState.PENDING, DeliveryState.COMMITTING])
            )
            return conn.scalar(query)

    # -- storage commitment (PS3.4 Annex J) ----------------------------------

    def commitment_requested(
        self, delivery_id: int, transaction_uid: str, deadline: float, now: float
    ) -> None:
        """The objects are stored: wait for the report of ``transaction_uid`` until ``deadline``."""
        with self._write() as conn:
            row = conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).one()
            check_delivery(DeliveryState(row.state), DeliveryState.COMMITTING)
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .values(
                    state=DeliveryState.COMMITTING,
                    commit_transaction_uid=transaction_uid,
                    commit_deadline=deadline,
                    committed_at=None,
                    updated_at=now,
                )
            )

    def delivery_by_transaction(self, transaction_uid: str) -> Row | None:
        with self._read() as conn:
            query = sa.select(deliveries).where(
                deliveries.c.commit_transaction_uid == transaction_uid
            )
            return conn.execute(query).one_or_none()

    def overdue_commitments(self, now: float) -> list[Row]:
        """COMMITTING deliveries whose report did not arrive by their deadline."""
        with self._read() as conn:
            query = (
                sa.select(deliveries)
                .where(deliveries.c.state == DeliveryState.COMMITTING)
                .where(deliveries.c.commit_deadline <= now)
                .order_by(deliveries.c.commit_deadline)
            )
            return list(conn.execute(query))

    def commitment_settled(
        self,
        transaction_uid: str,
        new: DeliveryState,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> Row | None:
        """Record the outcome of a commitment as one attempt: SENT, DEAD or PENDING again.

        None (nothing changed) unless the delivery is still COMMITTING under
        ``transaction_uid``: a late or repeated report, or one racing the
        timeout, settles an attempt at most once.
        """
        with self._write() as conn:
            row = conn.execute(
                sa.select(deliveries).where(deliveries.c.commit_transaction_uid == transaction_uid)
            ).one_or_none()
            if row is None or row.state != DeliveryState.COMMITTING:
                return None
            check_delivery(DeliveryState.COMMITTING, new)
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == row.id)
                .values(
                    state=new,
                    attempts=row.attempts + 1,
                    last_error=error,
                    next_attempt_at=retry_at if retry_at is not None else row.next_attempt_at,
                    commit_deadline=None,
                    committed_at=now if new == DeliveryState.SENT else None,
                    updated_at=now,
                )
            )
            settle_job(conn, row.job_id, now)
            return conn.execute(sa.select(deliveries).where(deliveries.c.id == row.id)).one()

    def delivery_attempted(
        self,
        delivery_id: int,
        new: DeliveryState,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> Row:
        """Record one send attempt: SENT, DEAD, or PENDING again with ``retry_at``."""
        with self._write() as conn:
            row = conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).one()
            if new != DeliveryState.PENDING:
                check_delivery(DeliveryState(row.state), new)
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .values(
                    state=new,
                    attempts=row.attempts + 1,
                    last_error=error,
                    next_attempt_at=retry_at if retry_at is not None else row.next_attempt_at,
                    updated_at=now,
                )
            )
            settle_job(conn, row.job_id, now)
            return conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).one()


FINISHED = frozenset({JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER})
HAS_RESULTS = frozenset({JobState.SENDING, JobState.DONE, JobState.DEAD_LETTER})


def set_job_state(
    conn: Connection, row: Row, new: JobState, now: float, error: str | None = None
) -> None:
    check_job(JobState(row.state), new)
    values: dict[str, Any] = {"state": new, "updated_at": now}
    if error is not None:
        values["error"] = error
    if new == JobState.QUEUED:  # (again): to be handed to a worker afresh
        values.update(dispatched_at=None, lease_owner=None, lease_until=None)
    if new == JobState.ANALYSING:
        values["started_at"] = now
    elif new == JobState.SENDING and row.state == JobState.ANALYSING:
        values["analysed_at"] = now
    elif new in FINISHED:
        values["finished_at"] = now
    conn.execute(jobs.update().where(jobs.c.id == row.id).values(**values))


def settle_job(conn: Connection, job_id: int, now: float) -> None:
    row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
    if row.state != JobState.SENDING:
        return
    states = [
        DeliveryState(s)
        for s in conn.scalars(sa.select(deliveries.c.state).where(deliveries.c.job_id == job_id))
    ]
    new = job_state_after_deliveries(states)
    if new is not None:
        set_job_state(conn, row, new, now)
