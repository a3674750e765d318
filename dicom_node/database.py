"""Where the journal lives: a SQLite file (one node) or PostgreSQL (several), and its migrations.

The schema is :mod:`dicom_node.schema`; its history is the Alembic revisions in
``dicom_node/migrations``. Every process that opens the journal (``serve``,
``worker``, ``status``, ``migrate``) brings it to the newest revision first, under
a lock, so that two receivers starting together never migrate twice.

Journals written before Alembic carry only ``meta.schema`` (version 2 or 3): they
are brought to version 3 by :func:`dicom_node.schema.upgrade` and then stamped
with the baseline revision, which is exactly version 3's tables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine, make_url

from dicom_node.schema import (
    SCHEMA_VERSION,
    JournalSchemaError,
    meta_table,
    upgrade,
)
from dicom_node.sqlite_journal import (  # re-exported: defined there, without SQLAlchemy
    WriterLock as WriterLock,
)
from dicom_node.sqlite_journal import configure_sqlite as configure_sqlite
from dicom_node.sqlite_journal import is_url as is_url
from dicom_node.sqlite_journal import writer_lock as writer_lock

log = logging.getLogger(__name__)

# The revision whose tables are those of pre-Alembic schema version 3.
BASELINE_REVISION = "0001"
# Any constant: PostgreSQL's advisory lock serialising migrations between processes.
_MIGRATION_LOCK = 0x6469636F6D


def describe(location: Path | str) -> str:
    """The journal's location for logs and errors, without a password."""
    if is_url(location):
        return make_url(str(location)).render_as_string(hide_password=True)
    return str(location)


def create_engine(location: Path | str) -> Engine:
    """The engine for a SQLite file path or a database URL.

    A SQLite journal commits with ``synchronous=FULL`` here; received instances are
    recorded on a connection of their own (:class:`dicom_node.intake.SQLiteIntake`).
    """
    if not is_url(location):
        return _sqlite_engine(Path(location))
    url = make_url(str(location))
    if url.get_backend_name() != "postgresql":
        raise JournalSchemaError(
            f"journal {describe(location)}: only postgresql URLs are supported "
            "(postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE)"
        )
    engine = sa.create_engine(
        url,
        hide_parameters=True,  # errors must not quote rows (display details)
        pool_size=8,
        max_overflow=8,
        pool_pre_ping=True,  # a restarted server costs one reconnect, not one failed job
    )
    return engine


def _sqlite_engine(path: Path) -> Engine:
    engine = sa.create_engine(
        f"sqlite:///{path}",
        connect_args={"check_same_thread": False, "timeout": 30},
        hide_parameters=True,
        pool_size=8,
        max_overflow=8,
    )

    def configure(dbapi_connection: Any, _record: Any) -> None:
        configure_sqlite(dbapi_connection, "FULL")

    sa.event.listen(engine, "connect", configure)
    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "dicom_node:migrations")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def migrate(engine: Engine, location: Path | str) -> None:
    """Create or upgrade the journal's tables to the newest revision, keeping every row.

    Raises :class:`JournalSchemaError` for a journal this version cannot use: one
    written by a newer version, or a pre-Alembic version without a migration.
    """
    try:
        _migrate(engine, location)
    except sa.exc.OperationalError:
        raise  # a database server that cannot be reached, a locked file: not the journal's fault
    except sa.exc.DatabaseError as exc:  # e.g. a file that is not an SQLite database
        raise JournalSchemaError(
            f"journal {describe(location)} cannot be read ({exc.orig}): restore it from a"
            " backup (docs/operations.md, section 4) or move it away to start a new one"
        ) from None


def _migrate(engine: Engine, location: Path | str) -> None:
    with _file_lock(location), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        tables = set(sa.inspect(conn).get_table_names())
        if "meta" in tables:
            _settle_legacy_version(conn, location, stamped="alembic_version" in tables)
        config = alembic_config(conn)
        current = MigrationContext.configure(conn).get_current_revision()
        if current != head_revision():
            log.info("journal %s: migrating from revision %s", describe(location), current)
        try:
            command.upgrade(config, "head")
        except CommandError as exc:  # e.g. a revision from a newer dicom_node
            raise JournalSchemaError(
                f"journal {describe(location)} cannot be upgraded by this dicom_node "
                f"(newest known revision {head_revision()}): {exc}"
            ) from None
        found = conn.scalar(sa.select(meta_table.c.value).where(meta_table.c.key == "schema"))
        if found is None:
            conn.execute(meta_table.insert().values(key="schema", value=str(SCHEMA_VERSION)))


@contextmanager
def _file_lock(location: Path | str) -> Iterator[None]:
    """SQLite: hold ``<journal>.lock`` while migrating (PostgreSQL has its advisory lock)."""
    if is_url(location):
        yield
        return
    import fcntl

    fd = os.open(f"{location}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _settle_legacy_version(conn: Connection, location: Path | str, stamped: bool) -> None:
    """Bring a journal to ``meta.schema`` 3 and mark it as the baseline revision if unmarked."""
    found = conn.scalar(sa.select(meta_table.c.value).where(meta_table.c.key == "schema"))
    if found is not None and found != str(SCHEMA_VERSION):
        upgrade(conn, found, describe(location))  # raises JournalSchemaError if it cannot
    if not stamped:
        command.stamp(alembic_config(conn), BASELINE_REVISION)
        log.info("journal %s: marked as revision %s", describe(location), BASELINE_REVISION)
