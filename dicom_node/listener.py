"""The listening side: pynetdicom's association server, refusing the excess early.

:class:`HardenedServer` (a ``ThreadedAssociationServer``) refuses a connection in
``verify_request`` - after ``accept``, before any thread exists - when the source is
outside ``allowed_networks`` or ``max_connections`` / ``max_associations_per_source``
would be exceeded. TLS handshakes run in the connection's thread, under a deadline.
Every accepted association reads its PDUs through a
:class:`~dicom_node.transport.HardenedDUL`.
"""

from __future__ import annotations

import copy
import errno
import functools
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.config import NodeSection
from dicom_node.reactor import serve_association
from dicom_node.transport import HardenedDUL, Limits, restore_timeout

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

# kinds of connections turned away before any association (HardenedServer.on_refusal)
REFUSED = "refused"  # node.allowed_networks, max_connections, max_associations_per_source
TLS_FAILED = "tls_failed"


class Elsewhere(Protocol):
    """A connection handed to another receiving process (:mod:`dicom_node.receivers`)."""

    @property
    def open(self) -> bool: ...


# Hands an accepted (not yet TLS-wrapped) connection to another receiving process;
# returns what tells when it is closed there, or None to serve it here.
HandOff = Callable[[socket.socket, tuple[str, int]], "Elsewhere | None"]


@dataclass
class _Connection:
    sock: socket.socket
    source: str
    accepted_at: float
    assoc: Association | None = field(default=None)
    elsewhere: Elsewhere | None = field(default=None)

    def alive(self, grace: float) -> bool:
        if self.elsewhere is not None:
            return self.elsewhere.open
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
        dul.report_refusal = self.server.report_refusal
        assoc.dul = dul
        assoc._run_reactor = functools.partial(serve_association, assoc)  # type: ignore[method-assign]
        # the setters arm the new DUL's timers: ARTIM (no A-ASSOCIATE-RQ) and idle
        assoc.acse_timeout = min(assoc.acse_timeout or limits.idle_timeout, limits.idle_timeout)
        assoc.network_timeout = limits.idle_timeout
        restore_timeout(self.request, limits.idle_timeout)
        self.server.attach(self.request, assoc)
        return assoc


class ListenError(OSError):
    """A port the node cannot listen on, named by its configuration keys."""

    def __str__(self) -> str:
        return str(self.args[0])


def listen_error(exc: OSError, section: str, host: str, port: int) -> ListenError:
    """``exc`` from binding ``host``:``port`` (the ``section``'s ``host`` and ``port``:
    "node" or "web") as one line that says which setting to change: ``[Errno 98] Address
    already in use`` alone did not tell the DICOM port from the web port."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        text = f"{section}.host: cannot resolve {host!r} ({exc.strerror})"
    elif exc.errno == errno.EADDRINUSE:
        text = (
            f"{section}.port: {where} is already in use (by another dicom-node or another"
            f" program: ss -ltnp 'sport = :{port}')"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        text = f"{section}.host: {host} is not an address of this machine"
    elif exc.errno == errno.EACCES:
        text = f"{section}.port: no permission to listen on {where} (below 1024 needs privileges)"
    else:
        text = f"{section}.host, {section}.port: cannot listen on {where}: {exc.strerror or exc}"
    error = ListenError(text)
    error.errno = exc.errno
    return error


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
    # Stopping does not wait for connection threads (a TLS handshake may take up to
    # node.idle_timeout_seconds): the drain waits for associations, with its own deadline.
    block_on_close = False
    daemon_threads = True

    def __init__(self, ae: AE, address: tuple[str, int], limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        # (source address, reason, REFUSED or TLS_FAILED), for the metrics and the audit
        self.on_refusal: Callable[[str, str, str], None] | None = None
        self.hand_off: HandOff | None = None  # node.receive_processes > 1
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

    @property
    def local_connections(self) -> int:
        """Open connections served by this process (not handed to another)."""
        with self._connections_lock:
            self._prune()
            return sum(1 for c in self._connections if c.elsewhere is None)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()  # TLS-wrapped in process_request, if served here

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve an accepted connection here, or hand it to another receiving process."""
        if self.hand_off is not None:
            elsewhere = self.hand_off(request, client_address)
            if elsewhere is not None:
                self._mark(request, elsewhere=elsewhere)
                request.close()  # our copy only: the other process has its own descriptor
                return
        if self.ssl_context is not None:  # the handshake happens in the connection's thread
            wrapped = self.ssl_context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
            self._mark(request, replacement=wrapped)
            request = wrapped
        super().process_request(request, client_address)

    def _mark(
        self,
        sock: socket.socket,
        *,
        elsewhere: Elsewhere | None = None,
        replacement: socket.socket | None = None,
    ) -> None:
        """Record that ``sock`` was handed elsewhere, or is now ``replacement`` (TLS)."""
        with self._connections_lock:
            for connection in self._connections:
                if connection.sock is sock:
                    connection.elsewhere = elsewhere
                    connection.sock = replacement or sock

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


class HandedServer(HardenedServer):
    """The server of a receiving process that does not listen (node.receive_processes).

    The main process accepts every connection, applies the node-wide limits and passes
    some to this process (:mod:`dicom_node.receivers`), which serves them like its own
    through :meth:`take`. Its socket is never bound.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Keyed by the socket object, not its descriptor number: a closed connection's
        # number is given to the next one while its thread may still be finishing.
        self._closed_callbacks: dict[socket.socket, Callable[[], None]] = {}
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        pass  # server_address stays the main process's, for the logs

    def server_activate(self) -> None:
        pass

    def take(
        self, sock: socket.socket, address: tuple[str, int], on_closed: Callable[[], None]
    ) -> None:
        """Serve ``sock`` (accepted by the main process); ``on_closed`` once it is done."""
        if not self.verify_request(sock, address):
            self.shutdown_request(sock)
            on_closed()
            return
        with self._connections_lock:
            self._closed_callbacks[sock] = on_closed
        try:
            self.process_request(sock, address)
        except BaseException:
            with self._connections_lock:  # under its TLS socket, if it got that far
                for key in [k for k, v in self._closed_callbacks.items() if v is on_closed]:
                    del self._closed_callbacks[key]
            self.shutdown_request(sock)
            on_closed()
            raise

    def _mark(
        self,
        sock: socket.socket,
        *,
        elsewhere: Elsewhere | None = None,
        replacement: socket.socket | None = None,
    ) -> None:
        super()._mark(sock, elsewhere=elsewhere, replacement=replacement)
        if replacement is not None:  # wrapped for TLS: the callback follows the socket
            with self._connections_lock:
                on_closed = self._closed_callbacks.pop(sock, None)
                if on_closed is not None:
                    self._closed_callbacks[replacement] = on_closed

    def attach(self, sock: socket.socket, assoc: Association) -> None:
        """The connection's association runs in a thread of its own: ``on_closed`` once
        that thread ends."""
        super().attach(sock, assoc)
        with self._connections_lock:
            on_closed = self._closed_callbacks.pop(sock, None)
        if on_closed is None:
            return
        run = assoc.run

        def run_then_report() -> None:
            try:
                run()
            finally:
                on_closed()

        assoc.run = run_then_report  # type: ignore[method-assign]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:  # no association was made (a failed TLS handshake, ...)
            with self._connections_lock:
                on_closed = self._closed_callbacks.pop(request, None)
            if on_closed is not None:
                on_closed()

    def shutdown(self) -> None:
        """No accept loop to stop: close the unbound socket, forget the server."""
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)


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
    listening: bool = True,
) -> HardenedServer:
    """What ``AE.start_server(block=False)`` does, with :class:`HardenedServer`.

    ``listening=False``: a :class:`HandedServer`, which serves the connections it is
    given and has no accept loop.
    """
    kind = HardenedServer if listening else HandedServer
    server = kind(
        ae,
        (node.host, node.port),
        Limits.from_config(node),
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
    )
    ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
    if not listening:
        return server
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"AcceptorServer@{timestamp}", daemon=True
    )
    thread.start()
    return server
