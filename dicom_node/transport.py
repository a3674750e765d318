"""A hardened association server: pynetdicom's, with limits enforced while reading.

Stock pynetdicom 3.0.4 trusts the peer: it allocates whatever a PDU length field
claims, waits forever on a peer that trickles bytes, inflates deflated datasets
without bound and spends two threads on every accepted socket. Here:

* :class:`HardenedServer` (a ``ThreadedAssociationServer``) refuses a connection in
  ``verify_request`` - after ``accept``, before any thread exists - when the source is
  outside ``allowed_networks`` or ``max_connections`` / ``max_associations_per_source``
  would be exceeded. TLS handshakes run in the connection's thread, under a deadline.
* :class:`HardenedDUL` (an event-driven DUL, see :mod:`dicom_node.reactor`) reads each
  PDU under one deadline (``idle_timeout_seconds`` for the whole PDU, not per ``recv``),
  checks the length field before reading the body, and meters P-DATA-TF fragments:
  command sets are bounded, a message's dataset by ``max_instance_bytes`` (inflated size
  for the deflated transfer syntax). A breach sends A-ABORT and closes the connection.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.config import NodeSection
from dicom_node.reactor import EventDrivenDUL, serve_association

if TYPE_CHECKING:
    from pynetdicom import AE
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
PDATA_TF = 0x04
# kinds of connections turned away before any association (HardenedServer.on_refusal)
REFUSED = "refused"  # node.allowed_networks, max_connections, max_associations_per_source
TLS_FAILED = "tls_failed"

# A-ABORT reason/diagnostic values (PS3.8 9.3.8), source 0x02: the service provider
UNRECOGNIZED_PDU = 0x01
INVALID_PARAMETER_VALUE = 0x06


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


def recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytearray:
    """Read ``size`` bytes before ``deadline`` (time.monotonic) or raise TimeoutError."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{received} of {size} bytes before the PDU deadline")
        sock.settimeout(remaining)
        count = sock.recv_into(view[received:], min(RECV_CHUNK, size - received))
        if not count:
            raise ConnectionError(f"peer closed after {received} of {size} bytes")
        received += count
    return buffer


class MessageMeter:
    """Counts one DIMSE message's fragments as P-DATA-TF PDUs arrive (PS3.8 9.3.5)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._command = 0
        self._dataset = 0
        self._inflated = 0
        self._inflater: Any = None

    def feed(self, body: bytes | bytearray, deflated_contexts: frozenset[int]) -> None:
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            if item_length < 2 or offset + 4 + item_length > len(body):
                return  # malformed: pynetdicom's decoder rejects it
            context_id, control = body[offset + 4], body[offset + 5]
            fragment = memoryview(body)[offset + 6 : offset + 4 + item_length]
            if control & 0x01:
                self._count_command(len(fragment), last=bool(control & 0x02))
            else:
                self._count_dataset(fragment, context_id in deflated_contexts)
                if control & 0x02:
                    self._dataset, self._inflated, self._inflater = 0, 0, None
            offset += 4 + item_length

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

    def _is_transport_event(self) -> bool:
        if not self._reading_allowed():
            return False
        return bool(super()._is_transport_event())

    def _reading_allowed(self) -> bool:
        # Backpressure: a peer that pipelines messages faster than the handler stores
        # them waits in TCP, not in our memory.
        return self.assoc.dimse.msg_queue.qsize() < MAX_QUEUED_MESSAGES

    def _read_pdu_data(self) -> None:
        wrapper = cast(AssociationSocket, self.socket)
        sock = wrapper.socket
        if sock is None:
            self.event_queue.put("Evt17")
            return
        deadline = time.monotonic() + self._limits.idle_timeout
        try:
            pdu = self._read_pdu(sock, deadline)
        except Refused as exc:
            self.abort_connection(exc)
            return
        except OSError as exc:  # includes TimeoutError and ConnectionError
            if self.state_machine.current_state == "Sta13":  # released: the peer hangs up
                log.debug("connection from %s closed after release", _peer(self.assoc))
            else:
                log.warning("closing the connection from %s: %s", _peer(self.assoc), exc)
            wrapper.close()  # Evt17: transport connection closed
            return
        finally:
            _restore_timeout(sock, self._limits.idle_timeout)
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as exc:
            self.abort_connection(Refused(f"undecodable PDU ({type(exc).__name__})"))
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _read_pdu(self, sock: socket.socket, deadline: float) -> bytearray:
        header = recv_exactly(sock, 6, deadline)
        pdu_type, _, length = struct.unpack(">BBL", header)
        limit = self._limits.max_body(pdu_type)
        if length > limit:
            raise Refused(f"PDU type 0x{pdu_type:02X} of {length} bytes (limit {limit})")
        body = recv_exactly(sock, length, deadline)
        if pdu_type == PDATA_TF:
            self._meter.feed(body, self._deflated_contexts())
        return header + body

    def _deflated_contexts(self) -> frozenset[int]:
        return frozenset(
            int(cx.context_id)
            for cx in self.assoc.accepted_contexts
            if cx.context_id is not None and cx.transfer_syntax == [DeflatedExplicitVRLittleEndian]
        )

    def abort_connection(self, exc: Refused) -> None:
        """Send A-ABORT (source: service provider) and close; the FSM sees Evt17."""
        wrapper = cast(AssociationSocket, self.socket)
        log.warning("aborting the association from %s: %s", _peer(self.assoc), exc)
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = exc.reason
        if wrapper.socket is not None:
            try:
                wrapper.socket.sendall(pdu.encode())
            except OSError:
                pass
        wrapper.close()


def _restore_timeout(sock: socket.socket, timeout: float) -> None:
    # Also bounds send(): a peer that stops reading our responses cannot hold a thread.
    try:
        sock.settimeout(timeout)
    except OSError:
        pass


def _peer(assoc: Association) -> str:
    try:
        return str(assoc.requestor.address)
    except Exception:
        return "?"


@dataclass
class _Connection:
    sock: socket.socket
    source: str
    accepted_at: float
    assoc: Association | None = field(default=None)

    def alive(self, grace: float) -> bool:
        if self.sock.fileno() == -1:
            return False
        if self.assoc is None or self.assoc.ident is None:  # its threads are not started yet
            return time.monotonic() - self.accepted_at < grace
        return self.assoc.is_alive() or self.assoc.dul.is_alive()


class HardenedRequestHandler(RequestHandler):
    """Bounded TLS handshake, then an association whose DUL is a :class:`HardenedDUL`."""

    server: HardenedServer

    def handle(self) -> None:
        limits = self.server.limits
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(limits.idle_timeout)  # a total deadline for the handshake
                self.request.do_handshake()
            except (OSError, ValueError) as exc:
                log.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
                self.server.report_refusal(
                    str(self.client_address[0]), f"TLS handshake failed: {exc}", TLS_FAILED
                )
                self.server.shutdown_request(self.request)
                return
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        limits = self.server.limits
        stock = assoc.dul
        dul = HardenedDUL(assoc, limits)
        dul.socket, dul.event_queue = stock.socket, stock.event_queue  # Evt5 is queued there
        assoc.dul = dul
        assoc._run_reactor = functools.partial(serve_association, assoc)  # type: ignore[method-assign]
        # the setters arm the new DUL's timers: ARTIM (no A-ASSOCIATE-RQ) and idle
        assoc.acse_timeout = min(assoc.acse_timeout or limits.idle_timeout, limits.idle_timeout)
        assoc.network_timeout = limits.idle_timeout
        _restore_timeout(self.request, limits.idle_timeout)
        self.server.attach(self.request, assoc)
        return assoc


class SupportedContexts(list[PresentationContext]):
    """The server's presentation contexts, copied cheaply for each new association.

    pynetdicom deep-copies the acceptor's contexts for every association: with every
    storage SOP class and ~30 transfer syntaxes that took about 0.1 s of CPU per
    association here. A context's state is its scalar attributes and its list of
    (immutable) transfer syntax UIDs, so a shallow copy plus a new list is a full copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


class HardenedServer(ThreadedAssociationServer):
    """Counts connections and refuses the excess before any thread is spawned."""

    request_queue_size = 128  # a flood of refused connects should not drop good SYNs

    def __init__(self, ae: AE, address: tuple[str, int], limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        # (source address, reason, REFUSED or TLS_FAILED), for the metrics and the audit
        self.on_refusal: Callable[[str, str, str], None] | None = None
        self._connections: list[_Connection] = []
        self._connections_lock = threading.Lock()
        super().__init__(
            ae,
            address,
            ae.ae_title,
            ae.supported_contexts,
            request_handler=HardenedRequestHandler,
            **kwargs,
        )
        self.contexts = SupportedContexts(self.contexts)

    @property
    def open_connections(self) -> int:
        with self._connections_lock:
            self._prune()
            return len(self._connections)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:  # the handshake happens in the connection's thread
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        source = str(client_address[0])
        with self._connections_lock:
            self._prune()
            reason = self._refusal(source)
            if reason is None:
                self._connections.append(_Connection(request, source, time.monotonic()))
                return True
        log.warning("refused a connection from %s: %s", source, reason)
        self.report_refusal(source, reason, REFUSED)
        return False

    def report_refusal(self, source: str, reason: str, kind: str) -> None:
        """Tell :attr:`on_refusal` of a connection turned away before any association."""
        if self.on_refusal is None:
            return
        try:
            self.on_refusal(source, reason, kind)
        except Exception:  # reporting must never stop the server's loop
            log.exception("reporting a refused connection failed")

    def attach(self, sock: socket.socket, assoc: Association) -> None:
        with self._connections_lock:
            for connection in self._connections:
                if connection.sock is sock:
                    connection.assoc = assoc

    def _refusal(self, source: str) -> str | None:
        if not _in_networks(source, self.limits.allowed_networks):
            return "source outside node.allowed_networks"
        if len(self._connections) >= self.limits.max_connections:
            return f"node.max_connections ({self.limits.max_connections}) reached"
        same = sum(1 for c in self._connections if c.source == source)
        if same >= self.limits.max_per_source:
            return f"node.max_associations_per_source ({self.limits.max_per_source}) reached"
        return None

    def _prune(self) -> None:
        grace = self.limits.idle_timeout + 5.0
        keep = []
        for connection in self._connections:
            if connection.alive(grace):
                keep.append(connection)
            elif connection.sock.fileno() != -1:
                self.shutdown_request(connection.sock)  # threads gone, socket left open
        self._connections = keep


def _in_networks(
    source: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(source.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def start_server(
    ae: AE,
    node: NodeSection,
    evt_handlers: list[Any],
    ssl_context: ssl.SSLContext | None = None,
) -> HardenedServer:
    """What ``AE.start_server(block=False)`` does, with :class:`HardenedServer`."""
    server = HardenedServer(
        ae,
        (node.host, node.port),
        Limits.from_config(node),
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
    )
    ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"AcceptorServer@{timestamp}", daemon=True
    )
    thread.start()
    return server
