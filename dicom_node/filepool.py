"""Empty files made ahead of need, so that no C-STORE waits for an inode.

Creating a file cost the kernel anything from 0.015 to 1.0 ms of CPU on the VM this
node was measured on (ext4, which allocates the inode near the folder's own: the cost
depends on the folder). On the receive path it came before every success status:
py-spy put it at 28 % of the socket reader's time at one association, more than the
fsync of the file. A background thread keeps a few empty files ready in the spool's ``tmp/``;
:meth:`FilePool.take` hands one out without a system call.

Nothing about durability changes: a ready file is only an inode with a name in
``tmp/``. The instance's bytes are fsynced in it and it is renamed into place as
before; ready files left by a stop or a crash are removed at the next start like any
partial file (:meth:`dicom_node.store.Spool.clear_tmp`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

READY_SUFFIX = ".ready"
DEFAULT_SIZE = 32


def unused_ready_file(name: str, size: int) -> bool:
    """Whether a file in ``tmp/`` is a ready file nobody wrote into (not a partial one)."""
    return name.endswith(READY_SUFFIX) and size == 0


class FilePool:
    """Up to ``size`` empty files in ``folder``, refilled by a daemon thread once half are used.

    Per process: after a fork the child never takes the parent's files (both would
    write into the same inode); it starts a pool of its own.
    """

    def __init__(self, folder: Path, size: int = DEFAULT_SIZE) -> None:
        self.folder = folder
        self.size = size
        self._ready: deque[str] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def take(self) -> str | None:
        """The path of an empty file that only the caller will use, or None when none is
        ready (the caller creates its own; the pool is refilled meanwhile)."""
        if self._closed or self.size <= 0:
            return None
        if self._pid != os.getpid():
            self._forked()
        try:
            path = self._ready.popleft()
        except IndexError:
            path = None
        if len(self._ready) <= self.size // 2:
            self._refill()
        return path

    def close(self) -> None:
        """Stop refilling and remove the files still ready (a clean stop leaves none)."""
        self._closed = True
        self._wake.set()
        if self._pid != os.getpid():
            return  # the parent's files are the parent's to remove
        while self._ready:
            with contextlib.suppress(IndexError, OSError):
                os.unlink(self._ready.popleft())

    def __len__(self) -> int:
        return len(self._ready)

    def _refill(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="spool-file-pool", daemon=True
                    )
                    self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while not self._closed and len(self._ready) < self.size:
                path = os.path.join(self.folder, uuid.uuid4().hex + READY_SUFFIX)
                try:
                    os.close(
                        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    )
                except OSError as exc:
                    # Out of inodes or space, a folder removed: the writers create their
                    # own files and report the error; try again at the next take.
                    log.debug("cannot make a ready file in %s: %s", self.folder, exc)
                    break
                self._ready.append(path)
            if self._closed:  # closed while filling: remove what this thread made
                self.close()

    def _forked(self) -> None:
        self._pid = os.getpid()
        self._ready = deque()
        self._wake = threading.Event()
        self._thread = None
        self._start_lock = threading.Lock()
