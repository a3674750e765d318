"""Delivery: retry with backoff until the peer is up, dead letter after the limit."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from peers import GE_3SLICE, LOCALHOST, Storescp, free_port, require_tools
from test_assemble import Clock, Harness

from dicom_node.commit import Commitments
from dicom_node.config import SendingSection
from dicom_node.domain import DeliveryState, JobState
from dicom_node.journal import DeliverySpec
from dicom_node.send import Sender
from dicom_node.web.metrics import Metrics


def job_with_results(harness: Harness, port: int, kinds: Sequence[str] = ("seg", "sr")) -> int:
    """A job whose result stand-ins are on disk, with one delivery: real CT files given
    the job's SEG and SR SOP Instance UIDs. ``kinds=("sr",)``: a classifier's job."""
    job = harness.claimed_job()
    sources = dict(zip(("seg", "sr"), sorted(GE_3SLICE.glob("*.dcm")), strict=False))
    uids = {"seg": job.seg_sop_uid, "sr": job.sr_sop_uid}
    for kind in kinds:
        stand_in = pydicom.dcmread(sources[kind])
        stand_in.SOPInstanceUID = stand_in.file_meta.MediaStorageSOPInstanceUID = uids[kind]
        target = harness.spool.path(harness.spool.result_relpath(job.id, kind))
        target.parent.mkdir(parents=True, exist_ok=True)
        stand_in.save_as(target, enforce_file_format=True)
    harness.journal.job_analysed(
        job.id, [DeliverySpec("pacs", "STORESCP", LOCALHOST, port)], harness.clock.now
    )
    return int(job.id)


def make_sender(
    harness: Harness,
    max_attempts: int,
    timeout: float = 5,
    commitments: Commitments | None = None,
    shared_journal: bool = False,
) -> Sender:
    settings = SendingSection(
        max_attempts=max_attempts,
        backoff_initial_seconds=2,
        backoff_max_seconds=10,
        timeout_seconds=timeout,
    )
    return Sender(
        harness.journal,
        harness.spool,
        Metrics(),
        "AINODE",
        settings,
        harness.clock,
        rng=random.Random(7),
        commitments=commitments,
        shared_journal=shared_journal,
    )


def test_retries_with_backoff_until_the_peer_answers(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu")
    harness = Harness(tmp_path / "var", Clock())
    port = free_port()
    job_id = job_with_results(harness, port)
    sender = make_sender(harness, max_attempts=5)
    assert sender.send_due() == 1  # nobody listens yet
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.PENDING and delivery.attempts == 1
    first_delay = delivery.next_attempt_at - harness.clock.now
    assert 1.0 <= first_delay <= 2.0  # initial 2 s, equal jitter
    assert sender.send_due() == 0  # not due yet
    harness.clock.now = delivery.next_attempt_at
    assert sender.send_due() == 1
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert 2.0 <= delivery.next_attempt_at - harness.clock.now <= 4.0  # doubled
    assert "not established" in delivery.last_error
    with Storescp(tmp_path / "scp", port=port) as scp:
        harness.clock.now = delivery.next_attempt_at
        assert sender.send_due() == 1
        received = scp.wait_for_files(2)
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.SENT and delivery.attempts == 3
    assert harness.journal.job(job_id).state == JobState.DONE
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in received}
    job = harness.journal.job(job_id)
    assert sent == {job.seg_sop_uid, job.sr_sop_uid}


def test_a_job_without_a_seg_sends_its_sr_alone(tmp_path: Path) -> None:
    """A classifier package's job: the worker wrote sr.dcm only."""
    require_tools("storescp", "echoscu")
    harness = Harness(tmp_path / "var", Clock())
    with Storescp(tmp_path / "scp") as scp:
        job_id = job_with_results(harness, scp.port, kinds=("sr",))
        assert make_sender(harness, max_attempts=2).send_due() == 1
        (delivery,) = harness.journal.job_deliveries(job_id)
        received = scp.wait_for_files(1)
    assert delivery.state == DeliveryState.SENT and delivery.last_error is None
    assert [pydicom.dcmread(p).SOPInstanceUID for p in received] == [
        harness.journal.job(job_id).sr_sop_uid
    ]


def test_a_missing_sr_is_a_failed_attempt_not_a_partial_send(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "var", Clock())
    job_id = job_with_results(harness, free_port(), kinds=("seg",))
    assert make_sender(harness, max_attempts=2).send_due() == 1
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.PENDING and delivery.attempts == 1
    assert (
        delivery.last_error
        == f"job {job_id}: result results/{job_id}/sr.dcm is missing from the spool"
    )


def test_a_segmenting_job_whose_seg_is_lost_sends_nothing(tmp_path: Path) -> None:
    """The SR's evidence names a SEG that is not in the spool: sending the SR alone would
    leave the destination with a report about a segmentation it never receives."""
    from pydicom.dataset import Dataset

    harness = Harness(tmp_path / "var", Clock())
    job_id = job_with_results(harness, free_port(), kinds=("sr",))
    sr_path = harness.spool.path(harness.spool.result_relpath(job_id, "sr"))
    sr = pydicom.dcmread(sr_path)
    instance, series, study = Dataset(), Dataset(), Dataset()
    instance.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    instance.ReferencedSOPInstanceUID = harness.journal.job(job_id).seg_sop_uid
    series.ReferencedSOPSequence = [instance]
    study.ReferencedSeriesSequence = [series]
    sr.CurrentRequestedProcedureEvidenceSequence = [study]
    sr.save_as(sr_path, enforce_file_format=True)
    assert make_sender(harness, max_attempts=2).send_due() == 1
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.PENDING and delivery.attempts == 1
    assert delivery.last_error == (
        f"job {job_id}: the SR refers to a SEG that is missing from the spool"
    )


def test_dead_letter_after_the_attempt_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness = Harness(tmp_path / "var", Clock())
    job_id = job_with_results(harness, free_port())
    sender = make_sender(harness, max_attempts=3)
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        harness.clock.now += 60
        assert sender.send_due() == 1
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.DEAD and delivery.attempts == 3
    assert harness.journal.job(job_id).state == JobState.DEAD_LETTER
    assert "DEAD LETTER for pacs after 3 attempts" in caplog.text
    harness.clock.now += 3600
    assert sender.send_due() == 0  # dead deliveries are not retried


def test_a_response_taken_by_the_reactor_goes_back_to_the_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pynetdicom race worked around in send.keep_responses_for_the_requestor."""
    require_tools("storescp", "echoscu")
    from pynetdicom import AE as PlainAE
    from pynetdicom.dimse_primitives import C_STORE
    from requestors import ORIGINAL_ASSOCIATE

    # the tests' own copy of the workaround is off: this checks the node's
    monkeypatch.setattr(PlainAE, "associate", ORIGINAL_ASSOCIATE)
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from dicom_node.send import Peer, associate

    with Storescp(tmp_path / "scp") as scp:
        peer = Peer(scp.aet, LOCALHOST, scp.port)
        assoc = associate("AINODE", peer, [(CTImageStorage, ["1.2.840.10008.1.2"])], 5)
        try:
            response = C_STORE()
            response.MessageIDBeingRespondedTo = 1
            response.AffectedSOPClassUID = CTImageStorage
            response.Status = 0
            assoc._serve_request(response, 1)  # what the reactor does when it wins the race
            assert assoc.dimse.msg_queue.get(timeout=1) == (1, response)
            assoc._serve_request(response, 1)  # a second time it is dropped, not re-queued
            assert assoc.dimse.msg_queue.empty()
        finally:
            assoc.release()


def test_refusing_and_silent_destinations_are_retried(tmp_path: Path) -> None:
    """A peer that rejects the association, and one that accepts TCP but never answers."""
    import socket
    import threading

    from pynetdicom import AE as PeerAE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    refusing = PeerAE(ae_title="STORESCP")
    refusing.add_supported_context(CTImageStorage)
    refusing.require_calling_aet = ["SOMEONE_ELSE"]
    refusing_port = free_port()
    server = refusing.start_server((LOCALHOST, refusing_port), block=False)
    silent = socket.socket()
    silent.bind((LOCALHOST, 0))
    silent.listen()
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True)
    accepting.start()
    try:
        silent_port = silent.getsockname()[1]
        for port, expected in ((refusing_port, "was rejected"), (silent_port, "not established")):
            harness = Harness(tmp_path / f"var{port}", Clock())
            job_id = job_with_results(harness, port)
            sender = make_sender(harness, max_attempts=5, timeout=1.0)
            assert sender.send_due() == 1
            (delivery,) = harness.journal.job_deliveries(job_id)
            assert delivery.state == DeliveryState.PENDING and delivery.attempts == 1
            assert expected in delivery.last_error
            assert delivery.next_attempt_at > harness.clock.now  # waits in the journal
            assert harness.journal.job(job_id).state == JobState.SENDING
    finally:
        server.shutdown()
        silent.close()
        for sock in held:
            sock.close()


class _Killed(BaseException):
    """The process dies in the middle of an attempt (SIGKILL: nothing is recorded)."""


def test_a_delivery_cut_off_by_a_crash_is_due_again_at_once_after_the_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone, a sender claims nothing: the restarted node sends at once (the chaos test
    waited 240 s for results reserved for 300 s by the process it had killed)."""
    require_tools("storescp", "echoscu")
    harness = Harness(tmp_path / "var", Clock())
    with Storescp(tmp_path / "scp") as scp:
        job_id = job_with_results(harness, scp.port)

        def killed(*_args: object, **_kwargs: object) -> None:
            raise _Killed

        monkeypatch.setattr("dicom_node.send.store_files", killed)
        with pytest.raises(_Killed):
            make_sender(harness, max_attempts=3).send_due()
        (delivery,) = harness.journal.job_deliveries(job_id)
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0
        assert delivery.next_attempt_at <= harness.clock.now  # due, not reserved
        monkeypatch.undo()
        assert make_sender(harness, max_attempts=3).send_due() == 1  # the restarted node
        scp.wait_for_files(2)
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.SENT and delivery.attempts == 1


def test_with_a_shared_journal_a_delivery_is_claimed_before_its_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another receiver's sender must not send it too while this one is at it."""
    harness = Harness(tmp_path / "var", Clock())
    job_id = job_with_results(harness, free_port())

    def killed(*_args: object, **_kwargs: object) -> None:
        raise _Killed

    monkeypatch.setattr("dicom_node.send.store_files", killed)
    with pytest.raises(_Killed):
        make_sender(harness, max_attempts=3, timeout=5, shared_journal=True).send_due()
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.next_attempt_at - harness.clock.now == 300.0  # reserved
    assert make_sender(harness, max_attempts=3, shared_journal=True).send_due() == 0


def test_files_a_peer_takes_no_context_for_are_named_and_the_others_still_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS that does not take Segmentation Storage: pynetdicom logged an ERROR about the
    transfer syntax and raised ValueError, the rest (the SR) was never sent, and
    ``dicom-node send`` printed a traceback. A peer that takes CT in implicit VR only
    cannot get a JPEG 2000 file (compressed data is not transcoded)."""
    from peers import SHARED_REAL, patch_siemens_copy
    from pynetdicom import AE as PeerAE
    from pynetdicom import evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from dicom_node.send import Peer, SendError, store_files

    stored: list[str] = []

    def keep(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    pacs = PeerAE(ae_title="PACS")
    pacs.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2"])  # implicit VR only
    port = free_port()
    server = pacs.start_server(
        (LOCALHOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)]
    )
    seg = sorted((SHARED_REAL / "dcmqi-ct-3slice" / "seg").glob("*.dcm"))[0]
    j2k = patch_siemens_copy(tmp_path / "j2k")[0]
    ct = sorted(GE_3SLICE.glob("*.dcm"))[0]
    caplog.set_level(logging.WARNING)
    try:
        with pytest.raises(SendError) as failed:
            store_files("AINODE", Peer("PACS", LOCALHOST, port), [seg, j2k, ct], timeout=10)
    finally:
        server.shutdown()
    message = str(failed.value)
    assert message.startswith("PACS did not accept 2 of 3 file(s) at association (1 sent)")
    assert f"{seg.name}: no presentation context for Segmentation Storage" in message
    assert "CT Image Storage accepted only in Implicit VR Little Endian, not in" in message
    assert stored == [str(pydicom.dcmread(ct).SOPInstanceUID)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
