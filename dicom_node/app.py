"""The node: builds the object graph once, then start -> serve -> drain -> stop.

A signal only sets a flag; the main thread notices it, stops accepting new
associations, lets analysis in hand finish (bounded) and closes the journal.
Everything unfinished is in the journal and resumes on the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import sqlalchemy as sa

from dicom_node import __version__
from dicom_node.analysis.types import DeviceUnavailable
from dicom_node.assemble import Assembler, SchedulerTimers
from dicom_node.audit import AuditTrail
from dicom_node.broker import Publisher, celery_app
from dicom_node.commit import Commitments
from dicom_node.config import NodeConfig, receive_process_count
from dicom_node.dispatch import Dispatcher
from dicom_node.domain import JobState
from dicom_node.encode.types import Equipment
from dicom_node.journal import Journal, JournalSchemaError
from dicom_node.leases import LeaseKeeper
from dicom_node.listener import listen_error
from dicom_node.logs import current_logging
from dicom_node.objects import ObjectStore
from dicom_node.receive import Receiver
from dicom_node.receivers import ProcessSettings, ReceiverPool
from dicom_node.reindex import reindex_orphans, reindex_receiving_folders
from dicom_node.send import Sender
from dicom_node.store import NameInUse, Spool
from dicom_node.tls import destination_tls
from dicom_node.web.echo import DestinationMonitor
from dicom_node.web.metrics import Metrics
from dicom_node.web.server import WebServer

if TYPE_CHECKING:  # the analysis (torch, SimpleITK, highdicom) loads only with a worker
    import torch

    from dicom_node.analysis.types import Pipeline
    from dicom_node.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class Node:
    config: NodeConfig
    spool: Spool
    journal: Journal
    metrics: Metrics
    timers: SchedulerTimers
    assembler: Assembler
    receiver: Receiver
    analysis: Analysis  # the worker; none when `dicom-node worker` processes analyse
    sender: Sender
    web: WebServer | None
    audit: AuditTrail
    dispatcher: Dispatcher | None = None  # with a shared journal (docs/scale-out.md)
    leases: LeaseKeeper | None = None

    @property
    def worker(self) -> Worker | None:
        return self.analysis.worker

    def start(self) -> None:
        """Open the journal, resume unfinished work, start listening, then build and start
        the analysis worker."""
        try:
            self.audit.open()
        except OSError as exc:
            raise not_writable("audit.path", exc) from None
        self.audit.application("start", self.config.node.ae_title)
        self.spool.clear_tmp()
        reindex_orphans(self.spool, self.journal)
        if self.spool.name is None:  # node.receive_processes, now or in an earlier run
            reindex_receiving_folders(self.spool, self.journal)
        if not self.journal.shared:  # shared: other processes' jobs; expired leases tell
            resumed = self.journal.resume(time.time())
            if resumed:
                log.info("resuming %d job(s) interrupted during analysis", resumed)
        self.timers.start()
        open_studies = self.assembler.resume()
        if open_studies:
            log.info("resuming %d open stud(y/ies)", open_studies)
        if self.leases is not None:
            self.leases.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        self.sender.start()
        if self.web is not None:
            self.web.start()
        self.receiver.start()
        # after the listener: loading torch and the pipelines takes 1.5-2 s, and images
        # are received meanwhile (their jobs wait in the journal until the worker starts)
        self.analysis.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, drain bounded by ``timeout`` (None: ``node.drain_seconds``),
        close the journal."""
        if timeout is None:
            timeout = self.config.node.drain_seconds
        log.info("stopping: no new associations; draining (at most %.0f s)", timeout)
        deadline = time.monotonic() + timeout
        self.receiver.stop(timeout)  # associations in progress may finish
        self.timers.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self.analysis.stop(max(0.0, deadline - time.monotonic()))
        if self.leases is not None:
            self.leases.stop()
        self.sender.stop(max(0.0, deadline - time.monotonic()))
        if self.web is not None:
            self.web.stop()
        self.journal.close()
        self.spool.release()
        self.audit.application("stop", self.config.node.ae_title)
        self.audit.close()
        log.info("stopped")


IDLE_POLL_SECONDS = 5.0  # as often as a worker looks at the journal (Worker.run)
WAITING_JOB_STATES = (JobState.QUEUED, JobState.ANALYSING)  # ANALYSING: before resume()


class Analysis:
    """The node's analysis worker, built when the node starts, after its listener: a
    worker loads torch, SimpleITK and highdicom. Built at once where building it can
    refuse the start (an explicit CUDA device, checked before any port is opened).

    ``needed`` says whether anything is to be analysed: a node with no routes, a journal
    of its own and no job waiting never creates a job of itself, so its worker (and
    torch) is built only when a job first needs it, on a thread of its own
    ("analysis-idle"): woken by an operator's retry through the REST API (:meth:`wake`,
    which returns at once), or finding the job of ``dicom-node retry`` in the journal
    (it looks every :data:`IDLE_POLL_SECONDS`, as a worker does).
    """

    def __init__(
        self,
        build: Callable[[], Worker] | None,
        now: bool,
        needed: Callable[[], bool] = lambda: True,
    ) -> None:
        self._build = build
        self._needed = needed
        self._started = False  # the node has started
        self._running = False  # the worker has
        self._stopping = threading.Event()
        self._woken = threading.Event()  # look at the journal now (the idle thread)
        self._lock = threading.Lock()  # one build, and no start after the stop
        self.worker: Worker | None = build() if build is not None and now else None

    def start(self) -> None:
        self._started = True
        if self.worker is None and self._build is not None and not self._needed():
            log.info("no routes and no jobs: the analysis worker is loaded when a job needs it")
            threading.Thread(target=self._watch, name="analysis-idle", daemon=True).start()
            return
        self._start_worker()

    def wake(self) -> None:
        worker = self.worker
        if worker is not None:  # before the start: the worker looks at the journal first
            worker.wake()
        elif self._started:  # not built yet: the idle thread builds it, if a job waits
            self._woken.set()

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._woken.set()
        # waits for a build in progress, up to the deadline; its worker is not started
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
        if self.worker is not None:
            self.worker.stop(max(0.0, deadline - time.monotonic()))

    def _watch(self) -> None:
        """Until a job needs the worker: look at the journal when woken, and now and then."""
        while not self._running and not self._stopping.is_set():
            self._woken.wait(IDLE_POLL_SECONDS)
            self._woken.clear()  # a wake from here on comes after this look's job
            if self._stopping.is_set():
                return
            try:
                if self._needed():
                    self._start_worker()
            except Exception:  # e.g. the journal away for a moment: look again later
                if self._stopping.is_set():  # the journal closed under this look
                    return
                log.exception("cannot start the analysis worker")

    def _start_worker(self) -> None:
        with self._lock:
            if self._stopping.is_set() or self._running:
                return
            if self.worker is None:
                if self._build is None:
                    return
                self.worker = self._build()
                if self._stopping.is_set():  # stopped while building: never started
                    return
            self.worker.start()
            self._running = True


def build_node(config: NodeConfig, stop_requested: Callable[[], bool] = lambda: False) -> Node:
    """Every part of a node, wired together; nothing is started yet. ``stop_requested``:
    whether the node has been told to stop (a signal) before :meth:`Node.stop` runs."""
    name = config.cluster.name() if config.cluster.enabled else None
    spool, journal = _storage(config, name)
    try:
        return _build(config, spool, journal, name, stop_requested)
    except BaseException:  # the storage's lock goes with the node that was not built
        spool.release()
        journal.close()
        raise


def _build(
    config: NodeConfig,
    spool: Spool,
    journal: Journal,
    name: str | None,
    stop_requested: Callable[[], bool],
) -> Node:
    metrics = Metrics()
    metrics.watch_journal(journal.state_counts)
    metrics.watch_gpu()
    audit = _audit_trail(config, spool, name)
    commitments, sender = _sending(config, journal, spool, metrics, audit)
    leases, analysis = _analysis(config, journal, spool, metrics, sender.wake, name)
    timers = SchedulerTimers()
    assembler, dispatcher, on_jobs = _assembling(
        config, journal, spool, metrics, timers, sender, analysis
    )
    receiver = _receiver(
        config, journal, spool, metrics, audit, assembler, commitments, stop_requested
    )

    def on_retry() -> None:
        on_jobs([])
        sender.wake()

    web = _web(config, journal, metrics, lambda: receiver.running and journal.intact(), on_retry)
    return Node(
        config,
        spool,
        journal,
        metrics,
        timers,
        assembler,
        receiver,
        analysis,
        sender,
        web,
        audit,
        dispatcher,
        leases,
    )


def _storage(config: NodeConfig, name: str | None) -> tuple[Spool, Journal]:
    """The storage folder (with the shared bucket, if any) and the journal, created or upgraded."""
    cluster = config.cluster
    spool = Spool(config.storage.path, config.storage.min_free_bytes, name, object_store(config))
    try:
        spool.create()
    except NameInUse:
        raise
    except OSError as exc:  # "[Errno 13] Permission denied: '…/instances'" named no key
        raise not_writable("storage.path", exc) from None
    journal = Journal(cluster.journal_location(spool.journal_path))
    journal.create()
    if cluster.enabled:
        log.info("cluster: node %s, journal %s, folder %s", name, journal.path, spool.root)
    return spool, journal


def not_writable(key: str, exc: OSError) -> OSError:
    """``exc`` from creating a file or folder as the setting ``key`` names it."""
    where = f"{exc.filename}: " if exc.filename else ""
    error = OSError(
        f"{key}: cannot create {where}{exc.strerror or exc} (the node runs as uid"
        f" {os.getuid()}; that user needs to write there)"
    )
    error.errno = exc.errno
    return error


def _analysis(
    config: NodeConfig,
    journal: Journal,
    spool: Spool,
    metrics: Metrics,
    on_results: Callable[[], None],
    name: str | None,
) -> tuple[LeaseKeeper | None, Analysis]:
    """The worker and, with a shared journal, its leases; none when a broker has the analysis."""
    if config.cluster.broker_url is not None:  # analysis on `dicom-node worker` processes
        return None, Analysis(None, now=False)
    leases = None
    if journal.shared:
        owner = f"{name}:{os.getpid()}"
        leases = LeaseKeeper(journal, owner, config.cluster.lease_seconds, time.time)

    def build() -> Worker:
        return build_worker(config, journal, spool, metrics, on_results, leases=leases)

    def needed() -> bool:
        if config.routes or journal.shared:  # shared: other nodes' jobs too
            return True
        return any(journal.jobs_in_state(state, 1) for state in WAITING_JOB_STATES)

    # "cpu" and "auto" cannot fail; an explicit CUDA device is checked before listening
    return leases, Analysis(build, now=config.analysis.device not in ("cpu", "auto"), needed=needed)


def _assembling(
    config: NodeConfig,
    journal: Journal,
    spool: Spool,
    metrics: Metrics,
    timers: SchedulerTimers,
    sender: Sender,
    analysis: Analysis,
) -> tuple[Assembler, Dispatcher | None, Callable[[list[int]], None]]:
    """The assembler, the dispatcher (shared journal) and on_jobs, which wakes it and the worker."""
    dispatcher: Dispatcher | None = None

    def on_jobs(_ids: list[int]) -> None:
        if dispatcher is not None:
            dispatcher.wake()
        analysis.wake()

    assembler = Assembler(
        journal,
        spool,
        config.routes,
        config.completion.study_idle_seconds,
        time.time,
        timers,
        on_jobs=on_jobs,
        metrics=metrics,
        models_path=config.analysis.models_path,
    )
    if journal.shared:
        wake = [sender.wake, analysis.wake]
        dispatcher = _dispatcher(config, journal, assembler, metrics, wake)
    return assembler, dispatcher, on_jobs


def _receiver(
    config: NodeConfig,
    journal: Journal,
    spool: Spool,
    metrics: Metrics,
    audit: AuditTrail,
    assembler: Assembler,
    commitments: Commitments,
    stop_requested: Callable[[], bool],
) -> Receiver:
    """The C-STORE SCP (and its other processes); open associations are read at scrape time."""
    pool = None
    processes = receive_process_count(config)
    if config.node.receive_processes == "auto":
        log.info("node.receive_processes auto: %d receiving process(es)", processes)
    if processes > 1:
        level, fmt = current_logging()
        settings = [
            ProcessSettings(
                f"receiver-{number}",
                config.node,
                spool.root,
                spool.min_free_bytes,
                _audit_path(config, spool, None),
                level,
                fmt,
            )
            for number in range(2, processes + 1)
        ]
        pool = ReceiverPool(
            settings,
            metrics,
            on_opened=assembler.instance_recorded,
            on_report=commitments.answer_report,
            reschedule=assembler.resume,
            stop_requested=stop_requested,
        )
    receiver = Receiver(
        config.node,
        spool,
        journal,
        metrics,
        time.time,
        on_recorded=assembler.instance_recorded,
        audit=audit,
        on_event_report=commitments.handle_report,
        pool=pool,
    )
    metrics.watch_associations(lambda: receiver.active_associations)
    metrics.watch_receiving_processes(
        lambda: int(receiver.running) + (0 if pool is None else pool.ready)
    )
    return receiver


def _audit_trail(config: NodeConfig, spool: Spool, name: str | None) -> AuditTrail:
    return AuditTrail(_audit_path(config, spool, name), time.time)


def _audit_path(config: NodeConfig, spool: Spool, name: str | None) -> Path | None:
    """``audit.path``, else ``audit[-NAME].jsonl`` in the storage folder; None: no trail.

    Every receiving process of a node appends to the same file (one ``write`` each)."""
    if not config.audit.enabled:
        return None
    default = "audit.jsonl" if name is None else f"audit-{name}.jsonl"
    return config.audit.path or spool.root / default


def _sending(
    config: NodeConfig, journal: Journal, spool: Spool, metrics: Metrics, audit: AuditTrail
) -> tuple[Commitments, Sender]:
    """The sender of results and the storage commitment it asks for (each wakes the other)."""
    commitments = Commitments(
        journal,
        metrics,
        config.node.ae_title,
        config.destinations,
        config.sending,
        time.time,
        on_retry=lambda: sender.wake(),
        audit=audit,
        spool=spool,
    )
    sender = Sender(
        journal,
        spool,
        metrics,
        config.node.ae_title,
        config.sending,
        time.time,
        commitments=commitments,
        tls=destination_tls(config.destinations),
        audit=audit,
        destinations=config.destinations,
        shared_journal=journal.shared,
    )
    return commitments, sender


def _dispatcher(
    config: NodeConfig,
    journal: Journal,
    assembler: Assembler,
    metrics: Metrics,
    wake: list[Callable[[], None]],
) -> Dispatcher:
    """With a shared journal: hands jobs to the broker (if any) and completes others' studies."""
    cluster = config.cluster
    publisher = None
    if cluster.broker_url is not None:
        broker = celery_app(cluster.broker_url.get_secret_value(), cluster.lease_seconds)
        publisher = Publisher(broker)
    return Dispatcher(
        journal,
        cluster,
        assembler,
        config.completion.study_idle_seconds,
        time.time,
        metrics,
        publisher,
        wake,
    )


def _web(
    config: NodeConfig,
    journal: Journal,
    metrics: Metrics,
    receiving: Callable[[], bool],
    on_retry: Callable[[], None],
) -> WebServer | None:
    if not config.web.enabled:
        return None
    monitor = DestinationMonitor(
        config.node.ae_title, config.destinations, config.web.echo_interval_seconds, time.time
    )
    try:
        return WebServer(config, journal, metrics, monitor, receiving, on_retry, time.time)
    except OSError as exc:
        raise listen_error(exc, "web", config.web.host, config.web.port) from None


def object_store(config: NodeConfig) -> ObjectStore | None:
    """The shared bucket, checked reachable (raises ObjectStoreError), or None."""
    if config.storage.object_store is None:
        return None
    store = ObjectStore(config.storage.object_store)
    store.check()
    log.info("shared storage: %s", store.describe())
    return store


def build_worker(
    config: NodeConfig,
    journal: Journal,
    spool: Spool,
    metrics: Metrics,
    on_results: Callable[[], None],
    threads: int | None = None,
    leases: LeaseKeeper | None = None,
) -> Worker:
    """The analysis worker of ``serve`` (one node) or of ``dicom-node worker`` (scale-out).

    Its modules are imported here: a receiver whose analysis runs on ``dicom-node worker``
    processes (``cluster.broker_url``) never loads torch, SimpleITK or highdicom."""
    from dicom_node.analysis.device import select_device
    from dicom_node.analysis.pipelines import build_pipeline
    from dicom_node.worker import Worker

    device = select_device(config.analysis.device)
    log.info("analysis device: %s", device)

    def pipeline_factory(name: str, device: torch.device) -> Pipeline:
        return build_pipeline(name, device, config.analysis.models_path)

    node_uid = journal.meta_value("node_uid", _new_uid)
    equipment = Equipment(
        device_serial_number=node_uid.rsplit(".", 1)[-1][:16],
        device_observer_uid=node_uid,
        software_version=__version__,
    )
    return Worker(
        journal,
        spool,
        metrics,
        config.destinations,
        equipment,
        pipeline_factory,
        time.time,
        on_results=on_results,
        threads=threads or config.analysis.workers,
        device=device,
        warm_up=[route.pipeline for route in config.routes] if config.analysis.warm_up else [],
        leases=leases,
    )


def _new_uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid(None)


FORCED_EXIT = 1  # a second SIGINT/SIGTERM ended the drain


def _kill_children() -> None:
    """SIGKILL this process's children (its receiving processes; Linux /proc)."""
    for path in Path("/proc/self/task").glob("*/children"):
        try:
            pids = [int(pid) for pid in path.read_text().split()]
        except (OSError, ValueError):
            continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def run(config: NodeConfig) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP, then drain and return 0; a second SIGTERM
    or SIGINT during the drain ends the node at once (exit 1)."""
    stop: list[int] = []  # a plain list: a signal handler must not take a lock

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop and signum != signal.SIGHUP:  # a second Ctrl-C (or SIGTERM) while draining
            # Python runs this in the main thread, between bytecodes: logging's locks are
            # re-entrant there. Every acknowledged instance is durable already.
            log.warning(
                "received %s again: stopping at once, without waiting for the drain;"
                " instances not yet acknowledged are sent again by their senders",
                signal.Signals(signum).name,
            )
            _kill_children()  # the receiving processes would drain on their own
            logging.shutdown()
            os._exit(FORCED_EXIT)
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # the terminal of a foreground `make run` closing, or a reload habit: a clean stop,
    # not the default's immediate death with associations cut and nothing logged
    signal.signal(signal.SIGHUP, on_signal)
    try:
        node = build_node(config, stop_requested=lambda: bool(stop))
    # web port in use, storage not writable, CUDA device missing, ...
    except (OSError, JournalSchemaError, DeviceUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 1
    except sa.exc.OperationalError as exc:  # the journal's database server is unreachable
        log.error("cannot start: journal database unreachable: %s", exc.orig)
        return 1
    try:
        node.start()
    except OSError as exc:  # DICOM port in use, ...
        log.error("cannot start: %s", exc)
        node.stop(timeout=5)
        return 1
    except Exception as exc:  # e.g. the worker (built after the listener opened) cannot load torch
        log.error("cannot start: %s", exc, exc_info=True)
        node.stop(timeout=5)
        return 1
    host, port = node.receiver.address
    log.info("dicom_node %s ready: %s on %s:%d", __version__, config.node.ae_title, host, port)
    while not stop:
        time.sleep(0.2)
    log.info("received %s", signal.Signals(stop[0]).name)
    node.stop()
    return 0
