"""Event-driven reactor loops for pynetdicom's acceptor side.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms
whenever it finds nothing to do, and the association thread sleeps 1 ms before every
look at its message queue. A C-STORE crosses both loops twice (request in, response
out), so each instance waited about 2-4 ms in ``time.sleep`` - more than the rest of
the work together: a handler that does nothing topped out near 220 images/s here,
where dcmtk's storescp takes 700-800.

Here both loops block on what they wait for instead:

* :class:`EventDrivenDUL` waits in ``select`` on the socket and on a wake-up pipe
  that :meth:`~EventDrivenDUL.send_pdu` and :meth:`~EventDrivenDUL.kill_dul` write
  to, so a received PDU or a queued response is handled at once.
* :func:`serve_association` replaces the association reactor: it waits on the DIMSE
  message queue's condition (without taking the message, so the pause/checkpoint
  protocol that ``send_*`` and ``release`` rely on is unchanged). The receiver uses it
  (``dicom_node.transport``), and so do the associations we request
  (``dicom_node.send``), where ``send_c_store`` otherwise waits up to 1 ms per
  instance for the reactor to pause.

Going faster exposed two faults that the polling had hidden, both fixed here: a DUL
that had ended could still write a wake-up byte to its closed pipe, whose descriptor
number the kernel had by then given to a new connection; and an acceptor whose peer
was cut off before its A-ASSOCIATE-RQ held an association slot until acse_timeout,
so a burst of bad connections could fill ``max_associations``.

Both still wake at least every :data:`TICK_SECONDS` to check timers and flags, as
the originals do on every turn.

The requestor's C-STORE data phase does not go through the DUL at all: the sending
thread borrows the socket (:meth:`EventDrivenDUL.lend_socket`, see
:mod:`dicom_node.store_wire`) while the reactor waits, parked between two turns.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

TICK_SECONDS = 0.02  # longest wait before timers and flags are looked at again
PDATA_BATCH = 64  # P-DATA PDUs joined into one send, at most
BACKPRESSURE_PAUSE = 0.001  # the handler is behind: wait before looking at the socket again
_FREE, _REQUESTED, _PARKED = "free", "requested", "parked"  # EventDrivenDUL socket lease


class EventDrivenDUL(DULServiceProvider):
    """A DUL whose reactor sleeps in ``select`` instead of a fixed 1 ms poll."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._lease = threading.Condition()
        self._lease_state = _FREE
        # Consulted before pynetdicom reads a PDU (see _is_transport_event); the
        # receiver's C-STORE data phase (dicom_node.store_scp_wire) sets it.
        self.receive_hook: Callable[[], bool | None] | None = None
        self.serving = False  # the association thread is serving a DIMSE request

    def lend_socket(self, timeout: float) -> bool:
        """Park the reactor so that the caller alone reads and writes the socket.

        The reactor parks at the start of a turn once nothing is queued for it (no
        primitive to send, no event for the state machine), so no PDU is half read or
        half written. False when it did not park within ``timeout`` (it has ended).
        Every True must be followed by :meth:`return_socket`.
        """
        with self._lease:
            self._lease_state = _REQUESTED
        self._wake()
        with self._lease:
            self._lease.wait_for(
                lambda: self._lease_state == _PARKED or not self.is_alive(), timeout
            )
            if self._lease_state == _PARKED:
                return True
            self._lease_state = _FREE
            return False

    def return_socket(self) -> None:
        """The reactor takes the socket back (and restarts its idle timer)."""
        # Before the association thread runs again: it would read a lease longer than
        # network_timeout as an idle connection and abort it.
        self._idle_timer.restart()
        with self._lease:
            self._lease_state = _FREE
            self._lease.notify_all()

    def deliver_received(self, raw: bytes | bytearray) -> None:
        """A whole PDU that the borrower read but does not handle (A-ABORT, A-RELEASE-RQ,
        anything unexpected): queued for the state machine, as ``_read_pdu_data`` would
        have, to be acted on once the socket is returned."""
        try:
            pdu, event = self._decode_pdu(bytearray(raw))
        except Exception:
            self.event_queue.put("Evt19")  # unrecognised or invalid PDU
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _park_if_asked(self) -> bool:
        """Wait here while the socket is lent; True when the reactor was parked."""
        with self._lease:
            if self._lease_state != _REQUESTED:
                return False
            if not self.event_queue.empty() or not self.to_provider_queue.empty():
                return False  # finish what is queued first
            self._lease_state = _PARKED
            self._lease.notify_all()
            while self._lease_state == _PARKED and not self._kill_thread:
                self._lease.wait(TICK_SECONDS)
        self._idle_timer.restart()  # the borrower used the connection meanwhile
        return True

    def _is_transport_event(self) -> bool:
        # The hook reads (and acts on) what the socket holds when it can, and says so;
        # otherwise pynetdicom's step reads one PDU for the state machine. None: nothing
        # to read, and what comes next is the hook's (the next turn's) to read.
        hook = self.receive_hook
        if hook is not None:
            read = hook()
            if read is None:
                return False
            if read:
                return True
        return bool(super()._is_transport_event())

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _process_recv_primitive(self) -> bool:
        wrapper = cast(AssociationSocket, self.socket)
        if self.state_machine.current_state == "Sta1" and (
            wrapper is None or wrapper.socket is None
        ):
            # The connection is gone (e.g. a response the handler finished after the peer
            # hung up): nothing queued can be sent, and re-posting it would spin.
            with self.to_provider_queue.mutex:
                self.to_provider_queue.queue.clear()  # type: ignore[attr-defined]
            return False
        # Sta6 + P-DATA request (Evt9) is DT-1: send a P-DATA-TF PDU, stay in Sta6. A
        # dataset leaves as one primitive per peer PDU size (32 of them for a CT slice
        # to a 16 KiB peer); here the queued run of them goes out in one send.
        if self.state_machine.current_state == "Sta6":
            batch = self._queued_pdata()
            if batch:
                self._send_pdata(batch)
                return True
        return bool(super()._process_recv_primitive())

    def _queued_pdata(self) -> list[P_DATA]:
        provider = self.to_provider_queue
        batch: list[P_DATA] = []
        with provider.mutex:
            pending = provider.queue  # type: ignore[attr-defined]
            while pending and isinstance(pending[0], P_DATA) and len(batch) < PDATA_BATCH:
                batch.append(pending.popleft())
        return batch

    def _send_pdata(self, batch: list[P_DATA]) -> None:
        pdus = [P_DATA_TF(primitive) for primitive in batch]
        wrapper = cast(AssociationSocket, self.socket)
        wrapper.send(b"".join(pdu.encode() for pdu in pdus))
        for pdu in pdus:
            evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})

    def _wake(self) -> None:
        # Under the lock that closes the pipe: once closed, its descriptor number may
        # belong to a new connection's socket, and a stray write would land there.
        with self._wake_lock:
            if self._wake_write < 0:
                return
            try:
                os.write(self._wake_write, b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: a wake-up is pending anyway

    def run_reactor(self) -> None:
        try:
            self._event_driven_reactor()
        finally:
            with self._lease:  # a borrower waiting for the reactor to park gives up
                self._lease.notify_all()
            # Nothing will reach the association any more. An acceptor still waiting for
            # its A-ASSOCIATE-RQ (the peer sent garbage and was cut off) would otherwise
            # hold its slot until acse_timeout: a None reads as that timeout, at once.
            self.to_user_queue.put(None)  # type: ignore[arg-type]
            self.close_wake_pipe()

    def __del__(self) -> None:  # a DUL that was never started still owns its pipe
        self.close_wake_pipe()

    def close_wake_pipe(self) -> None:
        with self._wake_lock:
            for fd in (self._wake_read, self._wake_write):
                if fd >= 0:
                    os.close(fd)
            self._wake_read = self._wake_write = -1

    def _event_driven_reactor(self) -> None:
        # The same steps as DULServiceProvider.run_reactor, one difference: when a turn
        # found nothing to do, wait for the socket or a wake-up instead of sleeping.
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                return
            if self._lease_state == _REQUESTED and self._park_if_asked():
                continue
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("DUL reactor error; aborting the association")
                self._hard_abort()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait_for_work()
                continue
            self.state_machine.do_action(event)
            if self.to_user_queue.queue:  # type: ignore[attr-defined]
                # A-RELEASE / A-ABORT for the association thread: it waits on the DIMSE
                # queue (serve_association), so wake it there, or it sees them a tick late.
                messages = self.assoc.dimse.msg_queue
                with messages.not_empty:
                    messages.not_empty.notify_all()

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, a primitive is queued, or a tick passes."""
        if not self.to_provider_queue.empty():
            return
        wrapper = cast(AssociationSocket, self.socket)
        sock = wrapper.socket if wrapper is not None else None
        watch = [self._wake_read]
        if sock is not None and sock.fileno() != -1 and self._reading_allowed():
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes are buffered: select would not see them
            watch.append(sock.fileno())
        timeout = TICK_SECONDS if len(watch) > 1 else BACKPRESSURE_PAUSE
        try:
            readable, _, _ = select.select(watch, [], [], timeout)
        except (OSError, ValueError):
            return  # the socket closed under us: the next turn sees it (Evt17)
        if self._wake_read in readable:
            try:
                while os.read(self._wake_read, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def _reading_allowed(self) -> bool:
        """False while the association is too far behind to take another message."""
        return True

    def _hard_abort(self) -> None:
        from pynetdicom.pdu import A_ABORT_RQ

        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = 0x00
        wrapper = cast(AssociationSocket, self.socket)
        try:
            wrapper.send(pdu.encode())
        except Exception:
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


def serve_association(assoc: Association) -> None:
    """The acceptor's reactor (``Association._run_reactor``), waiting on its queue.

    Each turn: honour a pause request, serve one DIMSE message if there is one, then
    check release, abort, the DUL thread and the network timeout, in the order
    pynetdicom's own loop does.
    """
    messages = assoc.dimse.msg_queue
    while not assoc._kill:
        # Paused while waiting: the wait takes nothing off the queue, so a thread that
        # pauses the reactor (release(), send_*()) may go on at once.
        assoc._is_paused = True
        _wait_for_message(messages)
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        if messages.queue:  # type: ignore[attr-defined]
            _serve_one(assoc)
        if _ended(assoc):
            assoc.kill()
            return


def _serve_one(assoc: Association) -> None:
    """Serve the DIMSE message at the head of the queue.

    ``serving`` is set before the message leaves the queue, so that a DUL that saw the
    queue empty and then ``serving`` False knows no request is being answered.
    """
    dul = assoc.dul if isinstance(assoc.dul, EventDrivenDUL) else None
    if dul is not None:
        dul.serving = True
    try:
        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, cast(int, context_id))
    finally:
        if dul is not None:
            dul.serving = False


def _ended(assoc: Association) -> bool:
    """Whether the association is over: released or aborted by the peer, its DUL thread
    gone, or idle past the network timeout (then released or aborted here)."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        log.debug("association released by the peer")
        assoc.is_released = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
        return True
    if assoc.acse.is_aborted():
        assoc.dul.receive_pdu(wait=False)  # lets EVT_ACSE_RECV fire for subscribers
        assoc.is_aborted = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
        return True
    if not assoc.dul.is_alive():
        return True
    if assoc.dul.idle_timer_expired():
        log.warning("network timeout on the association from %s", assoc.requestor.address)
        if assoc.network_timeout_response == "A-RELEASE":
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc.release()
            assoc._is_paused = False
        else:
            assoc.abort()
        return True
    return False


def _wait_for_message(messages: queue.Queue[Any]) -> None:
    """Wait until ``messages`` holds an item or a tick passes, without taking it.

    ``put`` wakes one waiter. When that was this wait, the item is still there and a
    thread blocked in ``get`` (``send_c_store`` waiting for its response while the
    reactor is paused) would sleep on until its timeout: so the wake-up is passed on.
    """
    with messages.not_empty:  # holds the queue's mutex: qsize() would deadlock
        if not messages.queue:  # type: ignore[attr-defined]
            messages.not_empty.wait(TICK_SECONDS)
        if messages.queue:  # type: ignore[attr-defined]
            messages.not_empty.notify()
