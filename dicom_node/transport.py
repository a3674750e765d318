"""Reading a peer's PDUs with limits: the DUL of every association we accept.

Stock pynetdicom 3.0.4 trusts the peer: it allocates whatever a PDU length field
claims, waits forever on a peer that trickles bytes, inflates deflated datasets
without bound and spends two threads on every accepted socket. Here:

* :class:`dicom_node.listener.HardenedServer` refuses excess connections before any
  thread exists (see there).
* :class:`HardenedDUL` (an event-driven DUL, see :mod:`dicom_node.reactor`) reads each
  PDU under one deadline (``idle_timeout_seconds`` for the whole PDU, not per ``recv``),
  checks the length field before reading the body, and meters P-DATA-TF fragments:
  command sets are bounded, a message's dataset by ``max_instance_bytes`` (inflated size
  for the deflated transfer syntax). A breach sends A-ABORT and closes the connection.
* A P-DATA-TF PDU that carries the end of one DIMSE message and the start of the next
  (PS3.8 allows it) is handed to pynetdicom as one PDU per message
  (:func:`split_pdata`): its decoder ends a message at its last fragment and drops
  whatever follows in the same PDU.
* A read in progress gives up once the association is being aborted here (the node
  stops: ``node.drain_seconds`` passed), however long its PDU deadline still runs: it
  looks every :data:`RECV_SLICE_SECONDS` (see :func:`recv_into_exactly`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.transport import AssociationSocket

from dicom_node.config import NodeSection
from dicom_node.reactor import EventDrivenDUL

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

KiB = 1024
MAX_ASSOCIATE_PDU_BYTES = 64 * KiB  # A-ASSOCIATE-RQ/AC: a few contexts and user items
MAX_SMALL_PDU_BYTES = 64  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP, A-ABORT: 4-byte bodies
PDATA_HEADER_ALLOWANCE = 1 * KiB  # peers count the PDV headers differently
MAX_COMMAND_BYTES = 64 * KiB  # a DIMSE command set is a few hundred bytes
MAX_QUEUED_MESSAGES = 4  # complete DIMSE messages waiting for the handler: then stop reading
INFLATE_CHUNK = 1024 * KiB
RECV_CHUNK = 1024 * KiB
RECV_SLICE_SECONDS = 0.5  # a sliced read (see sliced_reads) looks at its deadline this often
A_ASSOCIATE_RQ_TYPE = 0x01
PDATA_TF = 0x04

Buffer = bytes | bytearray | memoryview

# A-ABORT reason/diagnostic values (PS3.8 9.3.8), source 0x02: the service provider
UNRECOGNIZED_PDU = 0x01
INVALID_PARAMETER_VALUE = 0x06
# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent by the service user, because of the
# calling or the called AE title
REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07
# The kind such a rejection is reported as to the server's on_refusal (beside the listener's
# "refused" and "tls_failed"): dicom_node_associations{outcome="rejected"}, and audited
REJECTED = "rejected"


def ae_title_problem(raw: bytes) -> str | None:
    """Why a 16-byte AE title field of an A-ASSOCIATE-RQ is not an AE title (PS3.5 AE:
    ASCII without control characters or backslash, not all spaces), or None.

    As strict as pynetdicom's decoder, which logs a traceback and raises for such a title
    (the association was then aborted as an undecodable PDU).
    """
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return "not ASCII"
    if not text:
        return "all spaces"
    if "\\" in text or not text.isprintable():
        return "control characters or a backslash"
    return None


class Stopped(ConnectionError):
    """A read given up because the association is being aborted or ended here."""


class Refused(Exception):
    """The peer broke a limit; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What the listener enforces, from ``node``."""

    max_pdu_bytes: int
    max_instance_bytes: int
    idle_timeout: float
    max_connections: int
    max_per_source: int
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, node: NodeSection) -> Limits:
        return cls(
            max_pdu_bytes=node.max_pdu_bytes,
            max_instance_bytes=node.max_instance_bytes,
            idle_timeout=node.idle_timeout_seconds,
            max_connections=node.max_connections,
            max_per_source=node.max_associations_per_source,
            allowed_networks=tuple(node.allowed_networks),
        )

    def max_body(self, pdu_type: int) -> int:
        if pdu_type == PDATA_TF:
            return self.max_pdu_bytes + PDATA_HEADER_ALLOWANCE
        if pdu_type in (0x01, 0x02):
            return MAX_ASSOCIATE_PDU_BYTES
        if pdu_type in (0x03, 0x05, 0x06, 0x07):
            return MAX_SMALL_PDU_BYTES
        raise Refused(f"unknown PDU type 0x{pdu_type:02X}", UNRECOGNIZED_PDU)


def sliced_reads(sock: socket.socket) -> None:
    """Put a plain TCP socket in blocking mode, each ``recv`` bounded by SO_RCVTIMEO.

    With a timeout, every Python ``recv`` is three system calls (``ioctl`` to set the
    timeout, ``poll``, ``recvfrom``), and each wait hands the GIL over: with a deadline
    per PDU, some 35 per 513 KiB image. A sliced read is one ``recvfrom``, which waits at
    most :data:`RECV_SLICE_SECONDS` before its deadline is looked at again, so a deadline
    holds to within that. Pass ``sliced=True`` to :func:`recv_into_exactly`, and call
    :func:`restore_timeout` after the reads (SO_RCVTIMEO does nothing in timeout mode).
    Not for TLS sockets (a timed-out ``recv`` under OpenSSL is not a clean retry).
    """
    seconds = int(RECV_SLICE_SECONDS)
    micros = int((RECV_SLICE_SECONDS - seconds) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
    sock.settimeout(None)


def recv_exactly(
    sock: socket.socket,
    size: int,
    deadline: float,
    sliced: bool = False,
    stop: Callable[[], bool] | None = None,
) -> bytearray:
    """Read ``size`` bytes before ``deadline`` (time.monotonic) or raise TimeoutError."""
    buffer = bytearray(size)
    recv_into_exactly(sock, memoryview(buffer), deadline, sliced, stop)
    return buffer


def recv_into_exactly(
    sock: socket.socket,
    view: memoryview,
    deadline: float,
    sliced: bool = False,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Fill ``view`` before ``deadline`` (time.monotonic) or raise TimeoutError.

    ``sliced``: ``sock`` is in :func:`sliced_reads` mode. A peer that closes first
    raises ConnectionError. ``stop``: looked at after each wait that brought no byte
    (each wait is at most :data:`RECV_SLICE_SECONDS`) and before each further ``recv``
    once part of ``view`` is filled, never when one ``recv`` fills it; True raises
    :class:`Stopped`.
    """
    received, size = 0, len(view)
    while received < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{received} of {size} bytes before the PDU deadline")
        if received and stop is not None and stop():
            raise Stopped(f"given up with {received} of {size} bytes read: aborted here")
        if not sliced:
            sock.settimeout(remaining if stop is None else min(remaining, RECV_SLICE_SECONDS))
        try:
            count = sock.recv_into(view[received:], min(RECV_CHUNK, size - received))
        except BlockingIOError:
            if not sliced:
                raise
            count = -1  # a slice passed without a byte: the deadline is looked at again
        except TimeoutError:
            if sliced or stop is None:
                raise
            count = -1  # a capped wait passed (TLS, pynetdicom's read path): the same
        if count > 0:
            received += count
            continue
        if not count:
            raise ConnectionError(f"peer closed after {received} of {size} bytes")
        if stop is not None and stop():
            raise Stopped(f"given up with {received} of {size} bytes read: aborted here")


def split_pdata(pdu: bytearray, cuts: list[int]) -> list[bytearray]:
    """A P-DATA-TF PDU (header included) as one P-DATA-TF PDU per DIMSE message it
    carries: cut before the PDVs at body offsets ``cuts`` (see :meth:`MessageMeter.feed`).
    """
    pieces = []
    view = memoryview(pdu)
    start = 6
    for stop in [6 + cut for cut in cuts] + [len(pdu)]:
        piece = bytearray(struct.pack(">BBL", PDATA_TF, 0, stop - start))
        piece += view[start:stop]
        pieces.append(piece)
        start = stop
    return pieces


class MessageMeter:
    """Counts one DIMSE message's fragments as P-DATA-TF PDUs arrive (PS3.8 9.3.5)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._command = 0
        self._dataset = 0
        self._inflated = 0
        self._inflater: Any = None

    def feed(self, body: Buffer, deflated_contexts: frozenset[int]) -> list[int] | None:
        """Count the PDVs of a P-DATA-TF body. Returns the offsets of the PDVs that start
        a DIMSE message after another one ended in this same body (a command fragment
        after a last fragment), for :func:`split_pdata`; None when there are none."""
        offset = 0
        ended = False  # the PDV before was a last fragment
        cuts: list[int] | None = None
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            if item_length < 2 or offset + 4 + item_length > len(body):
                return cuts  # malformed: pynetdicom's decoder rejects it
            context_id, control = body[offset + 4], body[offset + 5]
            fragment = memoryview(body)[offset + 6 : offset + 4 + item_length]
            if control & 0x01:
                if ended:  # PS3.8 9.3.5: a PDU may carry PDVs of more than one message
                    cuts = [offset] if cuts is None else [*cuts, offset]
                self._count_command(len(fragment), last=bool(control & 0x02))
            else:
                self._count_dataset(fragment, context_id in deflated_contexts)
                if control & 0x02:
                    self._dataset, self._inflated, self._inflater = 0, 0, None
            ended = bool(control & 0x02)
            offset += 4 + item_length
        return cuts

    def _count_command(self, size: int, last: bool) -> None:
        self._command = 0 if last else self._command + size
        if self._command > MAX_COMMAND_BYTES:
            raise Refused(f"command set over {MAX_COMMAND_BYTES} bytes")

    def _count_dataset(self, fragment: memoryview, deflated: bool) -> None:
        limit = self._limits.max_instance_bytes
        self._dataset += len(fragment)
        if self._dataset > limit:
            raise Refused(f"dataset over node.max_instance_bytes ({limit})")
        if deflated:
            self._inflate(bytes(fragment), limit)

    def _inflate(self, data: bytes, limit: int) -> None:
        """Inflate into nothing, INFLATE_CHUNK at a time, to learn the inflated size."""
        if self._inflater is None:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            while data:
                self._inflated += len(self._inflater.decompress(data, INFLATE_CHUNK))
                if self._inflated > limit:
                    raise Refused(f"inflated dataset over node.max_instance_bytes ({limit})")
                data = self._inflater.unconsumed_tail
        except zlib.error as exc:
            raise Refused(f"corrupt deflated dataset ({exc})") from exc


class GuardedStateMachine(StateMachine):
    """An action that raises (say, a P-DATA whose command set cannot be decoded) aborts
    the association; pynetdicom would let the exception end the DUL thread."""

    def do_action(self, event: str) -> None:
        try:
            super().do_action(event)
        except Exception as exc:
            dul = cast(HardenedDUL, self.dul)
            dul.abort_connection(Refused(f"{event} failed in the state machine ({exc!r:.80})"))


class HardenedDUL(EventDrivenDUL):
    """The DICOM upper layer with a deadline per PDU and limits checked before reading."""

    def __init__(self, assoc: Association, limits: Limits) -> None:
        super().__init__(assoc)
        self._limits = limits
        self._meter = MessageMeter(limits)
        self.state_machine = GuardedStateMachine(self)
        # (source address, reason, kind): the listener's report of a connection turned
        # away (HardenedServer.report_refusal), set by the request handler
        self.report_refusal: Callable[[str, str, str], None] | None = None

    def _is_transport_event(self) -> bool:
        if not self._reading_allowed():
            return False
        return bool(super()._is_transport_event())

    def _reading_allowed(self) -> bool:
        # Backpressure: a peer that pipelines messages faster than the handler stores
        # them waits in TCP, not in our memory.
        return self.assoc.dimse.msg_queue.qsize() < MAX_QUEUED_MESSAGES

    def stopping(self) -> bool:
        """Whether the association is being aborted (the node stops) or the DUL ends: a
        read in progress gives up (see :func:`recv_into_exactly`)."""
        return bool(self._kill_thread or self.assoc._sent_abort)

    def _read_pdu_data(self) -> None:
        wrapper = cast(AssociationSocket, self.socket)
        sock = wrapper.socket
        if sock is None:
            self.event_queue.put("Evt17")
            return
        deadline = time.monotonic() + self._limits.idle_timeout
        try:
            pdu, cuts = self._read_pdu(sock, deadline)
        except Refused as exc:
            self.abort_connection(exc)
            return
        except Stopped as exc:
            self.abandon_read(exc)
            return
        except OSError as exc:  # includes TimeoutError and ConnectionError
            if self.state_machine.current_state == "Sta13":  # released: the peer hangs up
                log.debug("connection from %s closed after release", _peer(self.assoc))
            else:
                log.warning("closing the connection from %s: %s", _peer(self.assoc), exc)
            wrapper.close()  # Evt17: transport connection closed
            return
        finally:
            restore_timeout(sock, self._limits.idle_timeout)
        if pdu[0] == A_ASSOCIATE_RQ_TYPE and self._rejected_ae_title(pdu):
            return
        self.queue_received(pdu, cuts)

    def _rejected_ae_title(self, pdu: bytearray) -> bool:
        """Answer an A-ASSOCIATE-RQ whose calling or called AE title is not an AE title
        with A-ASSOCIATE-RJ (rejected-permanent, calling or called AE title not
        recognized) and close, as a title not allowed is answered; True if it was."""
        # Sta1 with the connection's Evt5 still queued, or Sta2: the acceptor's first PDU
        if self.state_machine.current_state not in ("Sta1", "Sta2") or len(pdu) < 42:
            return False  # pynetdicom's state machine and decoder see to it
        for field, start, reason in (
            ("calling", 26, CALLING_AE_NOT_RECOGNIZED),
            ("called", 10, CALLED_AE_NOT_RECOGNIZED),
        ):
            raw = bytes(pdu[start : start + 16])
            problem = ae_title_problem(raw)
            if problem is None:
                continue
            address = _peer(self.assoc)
            text = f"{field} AE title {raw.strip(b' ')!r} is not an AE title ({problem})"
            log.warning("association from %s rejected: %s", address, text)
            rejection = A_ASSOCIATE_RJ()
            rejection.result, rejection.source = REJECTED_PERMANENT, SERVICE_USER
            rejection.reason_diagnostic = reason
            self._send_and_close(rejection.encode())
            if self.report_refusal is not None:
                try:
                    self.report_refusal(address, text, REJECTED)
                except Exception:  # counting and auditing must not break the DUL
                    log.exception("reporting a rejected association failed")
            return True
        return False

    def _read_pdu(self, sock: socket.socket, deadline: float) -> tuple[bytearray, list[int] | None]:
        """The next PDU (header included) and, for a P-DATA-TF PDU that carries more than
        one DIMSE message, where to cut it (see :meth:`MessageMeter.feed`)."""
        header = recv_exactly(sock, 6, deadline, stop=self.stopping)
        pdu_type, _, length = struct.unpack(">BBL", header)
        limit = self._limits.max_body(pdu_type)
        if length > limit:
            raise Refused(f"PDU type 0x{pdu_type:02X} of {length} bytes (limit {limit})")
        body = recv_exactly(sock, length, deadline, stop=self.stopping)
        cuts = None
        if pdu_type == PDATA_TF:
            cuts = self._meter.feed(body, self._deflated_contexts())
        return header + body, cuts

    def queue_received(self, pdu: bytearray, cuts: list[int] | None) -> bool:
        """Decode a PDU read (cut at ``cuts``: :func:`split_pdata`) and queue it for the
        state machine; False when it could not be decoded (then aborted)."""
        for piece in split_pdata(pdu, cuts) if cuts else (pdu,):
            try:
                decoded, event = self._decode_pdu(piece)
            except Exception as exc:
                self.abort_connection(Refused(f"undecodable PDU ({type(exc).__name__})"))
                return False
            self.event_queue.put(event)
            self._recv_pdu.put(decoded)
        return True

    def _deflated_contexts(self) -> frozenset[int]:
        return frozenset(
            int(cx.context_id)
            for cx in self.assoc.accepted_contexts
            if cx.context_id is not None and cx.transfer_syntax == [DeflatedExplicitVRLittleEndian]
        )

    def abort_connection(self, exc: Refused) -> None:
        """Send A-ABORT (source: service provider) and close; the FSM sees Evt17."""
        log.warning("aborting the association from %s: %s", _peer(self.assoc), exc)
        self._send_abort_and_close(0x02, exc.reason)

    def abandon_read(self, exc: Stopped) -> None:
        """A PDU half read when the association was aborted here (the node stops): the
        A-ABORT queued for the state machine cannot follow it, so it is sent here (unless
        one went already: Sta13), and the connection closed; the FSM sees Evt17."""
        log.info("closing the connection from %s: %s", _peer(self.assoc), exc)
        if self.state_machine.current_state == "Sta13":
            cast(AssociationSocket, self.socket).close()
        else:
            self._send_abort_and_close(0x00, 0x00)  # as Association.abort() sends it

    def _send_abort_and_close(self, source: int, reason: int) -> None:
        pdu = A_ABORT_RQ()
        pdu.source = source
        pdu.reason_diagnostic = reason
        self._send_and_close(pdu.encode())

    def _send_and_close(self, pdu: bytes) -> None:
        """Send a last PDU (as far as the peer takes it) and close; the FSM sees Evt17."""
        wrapper = cast(AssociationSocket, self.socket)
        if wrapper.socket is not None:
            try:
                wrapper.socket.sendall(pdu)
            except OSError:
                pass
        wrapper.close()


def restore_timeout(sock: socket.socket, timeout: float) -> None:
    """Put back the idle timeout after a read with a deadline; a closed socket is left be.

    Also bounds send(): a peer that stops reading our responses cannot hold a thread.
    """
    try:
        sock.settimeout(timeout)
    except OSError:
        pass


def _peer(assoc: Association) -> str:
    try:
        return str(assoc.requestor.address)
    except Exception:
        return "?"
