"""More than one receiving process (``node.receive_processes``).

One Python process receives at about one core's worth: the GIL serialises its
associations (docs/performance.md). With ``node.receive_processes: N`` the node starts
N - 1 receiving processes beside its own (``receiver-2`` ... ``receiver-N``).

- **The main process keeps the listening socket.** It accepts each connection, applies
  the node-wide limits (``allowed_networks``, ``max_connections``,
  ``max_associations_per_source``) and passes the connection's descriptor (SCM_RIGHTS
  over a Unix socket pair) to whichever process has the fewest open connections,
  itself included.
- **A receiving process serves the associations it is given as the main process does:**
  the wire path, the fsyncs and the journal row before success. Its files go to its own
  folder, ``instances/receiver-K/``. It writes the same SQLite journal; the writers of
  every process take the journal's cross-process lock
  (:class:`dicom_node.database.WriterLock`).
- **What only the main process does comes back to it as messages:** a study that opened
  (its completion timer), a storage commitment report (answered by its
  :class:`~dicom_node.commit.Commitments`), and the counters for ``/metrics``.

Not SO_REUSEPORT: the kernel spreads its connections by a hash of the addresses, so four
associations often land 3 + 1 or 4 + 0 on two processes. It also lets any process of the
same user bind the port unnoticed, and the connection limits would count per process.

Failures:
- A receiving process that dies is started again (after 1 s, doubling up to 60 s). Its
  associations are cut, and their senders resend what was not acknowledged.
- Its files without a journal row are indexed again when it starts. Every open study
  gets its completion timer again when a process ends and when one is ready, since a
  study it had just opened (or indexed again) may not have been announced.
- If the main process dies, the others see their socket close, drain and exit.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import evt

from dicom_node.config import NodeSection
from dicom_node.header import PROCESSING_FAILURE
from dicom_node.intake import ReceivingJournal, Recorded
from dicom_node.web.metrics import CounterKey, Metrics

log = logging.getLogger(__name__)

START_SECONDS = 60.0  # the node waits this long for its receiving processes at start
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 60.0
STABLE_SECONDS = 60.0  # a process that ran this long is restarted after the first delay again
STOP_GRACE_SECONDS = 1.0  # how long a node may take to begin its stop after its SIGTERM
STOP_POLL_SECONDS = 0.05  # how often the grace looks whether the node was told to stop
REPORT_SECONDS = 30.0  # a receiving process's wait for the answer to a commitment report
COUNTS_SECONDS = 0.5  # how often a receiving process reports its counters
EXIT_GRACE_SECONDS = 5.0  # after the drain, before a receiving process is killed
# A SOCK_SEQPACKET message must fit the socket's send buffer (net.core.wmem_default,
# 208 KiB by default); the largest are commitment reports (about 100 bytes per object).
MAX_MESSAGE_BYTES = 192 * 1024
HANDOFF_SECONDS = 2.0  # a draining process's wait for the main process's "no-more"

# Answers a storage commitment report: (event type, Event Information) -> (status, reply)
ReportAnswer = Callable[[int, pydicom.Dataset], tuple[int, pydicom.Dataset | None]]


@dataclass(frozen=True)
class ProcessSettings:
    """What a receiving process needs, sent to it as its first message."""

    name: str  # receiver-K: its folders instances/<name>/ and tmp/<name>/
    node: NodeSection
    storage: Path
    min_free_bytes: int
    audit: Path | None
    log_level: str
    log_format: str


class _Remote:
    """A connection served by a receiving process; ``open`` until it says it is closed."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


@dataclass
class _Process:
    """The main process's view of one receiving process."""

    settings: ProcessSettings
    process: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None
    ready: bool = False
    started: threading.Event = field(default_factory=threading.Event)
    connections: dict[int, _Remote] = field(default_factory=dict)
    active: int = 0  # associations, as it last reported
    totals: dict[CounterKey, float] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    supervisor: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.settings.name


class ReceiverPool:
    """The receiving processes of a node, seen from its main process."""

    def __init__(
        self,
        settings: Sequence[ProcessSettings],
        metrics: Metrics,
        on_opened: Callable[[Recorded], None],
        on_report: ReportAnswer,
        reschedule: Callable[[], object],
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        """``stop_requested``: whether the node has been told to stop (its SIGTERM), which
        may come before it stops this pool: the exit of a receiving process then is no
        failure, and it is not started again."""
        self._processes = [_Process(s) for s in settings]
        self._metrics = metrics
        self._on_opened = on_opened
        self._on_report = on_report
        self._reschedule = reschedule
        self._stop_requested = stop_requested
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._local_load: Callable[[], int] = lambda: 0

    @property
    def active_associations(self) -> int:
        return sum(p.active for p in self._processes)  # a draining one's count too

    @property
    def ready(self) -> int:
        """How many receiving processes take connections now."""
        return sum(1 for p in self._processes if p.ready)

    def start(self, local_load: Callable[[], int]) -> None:
        """Start every receiving process; wait (bounded) until each is ready.

        ``local_load``: the main process's open connections, counting the one being
        placed when it is asked from :meth:`hand_off`.
        """
        self._local_load = local_load
        for proc in self._processes:
            proc.supervisor = threading.Thread(
                target=self._supervise, args=(proc,), name=f"{proc.name}-supervisor", daemon=True
            )
            proc.supervisor.start()
        deadline = time.monotonic() + START_SECONDS
        for proc in self._processes:
            proc.started.wait(max(0.0, deadline - time.monotonic()))
        missing = [p.name for p in self._processes if not p.ready]
        if missing:
            log.warning(
                "receiving process(es) %s not ready after %.0f s; receiving without them"
                " until they are",
                ", ".join(missing),
                START_SECONDS,
            )
        log.info("receiving in %d process(es)", 1 + self.ready)

    def hand_off(self, sock: socket.socket, address: tuple[str, int]) -> _Remote | None:
        """Pass ``sock`` to the least busy receiving process, or None to serve it here."""
        if self._stopping.is_set():
            return None
        with self._lock:  # sent under the lock: never after a "no-more" (see "draining")
            ready = [p for p in self._processes if p.ready]
            if not ready:
                return None
            proc = min(ready, key=lambda p: len(p.connections))
            if len(proc.connections) >= self._local_load():
                return None  # on a tie the main process keeps it: it counts itself in
            conn_id = next(self._ids)
            try:
                self._send(proc, ("take", conn_id, tuple(address[:2])), fd=sock.fileno())
            except OSError as exc:
                error = exc
            else:
                remote = proc.connections[conn_id] = _Remote()
                return remote
        log.warning("cannot hand a connection to %s (%s); serving it here", proc.name, error)
        return None

    def stop_accepting(self, timeout: float) -> None:
        """Tell every receiving process to finish its associations within ``timeout``."""
        with self._lock:  # no process starts after this, and each running one is told
            self._stopping.set()
            for proc in self._processes:
                if proc.sock is not None:
                    try:
                        self._send(proc, ("stop", timeout))
                    except OSError:
                        pass  # it is gone already

    def join(self, timeout: float) -> int:
        """Wait for the receiving processes to exit; kill those still running after
        ``timeout`` (+ a grace). Returns the connections they still had open."""
        with self._lock:
            self._stopping.set()
        deadline = time.monotonic() + timeout + EXIT_GRACE_SECONDS
        left = 0
        for proc in self._processes:
            process = proc.process
            if process is None:
                continue
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("receiving process %s did not exit in time; killing it", proc.name)
                left += len(proc.connections)
                process.kill()
                process.wait()
        for proc in self._processes:
            if proc.supervisor is not None:
                proc.supervisor.join(EXIT_GRACE_SECONDS)
            process = proc.process
            if process is not None and process.poll() is None:  # started during the stop
                process.kill()
                process.wait()
        return left

    # -- one receiving process's life -------------------------------------------

    def _supervise(self, proc: _Process) -> None:
        delay = RESTART_FIRST_SECONDS
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                code = self._run(proc)
            except Exception:
                log.exception("receiving process %s failed", proc.name)
                code = None
            finally:
                self._lost(proc)
            # systemd stops a service with SIGTERM to each of its processes at once: a
            # receiving process with nothing to drain may end before this one has begun
            # to stop. That is no failure.
            if self._node_stops():
                log.info("receiving process %s ended (code %s) as the node stops", proc.name, code)
                return
            # a study it opened, or indexed again at its start, may not have been announced
            self._reschedule_studies()
            if time.monotonic() - began > STABLE_SECONDS:
                delay = RESTART_FIRST_SECONDS
            log.error(
                "receiving process %s exited (code %s); starting it again in %.0f s",
                proc.name,
                code,
                delay,
            )
            if self._stopping.wait(max(0.0, delay - STOP_GRACE_SECONDS)) or self._stop_requested():
                return
            delay = min(delay * 2, RESTART_MAX_SECONDS)

    def _node_stops(self) -> bool:
        """Whether the node stops, or is told to within :data:`STOP_GRACE_SECONDS`."""
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while not self._stop_requested():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._stopping.wait(min(remaining, STOP_POLL_SECONDS)):
                return True
        return True

    def _run(self, proc: _Process) -> int | None:
        """Start the process, read its messages until it closes its end; its exit code."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Under the lock, so that stop_accepting either finds the socket (and sends
            # "stop") or this finds the node stopping. Popen forks with vfork: the
            # accept thread waits for no more than that.
            with self._lock:
                if self._stopping.is_set():
                    ours.close()
                    return None
                process = proc.process = subprocess.Popen(
                    [sys.executable, "-m", "dicom_node.receivers", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                )
                proc.sock = ours
        finally:
            theirs.close()
        try:
            self._send(proc, ("setup", proc.settings))
            while True:
                try:
                    data = ours.recv(MAX_MESSAGE_BYTES)
                except ConnectionResetError:
                    # It ended with a message of ours unread. Linux says so once,
                    # before the messages it sent last: those are still read.
                    continue
                except OSError:
                    break
                if not data:
                    break
                try:
                    self._handle(proc, pickle.loads(data))
                except Exception:
                    log.exception("a message from receiving process %s failed", proc.name)
        finally:
            ours.close()
            self._lost(proc)  # at once: it takes no connection while it is reaped
            try:
                code = process.wait(EXIT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:  # it closed its end but lives on
                process.kill()
                code = process.wait()
        return code

    def _handle(self, proc: _Process, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "closed":
            with self._lock:
                remote = proc.connections.pop(message[1], None)
            if remote is not None:
                remote.open = False
        elif kind == "opened":
            _, study_id, reopened = message
            self._on_opened(Recorded(study_id, duplicate=False, reopened=reopened, opened=True))
        elif kind == "counts":
            _, totals, active = message
            deltas = {key: value - proc.totals.get(key, 0.0) for key, value in totals.items()}
            proc.totals, proc.active = totals, active
            self._metrics.add_counts(deltas)
        elif kind == "report":
            _, request_id, event_type, info = message
            status, _reply = self._on_report(event_type, info)
            try:
                self._send(proc, ("answer", request_id, status))
            except OSError as exc:
                log.error("cannot answer %s's storage commitment report: %s", proc.name, exc)
        elif kind == "draining":  # it takes no new connection
            with self._lock:
                proc.ready = False
                # every "take" sent before this reaches it first, and it serves them
                self._send(proc, ("no-more",))
        elif kind == "ready":
            assert proc.process is not None
            log.info("receiving process %s ready (pid %d)", proc.name, proc.process.pid)
            self._reschedule_studies()  # studies of the files it has just indexed again
            proc.ready = True
            proc.started.set()
        elif kind == "failed":
            log.error("receiving process %s cannot start: %s", proc.name, message[1])
        else:
            log.error("unknown message %r from receiving process %s", kind, proc.name)

    def _reschedule_studies(self) -> None:
        try:
            self._reschedule()
        except Exception:
            log.exception("scheduling the open studies' completion failed")

    def _lost(self, proc: _Process) -> None:
        """Forget a process that ended: its connections are closed, its counts kept."""
        with self._lock:
            proc.ready = False
            for remote in proc.connections.values():
                remote.open = False
            proc.connections.clear()
        proc.active = 0
        proc.totals = {}  # the next one counts from zero again
        proc.sock = None
        proc.started.set()  # start() waits no longer for one that failed

    def _send(self, proc: _Process, message: tuple[Any, ...], fd: int | None = None) -> None:
        """One message; never blocks: a process that does not read gets an error."""
        sock = proc.sock
        if sock is None:
            raise ConnectionError(f"{proc.name} is not running")
        data = pickle.dumps(message)
        with proc.send_lock:
            if fd is None:
                sock.send(data, socket.MSG_DONTWAIT)
            else:
                socket.send_fds(sock, [data], [fd], socket.MSG_DONTWAIT)


# -- a receiving process ---------------------------------------------------------


class _Waiter:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.status: int | None = None


class _Serving:
    """A receiving process: serves the connections the main process passes to it."""

    def __init__(self, sock: socket.socket, settings: ProcessSettings) -> None:
        self._sock = sock
        self._settings = settings
        self._send_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        # without the main process, its associations may finish for this long
        self._drain = settings.node.drain_seconds
        self._receiver: Any = None
        self._stopping = threading.Event()  # drain now
        self._terminated = False  # SIGTERM: a plain flag, safe to set in a signal handler
        self._handoffs_over = threading.Event()  # "no-more" read, or the main process gone
        self._draining = threading.Event()  # the receiver stops: connections are refused
        self._closing = threading.Event()  # drained
        self._metrics = Metrics()
        self._parts: list[Any] = []  # closed in reverse at the end

    def run(self) -> int:
        """Serve until told to stop, drain, and end the process (never returns normally)."""
        try:
            receiver = self._receiver = self._start()
        except Exception as exc:
            log.exception("cannot start")
            self._send(("failed", f"{type(exc).__name__}: {exc}"))
            self._close()
            return 1
        signal.signal(signal.SIGTERM, self._terminate)
        self._send(("ready",))
        counting = threading.Thread(target=self._report_counts, name="counts", daemon=True)
        counting.start()
        # Messages are read by a thread of their own, so that the answers to storage
        # commitment reports still arrive while the associations drain.
        reading = threading.Thread(target=self._read, args=(receiver,), name="main", daemon=True)
        reading.start()
        while not (self._stopping.is_set() or self._terminated):
            self._stopping.wait(0.2)
        # The main process hands it nothing more once it reads "draining". What it
        # handed before comes ahead of its "no-more", and is served like the rest.
        if self._send(("draining",)):
            self._handoffs_over.wait(HANDOFF_SECONDS)
        self._draining.set()
        receiver.stop(self._drain)  # associations still open at the deadline are aborted
        self._closing.set()
        counting.join()
        self._send_counts(None)
        self._close()
        # Nothing of this process may outlive the drain: a new receiver-K may start on
        # the same folder as soon as the name lock is free. os._exit ends every thread
        # still winding down; the lock goes with the process.
        logging.shutdown()
        os._exit(0)

    def _start(self) -> Any:
        from dicom_node.audit import AuditTrail
        from dicom_node.receive import Receiver
        from dicom_node.reindex import reindex_orphans
        from dicom_node.store import Spool

        settings = self._settings
        spool = Spool(settings.storage, settings.min_free_bytes, settings.name)
        spool.create()  # holds nodes/<name>.lock until this process ends, not before
        spool.clear_tmp()
        journal = ReceivingJournal(spool.journal_path)
        self._parts.append(journal.close)
        reindex_orphans(spool, journal)
        audit = AuditTrail(settings.audit, time.time)
        audit.open()
        self._parts.append(audit.close)
        receiver = Receiver(
            settings.node,
            spool,
            journal,
            self._metrics,
            time.time,
            on_recorded=self._recorded,
            audit=audit,
            on_event_report=self._report,
            listening=False,
        )
        receiver.start()
        return receiver

    def _read(self, receiver: Any) -> None:
        """Take connections and answers until the socket closes; a "stop" message or an
        end of file (the main process is gone) starts the drain, and so does a failure
        here (a process that cannot read its messages must not stay "ready")."""
        while True:
            try:
                data, fds, _flags, _address = socket.recv_fds(self._sock, MAX_MESSAGE_BYTES, 4)
            except ConnectionResetError:
                continue  # reported once, ahead of the messages still queued for us
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self._stop_reading()
                return
            try:
                self._dispatch(receiver, pickle.loads(data), fds)
            except Exception:
                log.exception("a message from the main process failed; draining")
                self._stop_reading()
                return

    def _stop_reading(self) -> None:
        self._handoffs_over.set()
        self._stopping.set()

    def _dispatch(self, receiver: Any, message: tuple[Any, ...], fds: list[int]) -> None:
        kind = message[0]
        if kind == "take":
            self._take(receiver, message[1], message[2], fds)
            return
        for fd in fds:
            os.close(fd)
        if kind == "answer":
            waiter = self._waiters.pop(message[1], None)
            if waiter is not None:
                waiter.status = message[2]
                waiter.done.set()
        elif kind == "stop":
            self._drain = float(message[1])
            self._stopping.set()
        elif kind == "no-more":
            self._handoffs_over.set()

    def _take(self, receiver: Any, conn_id: int, address: tuple[str, int], fds: list[int]) -> None:
        """Serve a connection; whatever goes wrong, the main process hears it closed."""
        if not fds or self._draining.is_set():
            for fd in fds:
                os.close(fd)
            self._closed(conn_id)
            return
        conn = socket.socket(fileno=fds[0])
        for fd in fds[1:]:
            os.close(fd)
        try:
            receiver.take(conn, address, lambda: self._closed(conn_id))
        except Exception:
            log.exception("cannot serve a connection from %s", address[0])
            conn.close()
            self._closed(conn_id)  # a second "closed" for the same id is ignored

    def _terminate(self, _signum: int, _frame: Any) -> None:
        """SIGTERM (e.g. systemd stopping the whole unit): drain and exit."""
        self._terminated = True

    def _recorded(self, recorded: Recorded) -> None:
        if recorded.opened:  # the main process schedules its completion
            self._send(("opened", recorded.study_id, recorded.reopened))

    def _closed(self, conn_id: int) -> None:
        self._send(("closed", conn_id))

    def _report(self, event: evt.Event) -> tuple[int, pydicom.Dataset | None]:
        """A storage commitment report: answered by the main process."""
        try:
            info = event.event_information
            event_type = int(event.event_type or 0)
        except Exception as exc:
            log.warning("cannot read a storage commitment report (%s)", type(exc).__name__)
            return PROCESSING_FAILURE, None
        request_id = next(self._ids)
        waiter = self._waiters[request_id] = _Waiter()
        if not self._send(("report", request_id, event_type, info)):
            self._waiters.pop(request_id, None)
            return PROCESSING_FAILURE, None
        if not waiter.done.wait(REPORT_SECONDS) or waiter.status is None:
            self._waiters.pop(request_id, None)
            log.error("the main process did not answer a storage commitment report")
            return PROCESSING_FAILURE, None
        return waiter.status, None

    def _report_counts(self) -> None:
        last: tuple[dict[CounterKey, float], int] | None = None
        while not self._closing.wait(COUNTS_SECONDS):
            last = self._send_counts(last)

    def _send_counts(
        self, last: tuple[dict[CounterKey, float], int] | None
    ) -> tuple[dict[CounterKey, float], int]:
        """Report the counters and open associations if they changed since ``last``."""
        now = (self._metrics.counter_totals(), self._receiver.active_associations)
        if now != last:
            self._send(("counts", *now))
        return now

    def _send(self, message: tuple[Any, ...]) -> bool:
        """Send one message to the main process; False if it is gone."""
        data = pickle.dumps(message)
        if len(data) > MAX_MESSAGE_BYTES:
            log.error("a %s message of %d bytes is too big to pass on", message[0], len(data))
            return False
        try:
            with self._send_lock:
                self._sock.send(data)
            return True
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                log.error("a %s message of %d bytes is too big to pass on", message[0], len(data))
            else:
                log.debug("cannot reach the main process: %s", exc)
            return False

    def _close(self) -> None:
        for close in reversed(self._parts):
            try:
                close()
            except Exception:
                log.exception("closing failed")
        self._sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """A receiving process's entry point: ``python -m dicom_node.receivers FD``."""
    from dicom_node.logs import configure_logging

    args = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops us
    sock = socket.socket(fileno=int(args[0]))
    data = sock.recv(MAX_MESSAGE_BYTES)
    if not data:
        return 1
    kind, settings = pickle.loads(data)
    if kind != "setup" or not isinstance(settings, ProcessSettings):
        return 1
    try:
        configure_logging(settings.log_level, settings.log_format, process=settings.name)
    except ValueError:
        configure_logging("INFO", settings.log_format, process=settings.name)
    return _Serving(sock, settings).run()


if __name__ == "__main__":
    # run as a script, this module is __main__: the settings unpickle as classes of
    # dicom_node.receivers, so that module's main serves
    from dicom_node.receivers import main as _main

    sys.exit(_main())
