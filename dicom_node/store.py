"""Durable files in the spool: received instances and result objects.

Every file is written once: to a temporary file in ``tmp/`` on the same file
system (made ahead of need: :mod:`dicom_node.filepool`), flushed and fsynced, then
renamed into place and the directory fsynced.
Paths come from our own random ids, never from a received UID.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from dicom_node.filepool import FilePool, unused_ready_file
from dicom_node.header_scan import Buffer

if TYPE_CHECKING:
    from dicom_node.objects import ObjectStore

log = logging.getLogger(__name__)
WRITEV_MAX_BUFFERS = 1024  # IOV_MAX on Linux


class Alongside(Protocol):
    """Work that runs on another thread while :meth:`Spool.write_atomic` writes a file.

    ``start`` is called once the file is written, just before its fsync; ``finish``
    (which waits for the work) once the file is synced, before it takes its name.
    Started there, the other thread runs while this one is in ``fsync``, which releases
    the GIL. Started before the write, it took the GIL during this thread's shorter
    system calls (the free-space check, the open), and this one waited after each
    (docs/performance.md, item 28).
    """

    def start(self) -> None: ...

    def finish(self) -> object: ...


class LowSpace(Exception):
    """Free space in the spool is below the configured watermark."""


class NameInUse(OSError):
    """Another running process uses the same node name on this storage."""


def _lock_holder(fd: int) -> str:
    """`` (pid N)`` as the lock file's holder wrote it, or ``""``."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


class Spool:
    """The storage folder: ``instances/``, ``results/``, ``tmp/`` and the journal.

    Shared by several processes (docs/scale-out.md), each has a ``name``: its
    received instances go to ``instances/<name>/`` and its partial files to
    ``tmp/<name>/``, so that one process's start-up clean-up and re-indexing never
    touch another's files. Results are written by whichever worker ran the job.
    """

    def __init__(
        self,
        root: Path,
        min_free_bytes: int = 0,
        name: str | None = None,
        objects: ObjectStore | None = None,
    ) -> None:
        self.root = root.resolve()
        # With an object store, the bucket is what is shared and ``root`` is this
        # process's own folder (see dicom_node.objects).
        self.objects = objects
        self.min_free_bytes = min_free_bytes
        self.name = name
        self._low = False
        self._largest_refused = 0  # the largest instance refused since space got low
        self._instances_rel = "instances" if name is None else f"instances/{name}"
        self.instances = self.root / self._instances_rel
        self.results = self.root / "results"
        self.tmp = self.root / "tmp" if name is None else self.root / "tmp" / name
        self.journal_path = self.root / "journal.sqlite"
        self._lock_fd: int | None = None
        self._pool = FilePool(self.tmp)

    def create(self) -> None:
        for folder in (self.root, self.instances, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock_name()
        # All 256 instance folders up front, made durable once: otherwise the first
        # instance into a new folder could be acknowledged by a second thread (which saw
        # the folder and fsynced only it) before the folder's own entry was synced.
        for index in range(256):
            (self.instances / f"{index:02x}").mkdir(exist_ok=True)
        _fsync_dir(self.instances)
        _fsync_dir(self.root)

    def lock_name(self) -> None:
        """Hold ``nodes/<name>.lock`` (``nodes/node.lock`` without a name) while running:
        a second process of that name on this storage fails. Without a name that is a
        second node on the same ``storage.path``, which would share the journal, run the
        same studies' timers, jobs and deliveries and clear the first one's ``tmp/``."""
        import fcntl

        path = self.root / "nodes" / f"{self.name or 'node'}.lock"
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            if self.name is None:
                raise NameInUse(
                    f"storage.path {self.root} is in use by another dicom-node{holder};"
                    " each node needs a storage.path of its own"
                ) from None
            raise NameInUse(
                f"another running process{holder} uses the name {self.name!r} in {self.root}"
                " (cluster.node_name must be unique per receiver)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        self._pool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def clear_tmp(self) -> int:
        """Remove partial files left by a crash; they were never acknowledged.

        Empty ready files (:mod:`dicom_node.filepool`) go too, without counting.
        """
        removed = 0
        for leftover in os.scandir(self.tmp):
            if leftover.is_dir():  # another process's tmp/<name>/ on a shared storage
                continue
            try:
                unused = unused_ready_file(leftover.name, leftover.stat().st_size)
                os.unlink(leftover.path)
            except FileNotFoundError:
                continue
            removed += not unused
        if removed:
            log.warning(
                "removed %d partial file(s) left in %s by an interrupted run", removed, self.tmp
            )
        return removed

    def ensure_space(self, incoming: int) -> None:
        """Raise :class:`LowSpace` if storing ``incoming`` bytes would pass the watermark.

        Checked before every write, so the node recovers by itself when space returns.
        Low space is logged once when an instance is first refused and once when an
        instance of the largest size refused meanwhile fits again, not at each smaller
        instance that still fits in between.
        """
        free = shutil.disk_usage(self.root).free
        floor = self.min_free_bytes
        if free - incoming >= floor:
            if self._low and free - self._largest_refused >= floor:
                self._low, self._largest_refused = False, 0
                log.warning("free space back above storage.min_free_bytes: accepting again")
            return
        if not self._low:
            self._low = True
            log.error(
                "free space %d MiB: an instance of %d KiB would leave less than"
                " storage.min_free_bytes (%d MiB); refusing new instances with 0xA700 until"
                " space returns",
                free // 2**20,
                incoming // 1024,
                floor // 2**20,
            )
        self._largest_refused = max(self._largest_refused, incoming)
        if free < floor:
            raise LowSpace(f"{free} bytes free, below storage.min_free_bytes ({floor})")
        raise LowSpace(
            f"an instance of {incoming} bytes would leave {max(free - incoming, 0)} of the"
            f" {free} bytes free, below storage.min_free_bytes ({floor})"
        )

    def new_instance_relpath(self) -> str:
        """A fresh relative path for a received instance: ``instances/[<name>/]ab/<uuid>.dcm``."""
        name = uuid.uuid4().hex
        return f"{self._instances_rel}/{name[:2]}/{name}.dcm"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def write_atomic(
        self,
        relpath: str,
        data: Buffer | Sequence[Buffer] | Callable[[BinaryIO], object],
        alongside: Alongside | None = None,
    ) -> Path:
        """Write ``data`` (one buffer, several written one after the other, or a function
        that writes to the file it is given) durably to ``relpath``; on any error no file
        is left behind.

        ``alongside``: work for another thread while this one writes and syncs (see
        :class:`Alongside`); what its ``finish`` raises leaves no file behind and
        propagates.
        """
        pieces: list[Buffer] = []
        if callable(data):
            writer = data
        else:
            pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        final = self.root / relpath
        temp, fd = self._open_temp()
        try:
            try:
                if callable(data):
                    with os.fdopen(fd, "wb", closefd=False) as stream:
                        writer(stream)
                else:
                    _write_all(fd, pieces)
                if alongside is not None:
                    alongside.start()
                os.fsync(fd)
            finally:
                os.close(fd)
            if alongside is not None:
                alongside.finish()
            created = self._move_into_place(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_dir(final.parent)
        if created:  # the new folder's own entry must be durable too
            _fsync_dir(final.parent.parent)
        if self.objects is not None:
            try:
                payload = final.read_bytes() if callable(data) else b"".join(pieces)
                self.objects.put(relpath, payload)
            except OSError:
                final.unlink(missing_ok=True)  # not shared, so not stored
                raise
        return final

    def _open_temp(self) -> tuple[str, int]:
        """A new, empty file in ``tmp/`` opened for writing: a ready one when there is."""
        ready = self._pool.take()
        if ready is not None:
            try:
                return ready, os.open(ready, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # removed behind our back: make one as below
                pass
        temp = os.path.join(self.tmp, f"{uuid.uuid4().hex}.part")
        return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _move_into_place(temp: str, final: Path) -> bool:
        """Rename ``temp`` to ``final``; True when ``final``'s folder had to be made."""
        try:
            os.replace(temp, final)
            return False
        except FileNotFoundError:
            if final.parent.is_dir():
                raise  # the temporary file itself is gone
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        return True

    def fetch(self, relpath: str) -> Path:
        """The local path of ``relpath``, copied from the object store first if need be.

        Without an object store (or when the object is missing there too) this is
        just :meth:`path`: callers see a missing file as before.
        """
        local = self.root / relpath
        if self.objects is None or local.exists():
            return local
        data = self.objects.get(relpath)
        if data is None:
            return local
        temp = self.tmp / f"{uuid.uuid4().hex}.part"
        temp.write_bytes(data)  # a cache: no fsync, the bucket has it
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, local)
        return local

    def share(self, relpath: str) -> None:
        """Put a local file in the object store (again): one whose put a crash interrupted."""
        if self.objects is not None:
            self.objects.put(relpath, (self.root / relpath).read_bytes())

    def evict(self, relpaths: list[str]) -> None:
        """Drop local copies fetched from the object store (this process's own files stay)."""
        if self.objects is None:
            return
        for relpath in relpaths:
            if not relpath.startswith(self.instances_prefix):
                (self.root / relpath).unlink(missing_ok=True)

    def remove(self, relpath: str) -> None:
        (self.root / relpath).unlink(missing_ok=True)
        if self.objects is not None:
            self.objects.delete(relpath)

    def result_relpath(self, job_id: int, kind: str) -> str:
        return f"results/{job_id}/{kind}.dcm"

    def orphans(self, known: set[str]) -> list[str]:
        """Relative paths of instance files the journal does not know, oldest first.

        A crash between the rename into place and the journal commit leaves such a
        file, and so does a power failure that loses the last journal rows (they are
        committed without a WAL sync; the file was fsynced before the success status).
        """
        found = []
        for folder in os.scandir(self.instances):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder.path):
                relpath = f"{self._instances_rel}/{folder.name}/{entry.name}"
                if entry.name.endswith(".dcm") and relpath not in known:
                    found.append((entry.stat().st_mtime, relpath))
        return [relpath for _, relpath in sorted(found)]

    @property
    def instances_prefix(self) -> str:
        """The relative paths of this spool's own instance files start with this."""
        return f"{self._instances_rel}/"

    def quarantine(self, relpath: str) -> Path:
        """Move a file that cannot be indexed out of ``instances/``, keeping it."""
        target = self.root / "quarantine" / Path(relpath).name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / relpath, target)
        _fsync_dir(target.parent)
        return target


def _write_all(fd: int, pieces: list[Buffer]) -> None:
    """``os.writev`` until every byte of ``pieces`` is written (it may write fewer)."""
    views = [memoryview(piece).cast("B") for piece in pieces if len(piece)]
    while views:
        written = os.writev(fd, views[:WRITEV_MAX_BUFFERS])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
