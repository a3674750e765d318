"""Storage Commitment Push Model (PS3.4 Annex J) as the SCU: ask, wait, settle.

After the C-STOREs of a delivery to a destination with ``storage_commitment``,
:meth:`Commitments.request` marks the delivery COMMITTING under a new Transaction
UID, with a deadline, and sends N-ACTION (action type 1) listing the objects just
stored (:func:`dicom_node.send.result_files`: the SEG and SR, or a classifier's SR alone).
The peer answers with N-EVENT-REPORT, usually on an association it opens to our
SCP, sometimes on the N-ACTION's own association; both go to
:meth:`Commitments.handle_report`. Event type 1 naming every object finishes the
delivery (SENT); event type 2 (a Failed SOP Sequence), a report that leaves an
object out, a refused N-ACTION or no report before the deadline
(:meth:`Commitments.expire_overdue`, run by the sender loop) is a failed attempt:
retried with the C-STORE backoff, the same SOP Instance UIDs and a new
Transaction UID, and dead-lettered after ``sending.max_attempts``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt

from dicom_node.audit import AuditTrail
from dicom_node.config import Destination, SendingSection
from dicom_node.domain import DeliveryState
from dicom_node.journal import Journal, Row
from dicom_node.send import (
    Peer,
    SendError,
    associate,
    next_attempt_at,
    observe_send_stage,
    report_failure,
    result_files,
    status_text,
)
from dicom_node.store import Spool
from dicom_node.web.metrics import Metrics

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # well-known instance
REQUEST_STORAGE_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)
EVENT_SUCCESS = 1  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3)
EVENT_FAILURES_EXIST = 2
COMMITMENT_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115

# Failure Reason (0008,1197), PS3.3 C.14.1.1
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


@dataclass(frozen=True)
class Report:
    """What an N-EVENT-REPORT says about one transaction."""

    transaction_uid: str
    event_type: int
    committed: frozenset[str]  # SOP Instance UIDs in the Referenced SOP Sequence
    failed: Mapping[str, int] = field(default_factory=dict)  # SOP Instance UID -> reason


def parse_report(event_type: int, info: Dataset) -> Report:
    """Read the Event Information of a storage commitment report (PS3.4 J.3.3.1)."""
    if event_type not in (EVENT_SUCCESS, EVENT_FAILURES_EXIST):
        raise ValueError(f"event type {event_type} is not a storage commitment result (1 or 2)")
    transaction_uid = str(info.get("TransactionUID", "") or "").strip()
    if not transaction_uid:
        raise ValueError("the report has no Transaction UID")
    committed = frozenset(
        str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])
    )
    failed = {
        str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", PROCESSING_FAILURE))
        for item in info.get("FailedSOPSequence", [])
    }
    return Report(transaction_uid, event_type, committed, failed)


def referenced_sop_sequence(paths: Sequence[Path]) -> list[Dataset]:
    """One Referenced SOP Sequence item (class and instance UID) per file."""
    items = []
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        item = Dataset()
        item.ReferencedSOPClassUID = meta.MediaStorageSOPClassUID
        item.ReferencedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
        items.append(item)
    return items


def request_commitment(
    calling_aet: str,
    peer: Peer,
    transaction_uid: str,
    paths: Sequence[Path],
    timeout: float,
    on_report: Callable[[evt.Event], tuple[int, Dataset | None]],
) -> None:
    """Send the N-ACTION; ``on_report`` answers a report sent back on this association."""
    assoc = associate(
        calling_aet, peer, [(STORAGE_COMMITMENT_PUSH_MODEL, COMMITMENT_SYNTAXES)], timeout
    )
    try:
        if not any(
            cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL for cx in assoc.accepted_contexts
        ):
            raise SendError(f"{peer.ae_title} does not accept Storage Commitment Push Model")
        assoc.bind(evt.EVT_N_EVENT_REPORT, on_report)
        action = Dataset()
        action.TransactionUID = transaction_uid
        action.ReferencedSOPSequence = referenced_sop_sequence(paths)
        status, _reply = assoc.send_n_action(
            action,
            REQUEST_STORAGE_COMMITMENT,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
        )
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or int(status.Status) != SUCCESS:
        raise SendError(
            f"storage commitment N-ACTION to {peer.ae_title} failed: {status_text(status)}"
        )


class Commitments:
    """Storage commitment for the destinations that ask for it; thread-safe via the journal."""

    def __init__(
        self,
        journal: Journal,
        metrics: Metrics,
        calling_aet: str,
        destinations: Mapping[str, Destination],
        settings: SendingSection,
        clock: Callable[[], float],
        on_retry: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
        audit: AuditTrail | None = None,
        spool: Spool | None = None,
    ) -> None:
        self._audit = audit or AuditTrail(None, clock)
        # Where the sent result files are, to know which objects a report must name;
        # without it, every job is taken to have sent both a SEG and an SR.
        self._spool = spool
        self._journal = journal
        self._metrics = metrics
        self._calling_aet = calling_aet
        self._wanted = frozenset(n for n, d in destinations.items() if d.storage_commitment)
        self._settings = settings
        self._clock = clock
        self._on_retry = on_retry
        self._rng = rng or random.Random()

    def wanted(self, destination: str) -> bool:
        return destination in self._wanted

    def request(self, delivery: Row, peer: Peer, paths: Sequence[Path]) -> DeliveryState:
        """The objects are stored: ask ``peer`` to commit them (COMMITTING, or a failed attempt)."""
        transaction_uid = generate_uid()
        now = self._clock()
        deadline = now + self._settings.commitment_timeout_seconds
        self._journal.commitment_requested(delivery.id, transaction_uid, deadline, now)
        try:
            request_commitment(
                self._calling_aet,
                peer,
                transaction_uid,
                paths,
                self._settings.timeout_seconds,
                self.handle_report,
            )
        except Exception as exc:
            error = str(exc) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"
            return self._failed(delivery, transaction_uid, error) or DeliveryState.COMMITTING
        log.info(
            "job %d: storage commitment of %d objects requested from %s (transaction %s)",
            delivery.job_id,
            len(paths),
            delivery.destination,
            transaction_uid,
        )
        return DeliveryState.COMMITTING

    def handle_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """EVT_N_EVENT_REPORT handler: the one place a report becomes a response status."""
        return self._answer(lambda: (int(event.event_type or 0), event.event_information))

    def answer_report(self, event_type: int, info: Dataset) -> tuple[int, Dataset | None]:
        """The same, for a report that another receiving process took and passes on
        (:mod:`dicom_node.receivers`)."""
        return self._answer(lambda: (event_type, info))

    def _answer(self, read: Callable[[], tuple[int, Dataset]]) -> tuple[int, Dataset | None]:
        try:
            report = parse_report(*read())
        except ValueError as exc:
            log.warning("refused a storage commitment report: %s", exc)
            return INVALID_ARGUMENT_VALUE, None
        except Exception:
            log.exception("cannot read a storage commitment report")
            return PROCESSING_FAILURE, None
        try:
            self.settle(report)
        except Exception:
            log.exception("cannot record storage commitment %s", report.transaction_uid)
            return PROCESSING_FAILURE, None
        return SUCCESS, None

    def settle(self, report: Report) -> DeliveryState | None:
        """Record a report; None when its transaction is unknown or already settled."""
        delivery = self._journal.delivery_by_transaction(report.transaction_uid)
        if delivery is None or delivery.state != DeliveryState.COMMITTING:
            log.warning(
                "storage commitment report for transaction %s ignored: %s",
                report.transaction_uid,
                "unknown transaction" if delivery is None else f"delivery is {delivery.state}",
            )
            return None
        job = self._journal.job(delivery.job_id)
        uids = self.requested(job)
        missing = sorted(set(uids) - report.committed - set(report.failed))
        if report.event_type == EVENT_SUCCESS and not report.failed and not missing:
            settled = self._journal.commitment_settled(
                report.transaction_uid, DeliveryState.SENT, self._clock()
            )
            if settled is None:
                return None
            self._metrics.sends.labels(destination=delivery.destination, outcome="committed").inc()
            self._audit.results_sent(delivery.destination, delivery.ae_title, uids, commitment=True)
            observe_send_stage(self._metrics, self._journal, job.id)
            log.info(
                "job %d: %s confirmed storage commitment of every object (transaction %s)",
                delivery.job_id,
                delivery.destination,
                report.transaction_uid,
            )
            return DeliveryState.SENT
        problems = [
            f"{uid} ({FAILURE_REASONS.get(reason, 'failure reason')} 0x{reason:04X})"
            for uid, reason in sorted(report.failed.items())
        ] + [f"{uid} (not in the report)" for uid in missing]
        error = (
            f"storage commitment by {delivery.ae_title} failed for {', '.join(problems)}"
            f" (transaction {report.transaction_uid})"
        )
        return self._failed(delivery, report.transaction_uid, error)

    def requested(self, job: Row) -> list[str]:
        """SOP Instance UIDs the N-ACTION listed: those of the files the sender sent."""
        if self._spool is None:
            return [str(job.seg_sop_uid), str(job.sr_sop_uid)]
        return [f.sop_uid for f in result_files(self._spool, job)]

    def expire_overdue(self) -> int:
        """Commitments whose report did not come in time become failed attempts."""
        overdue = self._journal.overdue_commitments(self._clock())
        for delivery in overdue:
            error = (
                f"no storage commitment report from {delivery.ae_title} within"
                f" {self._settings.commitment_timeout_seconds:g} s"
                f" (transaction {delivery.commit_transaction_uid})"
            )
            self._failed(delivery, delivery.commit_transaction_uid, error)
        return len(overdue)

    def _failed(self, delivery: Row, transaction_uid: str, error: str) -> DeliveryState | None:
        """Retry with backoff, or dead-letter at the attempt limit (as for C-STORE failures)."""
        attempt = delivery.attempts + 1
        now = self._clock()
        retry_at = next_attempt_at(self._settings, attempt, now, self._rng.random())
        new = DeliveryState.PENDING if retry_at is not None else DeliveryState.DEAD
        settled = self._journal.commitment_settled(transaction_uid, new, now, error, retry_at)
        if settled is None:  # settled meanwhile by a report or the timeout
            return None
        report_failure(self._metrics, delivery, attempt, self._settings, error, retry_at, now)
        if retry_at is not None:
            self._on_retry()
        return new
