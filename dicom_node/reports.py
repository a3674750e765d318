"""Read-only views of the journal for the dashboard, the REST API and the CLI."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dicom_node.domain import JobState
from dicom_node.schema import deliveries, instances, jobs, series, studies

Row = sa.Row[Any]


class JournalReports:
    """Queries that change nothing; mixed into :class:`dicom_node.journal.Journal`."""

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def jobs_in_state(self, state: JobState, limit: int = 100) -> list[Row]:
        with self._read() as conn:
            query = sa.select(jobs).where(jobs.c.state == state).order_by(jobs.c.id.desc())
            return list(conn.execute(query.limit(limit)))

    def job_deliveries(self, job_id: int) -> list[Row]:
        with self._read() as conn:
            return list(conn.execute(sa.select(deliveries).where(deliveries.c.job_id == job_id)))

    def state_counts(self) -> dict[str, dict[str, int]]:
        """Counts by state for studies, jobs and deliveries, plus the instance total."""
        with self._read() as conn:
            out: dict[str, dict[str, int]] = {}
            for name, table in (("studies", studies), ("jobs", jobs), ("deliveries", deliveries)):
                query = sa.select(table.c.state, sa.func.count()).group_by(table.c.state)
                out[name] = {state: count for state, count in conn.execute(query)}
            out["instances"] = {
                "total": int(conn.scalar(sa.select(sa.func.count(instances.c.id))) or 0)
            }
            return out

    def recent_studies(self, limit: int = 50) -> list[Row]:
        with self._read() as conn:
            query = sa.select(studies).order_by(studies.c.last_received_at.desc()).limit(limit)
            return list(conn.execute(query))

    def recent_jobs(self, limit: int = 50) -> list[Row]:
        with self._read() as conn:
            return list(conn.execute(sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)))

    def studies_overview(self, limit: int = 50) -> list[dict[str, Any]]:
        """Recent studies, each with its series and jobs (for the dashboard and REST API)."""
        with self._read() as conn:
            query = sa.select(studies).order_by(studies.c.last_received_at.desc()).limit(limit)
            study_rows = list(conn.execute(query))
            ids = [row.id for row in study_rows]
            series_rows = list(
                conn.execute(
                    sa.select(series).where(series.c.study_id.in_(ids)).order_by(series.c.id)
                )
            )
            job_rows = list(
                conn.execute(sa.select(jobs).where(jobs.c.study_id.in_(ids)).order_by(jobs.c.id))
            )
        out = []
        for row in study_rows:
            item = row._asdict()
            item["series"] = [s._asdict() for s in series_rows if s.study_id == row.id]
            item["jobs"] = [j._asdict() for j in job_rows if j.study_id == row.id]
            out.append(item)
        return out

    def job_detail(self, job_id: int) -> dict[str, Any] | None:
        """One job with its deliveries, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one_or_none()
            if row is None:
                return None
            found = conn.execute(sa.select(deliveries).where(deliveries.c.job_id == job_id))
            item = row._asdict()
            item["deliveries"] = [d._asdict() for d in found]
            return item

    def study_instance_count(self, study_uid: str) -> int:
        with self._read() as conn:
            query = (
                sa.select(sa.func.count(instances.c.id))
                .select_from(instances.join(series).join(studies))
                .where(studies.c.study_uid == study_uid)
            )
            return int(conn.scalar(query) or 0)

    def jobs_for_study(self, study_uid: str) -> list[Row]:
        with self._read() as conn:
            query = (
                sa.select(jobs)
                .select_from(jobs.join(studies))
                .where(studies.c.study_uid == study_uid)
                .order_by(jobs.c.id)
            )
            return list(conn.execute(query))
