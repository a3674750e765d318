"""The node's own SQLite journal without SQLAlchemy: its connection settings and the lock
of its writers, for every process that writes it.

SQLAlchemy and Alembic take about 25 MiB of each process that imports them. A receiving
process (node.receive_processes) records and looks up instances only, in plain SQL
(:class:`dicom_node.intake.ReceivingJournal`), so it imports neither; the node's own
process opens the journal through :class:`dicom_node.journal.Journal`, which creates and
migrates it before any receiving process starts.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any


def is_url(location: Path | str) -> bool:
    return isinstance(location, str) and "://" in location


def configure_sqlite(connection: Any, synchronous: str) -> None:
    """What every connection to a SQLite journal is set to: WAL, foreign keys, a 30 s busy
    timeout, and ``synchronous`` (FULL; NORMAL for the intake's own connection)."""
    cursor = connection.cursor()
    try:
        for pragma in (
            "journal_mode=WAL",
            f"synchronous={synchronous}",
            "foreign_keys=ON",
            "busy_timeout=30000",
        ):
            cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


class WriterLock:
    """Serialises the writers of one journal: the threads of this process and, for a
    SQLite file, every process on this host.

    A thread takes the process's own lock first, then an exclusive ``flock`` on
    ``<journal>.writers``. The kernel drops a ``flock`` when its process dies, so a
    receiving process killed in the middle of a transaction never leaves the others
    waiting. Writers that wait here are woken as soon as the lock is free, where
    SQLite's own busy handler would sleep and poll (1, 2, 5, 10 ms, ...).
    PostgreSQL locks rows itself: ``path=None`` leaves only the process's lock.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._threads = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            if self._path is not None:
                import fcntl

                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._fd is not None:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def close(self) -> None:
        with self._threads:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def writer_lock(location: Path | str) -> WriterLock:
    """The :class:`WriterLock` of the journal at ``location``."""
    return WriterLock(None if is_url(location) else Path(f"{location}.writers"))
