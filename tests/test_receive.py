"""The Storage SCP against real SCUs: pynetdicom and dcmtk's storescu; bad input; disk full."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from nodes import NodeProcess, child_pids, echo_ok, node_settings, partial_files, running_node
from peers import (
    GE_3SLICE,
    LOCALHOST,
    PHILIPS_L,
    patch_siemens_copy,
    require_tools,
    storescu,
    wait_until,
)
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from dicom_node.app import Node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running_node(node_settings(tmp_path / "var")) as running:
        yield running


def _port(node: Node) -> int:
    return node.receiver.address[1]


@contextlib.contextmanager
def association(node: Node, calling: str = "TESTSCU", syntaxes: list[str] | None = None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(
            sop_class, syntaxes or [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
        )
    assoc = ae.associate(LOCALHOST, _port(node), ae_title="AINODE")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def _stored_files(node: Node) -> list[Path]:
    return sorted(node.spool.instances.glob("*/*.dcm"))


def test_pynetdicom_store_keeps_the_dataset_as_received(node: Node) -> None:
    originals = sorted(GE_3SLICE.glob("*.dcm"))
    with association(node) as assoc:
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in originals]
    assert statuses == [0, 0, 0]
    assert node.journal.state_counts()["instances"]["total"] == 3
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in _stored_files(node)}
    for original in originals:
        ds = pydicom.dcmread(original)
        copy = pydicom.dcmread(stored[ds.SOPInstanceUID])
        # negotiated: explicit VR preferred over the implicit VR of the source files
        assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert copy.PixelData == ds.PixelData
        assert copy.PatientPosition == "FFS"
    # paths are our own ids, never a received UID
    assert not any(uid in str(path) for uid in stored for path in _stored_files(node))


def test_repeated_sop_instance_is_stored_once_and_acknowledged(node: Node) -> None:
    ds = pydicom.dcmread(sorted(GE_3SLICE.glob("*.dcm"))[0])
    with association(node) as assoc:
        assert assoc.send_c_store(ds).Status == 0
        assert assoc.send_c_store(ds).Status == 0
    assert node.journal.state_counts()["instances"]["total"] == 1
    assert len(_stored_files(node)) == 1


def _raw_file(path: Path, sop_class: str, sop_uid: str, body: bytes) -> Path:
    """A Part 10 file with a valid file meta and an arbitrary dataset body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)
    return path


def _implicit_body(ds: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.fixture
def send_raw_files(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom sends a file's bytes without decoding them only in this mode
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.usefixtures("send_raw_files")
def test_bad_input_is_refused_with_matching_status(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = pydicom.dcmread(sorted(GE_3SLICE.glob("*.dcm"))[0])
    uid = generate_uid()
    garbage = _raw_file(tmp_path / "garbage.dcm", CTImageStorage, uid, os.urandom(4096))
    mr = copy.deepcopy(good)
    mr.SOPClassUID = MRImageStorage
    mismatch = _raw_file(
        tmp_path / "mismatch.dcm", CTImageStorage, good.SOPInstanceUID, _implicit_body(mr)
    )
    no_study = copy.deepcopy(good)
    del no_study.StudyInstanceUID
    missing = _raw_file(
        tmp_path / "missing.dcm", CTImageStorage, good.SOPInstanceUID, _implicit_body(no_study)
    )
    other_uid = _raw_file(tmp_path / "uid.dcm", CTImageStorage, uid, _implicit_body(good))
    with association(node, syntaxes=[ImplicitVRLittleEndian]) as assoc:
        garbage_status = assoc.send_c_store(garbage).Status
        mismatch_status = assoc.send_c_store(mismatch).Status
        missing_status = assoc.send_c_store(missing).Status
        uid_status = assoc.send_c_store(other_uid).Status
    assert garbage_status & 0xF000 == 0xC000, hex(garbage_status)
    assert mismatch_status == 0xA900
    assert missing_status & 0xF000 == 0xC000, hex(missing_status)
    assert uid_status == 0xA900
    assert node.journal.state_counts()["instances"]["total"] == 0
    assert _stored_files(node) == [] and partial_files(node.spool.tmp) == []
    assert "StudyInstanceUID is missing" in caplog.text
    patient = str(good.PatientName)
    assert patient and patient not in caplog.text and str(good.PatientID) not in caplog.text
    assert echo_ok(_port(node))  # still serving


def test_unknown_calling_ae_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path / "var", node={"allowed_calling_aets": ["SCANNER1"]})
    with running_node(settings) as node, caplog.at_level("WARNING", logger="dicom_node"):
        assert not echo_ok(_port(node), calling="INTRUDER")
        assert not echo_ok(_port(node), ae_title="WRONG", calling="SCANNER1")
        assert echo_ok(_port(node), calling="SCANNER1")
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert [line.split(" rejected: ")[1] for line in rejected] == [
        "calling AE title not in node.allowed_calling_aets",
        "called AE title 'WRONG' is not node.ae_title 'AINODE' (node.check_called_aet)",
    ], rejected


def test_compressed_transfer_syntax_is_stored_as_received(node: Node, tmp_path: Path) -> None:
    files = patch_siemens_copy(tmp_path / "j2k")
    syntax = str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID)
    assert syntax == "1.2.840.10008.1.2.4.90"
    with association(node, syntaxes=[syntax]) as assoc:
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in files[:5]]
    assert statuses == [0] * 5
    stored = _stored_files(node)
    assert len(stored) == 5
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in stored} == {syntax}


def test_storescu_sends_a_series(node: Node) -> None:
    require_tools("storescu")
    files = sorted(PHILIPS_L.glob("*.dcm"))
    result = storescu(LOCALHOST, _port(node), "AINODE", files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.journal.state_counts()["instances"]["total"] == len(files) == 64
    assert len(_stored_files(node)) == 64


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


def test_disk_full_answers_out_of_resources_and_leaves_no_partial_file(tmp_path: Path) -> None:
    storage = tmp_path / "small"
    if not _mount_tmpfs(storage, "4m"):
        pytest.skip("needs root and tmpfs to make a genuinely full file system")
    try:
        with running_node(node_settings(storage / "var")) as node:
            files = sorted(PHILIPS_L.glob("*.dcm"))
            filler = storage / "filler"
            with open(filler, "wb", buffering=0) as handle:  # fill it to the last block
                with contextlib.suppress(OSError):
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
            with association(node) as assoc:
                status = assoc.send_c_store(pydicom.dcmread(files[0])).Status
            assert status == 0xA700
            assert _stored_files(node) == [] and partial_files(node.spool.tmp) == []
            filler.unlink()  # space again: the same instance is accepted
            with association(node) as assoc:
                assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
            assert len(_stored_files(node)) == 1
    finally:
        subprocess.run(["umount", "-l", str(storage)], check=False)


def test_negotiation_prefers_explicit_vr_and_accepts_every_storage_class(node: Node) -> None:
    from pynetdicom.sop_class import ParametricMapStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="TESTSCU")
    offered = ["1.2.840.10008.1.2.4.90", ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae.add_requested_context(CTImageStorage, offered)
    ae.add_requested_context(ParametricMapStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(LOCALHOST, _port(node), ae_title="AINODE")
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert accepted == {
        CTImageStorage: ExplicitVRLittleEndian,
        ParametricMapStorage: ExplicitVRLittleEndian,
    }


def test_free_space_watermark_refuses_before_the_disk_is_full_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = tmp_path / "small"
    if not _mount_tmpfs(storage, "16m"):
        pytest.skip("needs root and tmpfs to make a genuinely small file system")
    try:
        settings = node_settings(storage / "var")
        settings["storage"]["min_free_bytes"] = 8 * 2**20
        with running_node(settings) as node:
            files = [pydicom.dcmread(p) for p in sorted(PHILIPS_L.glob("*.dcm"))[:40]]
            with association(node) as assoc:
                statuses = [int(assoc.send_c_store(ds).Status) for ds in files]
            accepted = statuses.index(0xA700)
            assert 0 < accepted and set(statuses[:accepted]) == {0}
            assert set(statuses[accepted:]) == {0xA700}  # refused while space is low
            assert "below storage.min_free_bytes" in caplog.text
            free = shutil.disk_usage(storage).free
            assert free >= 4 * 2**20  # refused well before the disk was full
            assert len(_stored_files(node)) == accepted
            for path in _stored_files(node)[: accepted // 2]:  # an operator makes room
                path.unlink()
            started = time.monotonic()
            with association(node) as assoc:
                assert int(assoc.send_c_store(files[accepted]).Status) == 0
            recovered = time.monotonic() - started
            assert recovered < 5, recovered  # by itself, on the next instance
            print(f"accepted again {recovered * 1000:.0f} ms after space returned")
            assert "accepting again" in caplog.text
    finally:
        subprocess.run(["umount", "-l", str(storage)], check=False)


@pytest.mark.parametrize("fast_path", [True, False], ids=["wire", "pynetdicom"])
@pytest.mark.parametrize(
    "conflict",
    ["series of another study", "study of another patient", "instance of another patient"],
)
def test_a_uid_held_for_another_study_or_patient_is_refused(
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    conflict: str,
    fast_path: bool,
) -> None:
    """ "instance of another patient": a resend under the same UIDs with the Patient ID
    corrected was acknowledged as a resend, and the correction dropped unseen."""
    from dicom_node import store_scp_wire

    monkeypatch.setattr(store_scp_wire, "ENABLED", fast_path)
    first = pydicom.dcmread(sorted(GE_3SLICE.glob("*.dcm"))[0])
    other = copy.deepcopy(first)
    if conflict == "series of another study":
        other.StudyInstanceUID = generate_uid()  # the series UID stays
    else:
        other.PatientID = f"{first.PatientID}-OTHER"  # the study UID stays
    if conflict == "study of another patient":
        other.SeriesInstanceUID = generate_uid()
    if conflict != "instance of another patient":
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    caplog.set_level("WARNING", logger="dicom_node")
    with association(node) as assoc:
        assert assoc.send_c_store(first).Status == 0
        refusal = assoc.send_c_store(other)
        assert refusal.Status == 0xA900
        assert assoc.send_c_store(first).Status == 0  # the same patient again: a resend
    # what the modality's operator sees (storescu showed "Data Set does not match SOP Class")
    expected = {
        "series of another study": "SeriesInstanceUID already belongs to another study",
        "study of another patient": (
            "StudyInstanceUID already belongs to another patient (PatientID)"
        ),
        "instance of another patient": "SOP Instance UID already stored for another patient...",
    }[conflict]
    assert refusal.ErrorComment == expected
    assert node.journal.state_counts()["instances"]["total"] == 1
    (stored,) = _stored_files(node)
    assert pydicom.dcmread(stored).PatientID == first.PatientID
    refused = [r.getMessage() for r in caplog.records if "(status 0xA900)" in r.getMessage()]
    assert len(refused) == 1 and "another" in refused[0], refused
    assert str(first.PatientID) not in caplog.text


def test_a_request_for_another_sop_class_than_its_context_is_refused(node: Node) -> None:
    """An MR instance sent on the context accepted for CT Image Storage: the fast path
    leaves it to pynetdicom, whose handler stored it; the node refuses it there too."""
    import pdus
    from pynetdicom.sop_class import MRImageStorage as MR  # type: ignore[attr-defined]

    source = sorted(GE_3SLICE.glob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    sop = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = MR, sop
    dataset = pdus.encode(ds, True, True)
    assert dataset is not None
    message = pdus.p_data(
        (pdus.STORE_CONTEXT, pdus.COMMAND_LAST, pdus.command(0x0001, MR, sop, True))
    ) + pdus.p_data((pdus.STORE_CONTEXT, pdus.DATASET_LAST, dataset))
    with pdus.raw_association(_port(node)) as (sock, _):
        assert pdus.raw_store(sock, message) == 0xA900
    assert node.journal.state_counts()["instances"]["total"] == 0
    assert not _stored_files(node)


@pytest.mark.parametrize("fast_path", [True, False], ids=["wire", "pynetdicom"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_file_meta_elements_sent_in_the_dataset_are_left_out_of_the_file(
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    syntax: str,
    fast_path: bool,
) -> None:
    """A sender that sends a Part 10 file minus its preamble puts its group 0002 in the
    dataset. Stored behind the node's own File Meta Information, the file had two meta
    groups, and a reader took the sender's transfer syntax for the file's."""
    import pdus

    from dicom_node import store_scp_wire

    monkeypatch.setattr(store_scp_wire, "ENABLED", fast_path)
    source = sorted(GE_3SLICE.glob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    dataset = pdus.encode(ds, syntax == ImplicitVRLittleEndian, True)
    assert dataset is not None
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        CTImageStorage,
        ds.SOPInstanceUID,
    )
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"  # JPEG Lossless: not what it is
    meta.ImplementationClassUID = "1.2.3.4"
    sent_meta = DicomBytesIO()
    sent_meta.is_little_endian, sent_meta.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(sent_meta, meta, enforce_standard=True)
    message = pdus.c_store_rq(str(ds.SOPInstanceUID), sent_meta.getvalue() + dataset)
    caplog.set_level("WARNING", logger="dicom_node")
    rq = pdus.associate_rq(calling="SCANNER", store_syntaxes=(syntax,))
    with pdus.raw_association(_port(node), rq) as (sock, _):
        assert pdus.raw_store(sock, message) == 0
        assert pdus.raw_store(sock, message) == 0  # a resend: acknowledged again
    (stored,) = _stored_files(node)
    written = pydicom.dcmread(stored)
    assert written.file_meta.TransferSyntaxUID == syntax
    assert written.file_meta.ImplementationClassUID != "1.2.3.4"
    assert not [element for element in written if element.tag.group == 0x0002]
    assert stored.read_bytes().endswith(dataset)  # the rest exactly as received
    assert len(stored.read_bytes()) == 132 + len(_meta_bytes(stored)) + len(dataset)
    noted = [r.getMessage() for r in caplog.records if "group 0002" in r.getMessage()]
    assert len(noted) == 1 and "from SCANNER" in noted[0], noted


def _meta_bytes(path: Path) -> bytes:
    """The File Meta Information elements of a Part 10 file, as written."""
    data = path.read_bytes()
    (length,) = struct.unpack_from("<L", data, 132 + 8)
    return data[132 : 132 + 12 + length]


def _serve_failing_start(
    settings: dict[str, Any], config: Path
) -> subprocess.CompletedProcess[str]:
    """``serve`` with ``settings`` written to ``config``; it must fail to start (exit 1)."""
    config.write_text(yaml.safe_dump(settings))
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    return done


def test_a_port_in_use_is_named_by_its_key(tmp_path: Path) -> None:
    """``[Errno 98] Address already in use`` did not tell the DICOM port from the web one."""
    with socket.socket() as held:
        held.bind((LOCALHOST, 0))
        held.listen()
        busy = held.getsockname()[1]
        for section in ("node", "web"):
            settings = node_settings(tmp_path / section)
            settings[section]["port"] = busy
            done = _serve_failing_start(settings, tmp_path / f"{section}.yaml")
            assert f"cannot start: {section}.port: {LOCALHOST}:{busy} is already in use" in (
                done.stderr
            ), done.stderr


def test_storage_and_audit_paths_that_cannot_be_made_are_named_by_their_keys(
    tmp_path: Path,
) -> None:
    """ "cannot start: [Errno 13] Permission denied: '…/instances'" named no setting. (A
    path below a regular file: as root, permissions would not stop the node.)"""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = {
        "storage.path": node_settings(blocker / "var"),
        "audit.path": {**node_settings(tmp_path / "var"), "audit": {"path": str(blocker / "a")}},
    }
    for key, settings in cases.items():
        done = _serve_failing_start(settings, tmp_path / "node.yaml")
        assert f"cannot start: {key}: cannot create {blocker}" in done.stderr, done.stderr
        assert "(the node runs as uid" in done.stderr


def test_sighup_stops_the_node_cleanly(tmp_path: Path) -> None:
    """A closed terminal (SIGHUP) stops ``serve`` as SIGTERM does: logged, exit 0."""
    node = NodeProcess(node_settings(tmp_path / "var"), tmp_path / "node").start()
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    assert node.proc.wait(60) == 0
    assert "received SIGHUP" in node.log()


def test_a_second_sigint_during_the_drain_stops_at_once(tmp_path: Path) -> None:
    """Ctrl-C twice: the second one ends a drain that an open association holds,
    receiving processes included, instead of being ignored for node.drain_seconds."""
    settings = node_settings(tmp_path / "var", node={"receive_processes": 2, "drain_seconds": 120})
    node = NodeProcess(settings, tmp_path / "node").start()
    assert node.proc is not None
    children = child_pids(node.proc.pid)
    assert len(children) == 1
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    held = ae.associate(LOCALHOST, node.port, ae_title="AINODE")
    try:
        assert held.is_established
        node.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "draining" in node.log(), 10, 0.1, "the drain to begin")
        time.sleep(0.5)
        assert node.proc.poll() is None  # draining: the association is still open
        started = time.monotonic()
        node.proc.send_signal(signal.SIGINT)
        assert node.proc.wait(10) == 1
        assert time.monotonic() - started < 5
    finally:
        held.abort()
    assert "received SIGINT again: stopping at once" in node.log()
    wait_until(lambda: not Path(f"/proc/{children[0]}").exists(), 10, 0.1, "the child to end")


def test_a_second_node_on_the_same_storage_refuses_to_start(tmp_path: Path) -> None:
    """Two nodes on one storage.path would share the journal, run the same studies' jobs
    and deliveries, and clear each other's tmp/: the second one stops before any of it."""
    from dicom_node.app import build_node
    from dicom_node.config import parse_config
    from dicom_node.store import NameInUse

    storage = tmp_path / "var"
    first = NodeProcess(node_settings(storage), tmp_path / "first").start()
    try:
        second = parse_config(node_settings(storage))  # its own ports
        with pytest.raises(
            NameInUse,
            match=rf"storage.path {storage} is in use by another"
            rf" dicom-node \(pid {first.proc.pid}\)",
        ):  # type: ignore[union-attr]
            build_node(second)
    finally:
        assert first.stop() == 0
    build_node(second).stop()  # free again once the first has stopped


def test_serve_drains_for_node_drain_seconds_then_aborts_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM: an association that never ends keeps ``serve`` no longer than
    ``node.drain_seconds``; then it is aborted and the node exits 0."""
    settings = node_settings(tmp_path / "var", node={"drain_seconds": 2})
    node = NodeProcess(settings, tmp_path / "node").start()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 120  # an idle peer that never releases
    assoc = ae.associate(LOCALHOST, node.port, ae_title="AINODE")
    try:
        assert assoc.is_established
        stopped = time.monotonic()
        assert node.stop(timeout=30) == 0
        assert 1.5 < time.monotonic() - stopped < 12
        assert "draining (at most 2 s)" in node.log()
        wait_until(lambda: not assoc.is_established, 10, what="the association aborted")
    finally:
        if assoc.is_established:
            assoc.abort()


def test_stop_lets_an_association_in_progress_finish(tmp_path: Path) -> None:
    files = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    with running_node(node_settings(tmp_path / "var")) as node:
        port = _port(node)
        with association(node) as assoc:
            assert assoc.send_c_store(files[0]).Status == 0
            stopping = threading.Thread(target=node.receiver.stop, args=(20,))
            stopping.start()
            wait_until(lambda: not node.receiver.running, 5, 0.01, "the listener to close")
            # the open association is still served while the node drains
            assert [assoc.send_c_store(ds).Status for ds in files[1:]] == [0, 0]
        stopping.join(20)
        assert not stopping.is_alive()
        assert node.journal.state_counts()["instances"]["total"] == 3
        assert not echo_ok(port)  # no new associations


@pytest.mark.parametrize("busy", [False, True])
def test_the_header_is_read_on_another_thread_while_the_file_is_synced(
    node: Node, monkeypatch: pytest.MonkeyPatch, busy: bool
) -> None:
    """Receiver._store: the header scan and the duplicate look-up run while the storing
    thread is in fsync, not before the write; the file takes its name after both.
    While another instance is being stored (``busy``), they run first, on the storing
    thread: no core is idle to overlap with."""
    from dicom_node import receive, store

    events: list[tuple[str, str]] = []
    scanned = threading.Event()
    real_scan, real_write, real_fsync = receive.received_header, store._write_all, os.fsync

    def scan(*args: object, **kwargs: object) -> object:
        events.append(("scan", threading.current_thread().name))
        scanned.set()
        return real_scan(*args, **kwargs)  # type: ignore[arg-type]

    written: list[int] = []

    def write_all(fd: int, pieces: list[object]) -> None:
        events.append(("write", threading.current_thread().name))
        real_write(fd, pieces)  # type: ignore[arg-type]
        written.append(fd)

    def fsync(fd: int) -> None:
        if written and written[-1] == fd:  # the instance file's fsync
            written.clear()
            assert scanned.wait(10), "no header scan while the file was synced"
            events.append(("synced", threading.current_thread().name))
        real_fsync(fd)

    monkeypatch.setattr(receive, "received_header", scan)
    monkeypatch.setattr(store, "_write_all", write_all)
    monkeypatch.setattr(os, "fsync", fsync)
    ds = pydicom.dcmread(sorted(GE_3SLICE.glob("*.dcm"))[0])
    with association(node) as assoc, node.receiver._storing if busy else contextlib.nullcontext():
        assert assoc.send_c_store(ds).Status == 0
    if busy:
        assert [name for name, _ in events] == ["scan", "write", "synced"]
        (_, scanning), (_, storing), _ = events
        assert scanning == storing
    else:
        assert [name for name, _ in events] == ["write", "scan", "synced"]
        (_, storing), (_, scanning), _ = events
        assert scanning != storing
    assert node.journal.state_counts()["instances"]["total"] == 1


@pytest.mark.usefixtures("send_raw_files")
def test_a_refusal_or_a_resend_wins_over_low_space_and_leaves_no_file(
    node: Node, tmp_path: Path
) -> None:
    """With the header read alongside the write, the statuses stay those of a header
    read first: a resend is acknowledged and a mismatch refused even when the space is
    low; neither leaves a file."""
    good = pydicom.dcmread(sorted(GE_3SLICE.glob("*.dcm"))[0])
    mr = copy.deepcopy(good)
    mr.SOPClassUID = MRImageStorage
    mismatch = _raw_file(
        tmp_path / "mismatch.dcm", CTImageStorage, generate_uid(), _implicit_body(mr)
    )
    with association(node, syntaxes=[ImplicitVRLittleEndian]) as assoc:
        assert assoc.send_c_store(good).Status == 0
        assert assoc.send_c_store(good).Status == 0  # a resend, space as it is
        node.spool.min_free_bytes = 2**62  # from now on the space is low
        assert assoc.send_c_store(good).Status == 0
        assert assoc.send_c_store(mismatch).Status == 0xA900
        other = copy.deepcopy(good)
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assert assoc.send_c_store(other).Status == 0xA700  # new and good: no room
    assert node.journal.state_counts()["instances"]["total"] == 1
    assert len(_stored_files(node)) == 1 and partial_files(node.spool.tmp) == []


def test_the_response_does_not_wait_for_the_counters_and_the_audit_record(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.audit import AuditTrail

    answered = threading.Event()
    audited: list[str] = []
    real = AuditTrail.instance_received

    def instance_received(self: AuditTrail, *args: object) -> None:
        answered.wait(10)  # holds the response back for 10 s if it comes first
        audited.append(str(args[2]))
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(AuditTrail, "instance_received", instance_received)
    ds = pydicom.dcmread(sorted(GE_3SLICE.glob("*.dcm"))[0])
    with association(node) as assoc:
        started = time.monotonic()
        assert assoc.send_c_store(ds).Status == 0
        waited = time.monotonic() - started
        answered.set()
    assert waited < 5, waited
    wait_until(lambda: audited == [ds.SOPInstanceUID], 10, what="the audit record")
    samples = {
        sample.name: sample.value
        for metric in node.metrics.registry.collect()
        for sample in metric.samples
        if sample.labels.get("calling_aet") == "TESTSCU"
    }
    assert samples["dicom_node_instances_received_total"] == 1
    assert samples["dicom_node_received_bytes_total"] > len(ds.PixelData)
    registry = node.metrics.registry
    assert registry.get_sample_value("dicom_node_store_seconds_count") == 1
    # the store's own time: not the 10 s the audit record was held back, which came after
    assert 0 < registry.get_sample_value("dicom_node_store_seconds_sum") < waited


def test_the_header_threads_run_the_work_here_once_shut_down() -> None:
    from dicom_node.receive import _Helpers

    helpers = _Helpers(2)
    assert helpers.submit(threading.current_thread).result(10).name.startswith("header")
    failed = helpers.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(10)
    helpers.shutdown()
    assert helpers.submit(threading.current_thread).result(0) is threading.current_thread()
    failed = helpers.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(0)


def test_a_failure_after_the_response_is_logged_and_the_association_goes_on(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dicom_node.audit import AuditTrail

    def broken(self: AuditTrail, *args: object) -> None:
        raise RuntimeError("audit broken")

    monkeypatch.setattr(AuditTrail, "instance_received", broken)
    files = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    with association(node) as assoc:
        assert [assoc.send_c_store(ds).Status for ds in files] == [0, 0, 0]
    assert node.journal.state_counts()["instances"]["total"] == 3
    assert caplog.text.count("after the response to a C-STORE from TESTSCU") == 3


def test_a_running_node_checks_uids_quickly_and_binds_no_unheard_event_logging(
    node: Node,
) -> None:
    """pynetdicom's costly defaults for each association (a pydicom UID built again for
    each of its some 700 UIDs; its standard handlers formatting every PDU for a logger
    at WARNING) are replaced once the node runs; associations still work."""
    from pynetdicom import _config

    from dicom_node.header import pynetdicom_uid_check

    assert _config.VALIDATORS["UI"] is pynetdicom_uid_check
    assert _config.LOG_HANDLER_LEVEL == "none"
    assert echo_ok(_port(node))


def test_a_storage_commitment_request_to_the_node_is_refused_cleanly(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Orthanc asked for commitment after a store: the node accepted the Push Model
    context (it must, for the reports of the peers it asks) and pynetdicom answered the
    N-ACTION with 0x0110 after logging a NotImplementedError traceback at ERROR."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StorageCommitmentPushModel,
        Verification,
    )

    caplog.set_level("WARNING")
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCALHOST, _port(node), ae_title="AINODE")
    assert assoc.is_established
    try:
        request = Dataset()
        request.TransactionUID = generate_uid()
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
        request.ReferencedSOPSequence = [item]
        status, reply = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        assert status.Status == 0x0110 and reply is None
        assert status.ErrorComment == "not a storage commitment SCP"
        assert assoc.send_c_echo().Status == 0  # the association goes on
    finally:
        assoc.release()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "N-ACTION (a storage commitment request) from ORTHANC refused" in caplog.text


def test_an_association_for_services_the_node_does_not_offer_says_so(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """findscu, movescu or a private SOP class: every context rejected, and the log said
    only that the peer closed the connection and that the association was aborted."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
    )

    caplog.set_level("WARNING", logger="dicom_node")
    ae = AE(ae_title="QR1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context("1.2.826.0.1.3680043.8.498.77")  # a private SOP class
    assoc = ae.associate(LOCALHOST, _port(node), ae_title="AINODE")
    if assoc.is_established:
        assoc.abort()
    wait_until(lambda: "proposed nothing" in caplog.text, 5, 0.05, "the warning")
    (line,) = [r.getMessage() for r in caplog.records if "proposed nothing" in r.getMessage()]
    assert line.startswith("association from QR1 proposed nothing the node serves (")
    assert "Study Root Query/Retrieve Information Model - FIND" in line
    assert "SOP class 1.2.826.0.1.3680043.8.498.77" in line


def test_a_journal_removed_while_the_node_runs_stops_the_acknowledgements(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node acknowledged into the deleted file, /healthz said ok, and after a restart
    the study's results went out a second time under new UIDs."""
    import urllib.error
    import urllib.request

    files = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    caplog.set_level("WARNING", logger="dicom_node")
    with running_node(node_settings(tmp_path / "var")) as node:
        host, port = node.web.address  # type: ignore[union-attr]
        health = f"http://{host}:{port}/healthz"
        with association(node) as assoc:
            assert assoc.send_c_store(files[0]).Status == 0
        for path in (tmp_path / "var").glob("journal.sqlite*"):
            path.unlink()
        with association(node) as assoc:
            refused = [assoc.send_c_store(ds) for ds in files[1:]]
        assert [int(r.Status) for r in refused] == [0xA700, 0xA700]
        assert refused[0].ErrorComment == "the journal was removed or replaced; restart the node"
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(health, timeout=5)
        assert unhealthy.value.code == 503
        assert len(_stored_files(node)) == 1  # the refused ones left no file
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([e for e in errors if "was removed or replaced while the node runs" in e]) == 1
