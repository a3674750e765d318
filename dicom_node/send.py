"""Delivery of results: the loop with retry and dead letter, over the C-STORE SCU.

:func:`store_files` (from :mod:`dicom_node.store_scu`, like the other SCU names that
callers import from here) is the plain sender used by the CLI and by deliveries.
:class:`Sender` drives pending deliveries from the journal: each attempt sends
the job's result files (:func:`result_files`: the SEG, unless the pipeline is a
classifier, and the SR); a failure is retried with exponential backoff and jitter
until ``sending.max_attempts``, then the delivery is dead-lettered. For a
destination with ``storage_commitment`` a stored delivery is handed to
:mod:`dicom_node.commit` (COMMITTING) instead of being SENT.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from dicom_node.audit import AuditTrail
from dicom_node.config import ClientTLS, SendingSection
from dicom_node.domain import DeliveryState, backoff_seconds
from dicom_node.journal import Journal, Row
from dicom_node.logs import log_context
from dicom_node.store import Spool
from dicom_node.store_scu import (
    STORED_STATUSES,
    EventDrivenAE,
    Peer,
    SendError,
    associate,
    dicom_files,
    echo,
    keep_responses_for_the_requestor,
    status_text,
    store_files,
)
from dicom_node.web.metrics import Metrics

if TYPE_CHECKING:
    from dicom_node.commit import Commitments

__all__ = [  # the SCU names that other modules import from here
    "STORED_STATUSES",
    "EventDrivenAE",
    "Peer",
    "SendError",
    "associate",
    "dicom_files",
    "echo",
    "keep_responses_for_the_requestor",
    "status_text",
    "store_files",
]

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


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
    seg = spool.fetch(spool.result_relpath(job.id, "seg"))  # from the object store, if any
    sr_relpath = spool.result_relpath(job.id, "sr")
    sr = spool.fetch(sr_relpath)
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
        shared_journal: bool = False,
    ) -> None:
        """``shared_journal``: other receivers' senders work on the same deliveries
        (docs/scale-out.md), so each delivery is claimed before it is attempted."""
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
        # With a shared journal a delivery being attempted is reserved this long: longer
        # than any attempt, so that only a sender that died mid-way leaves it to another
        # one that late. Alone, a sender claims nothing: after a crash mid-way its restart
        # must find the delivery due at once, not reserved by a process that is gone.
        self._claim_seconds = max(300.0, 10 * settings.timeout_seconds) if shared_journal else 0

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
            now = self._clock()
            if self._claim_seconds and not self._journal.claim_delivery(
                delivery.id, now, now + self._claim_seconds
            ):
                continue  # another receiver sharing the journal is sending it
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
