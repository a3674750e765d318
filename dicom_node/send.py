"""C-STORE SCU: send files to a peer; the delivery loop with retry and dead letter.

:func:`store_files` is the plain sender used by the CLI and by deliveries.
:class:`Sender` drives pending deliveries from the journal: each attempt sends
the job's result files (:func:`result_files`: the SEG, unless the pipeline is a
classifier, and the SR); a failure is retried with exponential backoff and jitter
until ``sending.max_attempts``, then the delivery is dead-lettered. For a
destination with ``storage_commitment`` a stored delivery is handed to
:mod:`dicom_node.commit` (COMMITTING) instead of being SENT.
"""

from __future__ import annotations

import functools
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pynetdicom import AE, Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket

from dicom_node.audit import AuditTrail
from dicom_node.config import ClientTLS, SendingSection
from dicom_node.domain import DeliveryState, backoff_seconds
from dicom_node.journal import Journal, Row
from dicom_node.logs import log_context
from dicom_node.reactor import EventDrivenDUL, serve_association
from dicom_node.store import Spool
from dicom_node.tls import TLSConfigError, client_context
from dicom_node.web.metrics import Metrics

if TYPE_CHECKING:
    from dicom_node.commit import Commitments

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# Statuses that mean the peer has the object (PS3.4 B.2.3: success and warnings).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class SendError(Exception):
    """A send did not complete; the message names the peer and the reason."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: ClientTLS | None = None  # DICOM TLS (destinations.NAME.tls); None: plain TCP


def _tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    if peer.tls is None:
        return None
    try:
        return client_context(peer.tls), peer.host
    except TLSConfigError as exc:
        raise SendError(f"TLS to {peer.ae_title}: {exc}") from exc


def associate(
    calling_aet: str, peer: Peer, contexts: Iterable[tuple[str, list[str]]], timeout: float
) -> Association:
    ae = EventDrivenAE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=_tls_args(peer))
    if not assoc.is_established:
        raise SendError(
            f"association with {peer.ae_title}@{peer.host}:{peer.port} was "
            f"{'rejected' if assoc.is_rejected else 'not established'}"
            f"{' (over TLS)' if peer.tls else ''}"
        )
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keep_responses_for_the_requestor(assoc)
    return assoc


class EventDrivenAE(AE):
    """An AE whose requested associations use the event-driven loops of the receiver.

    ``AE.associate`` creates the association, then asks ``_create_socket`` for its
    socket before anything is started: the one place to swap in
    :class:`~dicom_node.reactor.EventDrivenDUL` and :func:`serve_association`. With the
    stock loops each C-STORE waited up to ~1 ms for the DUL to send it and again for
    the reactor to pause.
    """

    def _create_socket(
        self, assoc: Association, address: Any, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        assoc.dul = EventDrivenDUL(assoc)
        assoc._run_reactor = functools.partial(serve_association, assoc)  # type: ignore[method-assign]
        # the setters arm the new DUL's timers, as Association.__init__ did for the old one
        assoc.acse_timeout = assoc.acse_timeout
        assoc.network_timeout = assoc.network_timeout
        return super()._create_socket(assoc, address, tls_args)


def keep_responses_for_the_requestor(assoc: Association) -> None:
    """Work around a race in pynetdicom 3.0's requestor.

    ``send_c_store`` pauses the association's reactor thread by clearing an event
    and then checking a flag the reactor sets *before* it waits, so the reactor
    can slip past the pause and take the C-STORE response off the queue; it then
    drops it ("Received unexpected C-STORE service message") and the sender
    waits for the DIMSE timeout. Here a response the reactor takes is put back
    for the waiting sender (once; a response nobody waits for is still dropped).
    """
    serve_request = assoc._serve_request

    def serve(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not getattr(msg, "_dicom_node_requeued", False):
            msg._dicom_node_requeued = True
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve_request(msg, context_id)

    assoc._serve_request = serve  # type: ignore[method-assign]


def echo(calling_aet: str, peer: Peer, timeout: float = 10.0) -> None:
    """C-ECHO the peer; raise :class:`SendError` unless it answers success."""
    assoc = associate(calling_aet, peer, [(Verification, ["1.2.840.10008.1.2"])], timeout)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.Status != 0x0000:
        raise SendError(f"C-ECHO to {peer.ae_title} failed: {status_text(status)}")


def dicom_files(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` into DICOM Part 10 files (with file meta) and the rest."""
    files: list[Path] = []
    skipped: list[Path] = []
    for path in paths:
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
            usable = "MediaStorageSOPClassUID" in meta and "TransferSyntaxUID" in meta
        except Exception:
            usable = False
        (files if usable else skipped).append(path)
    return files, skipped


def _contexts(paths: Sequence[Path]) -> list[tuple[str, list[str]]]:
    """One context per (SOP class), offering each file's own transfer syntax first."""
    by_class: dict[str, list[str]] = {}
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        syntaxes = by_class.setdefault(str(meta.MediaStorageSOPClassUID), [])
        syntax = str(meta.TransferSyntaxUID)
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    contexts = []
    for abstract, syntaxes in by_class.items():
        for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):  # uncompressed fallbacks
            if syntax not in syntaxes:
                syntaxes.append(syntax)
        contexts.append((abstract, syntaxes))
    if len(contexts) > 128:
        raise SendError(f"{len(contexts)} SOP classes in one send; at most 128 fit one association")
    return contexts


def store_files(
    calling_aet: str,
    peer: Peer,
    paths: Sequence[Path],
    timeout: float = 30.0,
    progress: Callable[[Path, int], None] | None = None,
) -> None:
    """C-STORE every file over one association; raise :class:`SendError` on the first failure."""
    if not paths:
        return
    assoc = associate(calling_aet, peer, _contexts(paths), timeout)
    try:
        exact = _exact_contexts(assoc)
        for message_id, path in enumerate(paths, start=1):
            status = _store_one(assoc, path, exact, message_id)
            if not status or int(status.Status) not in STORED_STATUSES:
                raise SendError(
                    f"C-STORE of {path.name} to {peer.ae_title} failed: {status_text(status)}"
                )
            if progress is not None:
                progress(path, int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()


def _exact_contexts(assoc: Association) -> dict[tuple[str, str], int]:
    """(SOP class, transfer syntax) -> context ID, for what the peer accepted from us as SCU."""
    return {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
        for cx in assoc.accepted_contexts
        if cx.as_scu and cx.transfer_syntax and cx.context_id is not None
    }


def _store_one(
    assoc: Association, path: Path, exact: dict[tuple[str, str], int], message_id: int
) -> pydicom.Dataset:
    """C-STORE one file: its dataset bytes as stored when the peer accepted their syntax.

    pynetdicom's ``send_c_store(path)`` decodes the whole file and encodes it again (a
    third of the time per CT slice); its chunked mode avoids that but is a process-wide
    switch. Here the request carries the file and the dataset's offset in it, which
    pynetdicom's DIMSE layer then sends in PDU-sized chunks - for this call only. When
    the peer accepted another transfer syntax (e.g. implicit VR only), the decoded
    dataset goes through ``send_c_store``, which converts it.
    """
    if not assoc.is_established:  # the peer released or aborted after the last response
        raise SendError(f"association ended before {path.name} could be sent")
    meta, offset = split_dataset(path)
    sop_class = str(meta.MediaStorageSOPClassUID)
    context_id = exact.get((sop_class, str(meta.TransferSyntaxUID)))
    if context_id is None:
        return assoc.send_c_store(pydicom.dcmread(path), msg_id=message_id)
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = 2  # low, as send_c_store's default
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = str(meta.MediaStorageSOPInstanceUID)
    request._dataset_path = (path, offset)
    # The pause protocol of Association.send_c_store: the reactor must not take the
    # response off the queue while we wait for it.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return pydicom.Dataset()
    return assoc._check_received_status(response)


def status_text(status: pydicom.Dataset | None) -> str:
    if not status:
        return "no response (connection lost, timeout or aborted)"
    return f"status 0x{int(status.Status):04X}"


def next_attempt_at(
    settings: SendingSection, attempt: int, now: float, jitter: float
) -> float | None:
    """When to try a delivery again after failed attempt number ``attempt``.

    None means the attempt limit is reached: the delivery goes to the dead letter.
    """
    if attempt >= settings.max_attempts:
        return None
    delay = backoff_seconds(
        attempt, settings.backoff_initial_seconds, settings.backoff_max_seconds, jitter
    )
    return now + delay


def observe_send_stage(metrics: Metrics, journal: Journal, job_id: int) -> None:
    """Record the send stage once the job's last delivery has settled."""
    job = journal.job(job_id)
    if job.finished_at is not None and job.analysed_at is not None:
        metrics.stage_seconds.labels(stage="send").observe(job.finished_at - job.analysed_at)


def report_failure(
    metrics: Metrics,
    delivery: Row,
    attempt: int,
    settings: SendingSection,
    error: str,
    retry_at: float | None,
    now: float,
) -> None:
    """The metric and log line of a failed delivery attempt (C-STORE or commitment)."""
    outcome = "dead" if retry_at is None else "retry"
    metrics.sends.labels(destination=delivery.destination, outcome=outcome).inc()
    if retry_at is None:
        log.error(
            "job %d: DEAD LETTER for %s after %d attempts: %s",
            delivery.job_id,
            delivery.destination,
            attempt,
            error,
        )
        return
    log.warning(
        "job %d: delivery to %s failed (attempt %d of %d), retrying in %.1f s: %s",
        delivery.job_id,
        delivery.destination,
        attempt,
        settings.max_attempts,
        retry_at - now,
        error,
    )


@dataclass(frozen=True)
class ResultFile:
    """One result object of a job as it is sent: the file and its SOP Instance UID."""

    path: Path
    sop_uid: str


def result_files(spool: Spool, job: Row) -> list[ResultFile]:
    """What a delivery of ``job`` sends: its SEG, when its pipeline segmented, and its SR.

    A classifier's job has no SEG (the worker writes ``sr.dcm`` only), so the SEG is
    sent when its file exists; the SR is always written, so its absence is an error
    (:class:`SendError`: a failed attempt, not a silent partial send). Storage
    commitment lists the same files (:mod:`dicom_node.commit`).
    """
    seg = spool.path(spool.result_relpath(job.id, "seg"))
    sr_relpath = spool.result_relpath(job.id, "sr")
    sr = spool.path(sr_relpath)
    if not sr.is_file():
        raise SendError(f"job {job.id}: result {sr_relpath} is missing from the spool")
    if seg.is_file():
        return [ResultFile(seg, str(job.seg_sop_uid)), ResultFile(sr, str(job.sr_sop_uid))]
    if _references_a_seg(sr):  # a segmenting job whose SEG was lost: never send half
        raise SendError(f"job {job.id}: the SR refers to a SEG that is missing from the spool")
    return [ResultFile(sr, str(job.sr_sop_uid))]


def _references_a_seg(sr_path: Path) -> bool:
    """Whether the SR's evidence lists a Segmentation (a classifier's SR lists none)."""
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    return any(
        str(instance.ReferencedSOPClassUID) == SEGMENTATION_STORAGE
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    )


class Sender:
    """Sends due deliveries; sleeps until the next one is due or it is woken."""

    def __init__(
        self,
        journal: Journal,
        spool: Spool,
        metrics: Metrics,
        calling_aet: str,
        settings: SendingSection,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        commitments: Commitments | None = None,
        tls: Mapping[str, ClientTLS] | None = None,  # by destination name
        audit: AuditTrail | None = None,
        destinations: Collection[str] | None = None,  # configured names; None: any
    ) -> None:
        self._audit = audit or AuditTrail(None, clock)
        self._destinations = None if destinations is None else frozenset(destinations)
        self._journal = journal
        self._tls = dict(tls or {})
        self._commitments = commitments
        self._spool = spool
        self._metrics = metrics
        self._calling_aet = calling_aet
        self._settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                while not self._stopping.is_set() and self.send_due():
                    pass
                next_at = self._journal.next_delivery_at()
            except Exception:
                log.exception("delivery loop error; retrying in 5 s")
                next_at = self._clock() + 5
            wait = 60.0 if next_at is None else max(0.0, min(60.0, next_at - self._clock()))
            self._wake.wait(wait)

    def send_due(self) -> int:
        """Attempt every due delivery once; return how many were attempted.

        Storage commitments past their deadline become retries first. After one
        failure, a destination's other deliveries wait for the next pass, so a dead
        peer costs one timeout per pass, not one per delivery, and others go first.
        """
        if self._commitments is not None:
            self._commitments.expire_overdue()
        failing: set[str] = set()
        attempted = 0
        for delivery in self._journal.due_deliveries(self._clock()):
            if self._stopping.is_set():
                break
            if delivery.destination in failing:
                continue
            attempted += 1
            if self.attempt(delivery) not in (DeliveryState.SENT, DeliveryState.COMMITTING):
                failing.add(delivery.destination)
        return attempted

    def attempt(self, delivery: Row) -> DeliveryState:
        """One attempt for one delivery; records SENT, COMMITTING, a retry time or DEAD."""
        with log_context(job_id=delivery.job_id):
            job = self._journal.job(delivery.job_id)
            tls = self._tls.get(delivery.destination)
            peer = Peer(delivery.ae_title, delivery.host, delivery.port, tls)
            paths: list[Path] = []
            uids = [job.seg_sop_uid, job.sr_sop_uid]  # audited as the job's if listing fails
            try:
                self._check_configured(delivery.destination)
                files = result_files(self._spool, job)
                paths, uids = [f.path for f in files], [f.sop_uid for f in files]
                store_files(self._calling_aet, peer, paths, timeout=self._settings.timeout_seconds)
            except Exception as exc:
                self._audit.results_sent(delivery.destination, peer.ae_title, uids, str(exc))
                return self._failed(delivery, exc)
            self._audit.results_sent(delivery.destination, peer.ae_title, uids)
            if self._commitments is not None and self._commitments.wanted(delivery.destination):
                return self._commitments.request(delivery, peer, paths)
            self._journal.delivery_attempted(delivery.id, DeliveryState.SENT, self._clock())
            self._metrics.sends.labels(destination=delivery.destination, outcome="sent").inc()
            log.info("job %d: results sent to %s", job.id, delivery.destination)
            self._observe_send_stage(job.id)
            return DeliveryState.SENT

    def _check_configured(self, destination: str) -> None:
        """A destination removed from the config since the job was made gets nothing
        (in particular not its results in the clear, had it been a TLS destination)."""
        if self._destinations is not None and destination not in self._destinations:
            raise SendError(f"destination {destination!r} is no longer configured")

    def _observe_send_stage(self, job_id: int) -> None:
        observe_send_stage(self._metrics, self._journal, job_id)

    def _failed(self, delivery: Row, exc: Exception) -> DeliveryState:
        attempt = delivery.attempts + 1
        error = str(exc) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"
        now = self._clock()
        retry_at = next_attempt_at(self._settings, attempt, now, self._rng.random())
        new = DeliveryState.PENDING if retry_at is not None else DeliveryState.DEAD
        self._journal.delivery_attempted(delivery.id, new, now, error=error, retry_at=retry_at)
        report_failure(self._metrics, delivery, attempt, self._settings, error, retry_at, now)
        return new
