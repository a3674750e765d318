"""The direct C-STORE data phase (dicom_node.store_wire) against real peers.

Every byte must arrive as stored (dcmtk storescp in bit-preserving mode writes the
dataset exactly as read; pynetdicom's acceptor hands the received bytes to its handler),
for several peer PDU sizes, odd ones included; a failure status is still an error; a
peer that aborts, hangs up or does not answer ends the send at once with SendError and
leaves no association behind; TLS works the same.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from peers import GE_3SLICE, LOCALHOST, PHILIPS_L, Storescp, dicom_files, free_port, require_tools
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE as PeerAE
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from test_tls import Pki, TlsStorescp, pki  # noqa: F401  (pki: the module's PKI fixture)

from dicom_node import store_scu
from dicom_node.file_meta import read_part10
from dicom_node.send import Peer, SendError, associate, store_files
from dicom_node.store_wire import (
    AssociationBroken,
    AssociationEnded,
    DirectStore,
    command_elements,
    direct_store_possible,
    pdata_message,
    store_command,
)

CT = "1.2.840.10008.5.1.4.1.1.2"

# While the TLS storescp starts, pynetdicom's AssociationSocket.connect() drops the socket
# of a refused connection without closing it (as in test_tls.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.3.45", "1.2.840.113619.2.55.3.604688119"])
@pytest.mark.parametrize("message_id", [1, 2, 65535])
def test_the_command_set_is_pynetdicoms(instance: str, message_id: int, tmp_path: Path) -> None:
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = 2
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = instance
    request._dataset_path = (tmp_path / "unused", 0)  # a dataset follows
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    assert store_command(message_id, CT, instance) == encode(message.command_set, True, True)


@pytest.mark.parametrize("max_pdu", [0, 7, 8, 101, 4096, 4099, 16384, 16383])
@pytest.mark.parametrize("dataset_size", [0, 1, 2, 1000, 16378, 16379, 70001])
def test_pdata_pdus_reassemble_to_the_message(max_pdu: int, dataset_size: int) -> None:
    command = store_command(9, CT, "1.2.3.45")
    dataset = bytes(range(256)) * (dataset_size // 256) + bytes(dataset_size % 256)
    stream = pdata_message(5, command, memoryview(dataset), max_pdu)
    fragments: dict[bool, list[bytes]] = {True: [], False: []}
    lasts: list[tuple[bool, bool]] = []
    offset = 0
    while offset < len(stream):
        assert stream[offset] == 0x04
        length = int.from_bytes(stream[offset + 2 : offset + 6], "big")
        assert max_pdu == 0 or length <= max_pdu  # the peer's limit on the PDU's PDV list
        pdu = P_DATA_TF()
        pdu.decode(bytes(stream[offset : offset + 6 + length]))
        (item,) = pdu.presentation_data_value_items
        assert item.context_id == 5
        value = item.data
        is_command, is_last = bool(value[0] & 1), bool(value[0] & 2)
        fragments[is_command].append(value[1:])
        lasts.append((is_command, is_last))
        offset += 6 + length
    assert b"".join(fragments[True]) == command
    assert b"".join(fragments[False]) == dataset
    ends = [last for _, last in lasts]
    assert ends.count(True) == 2 and ends[-1]  # one last command and one last dataset PDV
    assert [c for c, _ in lasts] == sorted((c for c, _ in lasts), reverse=True)  # command first
    if max_pdu:
        assert len(fragments[False]) == max(1, math.ceil(dataset_size / (max_pdu - 6)))


def test_part10_header_agrees_with_pydicom(tmp_path: Path) -> None:
    explicit = tmp_path / "explicit.dcm"
    ds = pydicom.dcmread(dicom_files(GE_3SLICE)[0])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(explicit, enforce_file_format=True)
    for path in [*dicom_files(GE_3SLICE), dicom_files(PHILIPS_L)[0], explicit]:
        data = path.read_bytes()
        meta, offset = split_dataset(path)
        found = read_part10(data)
        assert found is not None
        assert found.sop_class_uid == meta.MediaStorageSOPClassUID
        assert found.sop_instance_uid == meta.MediaStorageSOPInstanceUID
        assert found.transfer_syntax == meta.TransferSyntaxUID
        assert found.dataset_offset == offset
        assert read_part10(data[: offset - 3]) is None  # cut inside the meta group
    assert read_part10(b"\0" * 300) is None  # no DICM
    assert read_part10(b"") is None


# --------------------------------------------------------------------------- real peers


def _no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a file goes through pynetdicom's path instead."""

    def refuse(*args: Any) -> None:
        raise AssertionError("pynetdicom's C-STORE path was used")

    monkeypatch.setattr(store_scu, "_store_one", refuse)


def _dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    meta = read_part10(data)
    assert meta is not None
    return data[meta.dataset_offset :]


def _assert_arrived_intact(sources: list[Path], received: list[Path]) -> None:
    by_uid = {f"CT.{read_part10(p.read_bytes()).sop_instance_uid}": p for p in sources}  # type: ignore[union-attr]
    assert sorted(p.name for p in received) == sorted(by_uid)
    for path in received:
        assert path.read_bytes() == _dataset_bytes(by_uid[path.name]), path.name


@pytest.mark.parametrize("max_pdu", [4096, 16384, 131072])
def test_every_byte_arrives_at_storescp(
    tmp_path: Path, max_pdu: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tools("storescp")
    _no_fallback(monkeypatch)
    files = dicom_files(GE_3SLICE) + dicom_files(PHILIPS_L)[:5]
    args = ("+xa", "+B", "-F", "-pdu", str(max_pdu))  # datasets written exactly as received
    with Storescp(tmp_path / "scp", extra_args=args) as scp:
        store_files("AINODE", Peer(scp.aet, LOCALHOST, scp.port), files, timeout=10)
        _assert_arrived_intact(files, scp.wait_for_files(len(files)))


class PynetdicomPeer:
    """pynetdicom's own acceptor: any maximum PDU length (dcmtk rounds odd ones down)."""

    def __init__(self, max_pdu: int, status: int = 0x0000) -> None:
        self.received: dict[str, bytes] = {}
        self.released = threading.Event()
        self._status = status
        self._ae = PeerAE(ae_title="PEER")
        self._ae.maximum_pdu_size = max_pdu
        self._ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2"])
        self.port = free_port()
        self.handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_RELEASED, self._released)]

    def _released(self, event: Any) -> None:
        self.released.set()

    def _store(self, event: Any) -> int:
        request = event.request
        self.received[str(request.AffectedSOPInstanceUID)] = request.DataSet.getvalue()
        return self._status

    def __enter__(self) -> PynetdicomPeer:
        self._server = self._ae.start_server(
            (LOCALHOST, self.port), block=False, evt_handlers=self.handlers
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


@pytest.mark.parametrize("max_pdu", [4099, 16383, 0])  # odd fragment sizes; 0: no limit
def test_every_byte_arrives_with_odd_pdu_sizes(
    max_pdu: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_fallback(monkeypatch)
    files = dicom_files(GE_3SLICE)
    with PynetdicomPeer(max_pdu) as peer:
        store_files("AINODE", Peer("PEER", LOCALHOST, peer.port), files, timeout=10)
        assert peer.released.wait(5)  # released as before, not aborted
    assert peer.received == {
        read_part10(p.read_bytes()).sop_instance_uid: _dataset_bytes(p)  # type: ignore[union-attr]
        for p in files
    }


@pytest.mark.parametrize(("status", "stored"), [(0xA700, False), (0xC000, False), (0xB000, True)])
def test_a_failure_status_is_an_error(status: int, stored: bool) -> None:
    files = dicom_files(GE_3SLICE)
    with PynetdicomPeer(16382, status) as peer:
        target = Peer("PEER", LOCALHOST, peer.port)
        if stored:  # a warning means stored: every file goes
            store_files("AINODE", target, files, timeout=10)
            assert len(peer.received) == len(files)
        else:
            with pytest.raises(SendError, match=f"failed: status 0x{status:04X}"):
                store_files("AINODE", target, files, timeout=10)
            assert len(peer.received) == 1  # the first refusal stops the send
        assert peer.released.wait(5)  # the association is released, as before


def _associations_left() -> list[Association]:
    deadline = time.monotonic() + 5
    while True:
        alive = [t for t in threading.enumerate() if isinstance(t, Association) and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--abort-during", "A-ABORT|connection lost"),
        ("--abort-after", "A-ABORT|connection lost"),
        ("--sleep-after", "no response within 1 s; association aborted"),
    ],
)
def test_a_peer_that_aborts_or_stalls_ends_the_send(
    tmp_path: Path, option: str, expected: str
) -> None:
    require_tools("storescp")
    files = dicom_files(GE_3SLICE)
    args = ("+xa", option, "5") if option == "--sleep-after" else ("+xa", option)
    with Storescp(tmp_path / "scp", extra_args=args) as scp:
        started = time.monotonic()
        # --sleep-after: storescp answers the first request, then sleeps before the next
        with pytest.raises(SendError, match=f"C-STORE of 0[12].dcm to STORESCP .*({expected})"):
            store_files("AINODE", Peer(scp.aet, LOCALHOST, scp.port), files, timeout=1)
        assert time.monotonic() - started < 4
        assert _associations_left() == []


def test_a_peer_that_hangs_up_mid_transfer() -> None:
    """pynetdicom's acceptor closes the connection (no A-ABORT) after a few PDUs."""
    import socket

    files = dicom_files(GE_3SLICE)
    peer = PynetdicomPeer(4096)
    seen: list[object] = []

    def hang_up(event: Any) -> None:
        seen.append(event.pdu)
        if len(seen) == 10:  # A-ASSOCIATE-RQ, then the first C-STORE's PDUs
            sock = event.assoc.dul.socket.socket
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    peer.handlers.append((evt.EVT_PDU_RECV, hang_up))
    with peer:
        with pytest.raises(SendError, match=f"C-STORE of {files[0].name} .*connection lost"):
            store_files("AINODE", Peer("PEER", LOCALHOST, peer.port), files, timeout=5)
    assert peer.received == {}
    assert _associations_left() == []


def test_the_association_serves_pynetdicom_again_after_a_direct_run(tmp_path: Path) -> None:
    """Files the peer takes as stored go direct, a file it needs converted goes through
    pynetdicom, then direct again; C-ECHO and release work on the same association."""
    require_tools("storescp")
    explicit = tmp_path / "explicit.dcm"
    ds = pydicom.dcmread(dicom_files(PHILIPS_L)[0])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(explicit, enforce_file_format=True)
    implicit = dicom_files(GE_3SLICE)
    files = [implicit[0], explicit, implicit[1], implicit[2]]
    with Storescp(tmp_path / "scp", extra_args=("+xi",)) as scp:  # implicit VR only
        peer = Peer(scp.aet, LOCALHOST, scp.port)
        store_files("AINODE", peer, files, timeout=10)
        received = scp.wait_for_files(len(files))
        assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in received} == {
            str(pydicom.dcmread(p).SOPInstanceUID) for p in files
        }
        converted = pydicom.dcmread(next(p for p in received if ds.SOPInstanceUID in p.name))
        assert converted.PixelData == ds.PixelData

        contexts = [
            (CTImageStorage, [ImplicitVRLittleEndian]),
            (Verification, [ImplicitVRLittleEndian]),
        ]
        assoc = associate("AINODE", peer, contexts, 10)
        try:
            assert direct_store_possible(assoc)
            (context_id,) = [
                c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CT
            ]
            for message_id, path in ((1, implicit[0]), (3, implicit[1])):
                with DirectStore(assoc, 10) as direct:
                    data = path.read_bytes()
                    meta = read_part10(data)
                    assert meta is not None
                    assert int(direct.store(context_id, message_id, meta, data).Status) == 0
                assert assoc.send_c_echo().Status == 0  # pynetdicom's path in between
            assert assoc.send_c_store(ds, msg_id=2).Status == 0  # converted by pynetdicom
        finally:
            assoc.release()
        assert assoc.is_released


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def bit_preserving_tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[TlsStorescp]:  # noqa: F811
    require_tools("storescp")
    scp = TlsStorescp(tmp_path / "scp", pki)
    scp.extra_args = (*scp.extra_args, "+B", "-F", "-pdu", "8192")
    with scp:
        yield scp


def test_every_byte_arrives_over_tls(
    bit_preserving_tls_storescp: TlsStorescp, monkeypatch: pytest.MonkeyPatch
) -> None:
    scp = bit_preserving_tls_storescp
    _no_fallback(monkeypatch)
    files = dicom_files(GE_3SLICE) + dicom_files(PHILIPS_L)[:3]
    store_files("AINODE", Peer(scp.aet, LOCALHOST, scp.port, scp.client_tls), files, timeout=10)
    _assert_arrived_intact(files, scp.wait_for_files(len(files)))


def test_an_ended_association_cannot_be_borrowed(tmp_path: Path) -> None:
    require_tools("storescp")
    with Storescp(tmp_path / "scp") as scp:
        peer = Peer(scp.aet, LOCALHOST, scp.port)
        assoc = associate("AINODE", peer, [(CTImageStorage, [ImplicitVRLittleEndian])], 5)
        assoc.release()
    started = time.monotonic()
    with pytest.raises(AssociationEnded):
        DirectStore(assoc, 5).__enter__()
    assert time.monotonic() - started < 1


def _response_bytes(message_id: int, status: int, comment: str | None = None) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RSP

    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = CT
    response.AffectedSOPInstanceUID = "1.2.3.45"
    response.Status = status
    if comment is not None:
        response.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    return bytes(encode(message.command_set, True, True))


def test_responses_are_checked() -> None:
    check = DirectStore(None, 1)._check  # type: ignore[arg-type]  # reads bytes only
    assert int(check(_response_bytes(7, 0x0000), 7).Status) == 0x0000
    refused = check(_response_bytes(7, 0xA700, "out of resources"), 7)
    assert int(refused.Status) == 0xA700 and refused.ErrorComment == "out of resources"
    with pytest.raises(AssociationBroken, match="for message 8 in answer to C-STORE 7"):
        check(_response_bytes(8, 0x0000), 7)
    echo_response = _response_bytes(7, 0x0000).replace(b"\x01\x80", b"\x30\x80")  # C-ECHO-RSP
    with pytest.raises(AssociationBroken, match="command 0x8030"):
        check(echo_response, 7)
    with pytest.raises(AssociationBroken, match="undecodable"):
        check(_response_bytes(7, 0x0000)[:-3], 7)
    assert command_elements(b"\x08\x00\x10\x00\x02\x00\x00\x00CT") == {}  # not group 0000
