"""The C-STORE data phase read and answered by the acceptor's DUL thread itself.

pynetdicom turns every P-DATA-TF PDU into an event for its state machine, a ``P_DATA_TF``
object and a ``P_DATA`` primitive, appends it to a DIMSE message, decodes the finished
command set with pydicom, queues the message for the association thread, runs the
handler there and sends the response back the same way. For a 513 KiB CT slice from a
peer that sends 16 KiB PDUs that is some 33 trips through that path and two thread
hand-overs per image: about 2.5 ms, more than the two fsyncs the instance needs.

Here (:class:`FastStore`, called from :meth:`dicom_node.reactor.EventDrivenDUL`'s read
step when the socket is readable and the association is idle), one C-STORE is:

* each PDU read with the limits :class:`~dicom_node.transport.HardenedDUL` applies (the
  length field checked against ``node.max_pdu_bytes`` before the body is read, one
  ``idle_timeout`` deadline per PDU, the dataset bounded by ``node.max_instance_bytes``:
  a breach sends A-ABORT and closes, as there);
* the command set gathered from its fragments and read with ``struct``; only a plain
  C-STORE-RQ on an accepted, not deflated storage context whose SOP Class is the
  context's, with valid UIDs, is served here;
* its dataset fragments kept as views of the PDUs read, joined once behind the File Meta
  Information, and the same store code as the pynetdicom handler runs
  (:meth:`dicom_node.receive.Receiver.store_status`);
* the C-STORE-RSP encoded with ``struct`` (:func:`store_response`, byte-compared with
  pynetdicom's encoder in the tests) and written at once.

Anything else - another PDU type, another DIMSE message (C-ECHO, N-EVENT-REPORT, ...),
a command this does not fully understand, a message whose fragments break the rules -
goes to pynetdicom as if its DUL had read those PDUs itself: they are decoded and queued
for the state machine, in order, and the message is served as before (a PDU that also
carries the next message is queued as one PDU per message:
:func:`~dicom_node.transport.split_pdata`). The state machine
stays in Sta6 meanwhile, as it does for P-DATA. Only for associations of a
:class:`~dicom_node.transport.HardenedDUL` on which nobody listens to PDU- or
DIMSE-level events (:func:`~dicom_node.store_wire.direct_store_possible`), since those
are not fired here.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket

from dicom_node.header import valid_uid
from dicom_node.store_wire import (
    COMMAND,
    LAST,
    PDATA_TF,
    PDV_HEADER_BYTES,
    command_elements,
    direct_store_possible,
)
from dicom_node.transport import (
    MAX_COMMAND_BYTES,
    HardenedDUL,
    Refused,
    Stopped,
    recv_exactly,
    recv_into_exactly,
    restore_timeout,
    sliced_reads,
)

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)

ENABLED = True  # tests switch it off to compare with pynetdicom's path
SETTLE_WAIT = 0.1  # longest wait for the association thread (see FastStore._answered)
ESTABLISH_WAIT = 1.0  # longest wait for it to mark a just-accepted association established
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
NO_DATASET = 0x0101
# The elements of a C-STORE-RQ served here (PS3.7 9.3.1.1) without the move originator's
_STORE_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_PDU_HEADER = struct.Struct(">BBL")

Buffer = bytes | bytearray | memoryview


class StoreFunction(Protocol):
    """:meth:`dicom_node.receive.Receiver.store_status`: stores one instance and returns
    the response's status; leaves in ``after`` what is to run once it is sent."""

    def __call__(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        dataset: Sequence[Buffer],
        calling: str,
        after: list[Callable[[], None]] | None = None,
        comment: list[str] | None = None,
    ) -> int: ...


def _text(element: int, text: str, padding: bytes) -> bytes:
    """A command element of text, padded to an even length (UI: NUL, LO: space)."""
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += padding
    return struct.pack("<HHL", 0x0000, element, len(raw)) + raw


def _ui(element: int, uid: str) -> bytes:
    return _text(element, uid, b"\0")


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHLH", 0x0000, element, 2, value)


def _lo(element: int, text: str) -> bytes:
    return _text(element, text, b" ")


def store_response(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int,
    error_comment: str = "",
) -> bytes:
    """The command set of a C-STORE-RSP without a dataset, as pynetdicom encodes it
    (``error_comment``: an Error Comment, :func:`dicom_node.header.error_comment`)."""
    body = b"".join(
        (
            _ui(0x0002, sop_class_uid),  # Affected SOP Class UID
            _us(0x0100, C_STORE_RSP),  # Command Field
            _us(0x0120, message_id),  # Message ID Being Responded To
            _us(0x0800, NO_DATASET),  # Command Data Set Type
            _us(0x0900, status),  # Status
            _lo(0x0902, error_comment) if error_comment else b"",  # Error Comment
            _ui(0x1000, sop_instance_uid),  # Affected SOP Instance UID
        )
    )
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """A command set as P-DATA-TF PDUs of one PDV each, cut for a peer's maximum PDU length
    (0: no limit), as pynetdicom cuts it."""
    size = max_pdu - PDV_HEADER_BYTES if max_pdu > PDV_HEADER_BYTES else len(command)
    out = []
    for start in range(0, len(command), size):
        fragment = command[start : start + size]
        control = COMMAND | (LAST if start + size >= len(command) else 0)
        pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
        out.append(_PDU_HEADER.pack(PDATA_TF, 0, len(pdv)) + pdv)
    return b"".join(out)


class _Request:
    """A C-STORE-RQ served here: what its command set says."""

    __slots__ = ("context_id", "message_id", "sop_class", "sop_instance", "transfer_syntax")

    def __init__(
        self,
        context_id: int,
        message_id: int,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
    ) -> None:
        self.context_id = context_id
        self.message_id = message_id
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.transfer_syntax = transfer_syntax


class _HandOver(Exception):
    """What was read goes to pynetdicom's state machine, as its DUL would have read it."""


def install(assoc: Association, store: StoreFunction) -> bool:
    """Serve this association's plain C-STOREs here; False when it must not be."""
    dul = assoc.dul
    if not ENABLED or not isinstance(dul, HardenedDUL) or not direct_store_possible(assoc):
        return False
    dul.receive_hook = FastStore(assoc, dul, store)
    return True


class FastStore:
    """One association's C-STORE data phase on the DUL thread (see the module's doc)."""

    def __init__(self, assoc: Association, dul: HardenedDUL, store: StoreFunction) -> None:
        self._assoc = assoc
        self._dul = dul
        self._store = store
        self._calling = ""  # the requestor's AE title, once established (see __call__)
        self._storage_classes: dict[str, bool] = {}
        self._deflated = frozenset({DeflatedExplicitVRLittleEndian})
        self._stopping = dul.stopping

    def __call__(self) -> bool | None:
        """Read from the socket if the association is idle.

        True: a message was read here (served, or handed to the state machine); False:
        let pynetdicom read; None: idle, with nothing to read yet. Then pynetdicom must not
        look either: a request arriving between the two looks would go its slow way.
        """
        if not self._idle():
            return False
        wrapper = cast(AssociationSocket, self._dul.socket)
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:
            return False
        if not _readable(sock):
            return None
        if not self._answered():
            return False
        held: list[bytearray] = []
        sliced = not isinstance(sock, ssl.SSLSocket)
        try:
            if sliced:
                sliced_reads(sock)
            request, fragments = self._read_message(sock, held, sliced)
        except _HandOver:
            self._hand_over(held)
            return True
        except Refused as exc:
            self._dul.abort_connection(exc)
            return True
        except Stopped as exc:  # the node stops: see HardenedDUL.stopping
            self._dul.abandon_read(exc)
            return True
        except OSError as exc:  # includes TimeoutError and ConnectionError
            log.warning("closing the connection from %s: %s", self._assoc.requestor.address, exc)
            wrapper.close()  # Evt17: transport connection closed
            return True
        finally:
            restore_timeout(sock, self._dul._limits.idle_timeout)
        self._dul._idle_timer.restart()
        if not self._calling:  # installed at EVT_REQUESTED, before pynetdicom had it
            self._calling = str(self._assoc.requestor.ae_title)
        after: list[Callable[[], None]] = []
        comment: list[str] = []
        status = self._store(
            request.sop_class,
            request.sop_instance,
            request.transfer_syntax,
            fragments,
            self._calling,
            after,
            comment,
        )
        del fragments, held  # the PDUs read: up to max_instance_bytes
        self._respond(sock, wrapper, request, status, comment[0] if comment else "")
        self._dul._idle_timer.restart()
        for work in after:  # while the peer reads the response and sends its next request
            try:
                work()
            except Exception:  # counters and audit: the instance is stored and answered
                log.exception("after the response to a C-STORE from %s", self._calling)
        return True

    def _idle(self) -> bool:
        """Nothing in progress that a message served here could overtake or interleave."""
        dul = self._dul
        assoc = self._assoc
        return (
            dul.state_machine.current_state == "Sta6"
            and not assoc._sent_release
            and assoc.dimse.message is None
            and dul.event_queue.empty()
            and dul.to_provider_queue.empty()
            and assoc.dimse.msg_queue.empty()
        )

    def _answered(self) -> bool:
        """Whether the association is established and its thread serves no request.

        Read after the DIMSE queue was seen empty (see serve_association). A peer that
        has our A-ASSOCIATE-AC or our last response may send its next request before
        that thread has marked the association established or come back from
        pynetdicom's service class, so it is given a moment (sleeping releases the GIL)
        rather than the request going the slow way: up to :data:`ESTABLISH_WAIT` for the
        thread to finish accepting (its EVT_ACCEPTED handlers, on a busy machine), up to
        :data:`SETTLE_WAIT` for it to finish a request.
        """
        dul = self._dul
        assoc = self._assoc
        start = time.monotonic()
        while dul.serving or not assoc.is_established:
            waited = time.monotonic() - start
            limit = SETTLE_WAIT if dul.serving else ESTABLISH_WAIT
            if dul._kill_thread or assoc.is_aborted or assoc.is_released:
                return False  # ending: pynetdicom's way sees it through
            if not dul.to_provider_queue.empty() or waited > limit:
                return False  # a response to send first, or a long request: not here
            time.sleep(0.0001)
        return True

    def _read_pdu(self, sock: socket.socket, held: list[bytearray], sliced: bool) -> bytearray:
        """The next PDU (header included) under the PDU deadline; any type but P-DATA-TF
        ends this: :class:`_HandOver`."""
        limits = self._dul._limits
        deadline = time.monotonic() + limits.idle_timeout
        header = recv_exactly(sock, 6, deadline, sliced, self._stopping)
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        limit = limits.max_body(pdu_type)  # raises Refused for an unknown type
        if length > limit:
            raise Refused(f"PDU type 0x{pdu_type:02X} of {length} bytes (limit {limit})")
        pdu = bytearray(6 + length)
        pdu[:6] = header
        recv_into_exactly(sock, memoryview(pdu)[6:], deadline, sliced, self._stopping)
        held.append(pdu)
        self._dul._idle_timer.restart()  # a long message must not look like an idle peer
        if pdu_type != PDATA_TF:
            raise _HandOver
        return pdu

    def _read_message(
        self, sock: socket.socket, held: list[bytearray], sliced: bool
    ) -> tuple[_Request, list[memoryview]]:
        """Read one C-STORE-RQ: the request and its dataset fragments (views of ``held``)."""
        command = bytearray()
        request: _Request | None = None
        fragments: list[memoryview] = []
        size = 0
        limit = self._dul._limits.max_instance_bytes
        while True:
            if held and (self._dul._kill_thread or not self._dul.to_provider_queue.empty()):
                raise _HandOver  # the local side wants to abort or send: as between PDUs
            pdu = self._read_pdu(sock, held, sliced)
            view = memoryview(pdu)
            offset, end = 6, len(pdu)
            while offset < end:
                if offset + PDV_HEADER_BYTES > end:
                    raise _HandOver
                (length,) = struct.unpack_from(">L", pdu, offset)
                context_id, control = pdu[offset + 4], pdu[offset + 5]
                stop = offset + 4 + length
                if length < 2 or stop > end:
                    raise _HandOver
                fragment = view[offset + PDV_HEADER_BYTES : stop]
                offset = stop
                if request is None:  # the command set
                    if not control & COMMAND:
                        raise _HandOver
                    command += fragment
                    if len(command) > MAX_COMMAND_BYTES:
                        raise Refused(f"command set over {MAX_COMMAND_BYTES} bytes")
                    if control & LAST:
                        request = self._request(bytes(command), context_id)
                    continue
                if control & COMMAND or context_id != request.context_id:
                    raise _HandOver
                size += len(fragment)
                if size > limit:
                    raise Refused(f"dataset over node.max_instance_bytes ({limit})")
                fragments.append(fragment)
                if control & LAST:
                    if offset != end:  # a next message in the same PDU: see _hand_over
                        raise _HandOver
                    return request, fragments

    def _request(self, command: bytes, context_id: int) -> _Request:
        """The C-STORE-RQ in ``command``; :class:`_HandOver` for anything else."""
        elements = command_elements(command)
        if not elements or not elements.keys() <= _STORE_ELEMENTS:
            raise _HandOver
        values = [elements.get(element, b"") for element in (0x0100, 0x0110, 0x0700, 0x0800)]
        if any(len(value) != 2 for value in values):
            raise _HandOver
        field, message_id, priority, dataset_type = (
            int.from_bytes(value, "little") for value in values
        )
        if field != C_STORE_RQ or dataset_type == NO_DATASET or priority not in (0, 1, 2):
            raise _HandOver
        sop_class = self._uid(elements.get(0x0002, b""))
        sop_instance = self._uid(elements.get(0x1000, b""))
        context = self._assoc._accepted_cx.get(context_id)
        if context is None or not self._storage_context(context, sop_class):
            raise _HandOver
        transfer_syntax = str(context.transfer_syntax[0])
        return _Request(context_id, message_id, sop_class, sop_instance, transfer_syntax)

    def _uid(self, raw: bytes) -> str:
        text = raw.rstrip(b"\0 ").decode("ascii", "replace")
        if not valid_uid(text):
            raise _HandOver  # pynetdicom decides, as it always did
        return text

    def _storage_context(self, context: PresentationContext, sop_class: str) -> bool:
        if context.abstract_syntax != sop_class or not context.transfer_syntax:
            return False
        if context.transfer_syntax[0] in self._deflated:
            return False  # metered (inflated) by HardenedDUL's path
        if _config.UNRESTRICTED_STORAGE_SERVICE or self._assoc.acceptor.accepted_common_extended:
            return False
        known = self._storage_classes.get(sop_class)
        if known is None:
            known = uid_to_service_class(sop_class) is StorageServiceClass
            self._storage_classes[sop_class] = known
        return known

    def _respond(
        self,
        sock: socket.socket,
        wrapper: AssociationSocket,
        request: _Request,
        status: int,
        error_comment: str,
    ) -> None:
        # pynetdicom sends no response when the association ended during the handler
        if not self._assoc.is_established or wrapper.socket is None:
            return
        command = store_response(
            request.message_id, request.sop_class, request.sop_instance, status, error_comment
        )
        max_pdu = int(self._assoc.requestor.maximum_length or 0)
        try:
            sock.sendall(command_pdus(request.context_id, command, max_pdu))
        except OSError as exc:
            log.warning("closing the connection from %s: %s", self._assoc.requestor.address, exc)
            wrapper.close()

    def _hand_over(self, held: list[bytearray]) -> None:
        """Queue the PDUs read for pynetdicom's state machine, as HardenedDUL would have:
        a PDU that carries more than one DIMSE message (the end of a C-STORE and the next
        request, say) as one PDU per message, since pynetdicom's decoder drops what
        follows a message's last fragment in the same PDU."""
        dul = self._dul
        deflated = dul._deflated_contexts()
        for pdu in held:
            cuts = None
            try:
                if pdu[0] == PDATA_TF:
                    cuts = dul._meter.feed(memoryview(pdu)[6:], deflated)
            except Refused as exc:
                dul.abort_connection(exc)
                return
            if not dul.queue_received(pdu, cuts):
                return


def _readable(sock: socket.socket) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted bytes are buffered: select would not see them
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False  # pynetdicom's own look at the socket reports the loss (Evt17)
    return bool(readable)
