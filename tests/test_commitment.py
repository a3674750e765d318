"""Storage Commitment Push Model (PS3.4 Annex J): a delivery is finished only when the
destination's N-EVENT-REPORT confirms every object; failures and silence are retried."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from nodes import node_settings, pacs_destination, running_node, send
from peers import GE_3SLICE, LOCALHOST, Orthanc, free_port, require_tools, wait_until
from pydicom import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from test_assemble import Clock, Harness
from test_send import job_with_results, make_sender

from dicom_node.app import Node
from dicom_node.commit import (
    EVENT_FAILURES_EXIST,
    EVENT_SUCCESS,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    Commitments,
    Report,
    parse_report,
)
from dicom_node.config import Destination, SendingSection
from dicom_node.domain import DeliveryState, JobState
from dicom_node.web.metrics import Metrics

ROUTE = {"name": "chest", "when": {"Modality": "CT"}, "pipeline": "ct-chest", "send_to": ["pacs"]}


# --------------------------------------------------------------------------- journal + policy


def commitments_for(
    harness: Harness, max_attempts: int = 2, with_spool: bool = False
) -> Commitments:
    settings = SendingSection(
        max_attempts=max_attempts,
        backoff_initial_seconds=2,
        backoff_max_seconds=10,
        commitment_timeout_seconds=30,
    )
    pacs = Destination(ae_title="P", host=LOCALHOST, port=104, storage_commitment=True)
    return Commitments(
        harness.journal,
        Metrics(),
        "AINODE",
        {"pacs": pacs},
        settings,
        harness.clock,
        spool=harness.spool if with_spool else None,
    )


def committing_delivery(tmp_path: Path, transaction_uid: str = "1.2.3.4") -> Harness:
    harness = Harness(tmp_path / "var", Clock())
    job_id = job_with_results(harness, free_port())
    (delivery,) = harness.journal.job_deliveries(job_id)
    deadline = harness.clock.now + 30
    harness.journal.commitment_requested(delivery.id, transaction_uid, deadline, harness.clock.now)
    return harness


def test_journal_commitment_confirmed_once(tmp_path: Path) -> None:
    harness = committing_delivery(tmp_path)
    journal, now = harness.journal, harness.clock.now
    (job,) = journal.jobs_in_state(JobState.SENDING)
    (delivery,) = journal.job_deliveries(job.id)
    assert delivery.state == DeliveryState.COMMITTING and delivery.attempts == 0
    assert journal.delivery_by_transaction("1.2.3.4").id == delivery.id
    assert journal.next_delivery_at() == now + 30  # the sender wakes for the deadline
    assert journal.due_deliveries(now + 3600) == []  # not sent again while committing
    assert journal.overdue_commitments(now + 29) == []
    assert [d.id for d in journal.overdue_commitments(now + 30)] == [delivery.id]
    settled = journal.commitment_settled("1.2.3.4", DeliveryState.SENT, now + 1)
    assert settled is not None and settled.state == DeliveryState.SENT
    assert settled.attempts == 1 and settled.committed_at == now + 1
    assert settled.commit_deadline is None
    assert journal.job(job.id).state == JobState.DONE
    # a repeated or late report, or one for a transaction we never started, changes nothing
    assert journal.commitment_settled("1.2.3.4", DeliveryState.PENDING, now + 2) is None
    assert journal.commitment_settled("9.9.9", DeliveryState.SENT, now + 2) is None
    assert journal.next_delivery_at() is None


def test_failure_report_is_retried_then_dead_lettered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness = committing_delivery(tmp_path)
    commitments = commitments_for(harness, max_attempts=2)
    (job,) = harness.journal.jobs_in_state(JobState.SENDING)
    failed = Report(
        "1.2.3.4", EVENT_FAILURES_EXIST, frozenset({job.seg_sop_uid}), {job.sr_sop_uid: 0x0112}
    )
    caplog.set_level(logging.WARNING)
    assert commitments.settle(failed) is DeliveryState.PENDING
    (delivery,) = harness.journal.job_deliveries(job.id)
    assert delivery.attempts == 1 and 1.0 <= delivery.next_attempt_at - harness.clock.now <= 2.0
    assert f"{job.sr_sop_uid} (no such object instance 0x0112)" in delivery.last_error
    assert commitments.settle(failed) is None  # the same report again: already settled
    # the second attempt stores again and is never confirmed: dead letter at the limit
    harness.clock.now = delivery.next_attempt_at
    harness.journal.commitment_requested(
        delivery.id, "1.2.3.5", harness.clock.now + 30, harness.clock.now
    )
    harness.clock.now += 29
    assert commitments.expire_overdue() == 0
    harness.clock.now += 1
    assert commitments.expire_overdue() == 1
    (delivery,) = harness.journal.job_deliveries(job.id)
    assert delivery.state == DeliveryState.DEAD and delivery.attempts == 2
    assert "no storage commitment report from STORESCP within 30 s" in delivery.last_error
    assert harness.journal.job(job.id).state == JobState.DEAD_LETTER
    assert "DEAD LETTER for pacs after 2 attempts" in caplog.text


def test_success_report_must_name_every_object(tmp_path: Path) -> None:
    harness = committing_delivery(tmp_path)
    commitments = commitments_for(harness, max_attempts=3)
    (job,) = harness.journal.jobs_in_state(JobState.SENDING)
    partial = Report("1.2.3.4", EVENT_SUCCESS, frozenset({job.seg_sop_uid}))
    assert commitments.settle(partial) is DeliveryState.PENDING
    (delivery,) = harness.journal.job_deliveries(job.id)
    assert f"{job.sr_sop_uid} (not in the report)" in delivery.last_error


def test_a_job_without_a_seg_commits_its_sr_alone(tmp_path: Path) -> None:
    """A classifier's job: the N-ACTION lists what was stored, the SR, and a report
    naming the SR alone confirms the delivery."""
    harness = Harness(tmp_path / "var", Clock())
    fake = FakeCommitmentScp(free_port(), [None])  # answers the N-ACTION; we settle below
    try:
        job_id = job_with_results(harness, fake.port, kinds=("sr",))
        commitments = commitments_for(harness, with_spool=True)
        sender = make_sender(harness, max_attempts=2, commitments=commitments)
        assert sender.send_due() == 1
    finally:
        fake.stop()
    job = harness.journal.job(job_id)
    (action,) = fake.actions
    assert [str(r.ReferencedSOPInstanceUID) for r in action.ReferencedSOPSequence] == [
        job.sr_sop_uid
    ]
    assert fake.stored == [job.sr_sop_uid]
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.COMMITTING
    report = Report(delivery.commit_transaction_uid, EVENT_SUCCESS, frozenset({job.sr_sop_uid}))
    # without the spool a job is taken to have a SEG too, which this report leaves out
    unaware = commitments_for(harness)
    assert unaware.requested(job) == [job.seg_sop_uid, job.sr_sop_uid]
    assert commitments.settle(report) is DeliveryState.SENT
    assert harness.journal.job(job_id).state == JobState.DONE


def test_parse_report() -> None:
    info = Dataset()
    info.TransactionUID = "1.2.3"
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID = bad.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ok.ReferencedSOPInstanceUID, bad.ReferencedSOPInstanceUID = "1.2.3.1", "1.2.3.2"
    bad.FailureReason = 0x0110
    info.ReferencedSOPSequence = [ok]
    info.FailedSOPSequence = [bad]
    report = parse_report(EVENT_FAILURES_EXIST, info)
    assert report == Report("1.2.3", 2, frozenset({"1.2.3.1"}), {"1.2.3.2": 0x0110})
    with pytest.raises(ValueError, match="event type 3"):
        parse_report(3, info)
    with pytest.raises(ValueError, match="no Transaction UID"):
        parse_report(EVENT_SUCCESS, Dataset())


# --------------------------------------------------------------------------- whole node


def ge_datasets() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]


class FakeCommitmentScp:
    """A pynetdicom peer that stores anything and answers N-ACTION; ``reports`` says what
    each N-ACTION gets: "fail" (event type 2, the SR failed), "ok" (event type 1) or None
    (never a report), sent on a new association to ``node_port`` as a PACS would."""

    def __init__(self, node_port: int, reports: list[str | None]) -> None:
        self.node_port = node_port
        self.reports = list(reports)
        self.actions: list[Dataset] = []
        self.stored: list[str] = []
        self.report_statuses: list[int] = []
        self._threads: list[threading.Thread] = []
        self.port = free_port()
        ae = AE(ae_title="FAKEPACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(StorageCommitmentPushModel)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)]
        self._server = ae.start_server((LOCALHOST, self.port), block=False, evt_handlers=handlers)

    def _store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request = event.action_information
        self.actions.append(request)
        outcome = self.reports.pop(0) if self.reports else None
        if outcome is not None:
            thread = threading.Thread(target=self._report, args=(request, outcome))
            thread.start()
            self._threads.append(thread)
        return 0x0000, None

    def _report(self, request: Dataset, outcome: str) -> None:
        info = Dataset()
        info.TransactionUID = request.TransactionUID
        items = list(request.ReferencedSOPSequence)
        if outcome == "fail":
            failed = items.pop()
            failed.FailureReason = 0x0110
            info.FailedSOPSequence = [failed]
        info.ReferencedSOPSequence = items
        ae = AE(ae_title="FAKEPACS")
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True)  # we, the SCP, report
        assoc = ae.associate(LOCALHOST, self.node_port, ae_title="AINODE", ext_neg=[role])
        assert assoc.is_established
        try:
            event_type = EVENT_FAILURES_EXIST if outcome == "fail" else EVENT_SUCCESS
            status, _ = assoc.send_n_event_report(
                info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
            )
            self.report_statuses.append(int(status.Status))
        finally:
            assoc.release()

    def stop(self) -> None:
        for thread in self._threads:
            thread.join(10)
        self._server.shutdown()


@contextmanager
def node_with_fake_pacs(
    tmp_path: Path,
    reports: list[str | None],
    node: dict[str, Any] | None = None,
    **sections: Any,
) -> Iterator[tuple[Node, FakeCommitmentScp]]:
    """A node whose "pacs" asks for storage commitment; ``node`` adds to its node
    section, ``sections`` as for node_settings."""
    node_port = free_port()
    fake = FakeCommitmentScp(node_port, reports)
    settings = node_settings(
        tmp_path / "var",
        node={"port": node_port, **(node or {})},
        destinations={
            "pacs": {
                "ae_title": "FAKEPACS",
                "host": LOCALHOST,
                "port": fake.port,
                "storage_commitment": True,
            }
        },
        **{
            "routes": [ROUTE],
            "sending": {"max_attempts": 2, "commitment_timeout_seconds": 1.0},
            **sections,
        },
    )
    try:
        with running_node(settings) as running:
            yield running, fake
    finally:
        fake.stop()


def finished_job(node: Node, state: JobState, timeout: float = 60) -> object:
    return wait_until(
        lambda: [j for j in node.journal.recent_jobs() if j.state == state],
        timeout,
        0.1,
        f"a job in state {state}",
    )


def test_orthanc_confirms_the_commitment(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc answers N-ACTION, then reports on a new association to our SCP (its
    DicomModalities entry for AINODE; no option beyond the plain [AET, host, port])."""
    require_tools("Orthanc")
    caplog.set_level(logging.INFO, logger="dicom_node")
    node_port = free_port()
    with Orthanc(
        tmp_path / "orthanc", modalities={"ainode": ["AINODE", LOCALHOST, node_port]}
    ) as pacs:
        settings = node_settings(
            tmp_path / "var",
            node={"port": node_port},
            destinations=pacs_destination(pacs, storage_commitment=True),
            routes=[ROUTE],
        )
        ge = ge_datasets()
        with running_node(settings) as node:
            assert send(node, ge) == [0, 0, 0]
            (job,) = finished_job(node, JobState.DONE)  # type: ignore[misc]
            (delivery,) = node.journal.job_deliveries(job.id)
        study_uid = str(ge[0].StudyInstanceUID)
        segs = pacs.find_instances_by_modality(study_uid, "SEG")
        srs = pacs.find_instances_by_modality(study_uid, "SR")
        orthanc_log = pacs.log_tail(400)
    assert [s["MainDicomTags"]["SOPInstanceUID"] for s in segs] == [job.seg_sop_uid]
    assert [s["MainDicomTags"]["SOPInstanceUID"] for s in srs] == [job.sr_sop_uid]
    uid = delivery.commit_transaction_uid
    assert delivery.state == DeliveryState.SENT and delivery.attempts == 1
    assert uid and delivery.committed_at is not None and delivery.last_error is None
    assert f"storage commitment of 2 objects requested from pacs (transaction {uid})" in caplog.text
    assert f"pacs confirmed storage commitment of every object (transaction {uid})" in caplog.text
    assert f"storage commitment transaction: {uid} (2 successes, 0 failures)" in orthanc_log


def test_failure_report_is_retried_until_confirmed(tmp_path: Path) -> None:
    with node_with_fake_pacs(tmp_path, ["fail", "ok"]) as (node, fake):
        assert send(node, ge_datasets()) == [0, 0, 0]
        (job,) = finished_job(node, JobState.DONE)  # type: ignore[misc]
        (delivery,) = node.journal.job_deliveries(job.id)
    assert delivery.state == DeliveryState.SENT and delivery.attempts == 2
    assert fake.report_statuses == [0x0000, 0x0000]
    first, second = fake.actions
    assert first.TransactionUID != second.TransactionUID == delivery.commit_transaction_uid
    for action in (first, second):  # same objects, same UIDs, every attempt
        refs = {str(r.ReferencedSOPInstanceUID) for r in action.ReferencedSOPSequence}
        assert refs == {job.seg_sop_uid, job.sr_sop_uid}
    assert sorted(fake.stored) == sorted([job.seg_sop_uid, job.sr_sop_uid] * 2)


def test_a_commitment_never_reported_is_dead_lettered(tmp_path: Path) -> None:
    with node_with_fake_pacs(tmp_path, [None, None]) as (node, fake):
        assert send(node, ge_datasets()) == [0, 0, 0]
        (job,) = finished_job(node, JobState.DEAD_LETTER)  # type: ignore[misc]
        (delivery,) = node.journal.job_deliveries(job.id)
    assert delivery.state == DeliveryState.DEAD and delivery.attempts == 2
    assert len(fake.actions) == 2 and delivery.committed_at is None
    assert delivery.last_error == (
        "no storage commitment report from FAKEPACS within 1 s"
        f" (transaction {fake.actions[1].TransactionUID})"
    )
