"""Hand-built DICOM Upper Layer PDUs (PS3.8 9.3) and DIMSE commands (PS3.7 9.3.1.1).

For hostile-input tests: everything here is encoded with ``struct`` so that a test can
send what no conforming library would (bad lengths, bad UIDs, unknown types). Plain
functions; nothing runs at import.
"""

from __future__ import annotations

import random
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pynetdicom.dsutils import encode

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_VR_LE = "1.2.840.10008.1.2.1.99"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07  # A-ASSOCIATE-RJ reasons

COMMAND_LAST, DATASET_LAST, DATASET_MORE = 0x03, 0x02, 0x00
ECHO_CONTEXT, STORE_CONTEXT = 1, 3


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def presentation_context(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    subitems = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(s)) for s in syntaxes)
    return _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + subitems)


def associate_rq(
    called: str | bytes = "AINODE",
    calling: str | bytes = "HOSTILE",
    store_syntaxes: tuple[str, ...] = (IMPLICIT_VR_LE,),
    max_pdu: int = 16384,
) -> bytes:
    """A-ASSOCIATE-RQ: context 1 Verification, context 3 CT Image Storage. An AE title
    given as bytes goes into its 16-byte field as it is (padded with spaces)."""
    fixed = struct.pack(">HH", 1, 0) + _ae_field(called) + _ae_field(calling)
    items = (
        _item(0x10, _uid(APPLICATION_CONTEXT))
        + presentation_context(ECHO_CONTEXT, VERIFICATION, [IMPLICIT_VR_LE])
        + presentation_context(STORE_CONTEXT, CT_IMAGE_STORAGE, list(store_syntaxes))
        + _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.3.4"))
    )
    return pdu(A_ASSOCIATE_RQ, fixed + bytes(32) + items)


def _ae_field(title: str | bytes) -> bytes:
    raw = title.encode() if isinstance(title, str) else title
    if len(raw) > 16:
        raise ValueError(f"an AE title field holds 16 bytes, not {len(raw)}")
    return raw.ljust(16, b" ")


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """P-DATA-TF from (context id, message control header, fragment) tuples."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, cx, mch) + data for cx, mch, data in pdvs)
    return pdu(P_DATA_TF, body)


def element(group: int, elem: int, value: bytes) -> bytes:
    """One implicit VR little endian element, padded to even length."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", group, elem, len(value)) + value


def command(
    field: int,
    sop_class: str,
    sop_instance: str | None,
    has_dataset: bool,
    message_id: int = 1,
) -> bytes:
    elements = element(0x0000, 0x0002, _uid(sop_class))
    elements += element(0x0000, 0x0100, struct.pack("<H", field))
    elements += element(0x0000, 0x0110, struct.pack("<H", message_id))  # MessageID
    if field == 0x0001:
        elements += element(0x0000, 0x0700, struct.pack("<H", 0))  # Priority
    elements += element(0x0000, 0x0800, struct.pack("<H", 0x0000 if has_dataset else 0x0101))
    if sop_instance is not None:
        elements += element(0x0000, 0x1000, _uid(sop_instance))
    return element(0x0000, 0x0000, struct.pack("<L", len(elements))) + elements


def c_echo_rq() -> bytes:
    return p_data((ECHO_CONTEXT, COMMAND_LAST, command(0x0030, VERIFICATION, None, False)))


def c_store_rq(sop_instance: str, dataset: bytes, context: int = STORE_CONTEXT) -> bytes:
    cmd = command(0x0001, CT_IMAGE_STORAGE, sop_instance, True)
    return p_data((context, COMMAND_LAST, cmd)) + p_data((context, DATASET_LAST, dataset))


def ct_dataset(path: Path, sop_instance: str | None = None) -> bytes:
    """A real CT slice in implicit VR LE, optionally with another SOP Instance UID (raw)."""
    ds = pydicom.dcmread(path)
    data = encode(ds, True, True)
    assert data is not None
    if sop_instance is None:
        return data
    old = element(0x0008, 0x0018, _uid(str(ds.SOPInstanceUID)))
    assert old in data
    return data.replace(old, element(0x0008, 0x0018, _uid(sop_instance)), 1)


def nested_dataset(depth: int, sop_instance: str) -> bytes:
    """SOP/Study/Series UIDs then ContentSequence nested ``depth`` deep (undefined lengths)."""
    head = element(0x0008, 0x0016, _uid(CT_IMAGE_STORAGE))
    head += element(0x0008, 0x0018, _uid(sop_instance))
    head += element(0x0020, 0x000D, b"1.2.826.0.1.3680043.8.498.1")
    head += element(0x0020, 0x000E, b"1.2.826.0.1.3680043.8.498.2")
    opening = struct.pack("<HHL", 0x0040, 0xA730, 0xFFFFFFFF)
    opening += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return head + opening * depth + closing * depth


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A deflated explicit VR LE dataset: one OB element of ``inflated_bytes`` zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [compressor.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes))]
    zeros = bytes(1024 * 1024)
    for _ in range(inflated_bytes // len(zeros)):
        out.append(compressor.compress(zeros))
    return b"".join(out) + compressor.flush()


# --------------------------------------------------------------------------- reading


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """The next PDU as (type, body), or None when the peer closed the connection."""
    deadline = time.monotonic() + timeout
    header = _recv(sock, 6, deadline)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = _recv(sock, length, deadline)
    return None if body is None else (pdu_type, body)


def _recv(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    data = b""
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes (or aborts and closes) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def response_status(body: bytes) -> int | None:
    """The Status (0000,0900) of a DIMSE response carried in one P-DATA-TF body."""
    return response_us(body, 0x0900)


def response_us(body: bytes, elem: int) -> int | None:
    """A US command element (0000,``elem``) of a DIMSE response carried in one P-DATA-TF
    body: 0x0100 Command Field, 0x0120 Message ID Being Responded To, 0x0900 Status."""
    data = body[6:]  # one PDV: item length, context id, message control header
    offset = 0
    while offset + 8 <= len(data):
        group, element_, length = struct.unpack_from("<HHL", data, offset)
        if (group, element_) == (0x0000, elem):
            return int(struct.unpack_from("<H", data, offset + 8)[0])
        offset += 8 + length
    return None


def accepted_syntax(ac_body: bytes, context_id: int) -> int:
    """The result (0: acceptance) of ``context_id`` in an A-ASSOCIATE-AC body."""
    offset = 68
    while offset + 4 <= len(ac_body):
        item_type, _, length = struct.unpack_from(">BBH", ac_body, offset)
        if item_type == 0x21 and ac_body[offset + 4] == context_id:
            return ac_body[offset + 6]
        offset += 4 + length
    raise AssertionError(f"context {context_id} missing from A-ASSOCIATE-AC")


@contextmanager
def raw_connection(port: int, host: str = "127.0.0.1") -> Iterator[socket.socket]:
    sock = socket.create_connection((host, port), timeout=5)
    try:
        yield sock
    finally:
        sock.close()


@contextmanager
def raw_association(port: int, rq: bytes | None = None) -> Iterator[tuple[socket.socket, bytes]]:
    """An established association on a raw socket: (socket, A-ASSOCIATE-AC body)."""
    with raw_connection(port) as sock:
        sock.sendall(rq or associate_rq())
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == A_ASSOCIATE_AC, reply
        yield sock, reply[1]


def raw_store(sock: socket.socket, message: bytes, timeout: float = 10.0) -> int | None:
    """Send a C-STORE-RQ; the response status, or None if the node aborted/closed."""
    sock.sendall(message)
    reply = read_pdu(sock, timeout)
    if reply is None or reply[0] != P_DATA_TF:
        return None
    return response_status(reply[1])


# --------------------------------------------------------------------------- mutation

MUTATIONS = ("flip", "insert", "delete", "truncate", "length", "u16")
Edit = tuple[str, int, bytes]


def mutate(data: bytes, edits: list[Edit]) -> bytes:
    """Apply (operation, position, payload) edits; positions wrap around the data."""
    out = bytearray(data)
    for operation, position, payload in edits:
        if not out:
            break
        at = position % len(out)
        if operation == "flip":
            out[at] ^= payload[0] if payload else 0xFF
        elif operation == "insert":
            out[at:at] = payload
        elif operation == "delete":
            del out[at : at + 1 + len(payload)]
        elif operation == "truncate":
            del out[at:]
        elif operation == "length":  # a 32-bit big-endian length field, as in PDU headers
            out[at : at + 4] = (payload + bytes(4))[:4]
        elif operation == "u16":  # a 16-bit item length (A-ASSOCIATE items)
            out[at : at + 2] = (payload + bytes(2))[:2]
    return bytes(out)


def random_edits(rng: random.Random) -> list[Edit]:
    return [
        (rng.choice(MUTATIONS), rng.randrange(2**20), rng.randbytes(rng.randrange(9)))
        for _ in range(rng.randint(1, 4))
    ]


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send and half-close; the node may abort before it has read everything."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def fuzz_once(port: int, target: str, edits: list[Edit]) -> None:
    """Send one mutated A-ASSOCIATE-RQ, or a mutated C-STORE inside an association."""
    rq = associate_rq()
    if target == "associate":
        with raw_connection(port) as sock:
            send_quietly(sock, mutate(rq, edits))
            closed_by_peer(sock, 3.0)
        return
    sop = "1.2.826.0.1.3680043.8.498.99"
    message = c_store_rq(sop, nested_dataset(2, sop))
    with raw_association(port, rq) as (sock, _):
        send_quietly(sock, mutate(message, edits))
        closed_by_peer(sock, 3.0)
