"""The receiver's C-STORE data phase on the DUL thread (dicom_node.store_scp_wire).

What it writes must be byte for byte what pynetdicom's path wrote, whatever the peer's
PDU cutting; its responses must be pynetdicom's bytes; everything else the peer sends
(C-ECHO, N-EVENT-REPORT, A-ABORT, limits broken) must end as it did before.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pdus
import pydicom
import pytest
from nodes import echo_ok, node_settings, running_node
from peers import (
    GE_3SLICE,
    LOCALHOST,
    peer_env,
    require_tools,
    storescu,
    tool_path,
    wait_until,
)
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    Verification,
)
from test_tls import Pki, _node_tls, pki  # noqa: F401 (pki: a fixture)

from dicom_node import store_scp_wire
from dicom_node.app import Node, build_node
from dicom_node.config import parse_config
from dicom_node.part10 import file_meta_bytes
from dicom_node.receive import Receiver
from dicom_node.store_scp_wire import FastStore, command_pdus, store_response
from dicom_node.transport import (
    RECV_SLICE_SECONDS,
    HardenedDUL,
    Stopped,
    recv_exactly,
    sliced_reads,
)

MiB = 1024 * 1024
GOOD = sorted(GE_3SLICE.glob("*.dcm"))[0]
CT = pdus.CT_IMAGE_STORAGE
CALLING = "HOSTILE"  # pdus.associate_rq's calling AE title
ROOT = "1.2.826.0.1.3680043.8.498."


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("max_pdu", [16384, 0, 64, 71])
@pytest.mark.parametrize(
    ("message_id", "instance", "status", "comment"),
    [
        (1, "1.2.3.4", 0x0000, ""),
        (65535, "1.2.3.45", 0xA700, ""),
        (7, ROOT + "12345", 0xC000, ""),
        (8, "1.2.3.4", 0xA900, "an odd-length one"),
        (9, "1.2.3.45", 0xA700, "x" * 64),
    ],
)
def test_response_is_pynetdicoms_encoding(
    max_pdu: int, message_id: int, instance: str, status: int, comment: str
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = instance
    primitive.Status = status
    if comment:
        primitive.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    theirs = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(5, max_pdu))
    ours = command_pdus(5, store_response(message_id, CT, instance, status, comment), max_pdu)
    assert ours == theirs


# --------------------------------------------------------------------------- a node


@contextmanager
def node(tmp_path: Path, **options: Any) -> Iterator[Node]:
    settings = node_settings(tmp_path / "var", node={"idle_timeout_seconds": 2.0, **options})
    with running_node(settings) as running:
        yield running


def _port(running: Node) -> int:
    return running.receiver.address[1]


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Statuses of the C-STOREs answered on the fast path, in order."""
    answered: list[int] = []
    respond = FastStore._respond

    def counting(
        self: FastStore, sock: Any, wrapper: Any, request: Any, status: int, comment: str
    ) -> None:
        answered.append(status)
        respond(self, sock, wrapper, request, status, comment)

    monkeypatch.setattr(FastStore, "_respond", counting)
    return answered


@contextmanager
def established(port: int) -> Iterator[Any]:
    """A raw association, once the node has finished setting it up (a C-ECHO first).

    A first C-STORE right behind the A-ASSOCIATE-AC is served by the wire path too
    (test_a_first_store_right_behind_the_associate_ac_takes_the_wire_path), but only
    after waiting up to ESTABLISH_WAIT for the association thread: the tests that time
    or count fast-path stores do not depend on that wait."""
    with pdus.raw_association(port) as (sock, _):
        sock.sendall(pdus.c_echo_rq())
        assert _read_response(sock) == 0
        yield sock


def _stored(running: Node) -> dict[str, bytes]:
    """relpath -> bytes of every instance file the journal knows."""
    spool = running.spool
    return {rel: spool.path(rel).read_bytes() for rel in running.journal.all_instance_relpaths()}


def _instance_files(running: Node) -> list[Path]:
    folder = running.spool.path(running.spool.instances_prefix)
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _total(running: Node) -> int:
    return int(running.journal.state_counts()["instances"]["total"])


def _read_response(sock: Any) -> int | None:
    reply = pdus.read_pdu(sock, 10)
    if reply is None or reply[0] != pdus.P_DATA_TF:
        return None
    return pdus.response_status(reply[1])


def _cut(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def _message(
    sop: str, dataset: bytes, fragment: int, command_cut: int = 0, per_pdu: int = 1
) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ: the command in fragments of ``command_cut``
    bytes (0: one), the dataset in fragments of ``fragment`` bytes, ``per_pdu`` PDVs in
    each PDU."""
    command = pdus.command(0x0001, CT, sop, True)
    pieces = _cut(command, command_cut) if command_cut else [command]
    pdvs = [(pdus.STORE_CONTEXT, 0x01, piece) for piece in pieces[:-1]]
    pdvs.append((pdus.STORE_CONTEXT, pdus.COMMAND_LAST, pieces[-1]))
    chunks = _cut(dataset, fragment)
    pdvs += [(pdus.STORE_CONTEXT, pdus.DATASET_MORE, chunk) for chunk in chunks[:-1]]
    pdvs.append((pdus.STORE_CONTEXT, pdus.DATASET_LAST, chunks[-1]))
    return [pdus.p_data(*pdvs[start : start + per_pdu]) for start in range(0, len(pdvs), per_pdu)]


# (dataset fragment size, command fragment size, PDVs per PDU)
LAYOUTS = [
    (16384 - 6, 0, 1),  # what dcmtk sends to a 16 KiB peer
    (4093, 0, 1),  # odd
    (1_000_003, 0, 1),  # the whole dataset in one PDU
    (7777, 17, 1),  # the command split mid-element over several PDUs
    (5001, 0, 2),  # the command and the first dataset fragment in one PDU
    (999, 33, 5),  # both, several PDVs per PDU
]


def test_stored_bytes_are_the_bytes_sent(tmp_path: Path, served: list[int]) -> None:
    with node(tmp_path, max_pdu_bytes=2 * MiB) as running:
        sent: dict[str, bytes] = {}
        with established(_port(running)) as sock:
            for fragment, command_cut, per_pdu in LAYOUTS:
                sop = generate_uid(ROOT)
                dataset = pdus.ct_dataset(GOOD, sop)
                sock.sendall(b"".join(_message(sop, dataset, fragment, command_cut, per_pdu)))
                assert _read_response(sock) == 0, (fragment, command_cut, per_pdu)
                sent[sop] = dataset
        assert served == [0] * len(LAYOUTS)  # all of them on the fast path
        stored = _stored(running)
    assert len(stored) == len(sent)
    for data in stored.values():
        sop = str(pydicom.dcmread(DicomBytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        meta = file_meta_bytes(CT, sop, pdus.IMPLICIT_VR_LE, CALLING)
        assert data == meta + sent[sop]


REFUSED = {
    "SOP Instance UID differs from the request's": (pdus.ct_dataset(GOOD, ROOT + "1"), ROOT + "2"),
    "not DICOM": (b"\x08\x00\x18\x00\xff\xff\xff\x7f" + bytes(64), ROOT + "3"),
    "sequences nested 500 deep": (pdus.nested_dataset(500, ROOT + "4"), ROOT + "4"),
    "a command set as the dataset": (pdus.command(0x0001, CT, None, False), ROOT + "5"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_are_the_handlers(
    tmp_path: Path, case: str, served: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, sop = REFUSED[case]
    statuses = []
    for enabled in (True, False):
        monkeypatch.setattr(store_scp_wire, "ENABLED", enabled)
        with node(tmp_path / str(enabled)) as running:
            with established(_port(running)) as sock:
                sock.sendall(b"".join(_message(sop, dataset, 16378)))
                statuses.append(_read_response(sock))
            assert _total(running) == 0
            assert _instance_files(running) == []
    fast, pynetdicom = statuses
    assert fast == pynetdicom and fast is not None and fast != 0, statuses
    assert served == [fast]
    if case.startswith("SOP Instance UID"):
        assert fast == 0xA900


def test_abort_mid_dataset_leaves_no_file_and_no_row(tmp_path: Path, served: list[int]) -> None:
    with node(tmp_path) as running:
        with established(_port(running)) as sock:
            sop = generate_uid(ROOT)
            message = _message(sop, pdus.ct_dataset(GOOD, sop), 4000)
            sock.sendall(b"".join(message[: len(message) // 2]))
            sock.sendall(pdus.pdu(pdus.A_ABORT, bytes(4)))
            assert pdus.closed_by_peer(sock, 5)
        wait_until(lambda: not running.receiver.active_associations, 5, what="abort seen")
        assert _total(running) == 0
        assert _instance_files(running) == []
        assert served == []
        assert echo_ok(_port(running))


@pytest.mark.parametrize("cut", ["mid_header", "mid_body"])
def test_a_peer_that_stops_mid_pdu_is_closed_at_the_pdu_deadline(
    tmp_path: Path, served: list[int], cut: str
) -> None:
    """Sliced reads (transport.sliced_reads): a silent peer still meets the deadline
    (idle_timeout_seconds 2.0 per PDU here, looked at every RECV_SLICE_SECONDS)."""
    with node(tmp_path) as running:
        with established(_port(running)) as sock:
            sop = generate_uid(ROOT)
            first, second = _message(sop, pdus.ct_dataset(GOOD, sop), 4000)[:2]
            sock.sendall(first)  # the command: a whole PDU
            sock.sendall(second[:3] if cut == "mid_header" else second[: len(second) // 2])
            started = time.monotonic()
            assert pdus.closed_by_peer(sock, 10)
            held = time.monotonic() - started
        assert 1.5 < held < 2.0 + RECV_SLICE_SECONDS + 1.0, f"closed after {held:.2f} s"
        wait_until(lambda: not running.receiver.active_associations, 5, what="close seen")
        assert _total(running) == 0 and _instance_files(running) == []
        assert served == []
        assert echo_ok(_port(running))


def _store_good(sock: Any) -> None:
    """Send the good CT with a new SOP Instance UID in 16378-byte fragments; expect success."""
    sop = generate_uid(ROOT)
    sock.sendall(b"".join(_message(sop, pdus.ct_dataset(GOOD, sop), 16378)))
    assert _read_response(sock) == 0


def _release(sock: Any) -> None:
    sock.sendall(pdus.pdu(pdus.A_RELEASE_RQ, bytes(4)))
    reply = pdus.read_pdu(sock, 5)
    assert reply is not None and reply[0] == pdus.A_RELEASE_RP


def test_a_first_store_right_behind_the_associate_ac_takes_the_wire_path(
    tmp_path: Path, served: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wire path is installed before the A-ASSOCIATE-AC goes out (EVT_REQUESTED), so a
    peer that sends its first C-STORE at once, as storescu does, is not served the slow
    way while the association thread is still busy accepting. Before, on a busy machine,
    it sometimes was: here EVT_ACCEPTED's handler is made slow on purpose."""
    accepted = Receiver._accepted

    def slow_accepted(self: Receiver, event: Any) -> None:
        time.sleep(0.3)  # a loaded machine: the peer's C-STORE is already there
        accepted(self, event)

    monkeypatch.setattr(Receiver, "_accepted", slow_accepted)
    rounds = 4
    with node(tmp_path) as running:
        for _ in range(rounds):
            with pdus.raw_association(_port(running)) as (sock, _):
                _store_good(sock)
                _release(sock)
        assert _total(running) == rounds
    assert served == [0] * rounds


def test_a_request_that_arrives_right_after_the_wire_path_looked_is_still_its_own(
    tmp_path: Path, served: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wire path found nothing to read, and the request arrived just after (here: it
    is already there, and the first look says no). pynetdicom must not read it in the
    same turn: the next turn's wire path does. Before, on a loaded machine, such a
    request now and then went the slow way."""
    readable = store_scp_wire._readable
    missed: list[bool] = []

    def late(sock: Any) -> bool:
        if armed and not missed:
            missed.append(True)
            return False  # as if the request arrived right after this look
        return readable(sock)

    armed = False
    monkeypatch.setattr(store_scp_wire, "_readable", late)
    with node(tmp_path) as running:
        with established(_port(running)) as sock:
            armed = True
            _store_good(sock)
            _release(sock)
        assert _total(running) == 1
    assert missed == [True]
    assert served == [0]


def test_release_after_stores(tmp_path: Path, served: list[int]) -> None:
    with node(tmp_path) as running:
        with established(_port(running)) as sock:
            for _ in range(2):
                _store_good(sock)
            _release(sock)
        assert served == [0, 0]
        assert _total(running) == 2


# --------------------------------------------------------------------------- messages sharing a PDU

Pdv = tuple[int, int, bytes]
ECHO_RSP, STORE_RSP = 0x8030, 0x8001


def _store_pdvs(sop: str, dataset: bytes, message_id: int, fragment: int) -> list[Pdv]:
    """A C-STORE-RQ's PDVs: the command in one, the dataset in ``fragment``-byte ones."""
    chunks = _cut(dataset, fragment)
    return [
        (pdus.STORE_CONTEXT, pdus.COMMAND_LAST, pdus.command(0x0001, CT, sop, True, message_id)),
        *((pdus.STORE_CONTEXT, pdus.DATASET_MORE, chunk) for chunk in chunks[:-1]),
        (pdus.STORE_CONTEXT, pdus.DATASET_LAST, chunks[-1]),
    ]


def _echo_pdv(message_id: int) -> Pdv:
    return (
        pdus.ECHO_CONTEXT,
        pdus.COMMAND_LAST,
        pdus.command(0x0030, pdus.VERIFICATION, None, False, message_id),
    )


def _responses(sock: Any, count: int) -> list[tuple[int | None, ...]]:
    """(Command Field, Message ID Being Responded To, Status) of the next ``count``
    responses."""
    out: list[tuple[int | None, ...]] = []
    for _ in range(count):
        reply = pdus.read_pdu(sock, 10)
        assert reply is not None and reply[0] == pdus.P_DATA_TF, (out, reply)
        out.append(tuple(pdus.response_us(reply[1], elem) for elem in (0x0100, 0x0120, 0x0900)))
    return out


def _shared(*groups: list[Pdv]) -> bytes:
    """P-DATA-TF PDUs, one per group of PDVs."""
    return b"".join(pdus.p_data(*group) for group in groups)


@pytest.mark.parametrize("fast", [True, False], ids=["wire_path", "pynetdicom_path"])
def test_every_message_in_a_shared_pdu_is_served_in_order(
    tmp_path: Path, served: list[int], monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """PS3.8 lets one P-DATA-TF PDU carry PDVs of more than one DIMSE message. Before,
    the message after the first one's last fragment was dropped (pynetdicom's decoder
    stops there) and the association hung until idle_timeout_seconds."""
    monkeypatch.setattr(store_scp_wire, "ENABLED", fast)
    sent: dict[str, bytes] = {}

    def store(message_id: int, fragment: int = 16378) -> list[Pdv]:
        sop = generate_uid(ROOT)
        sent[sop] = pdus.ct_dataset(GOOD, sop)
        return _store_pdvs(sop, sent[sop], message_id, fragment)

    with node(tmp_path, max_pdu_bytes=2 * MiB) as running:
        with established(_port(running)) as sock:
            # two whole C-STOREs in one PDU
            sock.sendall(_shared(store(20, 1_000_000) + store(21, 1_000_000)))
            assert _responses(sock, 2) == [(STORE_RSP, 20, 0), (STORE_RSP, 21, 0)]
            # X's last fragment, Y's command and first fragment in one PDU; Y goes on after
            x, y = store(22), store(23)
            sock.sendall(
                _shared(*([pdv] for pdv in x[:-1]), [x[-1], *y[:2]], *([p] for p in y[2:]))
            )
            assert _responses(sock, 2) == [(STORE_RSP, 22, 0), (STORE_RSP, 23, 0)]
            # C-ECHO, then a C-STORE, in one PDU; and a C-STORE's end, then a C-ECHO
            sock.sendall(_shared([_echo_pdv(24), *store(25, 1_000_000)]))
            assert _responses(sock, 2) == [(ECHO_RSP, 24, 0), (STORE_RSP, 25, 0)]
            z = store(26)
            sock.sendall(_shared(*([pdv] for pdv in z[:-1]), [z[-1], _echo_pdv(27)]))
            assert _responses(sock, 2) == [(STORE_RSP, 26, 0), (ECHO_RSP, 27, 0)]
            # one message per PDU again: the wire path serves it
            before = len(served)
            _store_good(sock)
            assert served[before:] == ([0] if fast else [])
            _release(sock)
        stored = _stored(running)
    assert len(stored) == len(sent) + 1
    for data in stored.values():
        sop = str(pydicom.dcmread(DicomBytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        if sop in sent:
            assert data == file_meta_bytes(CT, sop, pdus.IMPLICIT_VR_LE, CALLING) + sent[sop]


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "capped"])
def test_a_read_gives_up_once_told_to_stop(sliced: bool) -> None:
    """recv_exactly's ``stop``: looked at every RECV_SLICE_SECONDS while nothing arrives
    (sliced reads; otherwise each wait is capped to that), whatever the deadline."""
    ours, peer = socket.socketpair()
    with ours, peer:
        if sliced:
            sliced_reads(ours)
        peer.sendall(b"abc")  # then nothing
        told = threading.Event()
        timer = threading.Timer(0.2, told.set)
        timer.start()
        started = time.monotonic()
        with pytest.raises(Stopped):
            recv_exactly(ours, 10, started + 60, sliced, told.is_set)
        assert time.monotonic() - started < 0.2 + RECV_SLICE_SECONDS + 0.5
        timer.join()
        peer.sendall(b"defghij")  # unaffected otherwise: the rest of a PDU, read at once
        assert recv_exactly(ours, 7, time.monotonic() + 5, sliced, lambda: True) == b"defghij"


@pytest.mark.parametrize("cut", ["mid_header", "mid_body"])
@pytest.mark.parametrize("fast", [True, False], ids=["wire_path", "pynetdicom_path"])
def test_stopping_gives_up_a_pdu_half_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast: bool, cut: str
) -> None:
    """A peer stalled mid-PDU while the node stops: once node.drain_seconds have passed
    and the association is aborted, the read gives up (A-ABORT, closed) within about
    RECV_SLICE_SECONDS, not at the PDU deadline (idle_timeout_seconds, 60 s here)."""
    monkeypatch.setattr(store_scp_wire, "ENABLED", fast)
    drain = 0.5
    settings = node_settings(
        tmp_path / "var", node={"drain_seconds": drain, "idle_timeout_seconds": 60.0}
    )
    running = build_node(parse_config(settings))
    running.start()
    stopped = False
    try:
        duls = {t for t in threading.enumerate() if isinstance(t, HardenedDUL)}
        with established(_port(running)) as sock:
            sop = generate_uid(ROOT)
            first, second = _message(sop, pdus.ct_dataset(GOOD, sop), 4000)[:2]
            sock.sendall(first)  # the command: a whole PDU
            sock.sendall(second[:3] if cut == "mid_header" else second[: len(second) // 2])
            time.sleep(0.3)  # being read
            ours = [
                t for t in threading.enumerate() if isinstance(t, HardenedDUL) and t not in duls
            ]
            assert len(ours) == 1
            started = time.monotonic()
            running.stop()  # node.drain_seconds
            stopped = True
            reply = pdus.read_pdu(sock, 3)
            assert reply is not None and reply[0] == pdus.A_ABORT, reply
            assert pdus.closed_by_peer(sock, 3)
            held = time.monotonic() - started
            ours[0].join(3)
            assert not ours[0].is_alive()
        assert held < drain + RECV_SLICE_SECONDS + 2.0, f"closed after {held:.2f} s"
    finally:
        if not stopped:
            running.stop(timeout=5)


def test_instance_over_max_instance_bytes(tmp_path: Path, served: list[int]) -> None:
    sop = generate_uid(ROOT)
    padding = pdus.element(0xFFFC, 0xFFFC, bytes(MiB))  # Data Set Trailing Padding
    dataset = pdus.ct_dataset(GOOD, sop) + padding  # over the smallest limit allowed
    # the dataset fits, the file (File Meta Information added) does not: 0xA700
    with node(tmp_path / "a", max_instance_bytes=len(dataset) + 16) as running:
        with established(_port(running)) as sock:
            sock.sendall(b"".join(_message(sop, dataset, 16378)))
            assert _read_response(sock) == 0xA700
        assert served == [0xA700]
        assert _total(running) == 0 and _instance_files(running) == []
    # the dataset alone is over: aborted while it arrives
    with node(tmp_path / "b", max_instance_bytes=MiB) as running:
        with established(_port(running)) as sock:
            pdus.send_quietly(sock, b"".join(_message(sop, dataset, 16378)))
            reply = pdus.read_pdu(sock, 5)
            assert reply is None or reply[0] == pdus.A_ABORT
        assert _total(running) == 0 and _instance_files(running) == []
        assert echo_ok(_port(running))
    assert served == [0xA700]


def test_pdu_over_max_pdu_bytes_aborts(tmp_path: Path, served: list[int]) -> None:
    with node(tmp_path, max_pdu_bytes=16384) as running:
        with established(_port(running)) as sock:
            sop = generate_uid(ROOT)
            pdus.send_quietly(sock, b"".join(_message(sop, pdus.ct_dataset(GOOD, sop), 64000)))
            reply = pdus.read_pdu(sock, 5)
            assert reply is None or reply[0] == pdus.A_ABORT
        assert _total(running) == 0
        assert served == []
        assert echo_ok(_port(running))


def test_echo_commitment_report_and_stores_share_an_association(
    tmp_path: Path, served: list[int]
) -> None:
    ae = AE(ae_title="MIXED")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    sources = []
    for _ in range(3):
        ds = pydicom.dcmread(GOOD)
        ds.SOPInstanceUID = generate_uid(ROOT)
        sources.append(ds)
    with node(tmp_path) as running:
        assoc = ae.associate(LOCALHOST, _port(running), ae_title="AINODE", ext_neg=[role])
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_store(sources[0]).Status)]
            statuses.append(int(assoc.send_c_echo().Status))
            statuses.append(int(assoc.send_c_store(sources[1]).Status))
            info = pydicom.Dataset()
            info.TransactionUID = generate_uid(ROOT)
            info.ReferencedSOPSequence = []
            report, _ = assoc.send_n_event_report(
                info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
            )
            assert report is not None and "Status" in report  # answered by the node
            statuses.append(int(assoc.send_c_store(sources[2]).Status))
        finally:
            assoc.release()
        assert statuses == [0, 0, 0, 0]
        assert served == [0, 0, 0]
        assert _total(running) == 3


@pytest.mark.parametrize("max_send_pdu", [4098, 16384, 65534])  # dcmtk: even sizes only
def test_storescu_pdu_sizes(tmp_path: Path, max_send_pdu: int, served: list[int]) -> None:
    require_tools("storescu")
    folder = tmp_path / "in"
    folder.mkdir()
    sent = {}
    for index in range(3):
        ds = pydicom.dcmread(GOOD)
        ds.SOPInstanceUID = generate_uid(ROOT)
        path = folder / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sent[str(ds.SOPInstanceUID)] = ds.PixelData
    with node(tmp_path, max_pdu_bytes=MiB) as running:
        command = [
            tool_path("storescu"),
            "-aet",
            "SCANNER",
            "-aec",
            "AINODE",
            "--max-send-pdu",
            str(max_send_pdu),
            LOCALHOST,
            str(_port(running)),
            *sorted(str(p) for p in folder.iterdir()),
        ]
        subprocess.run(command, check=True, env=peer_env(), capture_output=True, timeout=60)
        stored = _stored(running)
    assert len(stored) == 3
    assert served == [0, 0, 0]
    for data in stored.values():
        ds = pydicom.dcmread(DicomBytesIO(data))
        assert ds.file_meta.SourceApplicationEntityTitle == "SCANNER"
        assert ds.PixelData == sent[str(ds.SOPInstanceUID)]


def test_tls_stores_take_the_fast_path(tmp_path: Path, pki: Pki, served: list[int]) -> None:  # noqa: F811
    require_tools("storescu")
    settings = node_settings(tmp_path / "var", node={"tls": _node_tls(pki)})
    with running_node(settings) as running:
        tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        storescu(LOCALHOST, _port(running), "AINODE", [GE_3SLICE], extra_args=tls)
        assert _total(running) == 3
        stored = _stored(running)
    assert served == [0, 0, 0]
    sources = {
        str(pydicom.dcmread(path).SOPInstanceUID): pydicom.dcmread(path).PixelData
        for path in GE_3SLICE.glob("*.dcm")
    }
    for data in stored.values():
        ds = pydicom.dcmread(DicomBytesIO(data))
        assert ds.PixelData == sources[str(ds.SOPInstanceUID)]
