"""The receive fast path: Part 10 framing from bytes, event-driven reactors, cheap contexts.

These change how pynetdicom's acceptor waits and copies, not what it says on the wire,
so the checks are about equivalence (same file meta, same contexts, same DIMSE
exchange) and about the races a faster loop exposes.
"""

from __future__ import annotations

import copy
import os
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from nodes import node_settings, running_node
from peers import LOCALHOST, PHILIPS_L, peer_env, require_tools, tool_path
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import NodeSection
from dicom_node.listener import SupportedContexts, _Connection, start_server
from dicom_node.part10 import file_meta_bytes, read_file_meta
from dicom_node.reactor import EventDrivenDUL
from dicom_node.receive import _make_ae

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("instance", "syntax", "aet"),
    [
        ("1.2.3.4", ExplicitVRLittleEndian, "SCANNER"),  # even-length UID, odd AE
        ("1.2.3.45", ImplicitVRLittleEndian, "CT01"),  # odd-length UID: NUL padded
        ("1.2.840.113619.2.55.3.1", "1.2.840.10008.1.2.4.90", ""),  # no AE: element left out
    ],
)
def test_file_meta_from_bytes_reads_back_as_written(instance: str, syntax: str, aet: str) -> None:
    body = pydicom.Dataset()
    body.SOPClassUID = CT
    body.SOPInstanceUID = instance
    raw = DicomBytesIO()
    raw.is_little_endian = True
    raw.is_implicit_VR = syntax == ImplicitVRLittleEndian
    pydicom.filewriter.write_dataset(raw, body)
    stream = file_meta_bytes(CT, instance, syntax, aet) + raw.getvalue()

    ds = pydicom.dcmread(BytesIO(stream))
    meta = ds.file_meta
    assert meta.MediaStorageSOPClassUID == CT
    assert meta.MediaStorageSOPInstanceUID == instance
    assert meta.TransferSyntaxUID == syntax
    assert meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert ("SourceApplicationEntityTitle" in meta) == bool(aet)
    # the group length is right: pydicom found the dataset right after the meta group
    assert ds.SOPInstanceUID == instance
    assert read_file_meta(stream) == read_file_meta(stream[: len(stream) - len(raw.getvalue())])
    assert read_file_meta(stream).source_aet == aet
    assert len(file_meta_bytes(CT, instance, syntax, aet)) % 2 == 0


def test_read_file_meta_refuses_a_stream_without_dicm() -> None:
    with pytest.raises(pydicom.errors.InvalidDicomError):
        read_file_meta(b"\0" * 200)


def test_contexts_copy_is_complete_and_independent() -> None:
    contexts = SupportedContexts(_make_ae(NodeSection(ae_title="A")).supported_contexts)
    twins = copy.deepcopy(contexts)
    assert len(twins) == len(contexts) > 150
    for twin, original in zip(twins, contexts, strict=True):
        assert twin is not original
        assert vars(twin) == vars(original)
        assert twin._transfer_syntax is not original._transfer_syntax
    twins[0].add_transfer_syntax("1.2.3")  # a negotiation that edits its copy...
    assert "1.2.3" not in contexts[0].transfer_syntax  # ...leaves the server's alone


def test_a_connection_whose_threads_have_not_started_is_not_pruned() -> None:
    """verify_request prunes dead connections; an association between attach() and
    start() is not dead (a faster accept loop made that window real: one of four
    concurrent storescu associations was cut off before its A-ASSOCIATE-RQ was read)."""
    assoc = Association(AE(), "acceptor")
    connection = _Connection(sock=_OpenSocket(), source="127.0.0.1", accepted_at=time.monotonic())
    connection.assoc = assoc
    assert connection.alive(grace=30.0)
    connection.accepted_at -= 60.0
    assert not connection.alive(grace=30.0)  # never started, past the grace: gone


class _OpenSocket:
    def fileno(self) -> int:
        return 99


def _server(handler):
    node = NodeSection(ae_title="FAST", port=0, max_associations_per_source=8)
    ae = _make_ae(node)
    server = start_server(ae, node, [(evt.EVT_C_STORE, handler)])
    return server, int(server.server_address[1])


def test_concurrent_storescu_associations_all_succeed(tmp_path: Path) -> None:
    """Four dcmtk storescu at once, three times over: every association is accepted."""
    require_tools("storescu")
    files = sorted(PHILIPS_L.glob("*.dcm"))[:32]
    received: list[str] = []
    lock = threading.Lock()

    def store(event: evt.Event) -> int:
        with lock:
            received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server, port = _server(store)
    try:
        for _ in range(3):
            groups = [files[i::4] for i in range(4)]
            procs = [
                subprocess.Popen(
                    [tool_path("storescu"), "-aec", "FAST", "-R", LOCALHOST, str(port)]
                    + [str(p) for p in group],
                    env=peer_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for group in groups
            ]
            outputs = [proc.communicate(timeout=60)[0] for proc in procs]
            assert [proc.returncode for proc in procs] == [0] * 4, outputs
    finally:
        server.shutdown()
    assert len(received) == 3 * len(files)


def test_reactor_serves_many_messages_and_notices_release_and_abort() -> None:
    """Stores and echoes interleaved on one association, then release; then an abort."""
    stored: list[int] = []
    server, port = _server(lambda event: stored.append(1) or 0x0000)
    ds = pydicom.dcmread(sorted(PHILIPS_L.glob("*.dcm"))[0])
    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(LOCALHOST, port, ae_title="FAST")
        assert assoc.is_established
        statuses = []
        for _ in range(20):
            statuses.append(int(assoc.send_c_store(ds).Status))
            statuses.append(int(assoc.send_c_echo().Status))
        started = time.monotonic()
        assoc.release()
        released_in = time.monotonic() - started
        assert assoc.is_released
        assert statuses == [0] * 40
        assert len(stored) == 20
        assert released_in < 5.0  # the reactor looks at release requests between waits

        aborted = ae.associate(LOCALHOST, port, ae_title="FAST")
        assert aborted.is_established
        aborted.abort()
        assert aborted.is_aborted
        # the server's association threads end: nothing is left behind
        deadline = time.monotonic() + 5
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.active_associations == []
    finally:
        server.shutdown()


def test_node_stores_concurrent_associations_durably(tmp_path: Path) -> None:
    """Through the whole node: 4 pynetdicom senders at once, every file and row present."""
    files = sorted(PHILIPS_L.glob("*.dcm"))[:24]
    datasets = [pydicom.dcmread(p) for p in files]
    with running_node(node_settings(tmp_path / "var")) as node:
        port = node.receiver.address[1]

        def send(group: list[pydicom.Dataset]) -> list[int]:
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage, [str(group[0].file_meta.TransferSyntaxUID)])
            assoc = ae.associate(LOCALHOST, port, ae_title="AINODE")
            assert assoc.is_established
            try:
                return [int(assoc.send_c_store(ds).Status) for ds in group]
            finally:
                assoc.release()

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, [datasets[i::4] for i in range(4)]))
        assert [s for r in results for s in r] == [0] * len(datasets)
        relpaths = node.journal.all_instance_relpaths()
        assert len(relpaths) == len(datasets)
        for relpath in relpaths:
            stored = node.spool.path(relpath).read_bytes()
            meta = read_file_meta(stored)
            assert meta.source_aet == "SCU"
            original = next(
                p for p in files if pydicom.dcmread(p).SOPInstanceUID == meta.sop_instance_uid
            )
            # the dataset bytes are exactly as sent (explicit VR LE both ways here)
            assert stored.endswith(_dataset_bytes(original))


def _dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    offset = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return data[offset:]


def test_a_late_wake_up_never_writes_into_a_reused_descriptor() -> None:
    """kill_dul()/send_pdu() after the DUL ended must not write to its closed pipe's
    descriptor numbers: the kernel hands them to the next socket or pipe opened (the
    fuzz test saw a stray NUL byte arrive on a new association)."""
    dul = EventDrivenDUL(Association(AE(), "acceptor"))
    old = (dul._wake_read, dul._wake_write)
    dul.close_wake_pipe()
    reader, writer = os.pipe()  # most likely the very same two numbers
    try:
        os.set_blocking(reader, False)
        dul.kill_dul()
        dul._wake()
        if (reader, writer) == old or writer == old[1]:
            with pytest.raises(BlockingIOError):
                os.read(reader, 16)
    finally:
        os.close(reader)
        os.close(writer)


def test_garbage_instead_of_an_associate_request_frees_the_slot_at_once() -> None:
    """A peer cut off before its A-ASSOCIATE-RQ used to hold an association slot until
    acse_timeout (30 s here): enough of them and max_associations refuses good peers."""
    node = NodeSection(ae_title="FAST", port=0, idle_timeout_seconds=30)
    server = start_server(_make_ae(node), node, [])
    port = int(server.server_address[1])
    try:
        for _ in range(5):
            with socket.create_connection((LOCALHOST, port), timeout=5) as sock:
                sock.sendall(b"\x01\x00" + struct.pack(">L", 2**31) + b"\0" * 16)
                sock.recv(64)  # A-ABORT, then the close
        deadline = time.monotonic() + 2.0
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.active_associations == []
    finally:
        server.shutdown()
