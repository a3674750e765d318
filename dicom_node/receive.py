"""The Storage SCP: C-ECHO and C-STORE handlers -> spool -> journal -> assembler.

The C-STORE handler is thin. It parses the header (never pixel data), checks
it against the request, writes the bytes exactly as received to a temporary
file, fsyncs and renames it into place, records the instance in the journal and
only then answers success. :func:`store_status` is the one place where a
failure becomes a DICOM status.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from typing import Any, Protocol, cast

import pydicom
from pydicom import uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import store_scp_wire
from dicom_node.audit import AuditTrail
from dicom_node.config import NodeSection
from dicom_node.header import (
    CANNOT_DECODE,
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    UNEXPECTED_ERROR,
    Header,
    Rejected,
    check_uids_quickly,
    error_comment,
    received_header,
    valid_uid,
)
from dicom_node.header_scan import meta_elements_length
from dicom_node.intake import (
    InstanceJournal,
    JournalReplaced,
    ReceivedInstance,
    Recorded,
    UIDConflict,
)
from dicom_node.listener import Elsewhere, HandedServer, listen_error, start_server
from dicom_node.logs import log_context, quiet_pynetdicom_events
from dicom_node.part10 import file_meta_bytes
from dicom_node.store import LowSpace, Spool
from dicom_node.tls import describe, server_context
from dicom_node.transport import REJECTED
from dicom_node.web.metrics import Metrics

log = logging.getLogger(__name__)


# Answers an N-EVENT-REPORT: (status, Event Reply or None)
EventReportHandler = Callable[[evt.Event], tuple[int, pydicom.Dataset | None]]


class Pool(Protocol):
    """The other receiving processes (:class:`dicom_node.receivers.ReceiverPool`)."""

    @property
    def active_associations(self) -> int: ...

    def start(self, local_load: Callable[[], int]) -> None: ...

    def hand_off(self, sock: socket.socket, address: tuple[str, int]) -> Elsewhere | None: ...

    def stop_accepting(self, timeout: float) -> None: ...

    def join(self, timeout: float) -> int: ...


# Where a requestor offers several transfer syntaxes in one presentation context, the
# acceptor chooses: uncompressed explicit VR first (as dcmtk's storescp does), then the
# lossless compressions, then everything else pynetdicom knows (lossy, deflated, ...).
PREFERRED_TRANSFER_SYNTAXES = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.JPEG2000Lossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.RLELossless,
    uid.JPEGLSLossless,
)
ACCEPTED_TRANSFER_SYNTAXES = list(PREFERRED_TRANSFER_SYNTAXES) + [
    syntax for syntax in ALL_TRANSFER_SYNTAXES if syntax not in PREFERRED_TRANSFER_SYNTAXES
]
HEADER_THREADS = 2  # used by one storing thread at a time, mostly (Receiver._store)
MAX_NOTED_SENDERS = 1000  # senders whose group 0002 elements were logged (once each)


class _Duplicate(Exception):
    """The journal has this SOP Instance UID already: a resend."""


class _HeaderRead:
    """One instance's header read on a helper thread (:class:`dicom_node.store.Alongside`);
    on the caller's thread when the write failed before it started."""

    def __init__(
        self, helpers: _Helpers, function: Callable[..., Header], args: tuple[Any, ...]
    ) -> None:
        self._helpers = helpers
        self._function = function
        self._args = args
        self._future: Future[Header] | None = None

    def start(self) -> None:
        if self._future is None:  # not read already (see Receiver._store)
            self._future = self._helpers.submit(self._function, *self._args)

    def finish(self) -> Header:
        if self._future is None:
            self._future = self._helpers.run(self._function, *self._args)
        return self._future.result()


class _Gauge:
    """How many threads are inside a ``with`` block of it."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.value += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.value -= 1


class _Helpers:
    """Threads that read each instance's header while its storing thread writes it.

    Started on first use. Once shut down, the work runs on the caller's thread, as it
    did before. Not for use across a fork (the node forks no receiving process).
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        context = contextvars.copy_context()  # log_context's fields (the calling AE)
        pool = self._pool or self._start()
        if pool is not None:
            try:
                return pool.submit(context.run, function, *args)
            except RuntimeError:  # shut down meanwhile, or the interpreter exits
                pass
        return self.run(function, *args, context=context)

    @staticmethod
    def run(
        function: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> Future[Any]:
        """``function`` run here, as a settled future."""
        done: Future[Any] = Future()
        try:
            done.set_result(function(*args) if context is None else context.run(function, *args))
        except BaseException as exc:
            done.set_exception(exc)
        return done

    def shutdown(self) -> None:
        """Let the threads end once idle; work in hand still finishes."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _start(self) -> ThreadPoolExecutor | None:
        with self._lock:
            if self._pool is None and not self._closed:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="header")
            return self._pool


class Receiver:
    """The DICOM listener. ``on_recorded`` is called after each new instance is durable."""

    def __init__(
        self,
        config: NodeSection,
        spool: Spool,
        journal: InstanceJournal,
        metrics: Metrics,
        clock: Callable[[], float],
        on_recorded: Callable[[Recorded], None],
        audit: AuditTrail | None = None,
        on_event_report: EventReportHandler | None = None,
        pool: Pool | None = None,
        listening: bool = True,
    ) -> None:
        """``pool``: the other receiving processes, which the main process hands some
        connections to; ``listening=False``: such a process, served through :meth:`take`."""
        self._pool = pool
        self._listening = listening
        self._on_event_report = on_event_report
        self._audit = audit or AuditTrail(None, clock)
        self._config = config
        self._spool = spool
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._on_recorded = on_recorded
        self._helpers = _Helpers(HEADER_THREADS)
        self._storing = _Gauge()  # threads writing an instance now
        self._meta_senders: set[str] = set()  # calling AE titles that sent group 0002
        self._journal_lost = False  # JournalReplaced seen (logged once)
        self._aborts_seen: weakref.WeakSet[Any] = weakref.WeakSet()  # associations
        self._aborts_lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        # Built here so that a certificate that cannot be used stops the node before it starts.
        self._ssl_context = None if config.tls is None else server_context(config.tls)

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def active_associations(self) -> int:
        server = self._server
        here = 0 if server is None else len(server.active_associations)
        return here + (0 if self._pool is None else self._pool.active_associations)

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> tuple[str, int]:
        ae = _make_ae(self._config)
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_ABORTED, self._aborted),
            (evt.EVT_N_EVENT_REPORT, self._handle_event_report),
            (evt.EVT_N_ACTION, _handle_action),
        ]
        try:
            server = start_server(
                ae, self._config, handlers, ssl_context=self._ssl_context, listening=self._listening
            )
        except OSError as exc:
            if not self._listening:
                raise
            raise listen_error(exc, "node", self._config.host, self._config.port) from None
        server.on_refusal = self._refused_connection
        self._server = server
        if not self._listening:  # given connections by the main process (take)
            return self.address
        # Accepted sockets inherit TCP_NODELAY from the listening socket on Linux.
        assert server.socket is not None
        server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("listening as %s on %s:%d", self._config.ae_title, *self.address)
        if self._ssl_context is not None:
            log.info("TLS on (%s)", describe(self._ssl_context))
        if self._pool is not None:
            self._pool.start(lambda: server.local_connections)
            server.hand_off = self._pool.hand_off
        return self.address

    def take(
        self, sock: socket.socket, address: tuple[str, int], on_closed: Callable[[], None]
    ) -> None:
        """Serve a connection the main process accepted (``listening=False``)."""
        server = self._server
        if not isinstance(server, HandedServer):
            raise RuntimeError("only a receiver that does not listen takes connections")
        server.take(sock, address, on_closed)

    def stop(self, timeout: float) -> int:
        """Stop accepting; let associations in progress finish for up to ``timeout`` s
        (``node.drain_seconds``; in a receiving process, what the main process gives it).

        Returns how many were still open at the deadline (their unacknowledged
        instances will be sent again by their senders).
        """
        server, self._server = self._server, None
        if server is None:
            return 0
        deadline = time.monotonic() + timeout  # before shutdown(): it may take a moment
        server.shutdown()
        if self._pool is not None:  # the other processes drain meanwhile
            self._pool.stop_accepting(timeout)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a thread list: no event to wait on
        remaining = server.active_associations
        if remaining:
            log.warning(
                "%d association(s) still open after %.0f s; closing", len(remaining), timeout
            )
            _abort_all(remaining)  # their senders resend what was not acknowledged
        left = len(remaining)
        if self._pool is not None:
            left += self._pool.join(max(0.0, deadline - time.monotonic()))
        self._helpers.shutdown()
        return left

    def _handle_store(self, event: evt.Event) -> int | pydicom.Dataset:
        request = cast(C_STORE, event.request)
        comment: list[str] = []
        status = self.store_status(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            (cast(BytesIO, request.DataSet).getvalue(),),
            event.assoc.requestor.ae_title,
            context_class=str(event.context.abstract_syntax),
            comment=comment,
        )
        return _with_comment(status, comment[0]) if comment else status

    def store_status(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        dataset: Sequence[bytes | bytearray | memoryview],
        calling: str,
        after: list[Callable[[], None]] | None = None,
        comment: list[str] | None = None,
        context_class: str | None = None,
    ) -> int:
        """Store one received instance; the C-STORE response status.

        The one place where a failure becomes a status, for pynetdicom's handler and for
        the wire path (:mod:`dicom_node.store_scp_wire`) alike. ``dataset`` is the
        dataset as received, in pieces. ``after``: where to leave what a stored
        instance's response need not wait for (its counters and audit record), for the
        caller to run once it has sent the response; without it, that runs here.
        ``context_class``: the abstract syntax of the presentation context the request
        came on, where the caller has not checked it against the request's SOP Class
        (the wire path serves only requests whose SOP Class is their context's).
        ``comment``: where to leave a refusal's reason as the response's Error Comment.
        """
        with log_context(calling_aet=calling):
            try:
                if context_class is not None and context_class != sop_class_uid:
                    raise Rejected(
                        DATASET_DOES_NOT_MATCH_SOP_CLASS,
                        f"request SOP Class {sop_class_uid} on a presentation context"
                        f" for {context_class}",
                    )
                status = self._store(
                    sop_class_uid, sop_instance_uid, transfer_syntax, dataset, calling, after
                )
            except Rejected as exc:
                self._metrics.instances_rejected.labels(reason=_reason_label(exc.status)).inc()
                self._audit.instance_received(calling, None, sop_instance_uid, exc.status)
                log.warning(
                    "refused C-STORE from %s (status 0x%04X): %s", calling, exc.status, exc.reason
                )
                if comment is not None:
                    comment.append(error_comment(exc.reason))
                return exc.status
            except Exception:
                log.exception("unexpected error storing an instance from %s", calling)
                self._metrics.instances_rejected.labels(reason="error").inc()
                return UNEXPECTED_ERROR
            log.debug("stored an instance from %s", calling)
            return status

    def _store(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        dataset: Sequence[bytes | bytearray | memoryview],
        calling: str,
        after: list[Callable[[], None]] | None,
    ) -> int:
        started = time.perf_counter()
        if dataset and bytes(dataset[0][:2]) == b"\x02\x00":  # group 0002 leads the dataset
            dataset = self._without_meta_elements(dataset, calling)
        meta = file_meta_bytes(
            _ascii_uid(sop_class_uid), _ascii_uid(sop_instance_uid), transfer_syntax, calling
        )
        pieces = (meta, *dataset)  # written as they are: the dataset is not copied
        size = sum(len(piece) for piece in pieces)
        if size > self._config.max_instance_bytes:
            raise Rejected(
                OUT_OF_RESOURCES,
                f"instance of {size} bytes exceeds node.max_instance_bytes"
                f" ({self._config.max_instance_bytes})",
            )
        # Where this is the only instance being stored, its header is read (and the
        # duplicate looked up) on a helper thread while this one fsyncs the file, which
        # releases the GIL; the file takes its name only once the header is known to be
        # good and new. Where others are being stored too, the CPUs are busy with them
        # (the helper would only add its hand-overs): read here, before the write.
        scan = _HeaderRead(
            self._helpers,
            self._scan,
            (meta, dataset, transfer_syntax, sop_class_uid, sop_instance_uid),
        )
        try:
            with self._storing:
                if self._storing.value > 1:
                    scan.finish()
                relpath = self._write(pieces, size, scan)
        except _Duplicate:  # a resend: nothing written, or its file dropped before it took a name
            return self._duplicate(calling)
        header = scan.finish()
        recorded = self._record(
            header.instance(relpath, transfer_syntax, size, calling, self._clock())
        )
        if recorded.duplicate:  # a concurrent association stored it first
            self._spool.remove(relpath)
            return self._duplicate(calling)
        self._on_recorded(recorded)  # first: the study's completion timer depends on it
        took = time.perf_counter() - started

        def account() -> None:
            with log_context(calling_aet=calling):
                self._metrics.store_seconds.observe(took)
                self._metrics.instances_received.labels(calling_aet=calling).inc()
                self._metrics.bytes_received.labels(calling_aet=calling).inc(size)
                self._audit.instance_received(calling, header.study_uid, header.sop_uid, SUCCESS)

        if after is None:
            account()
        else:
            after.append(account)
        return SUCCESS

    def _without_meta_elements(
        self, dataset: Sequence[bytes | bytearray | memoryview], calling: str
    ) -> Sequence[bytes | bytearray | memoryview]:
        """``dataset`` without the File Meta Information elements (group 0002) it begins
        with, if they end in its first piece: stored behind the node's own File Meta
        Information, they would make a file with two meta groups, whose readers may take
        either transfer syntax."""
        skip = meta_elements_length(dataset[0])
        if not skip:
            return dataset
        if calling not in self._meta_senders and len(self._meta_senders) < MAX_NOTED_SENDERS:
            self._meta_senders.add(calling)
            log.warning(
                "instances from %s carry File Meta Information elements (group 0002) in"
                " their dataset; they are left out of the stored files, which have the"
                " node's own (logged once per sender)",
                calling,
            )
        return [memoryview(dataset[0])[skip:], *dataset[1:]]

    def _scan(
        self,
        meta: bytes,
        dataset: Sequence[bytes | bytearray | memoryview],
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> Header:
        """The instance's header, checked against the request; :class:`_Duplicate` when
        the journal has it already."""
        header = received_header(meta, dataset, transfer_syntax, sop_class_uid, sop_instance_uid)
        stored_patient = self._stored_patient_id(header.sop_uid)
        if stored_patient is None:
            return header
        if stored_patient != header.study_details.get("PatientID", ""):
            # A resend with the patient corrected (a reconciliation at the modality or in
            # the PACS) under the same UIDs: acknowledging it as a resend would drop the
            # correction unseen, and the results already sent name the other patient.
            raise Rejected(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID already stored for another patient (PatientID); the"
                " stored instance and its results are kept unchanged",
            )
        raise _Duplicate

    def _stored_patient_id(self, sop_uid: str) -> str | None:
        try:
            return self._journal.stored_patient_id(sop_uid)
        except JournalReplaced as exc:
            raise self._journal_replaced(exc) from exc
        except Exception as exc:  # the journal's database is away: the sender will retry
            log.debug("journal error", exc_info=True)
            raise Rejected(
                OUT_OF_RESOURCES, f"cannot reach the journal ({type(exc).__name__})"
            ) from exc

    def _write(
        self,
        pieces: Sequence[bytes | bytearray | memoryview],
        size: int,
        scan: _HeaderRead,
    ) -> str:
        """Write the instance durably into the spool; its relative path.

        ``scan`` settles first: a refused or duplicate instance takes no name, and its
        refusal (or duplicate) is what the sender hears, also when the write failed.
        """
        relpath = self._spool.new_instance_relpath()
        try:
            self._spool.ensure_space(size)
            self._spool.write_atomic(relpath, pieces, alongside=scan)
        except (LowSpace, OSError) as exc:
            scan.finish()  # raises the header's refusal or _Duplicate, if any
            if isinstance(exc, LowSpace):
                raise Rejected(OUT_OF_RESOURCES, str(exc)) from exc
            raise Rejected(OUT_OF_RESOURCES, f"cannot write the instance: {exc.strerror}") from exc
        return relpath

    def _record(self, received: ReceivedInstance) -> Recorded:
        """Record a written instance; its file is removed again when that fails."""
        try:
            return self._journal.record_instance(received)
        except UIDConflict as exc:
            self._spool.remove(received.relpath)
            raise Rejected(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
        except JournalReplaced as exc:
            self._spool.remove(received.relpath)
            raise self._journal_replaced(exc) from exc
        except Exception as exc:
            self._spool.remove(received.relpath)
            # the exception text may quote the row (display details): keep it out of the log
            log.debug("journal error", exc_info=True)
            raise Rejected(
                OUT_OF_RESOURCES, f"cannot record the instance ({type(exc).__name__})"
            ) from exc

    def _journal_replaced(self, exc: JournalReplaced) -> Rejected:
        """Every instance is refused until a restart; said once at ERROR."""
        if not self._journal_lost:
            self._journal_lost = True
            log.error("%s; refusing every instance with 0xA700 until then", exc)
        return Rejected(OUT_OF_RESOURCES, "the journal was removed or replaced; restart the node")

    def _duplicate(self, calling: str) -> int:
        self._metrics.instances_duplicate.labels(calling_aet=calling).inc()
        log.info("instance already stored; acknowledged again (from %s)", calling)
        return SUCCESS

    def _handle_event_report(self, event: evt.Event) -> tuple[int, pydicom.Dataset | None]:
        """A storage commitment result (PS3.4 J.3.3) from a peer we asked to commit."""
        with log_context(calling_aet=event.assoc.requestor.ae_title):
            if self._on_event_report is None:
                log.warning("N-EVENT-REPORT from %s refused", event.assoc.requestor.ae_title)
                return PROCESSING_FAILURE, None
            return self._on_event_report(event)

    def _requested(self, event: evt.Event) -> None:
        # Before the A-ASSOCIATE-AC is sent: a peer may send its first C-STORE right
        # behind our AC, before EVT_ACCEPTED's handlers have run. The wire path serves
        # nothing before the association is established (FastStore._idle, _answered);
        # from then on its plain C-STOREs are read and answered by its DUL thread.
        store_scp_wire.install(event.assoc, self.store_status)

    def _accepted(self, event: evt.Event) -> None:
        self._metrics.associations.labels(outcome="accepted").inc()
        requestor = event.assoc.requestor
        self._audit.association(requestor.ae_title, str(requestor.address), True, "accepted")
        log.debug("association from %s accepted", event.assoc.requestor.ae_title)
        if not event.assoc.accepted_contexts and event.assoc.rejected_contexts:
            # C-FIND, C-MOVE, a private SOP class: the peer usually aborts next
            names = sorted({_sop_name(cx.abstract_syntax) for cx in event.assoc.rejected_contexts})
            log.warning(
                "association from %s proposed nothing the node serves (%s); it takes C-STORE"
                " of storage SOP classes and C-ECHO only",
                requestor.ae_title,
                ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else ""),
            )

    def _refused_connection(self, address: str, reason: str, kind: str) -> None:
        """A connection turned away before any association, or an association request
        rejected for an AE title that is not one (``kind`` REJECTED; already logged)."""
        self._metrics.associations.labels(outcome=kind).inc()
        subtype = "association rejected" if kind == REJECTED else "connection refused"
        self._audit.connection_refused(address, reason, subtype)

    def _aborted(self, event: evt.Event) -> None:
        # pynetdicom fires this twice for an association aborted here (the node stops):
        # for the A-ABORT it sends, and again when its DUL sees the connection close.
        with self._aborts_lock:
            if event.assoc in self._aborts_seen:
                return
            self._aborts_seen.add(event.assoc)
        self._metrics.associations.labels(outcome="aborted").inc()
        log.warning("association from %s aborted", event.assoc.requestor.ae_title)

    def _rejected(self, event: evt.Event) -> None:
        self._metrics.associations.labels(outcome="rejected").inc()
        requestor = event.assoc.requestor
        self._audit.association(requestor.ae_title, str(requestor.address), False, "rejected")
        _log_rejected(event)


ABORT_SECONDS = 2.0  # how long stopping waits for the A-ABORTs of the associations left


def _abort_all(associations: Sequence[Any]) -> None:
    """A-ABORT every association at once (each ``abort()`` blocks for 0.1 s or more)."""
    for assoc in associations:
        try:
            assoc.abort(block=False)
        except Exception:  # an association that ended meanwhile
            log.debug("abort failed", exc_info=True)
    deadline = time.monotonic() + ABORT_SECONDS
    for assoc in associations:
        assoc.join(max(0.0, deadline - time.monotonic()))


def _make_ae(config: NodeSection) -> AE:
    quiet_pynetdicom_events()
    check_uids_quickly()
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_bytes
    ae.require_calling_aet = list(config.allowed_calling_aets)
    ae.require_called_aet = config.check_called_aet
    ae.network_timeout = config.idle_timeout_seconds
    uncompressed = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
    ae.add_supported_context(Verification, uncompressed)
    # Storage commitment results come back on associations the peer opens, proposing
    # itself as SCP (SCP/SCU role selection); we are the SCU of the Push Model.
    ae.add_supported_context(
        StorageCommitmentPushModel, uncompressed, scu_role=False, scp_role=True
    )
    syntaxes = [
        syntax
        for syntax in ACCEPTED_TRANSFER_SYNTAXES
        if config.accept_deflate or syntax != uid.DeflatedExplicitVRLittleEndian
    ]
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    return ae


def _ascii_uid(value: object) -> str:
    """A request's UID for the file meta; one that is not a valid UID is refused.

    The dataset's own UIDs are checked against the request by
    :func:`dicom_node.header.received_header`.
    """
    text = str(value or "").strip()
    if not text or not valid_uid(text):
        raise Rejected(CANNOT_UNDERSTAND, "the request's affected SOP UIDs are not valid UIDs")
    return text


NOT_A_COMMITMENT_SCP = "not a storage commitment SCP"  # Error Comment: LO, 64 at most


def _handle_action(event: evt.Event) -> tuple[pydicom.Dataset, None]:
    """An N-ACTION: a sender asking the node to commit to storage (the Push Model context
    is accepted with default roles, for the reports of the peers the node asks). The node
    is no Storage Commitment SCP: refused with Processing Failure and an Error Comment;
    pynetdicom answered the same status after a traceback of its own."""
    requestor = event.assoc.requestor.ae_title
    log.warning(
        "N-ACTION (a storage commitment request) from %s refused: the node is no storage"
        " commitment SCP; a sender configured to ask for commitment from the node reports"
        " a failure although its images were stored",
        requestor,
    )
    return _with_comment(PROCESSING_FAILURE, NOT_A_COMMITMENT_SCP), None


def _with_comment(status: int, comment: str) -> pydicom.Dataset:
    """A handler's status for pynetdicom with an Error Comment (0000,0902)."""
    answer = pydicom.Dataset()
    answer.Status = status
    answer.ErrorComment = comment
    return answer


def _sop_name(abstract_syntax: object) -> str:
    """A proposed abstract syntax as a name (its UID where pydicom knows none)."""
    text = str(abstract_syntax or "?")
    name = uid.UID(text).name
    return name if name != text else f"SOP class {text}"


def _handle_echo(event: evt.Event) -> int:
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return SUCCESS


def _log_rejected(event: evt.Event) -> None:
    requestor = event.assoc.requestor
    log.warning(
        "association from %s at %s rejected: %s",
        requestor.ae_title,
        requestor.address,
        _rejection_reason(event.assoc),
    )


def _rejection_reason(assoc: Any) -> str:
    """Why pynetdicom's acceptor rejected ``assoc`` (its checks, last one first, as the
    last one that fails decides its A-ASSOCIATE-RJ), named by the setting involved."""
    ae = assoc.ae
    acceptors = [other for other in ae.active_associations if other.is_acceptor]
    if len(acceptors) > ae.maximum_associations:
        return f"node.max_associations ({ae.maximum_associations}) reached"
    request = getattr(assoc.requestor, "primitive", None)
    called = str(getattr(request, "called_ae_title", "") or "").strip()
    ours = str(assoc.acceptor.ae_title).strip()
    if ae.require_called_aet and called != ours:
        return f"called AE title {called!r} is not node.ae_title {ours!r} (node.check_called_aet)"
    allowed = [str(title).strip() for title in ae.require_calling_aet]
    if allowed and str(assoc.requestor.ae_title).strip() not in allowed:
        return "calling AE title not in node.allowed_calling_aets"
    return "application context, protocol version or user identity not accepted"


def _reason_label(status: int) -> str:
    return {
        OUT_OF_RESOURCES: "out_of_resources",
        DATASET_DOES_NOT_MATCH_SOP_CLASS: "sop_mismatch",
        CANNOT_DECODE: "undecodable",
        CANNOT_UNDERSTAND: "invalid",
    }.get(status, "error")
