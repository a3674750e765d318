"""Recording one received instance in the journal: the receive hot path, in plain SQL.

Every C-STORE runs this once, under the journal's write lock, before its success
status. Built with SQLAlchemy Core expressions it cost about 1 ms of CPU per instance
(building, caching and compiling five statements) - as much as the fsyncs. The
statements are fixed, so they are written once as SQL text. On PostgreSQL they run
with ``exec_driver_sql`` in a SQLAlchemy transaction. On SQLite even that cost 0.15 ms
per instance, most of it SQLAlchemy's result objects and connection pool (py-spy put
the journal at 28 % of the socket reader's time): :class:`SQLiteIntake` runs them on a
connection of Python's ``sqlite3`` of its own. The logic is that of the rest of the
journal: a known SOP Instance UID is a duplicate; a study that had completed re-opens
(a new generation); a Series Instance UID that belongs to another study is refused.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dicom_node.domain import StudyState, check_study
from dicom_node.sqlite_journal import WriterLock, configure_sqlite, writer_lock


class UIDConflict(Exception):
    """A received UID contradicts what the journal already holds."""


class JournalReplaced(Exception):
    """The journal's file was removed or replaced while the node had it open: rows would go
    to a file nobody will read again (and the worker's next connection makes an empty one)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"journal {path} was removed or replaced while the node runs; restart the node"
            " (it indexes the stored files again)"
        )


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance written to the spool, about to be recorded."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    relpath: str
    transfer_syntax: str
    size: int
    calling_aet: str
    received_at: float
    study_details: dict[str, str] = field(default_factory=dict)
    series_details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    """Outcome of :meth:`dicom_node.journal.Journal.record_instance`."""

    study_id: int
    duplicate: bool
    reopened: bool  # the study had completed and this instance re-opened it
    opened: bool  # the study is new or re-opened: completion must be (re)scheduled


@dataclass(frozen=True)
class Statements:
    """The intake's SQL in one database's dialect (placeholders, row ids, row locks)."""

    known: str
    study: str
    new_study: str
    touch_study: str
    reopen_study: str
    series: str
    new_series: str
    count_series: str
    new_instance: str
    instance_patient: str
    returning: bool  # inserts return the new id as a row (else: the cursor's lastrowid)


_SQLITE = Statements(
    known=(
        "SELECT series.study_id FROM instances JOIN series ON series.id = instances.series_id"
        " WHERE instances.sop_uid = ?"
    ),
    study=(
        "SELECT id, state, generation, last_received_at, details FROM studies WHERE study_uid = ?"
    ),
    new_study=(
        "INSERT INTO studies (study_uid, state, calling_aet, first_received_at,"
        " last_received_at, generation, details) VALUES (?, ?, ?, ?, ?, 1, ?)"
    ),
    touch_study="UPDATE studies SET last_received_at = ? WHERE id = ?",
    reopen_study=(
        "UPDATE studies SET last_received_at = ?, state = ?, generation = ?,"
        " completed_at = NULL WHERE id = ?"
    ),
    series="SELECT id, study_id FROM series WHERE series_uid = ?",
    new_series=(
        "INSERT INTO series (study_id, series_uid, modality, instance_count, details)"
        " VALUES (?, ?, ?, 1, ?)"
    ),
    count_series="UPDATE series SET instance_count = instance_count + 1 WHERE id = ?",
    new_instance=(
        "INSERT INTO instances (sop_uid, sop_class_uid, series_id, relpath, transfer_syntax,"
        " size, calling_aet, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    instance_patient=(
        "SELECT studies.details FROM instances JOIN series ON series.id = instances.series_id"
        " JOIN studies ON studies.id = series.study_id WHERE instances.sop_uid = ?"
    ),
    returning=False,
)


def statements(dialect: str) -> Statements:
    """The statements for ``dialect`` ("sqlite" or "postgresql").

    On PostgreSQL several receivers record at once: the study row is locked
    (``FOR UPDATE``) so that a completion or re-opening elsewhere is seen, and
    inserts return their id.
    """
    if dialect == "sqlite":
        return _SQLITE
    if dialect != "postgresql":
        raise ValueError(f"no intake statements for the {dialect} dialect")
    fields = {
        name: getattr(_SQLITE, name).replace("?", "%s")
        for name in Statements.__dataclass_fields__
        if name != "returning"
    }
    fields["study"] += " FOR UPDATE"
    for name in ("new_study", "new_series"):
        fields[name] += " RETURNING id"
    return Statements(**fields, returning=True)


# Runs one statement with its parameters in the open transaction; returns a DB-API cursor
# (or a SQLAlchemy CursorResult: both have fetchone() and lastrowid).
Execute = Callable[[str, Sequence[Any]], Any]


def record(execute: Execute, inst: ReceivedInstance, sql: Statements = _SQLITE) -> Recorded:
    """Insert ``inst`` (and its study and series when new) in the open transaction."""
    known = execute(sql.known, (inst.sop_uid,)).fetchone()
    if known is not None:
        return Recorded(int(known[0]), duplicate=True, reopened=False, opened=False)
    study_id, reopened, opened = _touch_study(execute, inst, sql)
    series_id = _touch_series(execute, study_id, inst, sql)
    execute(
        sql.new_instance,
        (
            inst.sop_uid,
            inst.sop_class_uid,
            series_id,
            inst.relpath,
            inst.transfer_syntax,
            inst.size,
            inst.calling_aet,
            inst.received_at,
        ),
    )
    return Recorded(study_id, duplicate=False, reopened=reopened, opened=opened)


def _touch_study(
    execute: Execute, inst: ReceivedInstance, sql: Statements
) -> tuple[int, bool, bool]:
    """Insert or refresh the study row; returns (id, reopened, opened)."""
    row = execute(sql.study, (inst.study_uid,)).fetchone()
    if row is None:
        result = execute(
            sql.new_study,
            (
                inst.study_uid,
                StudyState.OPEN.value,
                inst.calling_aet,
                inst.received_at,
                inst.received_at,
                json.dumps(inst.study_details),
            ),
        )
        return _new_id(result, sql), False, True
    study_id, state, generation, last_received_at, details = row
    if patient_id_of(details) != inst.study_details.get("PatientID", ""):
        # One Study Instance UID for two patients (a sender's UID generator, a copy of a
        # study edited by hand): one series would mix their images, and the results
        # would go to one of them. The sender hears 0xA900; nothing is merged.
        raise UIDConflict("StudyInstanceUID already belongs to another patient (PatientID)")
    latest = max(float(last_received_at), inst.received_at)
    if state != StudyState.COMPLETE:
        execute(sql.touch_study, (latest, study_id))
        return int(study_id), False, False
    check_study(StudyState(state), StudyState.OPEN)
    execute(sql.reopen_study, (latest, StudyState.OPEN.value, int(generation) + 1, study_id))
    return int(study_id), True, True


def patient_id_of(details: object) -> str:
    """The study's Patient ID as recorded (``details``: the row's JSON, as the database
    driver returns it: text from sqlite3, a dict from a JSON column)."""
    if isinstance(details, str | bytes):
        details = json.loads(details or "{}")
    return str(details.get("PatientID", "")) if isinstance(details, dict) else ""


def _touch_series(execute: Execute, study_id: int, inst: ReceivedInstance, sql: Statements) -> int:
    row = execute(sql.series, (inst.series_uid,)).fetchone()
    if row is not None and int(row[1]) != study_id:
        raise UIDConflict("SeriesInstanceUID already belongs to another study")
    if row is None:
        result = execute(
            sql.new_series,
            (study_id, inst.series_uid, inst.modality, json.dumps(inst.series_details)),
        )
        return _new_id(result, sql)
    execute(sql.count_series, (row[0],))
    return int(row[0])


def _new_id(result: Any, sql: Statements) -> int:
    if sql.returning:
        return int(result.fetchone()[0])
    rowid = getattr(result, "lastrowid", None)
    if rowid is None:
        raise RuntimeError("the journal did not report the new row's id")
    return int(rowid)


class SQLiteIntake:
    """The intake on a SQLite journal, through a ``sqlite3`` connection of its own.

    The caller serialises :meth:`record` with every other writer of its process (the
    journal's write lock); :meth:`stored_patient_id` needs no lock of the caller's. Like the
    SQLAlchemy engine it replaces here, the connection commits with
    ``synchronous=NORMAL``: the instance's file was fsynced before, and a row lost to
    a power failure is written again from the file at start
    (:func:`dicom_node.reindex.reindex_orphans`). Not for use across a fork.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # the file the connection has open
        self._lock = threading.Lock()  # one statement or transaction at a time

    def stored_patient_id(self, sop_uid: str) -> str | None:
        """The Patient ID recorded with the study of instance ``sop_uid`` ("" for none),
        or None when the instance is not stored."""
        with self._lock:
            row = self._connection().execute(_SQLITE.instance_patient, (sop_uid,)).fetchone()
        return None if row is None else patient_id_of(row[0])

    def record(self, inst: ReceivedInstance) -> Recorded:
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                recorded = record(db.execute, inst, _SQLITE)
                db.commit()
            except BaseException:
                self._roll_back(db)
                raise
            return recorded

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _roll_back(self, db: sqlite3.Connection) -> None:
        """End a failed transaction (a failed commit included), so that the next
        ``BEGIN`` works; a connection that cannot even roll back is closed and the
        next call opens a new one."""
        try:
            if db.in_transaction:
                db.rollback()
        except sqlite3.Error:
            db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is not None and file_identity(self.path) != self._identity:
            raise JournalReplaced(self.path)
        if self._db is None:
            # isolation_level=None: no implicit transactions, record() opens its own.
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            try:
                configure_sqlite(db, "NORMAL")
            except BaseException:
                db.close()
                raise
            self._db = db
            self._identity = file_identity(self.path)  # looked at before each use
        return self._db


class InstanceJournal(Protocol):
    """What receiving needs of the journal: :class:`dicom_node.journal.Journal`, or a
    receiving process's :class:`ReceivingJournal`."""

    def record_instance(self, inst: ReceivedInstance) -> Recorded: ...

    def stored_patient_id(self, sop_uid: str) -> str | None: ...

    def all_instance_relpaths(self, prefix: str = "") -> set[str]: ...


class ReceivingJournal:
    """The node's own SQLite journal as receiving uses it: the instances recorded, looked
    up and indexed again (:func:`dicom_node.reindex.reindex_orphans`), in plain SQL.

    What a receiving process (node.receive_processes) opens instead of
    :class:`dicom_node.journal.Journal`, without SQLAlchemy (about 25 MiB less); the
    journal uses one too for these. ``write_lock``: the process's lock of the journal's
    writers, if it has one already (else one of its own, closed with this).
    """

    def __init__(self, path: Path, write_lock: WriterLock | None = None) -> None:
        self.path = path
        self._intake = SQLiteIntake(path)
        self._own_lock = write_lock is None
        self._write_lock = writer_lock(path) if write_lock is None else write_lock

    def record_instance(self, inst: ReceivedInstance) -> Recorded:
        """Record a stored instance; a known SOP Instance UID is a duplicate."""
        with self._write_lock:
            return self._intake.record(inst)

    def has_instance(self, sop_uid: str) -> bool:
        return self.stored_patient_id(sop_uid) is not None

    def stored_patient_id(self, sop_uid: str) -> str | None:
        """The Patient ID of stored instance ``sop_uid``'s study, or None if not stored."""
        return self._intake.stored_patient_id(sop_uid)

    def all_instance_relpaths(self, prefix: str = "") -> set[str]:
        """The relative paths of the recorded instances (those starting with ``prefix``)."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            rows = db.execute(
                "SELECT relpath FROM instances WHERE substr(relpath, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
        finally:
            db.close()
        return {str(relpath) for (relpath,) in rows}

    def close(self) -> None:
        self._intake.close()
        if self._own_lock:
            self._write_lock.close()
