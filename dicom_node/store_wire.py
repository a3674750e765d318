"""The C-STORE data phase written and read by the sending thread itself.

pynetdicom sends a DIMSE message as one P-DATA primitive per peer PDU: each is queued
for the DUL thread, goes through the state machine (DT-1), becomes a ``P_DATA_TF``
object, is encoded and fires events; the response comes back the same way and then
through the association thread's queue. For a 513 KiB CT slice to a peer that takes
16 KiB PDUs that is some 35 trips through that path and three thread hand-overs per
image, and encoding the command set with pydicom alone took 0.4 ms. It kept the
sender near a quarter of dcmtk's storescu.

Here, while the association's reactors are parked (:class:`DirectStore`: the DUL lends
its socket, :meth:`dicom_node.reactor.EventDrivenDUL.lend_socket`), one C-STORE is:

* the request: the command set encoded with ``struct`` (:func:`store_command`, checked
  against pynetdicom's encoder in the tests) and the dataset bytes exactly as they are
  in the file, cut into PDVs of the peer's maximum PDU length minus the 6 bytes of a
  PDV header (as pynetdicom cuts them), one PDV per P-DATA-TF PDU, all written with
  one ``sendall`` (:func:`pdata_message`);
* the response: read PDU by PDU under the DIMSE timeout; it must be a C-STORE-RSP to
  this message ID on this presentation context. Its command set is read with ``struct``
  (pydicom took 0.3 ms per image for it), and decoded in full by pynetdicom's decoder
  when the status is not success.

The state machine stays in Sta6 all along, as it would: a P-DATA request (Evt9, DT-1)
and a P-DATA-TF PDU received (Evt10, DT-2) both leave it there. Anything else the peer
sends (A-ABORT, A-RELEASE-RQ, an unknown PDU) goes to the DUL's state machine as if the
DUL had read it, and a lost connection becomes Evt17: :class:`AssociationEnded`. A
response that does not come in time or is malformed: :class:`AssociationBroken`, and
the association is aborted when the socket is given back, as pynetdicom does on a DIMSE
timeout. Only for associations whose DUL is an
:class:`~dicom_node.reactor.EventDrivenDUL` and on which nobody listens to PDU-level
events (:func:`direct_store_possible`), since those are not fired here.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from io import BytesIO
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pydicom
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dsutils import decode

from dicom_node.file_meta import Part10
from dicom_node.reactor import EventDrivenDUL
from dicom_node.transport import recv_exactly

if TYPE_CHECKING:
    from pynetdicom.association import Association

KiB = 1024
PDATA_TF = 0x04
PDV_HEADER = struct.Struct(">BBLLBB")  # PDU type, reserved, PDU length, PDV length, context, flags
PDV_HEADER_BYTES = 6  # PDV item length (4), presentation context ID (1), control header (1)
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
SUCCESS = 0x0000
MAX_OTHER_PDU_BYTES = 64 * KiB  # A-ABORT, A-RELEASE-RQ: a few bytes
MAX_RESPONSE_BYTES = 64 * KiB  # a C-STORE-RSP command set: about 200 bytes
_PDU_NAMES = {0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
# Events that pynetdicom fires on the way this module bypasses. Its own debug loggers
# for them (bound to every association) lose nothing that matters; any other handler
# makes the association use pynetdicom's path.
_BYPASSED_EVENTS = (
    evt.EVT_PDU_SENT,
    evt.EVT_PDU_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_DATA_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_DIMSE_RECV,
    evt.EVT_FSM_TRANSITION,
)
_STANDARD_LOGGERS = {
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
}


class WireError(Exception):
    """A C-STORE on the socket did not complete."""


class AssociationEnded(WireError):
    """The peer aborted or released, or the connection was lost; the DUL has been told."""


class AssociationBroken(WireError):
    """No valid response in time: the association is aborted when the socket goes back."""


def command_elements(command: bytes) -> dict[int, bytes]:
    """Element number -> value of an Implicit VR Little Endian command set (group 0000);
    empty when the bytes are not one."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        end = offset + 8 + length
        if group != 0x0000 or end > len(command):
            return {}
        elements[element] = command[offset + 8 : end]
        offset = end
    return elements if offset == len(command) else {}


def _ui(group: int, element: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return struct.pack("<HHL", group, element, len(raw)) + raw


def _us(group: int, element: int, value: int) -> bytes:
    return struct.pack("<HHLH", group, element, 2, value)


def store_command(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE-RQ (Implicit VR Little Endian, PS3.7 9.3.1.1), priority
    low and a dataset present, as pynetdicom's ``send_c_store`` encodes it."""
    body = b"".join(
        (
            _ui(0x0000, 0x0002, sop_class_uid),  # Affected SOP Class UID
            _us(0x0000, 0x0100, C_STORE_RQ),  # Command Field
            _us(0x0000, 0x0110, message_id),  # Message ID
            _us(0x0000, 0x0700, 0x0002),  # Priority: low
            _us(0x0000, 0x0800, 0x0001),  # Command Data Set Type: a dataset follows
            _ui(0x0000, 0x1000, sop_instance_uid),  # Affected SOP Instance UID
        )
    )
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body  # Command Group Length


def pdata_message(context_id: int, command: bytes, dataset: memoryview, max_pdu: int) -> bytearray:
    """Every P-DATA-TF PDU of one DIMSE message, one PDV each, as one buffer.

    ``max_pdu`` is the peer's maximum PDU length (0: no limit), which bounds the PDV
    list of a PDU; a PDV carries at most ``max_pdu - 6`` bytes of the message.
    """
    if max_pdu and max_pdu <= PDV_HEADER_BYTES:
        raise ValueError(f"peer's maximum PDU length {max_pdu} leaves no room for data")
    parts: tuple[tuple[memoryview, int], ...] = (
        (memoryview(command), COMMAND),
        (memoryview(dataset), 0x00),
    )
    size = max_pdu - PDV_HEADER_BYTES if max_pdu else max(len(command), len(dataset), 1)
    counts = [max(1, math.ceil(len(payload) / size)) for payload, _ in parts]
    total = len(command) + len(dataset) + PDV_HEADER.size * sum(counts)
    out = bytearray(total)
    position = 0
    for (source, flags), count in zip(parts, counts, strict=True):
        for index in range(count):
            fragment = source[index * size : (index + 1) * size]
            length = len(fragment)
            control = flags | (LAST if index == count - 1 else 0)
            pdu_length = length + PDV_HEADER_BYTES
            PDV_HEADER.pack_into(
                out, position, PDATA_TF, 0, pdu_length, length + 2, context_id, control
            )
            position += PDV_HEADER.size
            out[position : position + length] = fragment
            position += length
    return out


def direct_store_possible(assoc: Association) -> bool:
    """Whether :class:`DirectStore` may take this association's C-STOREs."""
    if not isinstance(assoc.dul, EventDrivenDUL):
        return False
    for event in _BYPASSED_EVENTS:
        handlers: Any = assoc.get_handlers(event)
        if any(handler not in _STANDARD_LOGGERS for handler, _ in handlers):
            return False
    return True


class DirectStore:
    """Exclusive use of an established association's socket for C-STORE requests.

    A context manager: entering pauses the association thread (pynetdicom's pause
    protocol, as ``send_c_store`` uses it) and parks the DUL; leaving gives both back,
    aborts the association after :class:`AssociationBroken`, and after
    :class:`AssociationEnded` waits until the association thread has seen the end.
    """

    def __init__(self, assoc: Association, timeout: float | None) -> None:
        self._assoc = assoc
        self._timeout = timeout  # DIMSE timeout: the response, and writing the request
        self._sock: socket.socket | None = None
        self._saved_timeout: float | None = None
        self._failure: WireError | None = None
        self._in_flight = False  # a request is (partly) written and its response not read

    def __enter__(self) -> DirectStore:
        assoc = self._assoc
        dul = assoc.dul
        if not isinstance(dul, EventDrivenDUL):
            raise TypeError("DirectStore needs an EventDrivenDUL")
        wait = self._timeout if self._timeout is not None else 30.0
        assoc._reactor_checkpoint.clear()
        deadline = time.monotonic() + wait
        while not assoc._is_paused:
            if not assoc.is_alive() or time.monotonic() > deadline:
                assoc._reactor_checkpoint.set()
                raise AssociationEnded("the association thread has ended")
            time.sleep(0.0001)
        if not dul.lend_socket(wait):
            assoc._reactor_checkpoint.set()
            raise AssociationEnded("the association's DUL has ended")
        wrapper = dul.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None or not assoc.is_established:
            self._give_back()
            raise AssociationEnded("the connection is closed")
        self._sock = sock
        self._saved_timeout = sock.gettimeout()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._in_flight and self._failure is None:  # interrupted mid-message (^C, a bug):
            self._lost("interrupted")  # the byte stream cannot be resumed, nor aborted cleanly
        self._give_back()
        if isinstance(self._failure, AssociationBroken) and self._assoc.is_established:
            self._assoc.abort()
        elif isinstance(self._failure, AssociationEnded):
            self._wait_for_the_end()

    def store(
        self, context_id: int, message_id: int, meta: Part10, data: bytes | bytearray
    ) -> pydicom.Dataset:
        """One C-STORE of ``data`` (a Part 10 file's bytes): the response's command set."""
        if self._failure is not None or self._sock is None:
            raise AssociationEnded(f"the association cannot be used after: {self._failure}")
        command = store_command(message_id, meta.sop_class_uid, meta.sop_instance_uid)
        dataset = memoryview(data)[meta.dataset_offset :]
        max_pdu = int(self._assoc.acceptor.maximum_length or 0)
        message = pdata_message(context_id, command, dataset, max_pdu)
        self._in_flight = True
        try:
            self._sock.settimeout(self._timeout)
            self._sock.sendall(message)
        except OSError as exc:
            raise self._lost(f"connection lost while sending ({_reason(exc)})") from exc
        response = self._response(context_id, message_id)
        self._in_flight = False
        return response

    def _response(self, context_id: int, message_id: int) -> pydicom.Dataset:
        sock = self._sock
        assert sock is not None
        deadline = time.monotonic() + (self._timeout if self._timeout is not None else 1e7)
        command = bytearray()
        try:
            while True:
                header = recv_exactly(sock, 6, deadline)
                pdu_type, _, length = struct.unpack(">BBL", header)
                if pdu_type != PDATA_TF:
                    raise self._handed_over(header, length, pdu_type, deadline)
                if len(command) + length > MAX_RESPONSE_BYTES:
                    raise self._broken(f"a response of more than {MAX_RESPONSE_BYTES} bytes")
                body = recv_exactly(sock, length, deadline)
                if self._command_fragments(body, context_id, command):
                    break
        except TimeoutError as exc:
            raise self._broken(f"no response within {self._timeout} s") from exc
        except OSError as exc:
            what = f"connection lost while waiting for the response ({_reason(exc)})"
            raise self._lost(what) from exc
        return self._check(bytes(command), message_id)

    def _command_fragments(self, body: bytearray, context_id: int, command: bytearray) -> bool:
        """Add the PDVs of one P-DATA-TF PDU to ``command``; True after the last one."""
        offset = 0
        while offset < len(body):
            if offset + PDV_HEADER_BYTES > len(body):
                raise self._broken("a truncated PDV in the response")
            (length,) = struct.unpack_from(">L", body, offset)
            pdv_context, control = body[offset + 4], body[offset + 5]
            end = offset + 4 + length
            if length < 2 or end > len(body):
                raise self._broken("a PDV whose length does not fit its PDU")
            if not control & COMMAND:
                raise self._broken("a dataset in the response to a C-STORE")
            if pdv_context != context_id:
                raise self._broken(f"a response on presentation context {pdv_context}")
            command += body[offset + 6 : end]
            offset = end
            if control & LAST:
                if offset != len(body):
                    raise self._broken("data after the last fragment of the response")
                return True
        return False

    def _check(self, command: bytes, message_id: int) -> pydicom.Dataset:
        """The response's status, once it is known to be a C-STORE-RSP to ``message_id``.

        Read with ``struct`` (pydicom took a third of a millisecond per image for it); a
        status other than success is decoded in full, error comment and all."""
        elements = command_elements(command)
        values = [elements.get(element, b"") for element in (0x0100, 0x0120, 0x0900)]
        if any(len(value) != 2 for value in values):
            raise self._broken("an undecodable response")
        field, answered, status = (int.from_bytes(value, "little") for value in values)
        if field != C_STORE_RSP or answered != message_id:
            raise self._broken(
                f"command 0x{field:04X} for message {answered} in answer to C-STORE {message_id}"
            )
        if status != SUCCESS:
            return decode(BytesIO(command), True, True)
        response = pydicom.Dataset()
        response.Status = status
        return response

    def _handed_over(
        self, header: bytearray, length: int, pdu_type: int, deadline: float
    ) -> WireError:
        """A PDU other than P-DATA-TF: for the DUL's state machine, and the end of this use."""
        assert self._sock is not None
        if length > MAX_OTHER_PDU_BYTES:
            return self._broken(f"a PDU of type 0x{pdu_type:02X} and {length} bytes")
        body = recv_exactly(self._sock, length, deadline)
        dul = self._assoc.dul
        assert isinstance(dul, EventDrivenDUL)
        dul.deliver_received(header + body)
        name = _PDU_NAMES.get(pdu_type, f"a PDU of type 0x{pdu_type:02X}")
        failure = AssociationEnded(f"the peer sent {name} instead of the C-STORE response")
        self._failure = failure
        return failure

    def _broken(self, what: str) -> AssociationBroken:
        failure = AssociationBroken(f"{what}; association aborted")
        self._failure = failure
        return failure

    def _lost(self, what: str) -> AssociationEnded:
        dul = self._assoc.dul
        if dul.socket is not None:
            dul.socket.close()  # Evt17 for the state machine: A-P-ABORT, Sta1
        failure = AssociationEnded(what)
        self._failure = failure
        return failure

    def _give_back(self) -> None:
        if self._sock is not None and self._sock.fileno() != -1:
            try:
                self._sock.settimeout(self._saved_timeout)
            except OSError:
                pass
        dul = self._assoc.dul
        assert isinstance(dul, EventDrivenDUL)
        dul.return_socket()
        self._assoc._reactor_checkpoint.set()
        self._sock = None

    def _wait_for_the_end(self) -> None:
        deadline = time.monotonic() + (self._timeout if self._timeout is not None else 30.0)
        while self._assoc.is_established and self._assoc.is_alive():
            if time.monotonic() > deadline:
                self._assoc.abort()
                return
            time.sleep(0.001)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
