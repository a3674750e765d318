"""Hostile peers on raw sockets: malformed PDUs, huge lengths, slow senders, floods, bombs.

After every case the node must still answer C-ECHO, store a good instance (status 0),
stay within a memory bound and never write outside ``storage.path``.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pdus
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nodes import NodeProcess, echo_ok, node_settings, running_node
from peers import GE_3SLICE, LOCALHOST, wait_until
from prometheus_client import generate_latest
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.app import Node

MiB = 1024 * 1024
RSS_BOUND_MB = 100
GOOD = sorted(GE_3SLICE.glob("*.dcm"))[0]
SAFE = "1.2.826.0.1.3680043.8.498.99"


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024  # kB -> MB
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset VmHWM (Linux clear_refs 5) and return the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status("VmRSS")


def files_outside(root: Path, storage: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and storage not in p.parents}


def store_good(port: int) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(LOCALHOST, port, ae_title="AINODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(GOOD).Status)
    finally:
        assoc.release()


class Watch:
    """Baseline taken before an attack; :meth:`healthy` checks the node after it."""

    def __init__(self, node: Node, root: Path) -> None:
        self.node, self.root = node, root
        self.storage = Path(node.config.storage.path).resolve()
        self.outside = files_outside(root, self.storage)
        self.rss = reset_peak_rss()

    @property
    def port(self) -> int:
        return self.node.receiver.address[1]

    def healthy(self, what: str) -> int:
        growth = _proc_status("VmHWM") - self.rss
        wait_until(lambda: echo_ok(self.port), 15, interval=0.2, what="C-ECHO after " + what)
        assert store_good(self.port) == 0
        assert files_outside(self.root, self.storage) == self.outside
        assert growth < RSS_BOUND_MB, f"{what}: peak RSS grew {growth} MB"
        print(f"\n[hostile] {what}: peak RSS +{growth} MB")
        return growth


@contextmanager
def hostile_node(root: Path, **node: Any) -> Iterator[Watch]:
    settings_ = node_settings(root / "var", node={"idle_timeout_seconds": 1.0, **node})
    with running_node(settings_) as running:
        yield Watch(running, root)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Watch]:
    with hostile_node(tmp_path) as w:
        yield w


def _aborted_or_closed(sock: socket.socket, timeout: float = 3.0) -> bool:
    reply = pdus.read_pdu(sock, timeout)
    return reply is None or (reply[0] == pdus.A_ABORT and pdus.closed_by_peer(sock, timeout))


# --------------------------------------------------------------------------- malformed PDUs


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_dropped(watch: Watch, seed: int) -> None:
    rng = random.Random(seed)
    with pdus.raw_connection(watch.port) as sock:
        pdus.send_quietly(sock, rng.randbytes(rng.choice([1, 5, 6, 100, 5000, 70000])))
        assert _aborted_or_closed(sock)
    watch.healthy(f"random bytes #{seed}")


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0xFF, 0x02, 0x04, 0x06])
def test_wrong_pdu_types_abort(watch: Watch, pdu_type: int) -> None:
    with pdus.raw_connection(watch.port) as sock:
        sock.sendall(pdus.pdu(pdu_type, bytes(8)))
        assert _aborted_or_closed(sock)
    watch.healthy(f"PDU type 0x{pdu_type:02X}")


def test_truncated_pdus_are_dropped(watch: Watch) -> None:
    whole = pdus.associate_rq()
    for cut in (3, 6, 40, len(whole) - 1):
        with pdus.raw_connection(watch.port) as sock:
            pdus.send_quietly(sock, whole[:cut])
            assert pdus.closed_by_peer(sock, 3.0)
    with pdus.raw_association(watch.port) as (sock, _):
        message = pdus.c_store_rq(SAFE, pdus.ct_dataset(GOOD, SAFE))
        pdus.send_quietly(sock, message[: len(message) // 2])
        assert _aborted_or_closed(sock)
    watch.healthy("truncated PDUs")


@pytest.mark.parametrize("pdu_type", [pdus.A_ASSOCIATE_RQ, pdus.P_DATA_TF])
def test_4gib_length_field_aborts_without_reading(watch: Watch, pdu_type: int) -> None:
    header = struct.pack(">BBL", pdu_type, 0, 0xFFFFFFFF)
    with ExitStack() as stack:
        if pdu_type == pdus.P_DATA_TF:
            sock, _ = stack.enter_context(pdus.raw_association(watch.port))
        else:
            sock = stack.enter_context(pdus.raw_connection(watch.port))
        started = time.monotonic()
        sock.sendall(header + bytes(64 * 1024))
        reply = pdus.read_pdu(sock, 3.0)
        assert reply is not None and reply[0] == pdus.A_ABORT
        assert time.monotonic() - started < 1.0  # at once, not after a timeout
    watch.healthy(f"4 GiB length, PDU type 0x{pdu_type:02X}")


def test_huge_associate_rq_aborts(watch: Watch) -> None:
    with pdus.raw_connection(watch.port) as sock:
        pdus.send_quietly(sock, pdus.pdu(pdus.A_ASSOCIATE_RQ, bytes(4 * MiB)))
        assert _aborted_or_closed(sock)
    watch.healthy("4 MiB A-ASSOCIATE-RQ")


# --------------------------------------------------------------------------- slow and idle peers


def _seconds_until_closed(sock: socket.socket, data: bytes, interval: float) -> float:
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        if pdus.closed_by_peer(sock, interval):
            break
    return time.monotonic() - started


def test_trickling_sender_is_closed_at_the_pdu_deadline(watch: Watch) -> None:
    with pdus.raw_connection(watch.port) as sock:
        held = _seconds_until_closed(sock, pdus.associate_rq(), interval=0.3)
    assert held < 2.5, f"a byte every 0.3 s held the connection {held:.1f} s"
    with pdus.raw_association(watch.port) as (sock, _):
        message = pdus.c_store_rq(SAFE, pdus.ct_dataset(GOOD, SAFE))
        held = _seconds_until_closed(sock, message, interval=0.3)
    assert held < 2.5
    watch.healthy("trickling sender")


def test_idle_connections_are_closed(watch: Watch) -> None:
    with pdus.raw_connection(watch.port) as silent, pdus.raw_association(watch.port) as (idle, _):
        assert pdus.closed_by_peer(silent, 4.0)
        reply = pdus.read_pdu(idle, 4.0)  # network timeout: A-ABORT
        assert reply is None or reply[0] == pdus.A_ABORT
    watch.healthy("idle connections")


def test_stop_is_not_held_by_a_peer_stalled_mid_pdu(tmp_path: Path) -> None:
    """SIGTERM while a peer has sent 100 bytes of a 1000-byte PDU: the node exits soon
    after node.drain_seconds, not when the PDU deadline (idle_timeout_seconds) passes."""
    drain = 1.0
    settings_ = node_settings(
        tmp_path / "var", node={"drain_seconds": drain, "idle_timeout_seconds": 60.0}
    )
    with NodeProcess(settings_, tmp_path / "node") as node, ExitStack() as stack:
        sock, _ = stack.enter_context(pdus.raw_association(node.port))
        cmd = pdus.command(0x0001, pdus.CT_IMAGE_STORAGE, SAFE, True)
        sock.sendall(pdus.p_data((pdus.STORE_CONTEXT, pdus.COMMAND_LAST, cmd)))
        sock.sendall(struct.pack(">BBL", pdus.P_DATA_TF, 0, 1000) + bytes(100))
        time.sleep(0.3)  # being read
        started = time.monotonic()
        assert node.stop(timeout=30) == 0
        took = time.monotonic() - started
        assert took < drain + 4.0, f"stopped after {took:.1f} s"
        assert _aborted_or_closed(sock, 1.0)
        # once, not also for pynetdicom's second indication of the same abort
        assert node.log().count("association from HOSTILE aborted") == 1, node.log()


# --------------------------------------------------------------------------- floods and sources


def _hold(stack: ExitStack, port: int, count: int, source: str = LOCALHOST) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = stack.enter_context(socket.socket())
        sock.bind((source, 0))
        sock.connect((LOCALHOST, port))
        held.append(sock)
    return held


def _held_open(stack: ExitStack, port: int) -> bool:
    (sock,) = _hold(stack, port, 1)
    return not pdus.closed_by_peer(sock, 0.3)


def test_connection_flood_is_refused_before_threads(tmp_path: Path) -> None:
    with hostile_node(
        tmp_path, idle_timeout_seconds=20.0, max_connections=6, max_associations_per_source=6
    ) as watch:
        with ExitStack() as stack:
            _hold(stack, watch.port, 5)
            assert echo_ok(watch.port)  # under the cap: still served
            # the sixth is accepted once the node has closed the echo's connection
            wait_until(lambda: _held_open(stack, watch.port), 5, what="a sixth connection")
            threads = threading.active_count()
            refused = _hold(stack, watch.port, 200)
            assert all(pdus.closed_by_peer(sock, 2.0) for sock in refused)
            assert threading.active_count() - threads < 10
            assert not echo_ok(watch.port)
        watch.healthy("flood of 206 connections")
        counted = watch.node.metrics.registry.get_sample_value(
            "dicom_node_associations_total", {"outcome": "refused"}
        )
        assert counted is not None and counted >= 201  # the flood and the C-ECHO
    trail = Path(watch.node.config.storage.path) / "audit.jsonl"
    alerts = [
        record
        for record in map(json.loads, trail.read_text().splitlines())
        if record.get("subtype") == "connection refused"
    ]
    # one Security Alert per address and reason a minute, however many were refused
    assert len(alerts) == 1, alerts
    assert alerts[0]["detail"] == "node.max_connections (6) reached"
    assert alerts[0]["address"] == LOCALHOST and alerts[0]["event_id"]["code"] == "110113"


def test_per_source_cap_leaves_other_sources_served(tmp_path: Path) -> None:
    with hostile_node(tmp_path, idle_timeout_seconds=20.0, max_associations_per_source=3) as watch:
        with ExitStack() as stack:
            _hold(stack, watch.port, 3)
            (fourth,) = _hold(stack, watch.port, 1)
            assert pdus.closed_by_peer(fourth, 2.0)
            ae = AE(ae_title="OTHER")
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate(
                LOCALHOST, watch.port, ae_title="AINODE", bind_address=("127.0.0.2", 0)
            )
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        watch.healthy("per-source cap")


def test_sources_outside_allowed_networks_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.listener")
    with hostile_node(tmp_path, allowed_networks=["10.0.0.0/8"]) as watch:
        with pdus.raw_connection(watch.port) as sock:
            assert pdus.closed_by_peer(sock, 2.0)
        assert not echo_ok(watch.port)
    assert "refused a connection from 127.0.0.1: source outside node.allowed_networks" in (
        caplog.text
    )
    with hostile_node(tmp_path / "b", allowed_networks=["127.0.0.0/8"]) as watch:
        watch.healthy("allowed network")


@pytest.mark.parametrize(
    ("called", "calling", "reason"),
    [
        (b"AINODE", "SC\u00c9NER".encode(), pdus.CALLING_AE_NOT_RECOGNIZED),  # UTF-8
        (b"AINODE", b"SCAN\\NER", pdus.CALLING_AE_NOT_RECOGNIZED),
        (b"AINODE", b"\x00\x00SCANNER", pdus.CALLING_AE_NOT_RECOGNIZED),
        (b"AINODE", b" " * 16, pdus.CALLING_AE_NOT_RECOGNIZED),
        ("AIN\u00d6DE".encode("latin-1"), b"SCANNER", pdus.CALLED_AE_NOT_RECOGNIZED),
    ],
    ids=["utf8-calling", "backslash", "nul", "spaces", "latin1-called"],
)
def test_a_title_that_is_no_ae_title_is_rejected_not_aborted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, called: bytes, calling: bytes, reason: int
) -> None:
    """pynetdicom's decoder logged a traceback at ERROR for such a title and the node
    answered A-ABORT ("undecodable PDU"), not counted or audited as a rejection."""
    caplog.set_level(logging.WARNING)
    with hostile_node(tmp_path) as watch:
        with pdus.raw_connection(watch.port) as sock:
            sock.sendall(pdus.associate_rq(called, calling))
            reply = pdus.read_pdu(sock)
            assert reply is not None and reply[0] == pdus.A_ASSOCIATE_RJ, reply
            # reserved, result 1 (rejected-permanent), source 1 (service user), reason
            assert reply[1] == bytes([0, 1, 1, reason])
            assert pdus.closed_by_peer(sock, 3.0)
        watch.healthy("an AE title that is no AE title")
        exposition = generate_latest(watch.node.metrics.registry).decode()
        assert 'dicom_node_associations_total{outcome="rejected"} 1.0' in exposition
    side = "calling" if reason == pdus.CALLING_AE_NOT_RECOGNIZED else "called"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(
        line.startswith(f"association from 127.0.0.1 rejected: {side} AE title") for line in lines
    ), lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text and "undecodable" not in caplog.text
    trail = [
        json.loads(line) for line in (tmp_path / "var" / "audit.jsonl").read_text().splitlines()
    ]
    alerts = [r for r in trail if r["event_id"]["meaning"] == "Security Alert"]
    assert [(a["address"], a["subtype"], a["detail"].split(" AE title")[0]) for a in alerts] == [
        ("127.0.0.1", "association rejected", side)
    ]


# --------------------------------------------------------------------------- dataset content


def test_deeply_nested_sequences_are_refused(watch: Watch) -> None:
    with pdus.raw_association(watch.port) as (sock, _):
        status = pdus.raw_store(sock, pdus.c_store_rq(SAFE, pdus.nested_dataset(500, SAFE)))
    assert status is not None and status & 0xF000 == 0xC000, status
    assert watch.node.journal.state_counts()["instances"]["total"] == 0
    watch.healthy("sequences nested 500 deep")


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "..", "1." + "2" * 63])
def test_hostile_sop_instance_uids_are_refused(watch: Watch, bad: str) -> None:
    # in the dataset only: the C-STORE handler answers "cannot understand"
    with pdus.raw_association(watch.port) as (sock, _):
        status = pdus.raw_store(sock, pdus.c_store_rq(SAFE, pdus.ct_dataset(GOOD, bad)))
    assert status is not None and status & 0xF000 == 0xC000, status
    # in the command set too: pynetdicom cannot decode the request and aborts
    with pdus.raw_association(watch.port) as (sock, _):
        pdus.send_quietly(sock, pdus.c_store_rq(bad, pdus.ct_dataset(GOOD, bad)))
        assert _aborted_or_closed(sock)
    assert watch.node.journal.state_counts()["instances"]["total"] == 0
    watch.healthy(f"SOP Instance UID {bad[:12]!r}")


def test_instance_over_max_instance_bytes_aborts_while_receiving(tmp_path: Path) -> None:
    with hostile_node(tmp_path, max_instance_bytes=MiB) as watch:
        with pdus.raw_association(watch.port) as (sock, _):
            cmd = pdus.command(0x0001, pdus.CT_IMAGE_STORAGE, SAFE, True)
            fragment = bytes(16000)
            sock.sendall(pdus.p_data((pdus.STORE_CONTEXT, pdus.COMMAND_LAST, cmd)))
            more = pdus.p_data((pdus.STORE_CONTEXT, pdus.DATASET_MORE, fragment))
            pdus.send_quietly(sock, more * 128)  # 2 MB, never the last fragment
            assert _aborted_or_closed(sock)
        watch.healthy("2 MB instance over a 1 MiB limit")


def test_deflate_is_not_negotiated_by_default(watch: Watch) -> None:
    rq = pdus.associate_rq(store_syntaxes=(pdus.DEFLATED_VR_LE,))
    with pdus.raw_association(watch.port, rq) as (_, ac):
        assert pdus.accepted_syntax(ac, pdus.STORE_CONTEXT) == 4  # transfer syntax refused
    watch.healthy("deflate offered")


def test_deflate_bomb_is_bounded_when_deflate_is_accepted(tmp_path: Path) -> None:
    rq = pdus.associate_rq(store_syntaxes=(pdus.DEFLATED_VR_LE,))
    with hostile_node(tmp_path, accept_deflate=True, max_instance_bytes=4 * MiB) as watch:
        with pdus.raw_association(watch.port, rq) as (sock, ac):
            assert pdus.accepted_syntax(ac, pdus.STORE_CONTEXT) == 0
            good = pdus.deflate(_explicit(GOOD))
            sop = str(_sop_uid(GOOD))
            assert pdus.raw_store(sock, pdus.c_store_rq(sop, good)) == 0
        with pdus.raw_association(watch.port, rq) as (sock, _):
            bomb = pdus.deflate_bomb(1024 * MiB)  # ~1 MB deflated, 1 GiB inflated
            assert len(bomb) < 2 * MiB
            cmd = pdus.command(0x0001, pdus.CT_IMAGE_STORAGE, SAFE, True)
            pdvs = [(pdus.STORE_CONTEXT, pdus.COMMAND_LAST, cmd)]
            chunks = [bomb[i : i + 60000] for i in range(0, len(bomb), 60000)]
            message = pdus.p_data(*pdvs) + b"".join(
                pdus.p_data((pdus.STORE_CONTEXT, pdus.DATASET_MORE, c)) for c in chunks
            )
            pdus.send_quietly(sock, message)
            assert _aborted_or_closed(sock)
        watch.healthy("1 GiB deflate bomb")


def _explicit(path: Path) -> bytes:
    data = encode(pydicom.dcmread(path), False, True)
    assert data is not None
    return data


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------- bounded fuzzing

EDITS = st.lists(
    st.tuples(st.sampled_from(pdus.MUTATIONS), st.integers(0, 2**20), st.binary(max_size=8)),
    min_size=1,
    max_size=4,
)


def test_fuzzed_pdus_never_break_the_node(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # pytest keeps every captured record (~1 MB per case here, tracebacks included):
    # that would be the test's memory, not the node's.
    caplog.set_level(logging.CRITICAL)
    caplog.set_level(logging.CRITICAL, logger="pynetdicom")
    with hostile_node(tmp_path) as watch:
        tried = 0

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(target=st.sampled_from(["associate", "store"]), edits=EDITS)
        def fuzz(target: str, edits: list[pdus.Edit]) -> None:
            nonlocal tried
            pdus.fuzz_once(watch.port, target, edits)
            tried += 1
            if tried % 25 == 0:
                assert echo_ok(watch.port), f"no C-ECHO after {tried} fuzzed PDUs"

        started = time.monotonic()
        fuzz()
        assert time.monotonic() - started < 60
        watch.healthy(f"{tried} fuzzed PDUs")
