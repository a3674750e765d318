"""More than one receiving process (node.receive_processes, dicom_node.receivers).

The main process accepts and hands connections to the least busy process; every
instance ends up in the one journal, studies complete, counters reach /metrics, storage
commitment reports are answered, and a receiving process that dies loses nothing.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from nodes import NodeProcess, child_pids, echo_ok, node_settings, running_node, send
from peers import LOCALHOST, PHILIPS_B, require_tools, storescu, wait_until
from pynetdicom import AE
from test_commitment import finished_job, ge_datasets, node_with_fake_pacs

from dicom_node.app import Node
from dicom_node.config import NodeSection
from dicom_node.database import WriterLock
from dicom_node.domain import DeliveryState, JobState
from dicom_node.journal import Journal
from dicom_node.receivers import ProcessSettings, ReceiverPool
from dicom_node.web.metrics import Metrics


def _pool(node: Node) -> ReceiverPool:
    pool = node.receiver._pool
    assert isinstance(pool, ReceiverPool)
    return pool


def _pids(node: Node) -> list[int]:
    processes = [p.process for p in _pool(node)._processes]
    return [p.pid for p in processes if p is not None]


def _folders(storage: Path) -> Counter[str]:
    """Instance files per folder: "instances" (the main process) or "receiver-K"."""
    return Counter(path.parts[-3] for path in (storage / "instances").rglob("*.dcm"))


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone; ESRCH: reaped while being read
        return True
    return state == "Z"  # ended, not yet reaped by whoever adopted it


def _holder(pids: list[int], node_port: int, peer_port: int) -> int | None:
    """Which of ``pids`` holds the node's end of the TCP connection from ``peer_port``
    (Linux: /proc/net/tcp and each process's descriptors)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if (local, remote) == (node_port, peer_port):
            inode = fields[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:  # closed meanwhile
                continue
    return None


def _received(node: Node) -> float:
    totals = node.metrics.counter_totals()
    return sum(v for (name, _), v in totals.items() if name == "dicom_node_instances_received")


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(120)
def test_four_associations_are_shared_by_two_processes_and_every_instance_is_kept(
    tmp_path: Path,
) -> None:
    require_tools("storescu")
    files = sorted(PHILIPS_B.glob("*.dcm"))
    storage = tmp_path / "var"
    settings = node_settings(
        storage, node={"receive_processes": 2}, completion={"study_idle_seconds": 0.5}
    )
    with running_node(settings) as node:
        assert _pool(node).ready == 1
        assert node.metrics.registry.get_sample_value("dicom_node_receiving_processes") == 2
        port = node.receiver.address[1]
        with ThreadPoolExecutor(4) as pool:
            runs = list(
                pool.map(
                    lambda k: storescu(LOCALHOST, port, "AINODE", files[k::4], check=False),
                    range(4),
                )
            )
        assert [run.returncode for run in runs] == [0, 0, 0, 0], runs[0].stderr
        counts = node.journal.state_counts()
        assert counts["instances"]["total"] == len(files)
        # two associations each: the main process and receiver-2
        assert _folders(storage) == {"instances": len(files) / 2, "receiver-2": len(files) / 2}
        # the study was opened in one of them; the main process completes it either way
        wait_until(lambda: node.journal.state_counts()["studies"].get("complete"), 20)
        # receiver-2 reports its counters every 0.5 s
        wait_until(lambda: _received(node) == len(files), 10, what="counters of both")
        stored = node.metrics.registry.get_sample_value("dicom_node_store_seconds_count")
        assert stored == len(files)  # the store times of both, as a histogram
        wait_until(lambda: node.receiver.active_associations == 0, 10)
        totals = node.metrics.counter_totals()
        assert totals[("dicom_node_associations", (("outcome", "accepted"),))] == 4
        pids = _pids(node)
    assert pids and all(_exited(pid) for pid in pids)  # stopped with the node


@pytest.mark.timeout(180)
def test_a_killed_receiving_process_is_started_again_and_loses_nothing(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "var"
    settings = node_settings(
        storage, node={"receive_processes": 2}, completion={"study_idle_seconds": 0.5}
    )
    ge = ge_datasets()
    with running_node(settings) as node:
        (first_pid,) = _pids(node)
        # A file it made durable but had not recorded when it died (as after a crash
        # between the fsync and the journal commit), of a study nobody else knows.
        orphan = pydicom.dcmread(sorted(PHILIPS_B.glob("*.dcm"))[0])
        name = uuid.uuid4().hex
        target = storage / "instances" / "receiver-2" / name[:2] / f"{name}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sorted(PHILIPS_B.glob("*.dcm"))[0], target)
        os.kill(first_pid, signal.SIGKILL)
        wait_until(
            lambda: _pool(node).ready == 1 and _pids(node) != [first_pid],
            30,
            what="receiver-2 started again",
        )
        assert node.journal.has_instance(str(orphan.SOPInstanceUID))
        # its study gets a completion timer although no process announced it
        wait_until(lambda: node.journal.state_counts()["studies"].get("complete"), 20)
        # and the new process receives (a lone association goes to it)
        assert send(node, ge) == [0, 0, 0]
        assert _folders(storage)["receiver-2"] == 4  # the orphan and the three GE slices
        wait_until(lambda: node.journal.state_counts()["studies"].get("complete") == 2, 20)


@pytest.mark.timeout(120)
def test_sigterm_lets_a_receiving_process_finish_its_association_first(tmp_path: Path) -> None:
    """systemd stops a unit by sending SIGTERM to every process in it; here receiver-2
    alone gets it."""
    storage = tmp_path / "var"
    ge = ge_datasets()
    with running_node(node_settings(storage, node={"receive_processes": 2})) as node:
        (pid,) = _pids(node)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(str(ge[0].SOPClassUID), [str(ge[0].file_meta.TransferSyntaxUID)])
        assoc = ae.associate(LOCALHOST, node.receiver.address[1], ae_title="AINODE")
        assert assoc.is_established  # a lone association: receiver-2 has it
        try:
            assert int(assoc.send_c_store(ge[0]).Status) == 0
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: _pool(node).ready == 0, 5, what="receiver-2 to say it drains")
            assert not _exited(pid)
            # a new association meanwhile goes to the main process, not to the drain
            assert echo_ok(node.receiver.address[1])
            assert [int(assoc.send_c_store(ds).Status) for ds in ge[1:]] == [0, 0]
        finally:
            assoc.release()
        wait_until(lambda: _exited(pid), 10, what="receiver-2 to exit once drained")
        assert _folders(storage) == {"receiver-2": 3}
        wait_until(lambda: _pool(node).ready == 1, 30, what="receiver-2 started again")


@pytest.mark.timeout(120)
def test_a_stop_that_reaches_a_receiving_process_first_is_no_error(tmp_path: Path) -> None:
    """systemd sends SIGTERM to every process of the service: an idle receiving process
    may be gone before the node has begun to stop. No ERROR, exit code 0."""
    settings = node_settings(tmp_path / "var", node={"receive_processes": 2})
    with NodeProcess(settings, tmp_path / "node") as node:
        assert node.proc is not None
        wait_until(lambda: "receiving in 2 process(es)" in node.log(), 60, what="2 processes")
        (child,) = child_pids(node.proc.pid)
        os.kill(child, signal.SIGTERM)
        wait_until(lambda: _exited(child), 10, 0.01, what="receiver-2 to end")
        node.proc.send_signal(signal.SIGTERM)  # within the grace: as systemd's would be
        assert node.proc.wait(60) == 0
    assert "ended (code 0) as the node stops" in node.log()
    assert " ERROR " not in node.log(), node.log()[-3000:]


def test_an_exit_is_no_failure_once_the_node_is_told_to_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grace ends as soon as the node's signal arrives (its SIGTERM may come during
    its start, long before it stops the pool); without one it runs out."""
    import dicom_node.receivers as receivers

    monkeypatch.setattr(receivers, "STOP_GRACE_SECONDS", 0.3)
    told: list[int] = []
    pool, _theirs, _local = _fake_pool(["receiver-2"], stop_requested=lambda: bool(told))
    started = time.monotonic()
    assert not pool._node_stops()  # nobody told it: a failure, after the grace
    assert time.monotonic() - started >= 0.3
    threading.Timer(0.1, told.append, (15,)).start()
    started = time.monotonic()
    assert pool._node_stops()
    assert time.monotonic() - started < 0.25


@pytest.mark.timeout(120)
def test_receiving_processes_exit_when_the_main_process_dies(tmp_path: Path) -> None:
    storage = tmp_path / "var"
    settings = node_settings(storage, node={"receive_processes": 3})
    with NodeProcess(settings, tmp_path / "node") as node:
        wait_until(lambda: "receiving in 3 process(es)" in node.log(), 60, what="3 processes")
        assert node.proc is not None
        children = child_pids(node.proc.pid)
        assert len(children) == 2
        node.kill()
        wait_until(lambda: all(_exited(pid) for pid in children), 20, what="orphans to exit")


@pytest.mark.timeout(120)
def test_no_connection_is_dropped_while_a_receiving_process_starts_to_drain(
    tmp_path: Path,
) -> None:
    """C-ECHOs back to back while receiver-2 gets SIGTERM: those handed to it before the
    main process learns it drains are served in its drain, the rest by the main one."""
    with running_node(node_settings(tmp_path / "var", node={"receive_processes": 2})) as node:
        (pid,) = _pids(node)
        port = node.receiver.address[1]
        outcomes: list[bool] = []
        done = threading.Event()

        def echo_again_and_again() -> None:
            while not done.is_set():
                outcomes.append(echo_ok(port))

        thread = threading.Thread(target=echo_again_and_again)
        thread.start()
        try:
            wait_until(lambda: len(outcomes) >= 10, 20, what="echoes before")
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: _exited(pid), 20, what="receiver-2 to drain and exit")
            before = len(outcomes)
            wait_until(lambda: len(outcomes) >= before + 10, 20, what="echoes after")
        finally:
            done.set()
            thread.join(30)
    assert outcomes and all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} failed"


@pytest.mark.timeout(120)
def test_an_orphaned_receiving_process_ends_at_its_drain_deadline(tmp_path: Path) -> None:
    """Its main process killed, a receiving process lets its associations go on for
    node.drain_seconds, then aborts them and exits: nothing of it outlives that."""
    drain = 4.0
    settings = node_settings(
        tmp_path / "var", node={"receive_processes": 2, "drain_seconds": drain}
    )
    with NodeProcess(settings, tmp_path / "node") as node:
        wait_until(lambda: "receiving in 2 process(es)" in node.log(), 60, what="receiver-2")
        assert node.proc is not None
        (child,) = child_pids(node.proc.pid)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 120  # idle peers that never release
        # A lone association goes to receiver-2 unless the main process has not yet
        # heard that its start-up C-ECHO there closed; then the next one does.
        opened = []
        try:
            for _ in range(3):
                assoc = ae.associate(LOCALHOST, node.port, ae_title="AINODE")
                assert assoc.is_established
                opened.append(assoc)
                peer_port = assoc.dul.socket.socket.getsockname()[1]
                holder = _holder([node.proc.pid, child], node.port, peer_port)
                if holder == child:
                    break
            assert holder == child, "no association reached receiver-2"
            killed = time.monotonic()
            node.kill()
            wait_until(lambda: _exited(child), 60, 0.2, what="the orphan to exit")
            assert drain - 1 < time.monotonic() - killed < drain + 10
            wait_until(lambda: not assoc.is_established, 10, what="the association aborted")
        finally:
            for each in opened:
                if each.is_established:
                    each.abort()


@pytest.mark.timeout(300)
def test_sigkill_of_either_process_while_receiving_loses_nothing(tmp_path: Path) -> None:
    """A sender resends whatever was not acknowledged while receiver-2 (four times) and
    the main process (twice) are killed at random moments; every acknowledged instance
    is kept, every study completes."""
    from test_chaos import Sender, studies

    rng = random.Random(20261206)
    all_studies = studies()[:2]  # 40 Philips slices, 3 GE slices
    storage = tmp_path / "var"
    settings = node_settings(storage, node={"receive_processes": 2})
    node = NodeProcess(settings, tmp_path / "node").start()
    try:
        sender = Sender(node.port, [ds for study in all_studies for ds in study], pause=0.05)
        sender.start()
        for victim in ["receiver", "receiver", "main", "receiver", "receiver", "main"]:
            time.sleep(rng.uniform(0.3, 1.2))
            assert node.proc is not None
            if victim == "main":
                node.kill()  # its receiving process drains its association and exits
                node.start()
                continue
            for pid in child_pids(node.proc.pid):
                os.kill(pid, signal.SIGKILL)
        sender.join(120)
        assert not sender.pending, f"{len(sender.pending)} never acknowledged"
        journal = Journal(storage / "journal.sqlite")
        try:
            wait_until(
                lambda: journal.state_counts()["studies"].get("complete") == 2,
                60,
                what=f"both studies complete; node log:\n{node.log()[-3000:]}",
            )
            stored = {
                str(pydicom.dcmread(storage / rel, stop_before_pixels=True).SOPInstanceUID)
                for rel in journal.all_instance_relpaths()
            }
        finally:
            journal.close()
    finally:
        node.stop()
    assert sender.acked <= stored and len(stored) == sum(len(s) for s in all_studies)
    assert "receiving process receiver-2 exited" in node.log()
    # a kill hit the sender: an association broke under a request, or one was refused
    # while the main process restarted (which of the two depends on where the sender's
    # association was at each kill: receiver-2 drains its own while main restarts)
    assert sender.broken + sender.reconnects >= 1, "no kill hit an association"
    print(f"sender: {sender.broken} associations broken, {sender.reconnects} refused")


@pytest.mark.timeout(180)
def test_a_commitment_report_taken_by_a_receiving_process_settles_the_delivery(
    tmp_path: Path,
) -> None:
    """With two processes, a connection that arrives while none is open goes to
    receiver-2; so do both the GE slices and the PACS's later N-EVENT-REPORT."""
    with node_with_fake_pacs(tmp_path, ["ok"], node={"receive_processes": 2}) as (node, fake):
        assert send(node, ge_datasets()) == [0, 0, 0]
        (job,) = finished_job(node, JobState.DONE)  # type: ignore[misc]
        (delivery,) = node.journal.job_deliveries(job.id)
    assert _folders(tmp_path / "var") == {"receiver-2": 3}
    assert fake.report_statuses == [0x0000]
    assert delivery.state == DeliveryState.SENT and delivery.committed_at is not None


def test_folders_of_receiving_processes_no_longer_run_are_indexed_at_start(
    tmp_path: Path,
) -> None:
    """node.receive_processes lowered to 1: the orphans of receiver-3 are indexed by the
    node itself; a folder whose process still runs (its name lock held) is left to it."""
    from dicom_node.store import Spool

    storage = tmp_path / "var"
    sources = sorted(PHILIPS_B.glob("*.dcm"))[:2]
    planted = []
    for name, source in zip(["receiver-3", "receiver-4"], sources, strict=True):
        file_name = uuid.uuid4().hex
        target = storage / "instances" / name / file_name[:2] / f"{file_name}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        planted.append(str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID))
    still_running = Spool(storage, 0, "receiver-4")
    still_running.lock_name()
    try:
        with running_node(node_settings(storage)) as node:
            assert node.journal.has_instance(planted[0])
            assert not node.journal.has_instance(planted[1])
            wait_until(lambda: node.journal.state_counts()["studies"].get("complete"), 20)
    finally:
        still_running.release()


# --------------------------------------------------------------------------- the hand-off


def _settings(name: str) -> ProcessSettings:
    node = NodeSection(ae_title="AINODE")
    return ProcessSettings(name, node, Path("/nonexistent"), 0, None, "INFO", "text")


def _fake_pool(
    names: list[str], stop_requested: Callable[[], bool] = lambda: False
) -> tuple[ReceiverPool, list[socket.socket], list[int]]:
    """A pool whose processes are socket pairs (no process started); the main process's
    own load is the returned list's one element."""
    pool = ReceiverPool(
        [_settings(n) for n in names],
        metrics=Metrics(),
        on_opened=lambda _recorded: None,
        on_report=lambda _kind, _info: (0, None),
        reschedule=lambda: None,
        stop_requested=stop_requested,
    )
    theirs = []
    for proc in pool._processes:
        ours, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc.sock, proc.ready = ours, True
        theirs.append(other)
    local = [0]
    pool._local_load = lambda: local[0] + 1  # counting the connection being placed
    return pool, theirs, local


def _place(pool: ReceiverPool, local: list[int]) -> Any:
    """Place one connection; the remote it went to, or None (kept: local load + 1)."""
    with socket.socket() as sock:
        remote = pool.hand_off(sock, ("10.0.0.7", 40000))
    if remote is None:
        local[0] += 1
    return remote


def test_each_connection_goes_to_the_least_busy_process_the_main_one_on_a_tie() -> None:
    pool, theirs, local = _fake_pool(["receiver-2", "receiver-3"])
    placed = [_place(pool, local) for _ in range(6)]
    assert [r is None for r in placed] == [False, False, True, False, False, True]
    assert [len(p.connections) for p in pool._processes] == [2, 2] and local == [2]
    # what each process received: ("take", id, address) with the connection's descriptor
    data, fds, _, _ = socket.recv_fds(theirs[0], 1 << 16, 1)
    kind, conn_id, address = pickle.loads(data)
    assert (kind, address) == ("take", ("10.0.0.7", 40000)) and len(fds) == 1
    os.close(fds[0])
    # receiver-2 says its first connection closed: it is the least busy again
    pool._handle(pool._processes[0], ("closed", conn_id))
    assert placed[0].open is False and placed[1].open is True
    assert _place(pool, local) is not None and len(pool._processes[0].connections) == 2
    # a process that is not ready, or cannot be written to, gets nothing
    pool._processes[0].ready = False
    theirs[1].close()
    assert _place(pool, local) is None
    assert [len(p.connections) for p in pool._processes] == [2, 2]


def test_counters_of_a_receiving_process_are_added_once() -> None:
    pool, _theirs, _local = _fake_pool(["receiver-2"])
    proc = pool._processes[0]
    key = ("dicom_node_instances_received", (("calling_aet", "CT1"),))
    for total in (3.0, 3.0, 5.0):  # reports are totals; only the increase counts
        pool._handle(proc, ("counts", {key: total}, 1))
    pool._handle(proc, ("counts", {("no_such_metric", ()): 9.0}, 2))
    assert pool._metrics.counter_totals()[key] == 5.0
    assert pool.active_associations == 2
    pool._lost(proc)  # a new process counts from zero: its totals add again
    pool._processes[0].ready = True
    pool._handle(proc, ("counts", {key: 2.0}, 0))
    assert pool._metrics.counter_totals()[key] == 7.0


def test_store_times_of_a_receiving_process_are_added_to_the_histogram_once() -> None:
    pool, _theirs, _local = _fake_pool(["receiver-2"])
    proc = pool._processes[0]
    theirs = Metrics()
    for seconds in (0.0007, 0.0012, 30.0):
        theirs.store_seconds.observe(seconds)
    pool._metrics.store_seconds.observe(0.003)  # the main process's own
    for _ in range(2):  # the same totals twice: added once
        pool._handle(proc, ("counts", theirs.counter_totals(), 0))
    registry = pool._metrics.registry

    def bucket(bound: str) -> float | None:
        return registry.get_sample_value("dicom_node_store_seconds_bucket", {"le": bound})

    bounds = ("0.0005", "0.001", "0.002", "0.005", "10.0", "+Inf")
    assert [bucket(bound) for bound in bounds] == [0, 1, 2, 3, 3, 4]  # cumulative
    assert registry.get_sample_value("dicom_node_store_seconds_count") == 4
    assert registry.get_sample_value("dicom_node_store_seconds_sum") == pytest.approx(30.0049)
    theirs.store_seconds.observe(0.0001)
    pool._handle(proc, ("counts", theirs.counter_totals(), 0))
    assert bucket("0.0005") == 1
    assert registry.get_sample_value("dicom_node_store_seconds_count") == 5


# --------------------------------------------------------------------------- the journal lock

_HOLD = """
import sys, time
from pathlib import Path
from dicom_node.database import WriterLock
lock = WriterLock(Path(sys.argv[1]))
lock.__enter__()
print("held", flush=True)
time.sleep(60)
"""


def test_the_journal_lock_is_taken_across_processes_and_dropped_when_its_holder_dies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite.writers"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = WriterLock(path)
        taken: list[float] = []

        def take() -> None:
            with lock:
                taken.append(time.monotonic())

        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(take)
            time.sleep(0.5)
            assert not taken  # the other process holds it
            killed = time.monotonic()
            holder.send_signal(signal.SIGKILL)
            future.result(timeout=10)
        assert taken[0] - killed < 2.0
        lock.close()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_journal_writers_wait_for_the_lock_another_process_holds(tmp_path: Path) -> None:
    from test_intake import instance

    journal = Journal(tmp_path / "journal.sqlite")
    journal.create()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, f"{tmp_path / 'journal.sqlite'}.writers"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        threading.Timer(1.0, holder.kill).start()
        began = time.monotonic()
        journal.record_instance(instance("1.2.3.1", "1.2.3.1.1"))
        assert time.monotonic() - began > 0.8  # it waited for the other process
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        journal.close()


def test_auto_is_the_default_and_gives_one_process_per_usable_cpu_up_to_two() -> None:
    from dicom_node.config import parse_config, receive_process_count

    default = parse_config({"node": {"ae_title": "AINODE"}})
    assert default.node.receive_processes == "auto"
    assert [receive_process_count(default, cpus) for cpus in (1, 2, 3, 16)] == [1, 2, 2, 2]
    shared = parse_config(  # a shared journal: more receivers are more nodes, no error
        {
            "node": {"ae_title": "AINODE"},
            "cluster": {"journal_url": "postgresql+psycopg://u:p@db:5432/j"},
        }
    )
    assert receive_process_count(shared, 16) == 1
    explicit = parse_config({"node": {"ae_title": "AINODE", "receive_processes": 3}})
    assert receive_process_count(explicit, 1) == 3


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        ("0::/system.slice/dicom-node.service\n", {}, None),  # no quota anywhere
        (  # systemd's CPUQuota=150%
            "0::/system.slice/dicom-node.service\n",
            {"system.slice/dicom-node.service/cpu.max": "150000 100000\n"},
            2,
        ),
        (  # a quota on the slice above, none on the service
            "0::/system.slice/dicom-node.service\n",
            {
                "system.slice/cpu.max": "50000 100000\n",
                "system.slice/dicom-node.service/cpu.max": "max 100000\n",
            },
            1,
        ),
        ("0::/\n", {"cpu.max": "100000 100000\n"}, 1),  # a container's own namespace
        ("0::/\n", {"cpu.max": "garbage\n"}, None),
        (  # cgroup v1, docker --cpus 1
            "5:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            1,
        ),
        (
            "5:cpu,cpuacct:/docker/abc\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            None,
        ),
        (None, {"cpu.max": "100000 100000\n"}, 1),  # no /proc/self/cgroup: the top
    ],
)
def test_usable_cpus_follow_the_affinity_and_the_cgroup_quota(
    tmp_path: Path, proc: str | None, files: dict[str, str], expected: int | None
) -> None:
    from dicom_node.config import usable_cpus

    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    if proc is not None:
        proc_cgroup.write_text(proc)
    affinity = len(os.sched_getaffinity(0))
    found = usable_cpus(root, proc_cgroup)
    assert found == (affinity if expected is None else min(affinity, expected))


def test_a_node_left_at_auto_receives_in_as_many_processes_as_it_may_use_cpus(
    tmp_path: Path,
) -> None:
    from dicom_node.config import AUTO_RECEIVE_PROCESSES_MAX, usable_cpus

    expected = min(usable_cpus(), AUTO_RECEIVE_PROCESSES_MAX)
    settings = node_settings(tmp_path / "var", node={"receive_processes": "auto"})
    with running_node(settings) as node:
        if expected > 1:
            assert _pool(node).ready == expected - 1
        else:
            assert node.receiver._pool is None
        samples = node.metrics.registry.get_sample_value("dicom_node_receiving_processes")
        assert samples == expected


def test_receive_processes_need_the_nodes_own_journal() -> None:
    from dicom_node.config import ConfigError, parse_config

    settings = node_settings(
        Path("/tmp/unused"),
        node={"receive_processes": 2},
        cluster={"journal_url": "postgresql+psycopg://u:p@db:5432/j"},
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(settings)
    assert any(p.startswith("node.receive_processes:") for p in caught.value.problems)
