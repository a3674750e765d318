"""The GPU worker, tested without a GPU: the CUDA device is a ``torch.device("cuda", 0)``
that the fake pipelines below never touch, and free memory comes from a fake probe.

Covered: device selection, job priority (and the in-place journal upgrade that
added it), warm pipelines, memory admission, the out-of-memory fallback to the
CPU, one job at a time per GPU, and a receiver that answers during analysis.
"""

from __future__ import annotations

import copy
import functools
import logging
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dciodvfy import dciodvfy_errors
from nodes import node_settings, running_node, send
from peers import GE_3SLICE, LOCALHOST, free_port, wait_until
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from test_assemble import Clock, Harness

import dicom_node.analysis.pipelines
import dicom_node.app
import dicom_node.worker
from dicom_node.analysis import device as devices
from dicom_node.analysis import warm
from dicom_node.analysis.ct_chest import CtChestPipeline
from dicom_node.analysis.types import AnalysisError, AnalysisResult, Volume
from dicom_node.config import parse_config
from dicom_node.domain import JobState
from dicom_node.encode.types import Equipment
from dicom_node.journal import JobSpec, Journal, JournalSchemaError
from dicom_node.pipeline_runner import DEFAULT_BYTES_PER_VOXEL, memory_needed
from dicom_node.route import SeriesInfo, plan_jobs
from dicom_node.web.metrics import Metrics
from dicom_node.worker import Worker

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
MIB = 1 << 20
GIB = 1 << 30
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DESTINATIONS = parse_config(
    {
        "node": {"ae_title": "N"},
        "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 104}},
    }
).destinations
EQUIPMENT = Equipment(device_serial_number="1", device_observer_uid=generate_uid())


@functools.cache
def ct_chest() -> CtChestPipeline:
    return CtChestPipeline(CPU, airways_segment=True)


class Tracker:
    """Counts pipeline runs in progress at once, and the most there ever were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = self.most = 0
        self.started = threading.Event()

    def __enter__(self) -> None:
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
        self.started.set()

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self.active -= 1


class FakePipeline:
    """ct-chest's real result (computed on the CPU) for a pipeline built for ``device``.

    ``fail`` is raised instead on a CUDA device; ``hold`` seconds are spent in
    every run; ``memory`` is declared as the device memory a volume needs.
    """

    name = "ct-chest"
    version = "test"

    def __init__(
        self,
        device: torch.device,
        fail: Exception | None,
        hold: float,
        tracker: Tracker,
        memory: int | None,
    ) -> None:
        self.device = device
        self.runs = 0
        self._fail = fail if device.type == "cuda" else None
        self._hold = hold
        self._tracker = tracker
        if memory is not None:
            self.memory_bytes = lambda _volume: memory

    def run(self, volume: Volume) -> AnalysisResult:
        self.runs += 1
        with self._tracker:
            if self._fail is not None:
                raise self._fail
            time.sleep(self._hold)
            return ct_chest().run(volume)


class Factory:
    """The worker's ``pipeline_factory``: records what it built, for which device."""

    def __init__(
        self,
        fail_on_gpu: Exception | None = None,
        hold: float = 0.0,
        memory: int | None = None,
    ) -> None:
        self.built: list[tuple[str, str]] = []
        self.pipelines: dict[str, FakePipeline] = {}
        self.tracker = Tracker()
        self._options = (fail_on_gpu, hold, self.tracker, memory)

    def __call__(self, name: str, device: torch.device, *_models_path: object) -> FakePipeline:
        self.built.append((name, str(device)))
        pipeline = FakePipeline(device, *self._options)
        self.pipelines[str(device)] = pipeline
        return pipeline


class Probe:
    """A memory probe answering (free, total) from a script; the last answer repeats."""

    def __init__(self, *answers: tuple[int, int]) -> None:
        self._answers = list(answers)
        self.calls = 0

    def __call__(self, device: torch.device) -> tuple[int, int]:
        assert device == CUDA
        self.calls += 1
        return self._answers[min(self.calls, len(self._answers)) - 1]


PLENTY = Probe((80 * GIB, 80 * GIB))


def make_worker(harness: Harness, factory: Factory, metrics: Metrics, **options: object) -> Worker:
    options.setdefault("device", CUDA)
    options.setdefault("memory_probe", PLENTY)
    return Worker(
        harness.journal,
        harness.spool,
        metrics,
        DESTINATIONS,
        EQUIPMENT,
        factory,
        harness.clock,
        on_results=lambda: None,
        **options,  # type: ignore[arg-type]
    )


def fallbacks(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "dicom_node_analysis_cpu_fallbacks_total", {"pipeline": "ct-chest", "reason": reason}
    )


def queue_jobs(harness: Harness, priorities: list[str]) -> list[int]:
    """Receive the GE study and queue one job per priority, in this order."""
    for path in sorted(GE_3SLICE.glob("*.dcm")):
        harness.receive(path)
    (study,) = harness.journal.open_studies()
    (series_id,) = {r.id for r in harness.journal.study_snapshot(study.id).series}
    specs = [
        JobSpec(
            series_id,
            f"route-{index}",
            "ct-chest",
            ("pacs",),
            3,
            (generate_uid(), generate_uid(), generate_uid(), generate_uid()),
            priority,
        )
        for index, priority in enumerate(priorities)
    ]
    ids = harness.journal.complete_study(study.id, study.last_received_at, harness.clock.now, specs)
    assert ids is not None
    return ids


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "var", Clock())


# -- device selection -----------------------------------------------------------------------


def test_select_device_accepts_an_index_and_refuses_an_absent_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.select_device("auto") == CPU
    with pytest.raises(devices.DeviceUnavailable, match=r"'cuda:0' was requested.*is False"):
        devices.select_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.select_device("auto") == CUDA
    assert devices.select_device("cuda") == CUDA
    assert devices.select_device("cuda:1") == torch.device("cuda", 1)
    assert devices.select_device("cpu") == CPU
    with pytest.raises(devices.DeviceUnavailable, match=r"only 2 CUDA device\(s\).*cuda:0, cuda:1"):
        devices.select_device("cuda:2")
    for wrong in ("gpu", "cuda:", "cuda:x", "cuda0"):
        with pytest.raises(ValueError, match="unknown device preference"):
            devices.select_device(wrong)


def test_the_worker_is_built_after_the_listener_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading torch and the pipelines takes seconds: the node listens first."""
    real_build = dicom_node.app.build_worker
    listening: list[bool] = []

    def build(*args: object, **kwargs: object) -> Worker:
        listening.append(node.receiver.running)
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dicom_node.app, "build_worker", build)
    settings = node_settings(
        tmp_path / "var",
        destinations={"pacs": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()}},
        routes=[{"name": "chest", "pipeline": "ct-chest", "send_to": ["pacs"]}],
    )
    node = dicom_node.app.build_node(parse_config(settings))
    assert node.worker is None and listening == []
    node.start()
    try:
        assert listening == [True] and node.worker is not None
    finally:
        node.stop(timeout=5)


def _queued_job_of_a_routed_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Settings of a node with the ct-chest route whose GE study left a queued job (its
    worker never started); the same settings serve the restarts, routes changed."""
    pacs = {"pacs": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()}}
    routed = node_settings(
        tmp_path / "var",
        destinations=pacs,
        routes=[{"name": "chest", "pipeline": "ct-chest", "send_to": ["pacs"]}],
        completion={"study_idle_seconds": 0.2},
    )
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    with monkeypatch.context() as patched:
        patched.setattr(dicom_node.app.Analysis, "start", lambda self: None)  # no worker
        node = dicom_node.app.build_node(parse_config(routed))
        node.start()
        try:
            assert send(node, ge) == [0, 0, 0]
            wait_until(lambda: node.journal.state_counts()["jobs"].get(JobState.QUEUED), 30)
        finally:
            node.stop(timeout=5)
    return routed


def _failed_job_of_a_routed_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict, int]:
    """As :func:`_queued_job_of_a_routed_node`, its job then failed (nothing waits):
    the settings, and the job's id for an operator's retry."""
    settings = _queued_job_of_a_routed_node(tmp_path, monkeypatch)
    journal = Journal(tmp_path / "var" / "journal.sqlite")
    try:
        job = journal.claim_job(time.time())
        assert job is not None
        journal.job_failed(job.id, "RuntimeError: made to fail by the test", time.time())
    finally:
        journal.close()
    return settings, job.id


BUILD_SECONDS = 1.0  # a lazy build made this slow (loading torch takes 1.5-2 s)


@pytest.mark.parametrize("retried_by", ["REST API", "dicom-node retry"])
def test_a_node_without_routes_or_jobs_builds_its_worker_when_a_job_first_needs_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    retried_by: str,
) -> None:
    """No routes and a journal of its own: nothing to analyse, so no torch at the start;
    an operator's retry of an old failed job builds the worker, which runs it. The REST
    API wakes the node (and its answer does not wait for the build); ``dicom-node
    retry`` only writes the journal, which the node looks at every IDLE_POLL_SECONDS."""
    settings, job_id = _failed_job_of_a_routed_node(tmp_path, monkeypatch)
    real_build = dicom_node.app.build_worker
    built: list[bool] = []

    def build(*args: object, **kwargs: object) -> Worker:
        built.append(True)
        time.sleep(BUILD_SECONDS)  # as long as loading torch takes, about
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dicom_node.app, "build_worker", build)
    # the REST API's wake alone must build it: the journal is looked at too seldom here
    poll = 60.0 if retried_by == "REST API" else 0.2
    monkeypatch.setattr(dicom_node.app, "IDLE_POLL_SECONDS", poll)
    with caplog.at_level(logging.INFO, logger="dicom_node.app"):
        node = dicom_node.app.build_node(parse_config({**settings, "routes": []}))
        node.start()
    try:
        time.sleep(0.5)  # nothing to analyse yet
        assert built == [] and node.worker is None
        assert "the analysis worker is loaded when a job needs it" in caplog.text
        node.journal.retry_job(job_id, time.time())
        if retried_by == "REST API":
            woken = time.monotonic()
            node.analysis.wake()  # what its retry endpoint calls (through on_jobs)
            assert time.monotonic() - woken < BUILD_SECONDS / 2  # the answer did not wait
        wait_until(lambda: node.worker is not None, 10, 0.05, "the worker built")
        assert built == [True]
        leaving = {JobState.SENDING, JobState.DONE, JobState.DEAD_LETTER}  # no PACS listens
        wait_until(
            lambda: leaving & set(node.journal.state_counts()["jobs"]), 60, what="the job run"
        )
    finally:
        node.stop(timeout=5)


def test_a_worker_built_while_the_node_stops_is_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that comes while the lazy worker is being built waits for the build, and
    the worker it gives is never started."""
    settings, job_id = _failed_job_of_a_routed_node(tmp_path, monkeypatch)
    real_build = dicom_node.app.build_worker
    building, release = threading.Event(), threading.Event()
    started: list[bool] = []

    def build(*args: object, **kwargs: object) -> Worker:
        building.set()
        assert release.wait(10)
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dicom_node.app, "build_worker", build)
    monkeypatch.setattr(Worker, "start", lambda self: started.append(True))
    node = dicom_node.app.build_node(parse_config({**settings, "routes": []}))
    node.start()
    stopping = threading.Thread(target=node.stop, kwargs={"timeout": 5})
    try:
        node.journal.retry_job(job_id, time.time())
        node.analysis.wake()
        assert building.wait(10), "the build began"
        stopping.start()
        stopped = node.analysis._stopping  # no public sign that a stop has begun
        wait_until(stopped.is_set, 5, 0.01, "the stop began")
        assert stopping.is_alive()  # waiting for the build
    finally:
        release.set()
        if stopping.ident is None:  # failed before the stop began: stop here
            node.stop(timeout=5)
        stopping.join(10)
    assert not stopping.is_alive()
    assert started == []


def test_a_node_without_routes_builds_its_worker_at_the_start_when_jobs_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs left queued by an earlier run with routes are analysed after a restart
    without them."""
    settings = _queued_job_of_a_routed_node(tmp_path, monkeypatch)
    node = dicom_node.app.build_node(parse_config({**settings, "routes": []}))
    node.start()
    try:
        assert node.worker is not None
        wait_until(lambda: not node.journal.state_counts()["jobs"].get(JobState.QUEUED), 60)
    finally:
        node.stop(timeout=5)


def test_an_absent_cuda_device_refuses_the_start_before_any_port_opens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # run() must not take pytest's
    settings = node_settings(tmp_path / "var", analysis={"device": "cuda"})
    with pytest.raises(devices.DeviceUnavailable, match="'cuda' was requested"):
        dicom_node.app.build_node(parse_config(settings))
    for section in ("node", "web"):  # neither the DICOM nor the HTTP port was opened
        with socket.socket() as probe:
            probe.bind((LOCALHOST, settings[section]["port"]))
    with caplog.at_level(logging.ERROR, logger="dicom_node.app"):
        assert dicom_node.app.run(parse_config(settings)) == 1
    assert "cannot start: device 'cuda' was requested" in caplog.text
    assert "check analysis.device (auto runs on the CPU where no GPU is visible)" in caplog.text


def test_a_study_received_before_the_worker_is_built_is_analysed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its job is made while the worker is still being built (nobody to wake): the worker
    finds it in the journal when it starts."""
    real_build = dicom_node.app.build_worker

    def build(*args: object, **kwargs: object) -> Worker:
        assert send(node, ge) == [0, 0, 0]
        wait_until(lambda: node.journal.state_counts()["jobs"].get(JobState.QUEUED), 10)
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dicom_node.app, "build_worker", build)
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    settings = node_settings(
        tmp_path / "var",
        destinations={"pacs": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()}},
        routes=[{"name": "chest", "pipeline": "ct-chest", "send_to": ["pacs"]}],
    )
    node = dicom_node.app.build_node(parse_config(settings))
    node.start()
    analysed = {JobState.SENDING, JobState.DONE, JobState.DEAD_LETTER}  # no PACS listens

    def jobs() -> dict[str, int]:
        return dict(node.journal.state_counts()["jobs"])

    try:
        wait_until(lambda: set(jobs()) & analysed, 60, 0.1, what="the job analysed")
        assert sum(jobs().values()) == 1 and not set(jobs()) - analysed, jobs()
    finally:
        node.stop(timeout=5)


def test_a_worker_that_cannot_be_built_stops_the_start_and_closes_the_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker is built after the listener opened: if it fails (a broken torch install,
    say), the node closes the port again and ``serve`` exits 1 rather than hanging."""

    def broken(*_: object, **__: object) -> Worker:
        raise ImportError("libtorch_cpu.so: cannot open shared object file")

    monkeypatch.setattr(dicom_node.app, "build_worker", broken)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # run() must not take pytest's
    settings = node_settings(  # with a route: without one, no worker is built at the start
        tmp_path / "var",
        destinations={"pacs": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()}},
        routes=[{"name": "chest", "pipeline": "ct-chest", "send_to": ["pacs"]}],
    )
    with caplog.at_level(logging.ERROR, logger="dicom_node.app"):
        assert dicom_node.app.run(parse_config(settings)) == 1
    assert "cannot start" in caplog.text and "libtorch_cpu.so" in caplog.text
    with socket.socket() as probe:  # the DICOM port is free again
        probe.bind((LOCALHOST, settings["node"]["port"]))


def test_one_gate_per_gpu_for_the_whole_process() -> None:
    assert devices.device_gate(torch.device("cuda")) is devices.device_gate(CUDA)
    assert devices.device_gate(torch.device("cuda", 1)) is not devices.device_gate(CUDA)
    with devices.device_gate(CPU), devices.device_gate(CPU):  # no gate: CPU jobs run side by side
        pass


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("Expected all tensors to be on the same device"), False),
        (MemoryError(), False),  # the host's memory: the CPU would not do better
    ],
)
def test_out_of_memory_is_recognised(error: Exception, expected: bool) -> None:
    assert devices.is_out_of_memory(error) is expected


def test_an_error_raised_because_of_out_of_memory_counts_as_out_of_memory() -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:  # what tiled inference does when one tile is too many
            raise AnalysisError("out of memory even one tile at a time") from None
    except AnalysisError as exc:
        wrapped = exc
    assert wrapped.__cause__ is None and wrapped.__context__ is not None
    assert devices.is_out_of_memory(wrapped)
    try:
        raise AnalysisError("no lungs") from ValueError("unrelated")
    except AnalysisError as exc:
        assert not devices.is_out_of_memory(exc)


# -- priority -------------------------------------------------------------------------------


def test_urgent_jobs_are_claimed_before_older_normal_ones(harness: Harness) -> None:
    ids = queue_jobs(harness, ["normal", "urgent", "normal", "urgent"])
    claimed = [harness.journal.claim_job(harness.clock.now) for _ in ids]
    assert [job.id for job in claimed if job is not None] == [ids[1], ids[3], ids[0], ids[2]]
    assert [job.priority for job in claimed if job is not None] == ["urgent"] * 2 + ["normal"] * 2
    assert harness.journal.claim_job(harness.clock.now) is None


def test_a_route_gives_its_priority_to_its_jobs() -> None:
    routes = parse_config(
        {
            "node": {"ae_title": "N"},
            "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 104}},
            "routes": [
                {
                    "name": "stroke",
                    "pipeline": "ct-chest",
                    "send_to": ["pacs"],
                    "priority": "urgent",
                },
                {"name": "chest", "pipeline": "ct-chest", "send_to": ["pacs"]},
            ],
        }
    ).routes
    header = pydicom.dcmread(sorted(GE_3SLICE.glob("*.dcm"))[0], stop_before_pixels=True)
    planned = plan_jobs(routes, [SeriesInfo(1, header, 3)], [])
    assert [(job.route, job.priority) for job in planned] == [
        ("stroke", "urgent"),
        ("chest", "normal"),
    ]


def _as_version_2(path: Path) -> None:
    """Turn a journal into one written by schema version 2 (the version before priority).

    Dropping the column leaves exactly the tables version 2 creates (compared
    once, table by table, with a journal made by that version's code).
    """
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE jobs DROP COLUMN priority")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    db.close()


def test_a_version_2_journal_is_upgraded_in_place_keeping_its_jobs(harness: Harness) -> None:
    first, second = queue_jobs(harness, ["normal", "normal"])
    harness.journal.claim_job(harness.clock.now)  # first: analysing when the node stopped
    before = {job.id: job for job in harness.journal.recent_jobs()}
    harness.journal.close()
    path = harness.spool.journal_path
    _as_version_2(path)

    journal = Journal(path)
    journal.create()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
    db.close()
    after = {job.id: job for job in journal.recent_jobs()}
    assert after.keys() == before.keys() == {first, second}
    for job_id, job in after.items():
        assert job.priority == "normal"
        assert job._asdict() == {**before[job_id]._asdict(), "priority": "normal"}
    assert journal.resume(harness.clock.now) == 1  # the analysing job is queued again
    assert journal.claim_job(harness.clock.now).id == first
    journal.close()


def test_an_interrupted_upgrade_is_completed_and_unknown_versions_are_refused(
    harness: Harness,
) -> None:
    queue_jobs(harness, ["urgent"])
    harness.journal.close()
    path = harness.spool.journal_path
    with sqlite3.connect(path) as db:  # the column was added, the version not yet written
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    db.close()
    journal = Journal(path)
    journal.create()
    (job,) = journal.recent_jobs()
    assert job.priority == "urgent"
    journal.close()
    for version in ("1", "4"):
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (version,))
        db.close()
        with pytest.raises(JournalSchemaError, match=f"has schema version {version}; this"):
            Journal(path).create()


# -- memory admission and the fallback to the CPU ---------------------------------------------


def _results(harness: Harness, job_id: int) -> dict[str, pydicom.Dataset]:
    paths = {
        kind: harness.spool.path(harness.spool.result_relpath(job_id, kind))
        for kind in ("seg", "sr")
    }
    for path in paths.values():
        assert dciodvfy_errors(path) == []
    return {kind: pydicom.dcmread(path) for kind, path in paths.items()}


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the worker reads a series (one entry per read)."""
    loads: list[int] = []
    load_images = dicom_node.worker.load_images

    def counting(paths: list[Path]) -> Volume:
        loads.append(len(paths))
        return load_images(paths)

    monkeypatch.setattr(dicom_node.worker, "load_images", counting)
    return loads


def test_out_of_memory_on_the_gpu_reruns_the_job_on_the_cpu(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = Factory(fail_on_gpu=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    metrics = Metrics()
    worker = make_worker(harness, factory, metrics)
    job = harness.claimed_job()
    loads = _count_loads(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dicom_node.worker"):
        worker.run_job(job)
    assert harness.journal.job(job.id).state == JobState.SENDING
    results = _results(harness, job.id)
    assert results["seg"].SOPClassUID == SEG_STORAGE
    assert results["sr"].SOPClassUID == COMPREHENSIVE_3D_SR
    assert results["seg"].SOPInstanceUID == job.seg_sop_uid
    assert factory.built == [("ct-chest", "cuda:0"), ("ct-chest", "cpu")]
    assert factory.pipelines["cuda:0"].runs == factory.pipelines["cpu"].runs == 1
    assert fallbacks(metrics, "out_of_memory") == 1
    assert len(loads) == 2  # the GPU run had the only reference: the CPU run reads again
    assert "out of memory on cuda:0" in caplog.text
    assert "running it on the CPU instead" in caplog.text


def test_other_gpu_errors_fail_the_job_without_a_fallback(harness: Harness) -> None:
    factory = Factory(fail_on_gpu=AnalysisError("no lungs found"))
    metrics = Metrics()
    job = harness.claimed_job()
    make_worker(harness, factory, metrics).run_job(job)
    failed = harness.journal.job(job.id)
    assert failed.state == JobState.FAILED and failed.error.startswith("AnalysisError")
    assert factory.built == [("ct-chest", "cuda:0")]
    assert fallbacks(metrics, "out_of_memory") is None


def test_a_failure_the_journal_cannot_take_is_recorded_once_it_can(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No job stays ANALYSING until the next restart because its FAILED write failed."""
    factory = Factory(fail_on_gpu=AnalysisError("no lungs found"))
    metrics = Metrics()
    job = harness.claimed_job()
    worker = make_worker(harness, factory, metrics)
    record = harness.journal.job_failed
    attempts: list[int] = []

    def journal_away(job_id: int, *args: object) -> None:
        attempts.append(job_id)
        if len(attempts) <= 2:
            raise sqlite3.OperationalError("disk I/O error")
        record(job_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(harness.journal, "job_failed", journal_away)
    with caplog.at_level(logging.INFO, logger="dicom_node.worker"):
        worker.run_job(job)
        assert harness.journal.job(job.id).state == JobState.ANALYSING
        assert "failure cannot be written to the journal (OperationalError)" in caplog.text
        assert worker.record_unrecorded_failures() == 1  # the journal is still away
        assert worker.record_unrecorded_failures() == 0
        assert worker.record_unrecorded_failures() == 0  # nothing is written twice
    assert attempts == [job.id] * 3
    failed = harness.journal.job(job.id)
    assert failed.state == JobState.FAILED and failed.error.startswith("AnalysisError")
    outcome = {"pipeline": "ct-chest", "outcome": "failed"}
    assert metrics.registry.get_sample_value("dicom_node_jobs_analysed_total", outcome) == 1
    assert "its failure is recorded now" in caplog.text


def test_a_job_that_does_not_fit_waits_a_bounded_time_then_runs_on_the_cpu(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = Factory()
    metrics = Metrics()
    probe = Probe((1 * MIB, 80 * GIB))  # another process holds the GPU throughout
    worker = make_worker(harness, factory, metrics, memory_probe=probe, admission_wait=0.5)
    job = harness.claimed_job()
    loads = _count_loads(monkeypatch)
    started = time.monotonic()
    worker.run_job(job)
    assert time.monotonic() - started >= 0.5
    assert probe.calls >= 3  # after emptying torch's cache, then polled while waiting
    assert factory.pipelines["cuda:0"].runs == 0
    assert factory.pipelines["cpu"].runs == 1
    assert harness.journal.job(job.id).state == JobState.SENDING
    assert fallbacks(metrics, "memory") == 1
    assert len(loads) == 1  # the series read for the GPU goes to the CPU run


def test_a_job_admitted_once_memory_is_freed_runs_on_the_gpu(harness: Harness) -> None:
    factory = Factory()
    metrics = Metrics()
    probe = Probe((1 * MIB, 80 * GIB), (1 * MIB, 80 * GIB), (40 * GIB, 80 * GIB))
    worker = make_worker(harness, factory, metrics, memory_probe=probe, admission_wait=30)
    job = harness.claimed_job()
    worker.run_job(job)
    assert probe.calls == 3
    assert factory.built == [("ct-chest", "cuda:0")]
    assert harness.journal.job(job.id).state == JobState.SENDING
    assert fallbacks(metrics, "memory") is None


def test_a_declared_need_beyond_the_whole_gpu_goes_to_the_cpu_without_waiting(
    harness: Harness,
) -> None:
    factory = Factory(memory=3 * GIB)
    metrics = Metrics()
    probe = Probe((2 * GIB, 2 * GIB))  # an idle 2 GiB GPU
    worker = make_worker(harness, factory, metrics, memory_probe=probe, admission_wait=60)
    job = harness.claimed_job()
    started = time.monotonic()
    worker.run_job(job)
    assert time.monotonic() - started < 30
    assert factory.pipelines["cuda:0"].runs == 0 and factory.pipelines["cpu"].runs == 1
    assert fallbacks(metrics, "memory") == 1


def test_memory_needed_is_declared_or_estimated_from_the_voxels() -> None:
    volume = Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0), np.zeros(3), np.eye(3), ())
    plain = FakePipeline(CUDA, None, 0.0, Tracker(), None)
    assert memory_needed(plain, volume) == 256 * DEFAULT_BYTES_PER_VOXEL
    declaring = FakePipeline(CUDA, None, 0.0, Tracker(), 12345)
    assert memory_needed(declaring, volume) == 12345


# -- one job at a time per GPU, warm pipelines ------------------------------------------------


@pytest.mark.parametrize(("device", "most"), [(CPU, 2), (CUDA, 1)])
def test_two_analysis_threads_share_a_gpu_one_job_at_a_time(
    harness: Harness, device: torch.device, most: int
) -> None:
    factory = Factory(hold=1.0)
    worker = make_worker(harness, factory, Metrics(), device=device, threads=2)
    ids = queue_jobs(harness, ["normal", "normal"])
    worker.start()
    try:
        wait_until(
            lambda: all(harness.journal.job(i).state == JobState.SENDING for i in ids),
            60,
            0.1,
            "both jobs analysed",
        )
    finally:
        worker.stop(10)
    assert factory.tracker.most == most
    assert factory.built == [("ct-chest", str(device))]  # built once, used by both threads


def test_warm_up_loads_the_routes_pipelines_once_before_any_job(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    factory = Factory()
    worker = make_worker(harness, factory, Metrics(), warm_up=["ct-chest", "ct-chest"])
    with caplog.at_level(logging.INFO, logger="dicom_node.worker"):
        worker.start()
        try:
            wait_until(lambda: factory.built, 10, 0.05, "the warm-up")
            (job_id,) = queue_jobs(harness, ["normal"])
            worker.wake()
            wait_until(
                lambda: harness.journal.job(job_id).state == JobState.SENDING,
                60,
                0.1,
                "the job analysed",
            )
        finally:
            worker.stop(10)
    assert factory.built == [("ct-chest", "cuda:0")]
    assert factory.pipelines["cuda:0"].runs == 1
    assert "pipeline ct-chest loaded on cuda:0 in " in caplog.text


def test_a_sample_run_warms_each_pipeline_with_a_synthetic_chest_ct(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dicom-node worker``'s warm-up: load, run once on the phantom, encode, discard."""
    monkeypatch.setattr(warm, "SAMPLE_SLICES", 24)  # the same path, a smaller volume
    monkeypatch.setattr(warm, "SAMPLE_SIZE", 256)
    encoded: list[str] = []
    real_encode = dicom_node.worker._encode

    def encode(ds: pydicom.Dataset) -> bytes:
        encoded.append(str(ds.Modality))
        return real_encode(ds)

    monkeypatch.setattr(dicom_node.worker, "_encode", encode)
    factory = Factory()
    worker = make_worker(harness, factory, Metrics(), device=CPU, warm_up=["ct-chest"])
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        worker.warm_up(sample=True)
    assert factory.pipelines["cpu"].runs == 1
    assert sorted(encoded) == ["SEG", "SR"]
    assert "pipeline ct-chest warmed up on cpu: a synthetic chest CT in " in caplog.text
    counts = harness.journal.state_counts()
    assert counts["jobs"] == {} and counts["deliveries"] == {}  # nothing recorded or sent

    refusing = Factory(fail_on_gpu=AnalysisError("modality 'CT' is not one of ['DX']"))
    worker = make_worker(harness, refusing, Metrics(), warm_up=["ct-chest"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        worker.warm_up(sample=True)
    assert refusing.built == [("ct-chest", "cuda:0")]  # loaded all the same
    assert "does not take the synthetic chest CT" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    failing = Factory(fail_on_gpu=RuntimeError("CUDA error: an illegal memory access"))
    worker = make_worker(harness, failing, Metrics(), warm_up=["ct-chest"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        worker.warm_up(sample=True)
    assert failing.built == [("ct-chest", "cuda:0")]  # kept: the jobs use it
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING
    assert "its sample run failed (RuntimeError" in warning.getMessage()


# -- the receiver is never held up by analysis ------------------------------------------------


def test_a_c_store_is_answered_promptly_while_a_slow_analysis_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = Factory(hold=3.0)
    monkeypatch.setattr(dicom_node.analysis.pipelines, "build_pipeline", factory)
    settings = node_settings(
        tmp_path / "var",
        destinations={"pacs": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()}},
        routes=[{"name": "chest", "pipeline": "ct-chest", "send_to": ["pacs"]}],
    )
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    other = copy.deepcopy(ge[0])  # a slice of another study
    other.StudyInstanceUID = generate_uid()
    other.SeriesInstanceUID = generate_uid()
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    with running_node(settings) as node:
        wait_until(lambda: factory.built, 10, 0.05, "the warm-up")  # before any study
        assert _store(node.receiver.address[1], ge) < 5
        assert factory.tracker.started.wait(30), "the analysis did not start"
        took = _store(node.receiver.address[1], [other])
        still_analysing = factory.tracker.active == 1
    print(f"C-STORE association during analysis: {took:.3f} s")
    assert took < 1.0, f"C-STORE during analysis took {took:.2f} s"
    assert still_analysing
    assert factory.built == [("ct-chest", "cpu")]  # the warm pipeline served the job


def _store(port: int, datasets: list[pydicom.Dataset]) -> float:
    """Associate, C-STORE ``datasets``, release; the seconds it took."""
    started = time.monotonic()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate(LOCALHOST, port, ae_title="AINODE")
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
    finally:
        assoc.release()
    return time.monotonic() - started
