"""The journal's tables (SQLAlchemy Core) and their schema version."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# Bump when the tables change. An older journal is upgraded in place at start when
# a migration below leads from its version to this one; any other is refused.
# 2: deliveries gained the storage commitment columns; 3: jobs gained priority.
SCHEMA_VERSION = 3

# Job priorities, most urgent first (the order in which queued jobs are claimed).
PRIORITIES = ("urgent", "normal")

metadata = sa.MetaData()


class JournalSchemaError(Exception):
    """The journal on disk was written by an incompatible version."""


meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)
studies = sa.Table(
    "studies",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("calling_aet", sa.String(16), nullable=False),
    sa.Column("first_received_at", sa.Float, nullable=False),
    sa.Column("last_received_at", sa.Float, nullable=False),
    sa.Column("completed_at", sa.Float),
    sa.Column("generation", sa.Integer, nullable=False, default=1),
    sa.Column("details", sa.JSON, nullable=False, default=dict),  # display text, untrusted
)
series = sa.Table(
    "series",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_id", sa.ForeignKey("studies.id"), nullable=False, index=True),
    sa.Column("series_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("modality", sa.String(16), nullable=False),
    sa.Column("instance_count", sa.Integer, nullable=False, default=0),
    sa.Column("details", sa.JSON, nullable=False, default=dict),  # display text, untrusted
)
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sop_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("series_id", sa.ForeignKey("series.id"), nullable=False, index=True),
    sa.Column("relpath", sa.String, nullable=False),
    sa.Column("transfer_syntax", sa.String(64), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("calling_aet", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_id", sa.ForeignKey("studies.id"), nullable=False, index=True),
    sa.Column("series_id", sa.ForeignKey("series.id"), nullable=False),
    sa.Column("route", sa.String, nullable=False),
    sa.Column("pipeline", sa.String, nullable=False),
    sa.Column("send_to", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("instance_count", sa.Integer, nullable=False),
    sa.Column("seg_series_uid", sa.String(64), nullable=False),
    sa.Column("seg_sop_uid", sa.String(64), nullable=False),
    sa.Column("sr_series_uid", sa.String(64), nullable=False),
    sa.Column("sr_sop_uid", sa.String(64), nullable=False),
    sa.Column("predecessor_id", sa.ForeignKey("jobs.id")),
    sa.Column("priority", sa.String(8), nullable=False, default="normal", server_default="normal"),
    sa.Column("error", sa.String),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # stage timings: analysis started, results written, all deliveries settled
    sa.Column("started_at", sa.Float),
    sa.Column("analysed_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("analysis_seconds", sa.Float),
    sa.Column("encode_seconds", sa.Float),
    # scale-out (docs/scale-out.md): when the job was last handed to the broker, and
    # which worker holds it until when (renewed while it runs; expired: queued again)
    sa.Column("dispatched_at", sa.Float),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_until", sa.Float),
)
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("destination", sa.String, nullable=False),
    sa.Column("ae_title", sa.String(16), nullable=False),
    sa.Column("host", sa.String, nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_error", sa.String),
    sa.Column("updated_at", sa.Float, nullable=False),
    # storage commitment (PS3.4 J): the attempt's Transaction UID, report deadline, confirmation
    sa.Column("commit_transaction_uid", sa.String(64), unique=True),
    sa.Column("commit_deadline", sa.Float),
    sa.Column("committed_at", sa.Float),
)


def upgrade(conn: Connection, found: str, path: Path | str) -> None:
    """Migrate a journal of version ``found`` to :data:`SCHEMA_VERSION`, keeping every row.

    Each step is idempotent (a crash between a step and the version update only
    repeats the step). Raises :class:`JournalSchemaError` when no migration
    leads from ``found`` (an older version without one, or a newer version).
    """
    version = int(found) if found.isdigit() else -1
    if version not in _MIGRATIONS:
        raise JournalSchemaError(
            f"journal {path} has schema version {found}; this dicom_node uses "
            f"version {SCHEMA_VERSION} (keep the old version running until its work is "
            "done, then start the new one on an empty storage.path)"
        )
    while version < SCHEMA_VERSION:
        _MIGRATIONS[version](conn)
        version += 1
    conn.execute(meta_table.update().where(meta_table.c.key == "schema").values(value=str(version)))


def _add_job_priority(conn: Connection) -> None:
    """2 -> 3: jobs.priority; jobs already queued keep their order as "normal"."""
    columns = {column["name"] for column in sa.inspect(conn).get_columns("jobs")}
    if "priority" not in columns:
        conn.execute(
            sa.text("ALTER TABLE jobs ADD COLUMN priority VARCHAR(8) NOT NULL DEFAULT 'normal'")
        )


# version -> the step that upgrades a journal of that version by one
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _add_job_priority}
