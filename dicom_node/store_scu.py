"""C-STORE SCU: associations we request, C-ECHO, and sending files over one association.

:func:`store_files` is the plain sender used by the CLI and by deliveries
(:class:`dicom_node.send.Sender`). A file whose transfer syntax the peer accepted goes
out exactly as stored, without decoding: through :class:`~dicom_node.store_wire.
DirectStore`, which writes the P-DATA-TF PDUs straight to the socket, or, where that
cannot be used, through pynetdicom with the file's bytes streamed in PDU-sized chunks
(:func:`_store_one`). A file in another syntax is decoded and converted by pynetdicom.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import T_CONNECT, AssociationSocket

from dicom_node.config import ClientTLS
from dicom_node.file_meta import read_part10
from dicom_node.header import check_uids_quickly
from dicom_node.logs import quiet_pynetdicom_events
from dicom_node.reactor import EventDrivenDUL, serve_association
from dicom_node.store_wire import DirectStore, WireError, direct_store_possible
from dicom_node.tls import TLSConfigError, client_context

META_HEAD_BYTES = 16 * 1024  # enough for any ordinary File Meta Information group
MAX_MESSAGE_ID = 0xFFFF  # (0000,0110) is a US
MAX_CONTEXTS = 128  # odd context IDs 1..255 (PS3.8 9.3.2.2)
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit, Implicit VR Little Endian

# Statuses that mean the peer has the object (PS3.4 B.2.3: success and warnings).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class SendError(Exception):
    """A send did not complete; the message names the peer and the reason."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: ClientTLS | None = None  # DICOM TLS (destinations.NAME.tls); None: plain TCP


def _tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    if peer.tls is None:
        return None
    try:
        return client_context(peer.tls), peer.host
    except TLSConfigError as exc:
        raise SendError(f"TLS to {peer.ae_title}: {exc}") from exc


def associate(
    calling_aet: str, peer: Peer, contexts: Iterable[tuple[str, list[str]]], timeout: float
) -> Association:
    quiet_pynetdicom_events()
    check_uids_quickly()
    ae = EventDrivenAE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    where = f"association with {peer.ae_title}@{peer.host}:{peer.port} was"
    tls_args = _tls_args(peer)
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except socket.gaierror as exc:  # pynetdicom resolves the host before it connects
        raise SendError(
            f"{where} not established: cannot resolve {peer.host!r} ({exc.strerror})"
        ) from exc
    if not assoc.is_established:
        raise SendError(
            f"{where} {'rejected' if assoc.is_rejected else 'not established'}"
            f"{' (over TLS)' if peer.tls else ''}"
            f"{f': {ae.connect_error}' if ae.connect_error else ''}"
        )
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keep_responses_for_the_requestor(assoc)
    return assoc


class EventDrivenAE(AE):
    """An AE whose requested associations use the event-driven loops of the receiver.

    ``AE.associate`` creates the association, then asks ``_create_socket`` for its
    socket before anything is started: the one place to swap in
    :class:`~dicom_node.reactor.EventDrivenDUL` and :func:`serve_association`. With the
    stock loops each C-STORE waited up to ~1 ms for the DUL to send it and again for
    the reactor to pause.
    """

    _socket: ReasonKeepingSocket | None = None

    @property
    def connect_error(self) -> str:
        """Why the last association's connection failed (``""``: it did not fail)."""
        return self._socket.connect_error if self._socket is not None else ""

    def _create_socket(
        self, assoc: Association, address: Any, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        assoc.dul = EventDrivenDUL(assoc)
        assoc._run_reactor = functools.partial(serve_association, assoc)  # type: ignore[method-assign]
        # the setters arm the new DUL's timers, as Association.__init__ did for the old one
        assoc.acse_timeout = assoc.acse_timeout
        assoc.network_timeout = assoc.network_timeout
        sock = ReasonKeepingSocket(assoc, address=address)  # as AE._create_socket makes it
        sock.tls_args = tls_args
        self._socket = sock
        return sock


_connecting = threading.local()  # .socket: the ReasonKeepingSocket connecting on this thread


class ReasonKeepingSocket(AssociationSocket):
    """pynetdicom's socket, keeping why its connection failed.

    pynetdicom's ``connect`` swallows the error and logs it as two ERROR lines of its own
    ("Association request failed: unable to connect to remote", "TCP Initialisation
    Error: REASON") and, for a TLS error, a traceback; the requestor learns only that
    the association was not established. With a destination down that was two or three
    ERROR lines at every check and every send attempt, beside the node's own line. Here
    the reason is kept (:attr:`connect_error`) for the :class:`SendError`, which the
    node logs once, naming the destination, and shows on the dashboard; pynetdicom's
    lines are dropped (:class:`_ConnectFailureFilter`).
    """

    connect_error = ""

    def connect(self, primitive: T_CONNECT) -> None:
        _connecting.socket = self
        try:
            super().connect(primitive)
        finally:
            _connecting.socket = None


class _ConnectFailureFilter(logging.Filter):
    """Takes the ERROR records of a failing :meth:`ReasonKeepingSocket.connect` off
    pynetdicom's transport logger, keeping the reason on the socket."""

    FAILED = "Association request failed: unable to connect to remote"
    REASON = "TCP Initialisation Error: "

    def filter(self, record: logging.LogRecord) -> bool:
        sock = getattr(_connecting, "socket", None)
        if sock is None or record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        if message.startswith(self.REASON):
            sock.connect_error = message[len(self.REASON) :]
            return False
        # the first line, and the TLS error's traceback; anything else is still logged
        return not (message == self.FAILED or record.exc_info)


logging.getLogger("pynetdicom.transport").addFilter(_ConnectFailureFilter())


def keep_responses_for_the_requestor(assoc: Association) -> None:
    """Work around a race in pynetdicom 3.0's requestor.

    ``send_c_store`` pauses the association's reactor thread by clearing an event
    and then checking a flag the reactor sets *before* it waits, so the reactor
    can slip past the pause and take the C-STORE response off the queue; it then
    drops it ("Received unexpected C-STORE service message") and the sender
    waits for the DIMSE timeout. Here a response the reactor takes is put back
    for the waiting sender (once; a response nobody waits for is still dropped).
    """
    serve_request = assoc._serve_request

    def serve(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not getattr(msg, "_dicom_node_requeued", False):
            msg._dicom_node_requeued = True
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve_request(msg, context_id)

    assoc._serve_request = serve  # type: ignore[method-assign]


def echo(calling_aet: str, peer: Peer, timeout: float = 10.0) -> None:
    """C-ECHO the peer; raise :class:`SendError` unless it answers success."""
    assoc = associate(calling_aet, peer, [(Verification, ["1.2.840.10008.1.2"])], timeout)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.Status != 0x0000:
        raise SendError(f"C-ECHO to {peer.ae_title} failed: {status_text(status)}")


def dicom_files(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` into DICOM Part 10 files (with file meta) and the rest."""
    files: list[Path] = []
    skipped: list[Path] = []
    for path in paths:
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
            usable = "MediaStorageSOPClassUID" in meta and "TransferSyntaxUID" in meta
        except Exception:
            usable = False
        (files if usable else skipped).append(path)
    return files, skipped


def _class_and_syntax(path: Path) -> tuple[str, str]:
    with path.open("rb") as stream:
        meta = read_part10(stream.read(META_HEAD_BYTES))
    if meta is not None:
        return meta.sop_class_uid, meta.transfer_syntax
    parsed = pydicom.filereader.read_file_meta_info(path)
    return str(parsed.MediaStorageSOPClassUID), str(parsed.TransferSyntaxUID)


def _contexts(paths: Sequence[Path]) -> list[tuple[str, list[str]]]:
    """Per SOP class: one context for each transfer syntax its files are in, and one that
    offers the uncompressed syntaxes, for a file whose own syntax the peer refuses.

    One syntax per context lets the peer accept each file's own, as dcmtk's storescu
    asks: with all of them in one context, a peer that prefers Explicit VR would take
    that one only, and every Implicit VR file would be decoded and converted.
    """
    by_class: dict[str, list[str]] = {}
    for path in paths:
        sop_class, syntax = _class_and_syntax(path)
        syntaxes = by_class.setdefault(sop_class, [])
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    contexts: list[tuple[str, list[str]]] = []
    for abstract, syntaxes in by_class.items():
        contexts.extend((abstract, [syntax]) for syntax in syntaxes)
        contexts.append((abstract, list(UNCOMPRESSED)))
    if len(contexts) > MAX_CONTEXTS:
        raise SendError(
            f"{len(by_class)} SOP classes in {len(contexts) - len(by_class)} transfer syntaxes"
            f" need {len(contexts)} presentation contexts; at most {MAX_CONTEXTS} fit one"
            " association"
        )
    return contexts


def store_files(
    calling_aet: str,
    peer: Peer,
    paths: Sequence[Path],
    timeout: float = 30.0,
    progress: Callable[[Path, int], None] | None = None,
) -> None:
    """C-STORE every file over one association; raise :class:`SendError` on the first failure."""
    if not paths:
        return
    assoc = associate(calling_aet, peer, _contexts(paths), timeout)
    refused: list[str] = []  # files the peer took no presentation context for
    try:
        with _Stores(assoc) as stores:
            for number, path in enumerate(paths):
                message_id = number % MAX_MESSAGE_ID + 1
                try:
                    status = stores.store(path, message_id)
                except NotAccepted as exc:  # the others may still go (the SR without the SEG)
                    refused.append(f"{path.name}: {exc}")
                    continue
                except WireError as exc:
                    raise SendError(
                        f"C-STORE of {path.name} to {peer.ae_title} failed: {exc}"
                    ) from exc
                if not status or int(status.Status) not in STORED_STATUSES:
                    raise SendError(
                        f"C-STORE of {path.name} to {peer.ae_title} failed: {status_text(status)}"
                    )
                if progress is not None:
                    progress(path, int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    if refused:
        sent = len(paths) - len(refused)
        raise SendError(
            f"{peer.ae_title} did not accept {len(refused)} of {len(paths)} file(s) at"
            f" association ({sent} sent): " + "; ".join(refused)
        )


class _Stores:
    """The C-STOREs of one association: :class:`DirectStore` for a file sent as it is
    stored (the socket stays lent from one such file to the next), pynetdicom otherwise."""

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        self._exact = _exact_contexts(assoc)
        self._direct_possible = direct_store_possible(assoc)
        self._direct: DirectStore | None = None

    def __enter__(self) -> _Stores:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._end_direct()

    def store(self, path: Path, message_id: int) -> pydicom.Dataset:
        if self._direct is None and not self._assoc.is_established:
            raise SendError(f"association ended before {path.name} could be sent")
        data = path.read_bytes()
        meta = read_part10(data)
        context_id = None
        if meta is not None and self._direct_possible:
            context_id = self._exact.get((meta.sop_class_uid, meta.transfer_syntax))
        if meta is None or context_id is None:
            self._end_direct()
            return _store_one(self._assoc, path, self._exact, message_id)
        if self._direct is None:
            self._direct = DirectStore(self._assoc, self._assoc.dimse_timeout).__enter__()
        return self._direct.store(context_id, message_id, meta, data)

    def _end_direct(self) -> None:
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.__exit__(None, None, None)


def _exact_contexts(assoc: Association) -> dict[tuple[str, str], int]:
    """(SOP class, transfer syntax) -> context ID, for what the peer accepted from us as SCU."""
    return {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
        for cx in assoc.accepted_contexts
        if cx.as_scu and cx.transfer_syntax and cx.context_id is not None
    }


class NotAccepted(SendError):
    """The peer took no presentation context that a file can be sent on."""


def _not_sendable(assoc: Association, sop_class: str, syntax: str) -> str | None:
    """Why no context the peer accepted can carry a file of ``sop_class`` in ``syntax``
    (pynetdicom converts between the uncompressed syntaxes only), or None."""
    accepted = [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.as_scu and cx.transfer_syntax and str(cx.abstract_syntax) == sop_class
    ]
    name = UID(sop_class).name
    if not accepted:
        return f"no presentation context for {name} ({sop_class}) accepted: not taken there"
    if syntax in accepted or (syntax in UNCOMPRESSED and set(accepted) & set(UNCOMPRESSED)):
        return None
    offered = ", ".join(UID(accepted_syntax).name for accepted_syntax in sorted(set(accepted)))
    return (
        f"{name} accepted only in {offered}, not in the file's {UID(syntax).name}"
        " (compressed data is not transcoded)"
    )


def _store_one(
    assoc: Association, path: Path, exact: dict[tuple[str, str], int], message_id: int
) -> pydicom.Dataset:
    """C-STORE one file through pynetdicom: its dataset as stored when the peer accepted
    its syntax (used where :class:`DirectStore` cannot be).

    pynetdicom's ``send_c_store(path)`` decodes the whole file and encodes it again (a
    third of the time per CT slice); its chunked mode avoids that but is a process-wide
    switch. Here the request carries the file and the dataset's offset in it, which
    pynetdicom's DIMSE layer then sends in PDU-sized chunks - for this call only. When
    the peer accepted another transfer syntax (e.g. implicit VR only), the decoded
    dataset goes through ``send_c_store``, which converts it.
    """
    if not assoc.is_established:  # the peer released or aborted after the last response
        raise SendError(f"association ended before {path.name} could be sent")
    meta, offset = split_dataset(path)
    sop_class = str(meta.MediaStorageSOPClassUID)
    syntax = str(meta.TransferSyntaxUID)
    context_id = exact.get((sop_class, syntax))
    if context_id is None:
        refusal = _not_sendable(assoc, sop_class, syntax)
        if refusal is not None:  # pynetdicom would log an ERROR and raise ValueError
            raise NotAccepted(refusal)
        return assoc.send_c_store(pydicom.dcmread(path), msg_id=message_id)
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = 2  # low, as send_c_store's default
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = str(meta.MediaStorageSOPInstanceUID)
    request._dataset_path = (path, offset)
    # The pause protocol of Association.send_c_store: the reactor must not take the
    # response off the queue while we wait for it.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return pydicom.Dataset()
    return assoc._check_received_status(response)


def status_text(status: pydicom.Dataset | None) -> str:
    if not status:
        return "no response (connection lost, timeout or aborted)"
    return f"status 0x{int(status.Status):04X}"
