"""Drives queued jobs through analysis: load -> pipeline -> SEG + SR -> deliveries.

A pipeline that segments nothing (a classifier) gives an SR only; the sender
sends whichever result files a job has (:func:`dicom_node.send.result_files`).

:meth:`Worker.run_job` is the one boundary where an analysis failure becomes
the job's FAILED state with a reason; nothing inside it logs patient data.

The worker is its device's one user in the process. Pipelines stay loaded
(those of the routes optionally built at start); how a job's pipeline runs on
the device, or on the CPU when the GPU cannot take it, is
:class:`dicom_node.pipeline_runner.PipelineRunner`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from io import BytesIO

import pydicom
import torch
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicom_node.analysis.device import (
    CPU,
    MemoryProbe,
    cuda_memory,
    release_freed_host_memory,
)
from dicom_node.analysis.types import AnalysisResult, Pipeline, Volume
from dicom_node.analysis.volume import load_images
from dicom_node.analysis.warm import sample_volume, warm_with_sample
from dicom_node.config import SOURCE_DESTINATION, Destination
from dicom_node.domain import DeliveryState
from dicom_node.encode.seg import build_seg, save_dataset
from dicom_node.encode.sr import build_sr
from dicom_node.encode.types import Equipment, ResultUIDs
from dicom_node.journal import DeliverySpec, Journal, Row
from dicom_node.leases import LeaseKeeper, LeaseLost
from dicom_node.logs import log_context
from dicom_node.pipeline_runner import ADMISSION_WAIT_SECONDS, PipelineRunner
from dicom_node.store import Spool
from dicom_node.web.metrics import Metrics

log = logging.getLogger(__name__)


class Worker:
    """Analysis threads on one device; pipelines are built once per (name, device) and kept."""

    def __init__(
        self,
        journal: Journal,
        spool: Spool,
        metrics: Metrics,
        destinations: Mapping[str, Destination],
        equipment: Equipment,
        pipeline_factory: Callable[[str, torch.device], Pipeline],
        clock: Callable[[], float],
        on_results: Callable[[], None],
        threads: int = 1,
        *,
        device: torch.device = CPU,
        warm_up: Sequence[str] = (),
        memory_probe: MemoryProbe = cuda_memory,
        admission_wait: float = ADMISSION_WAIT_SECONDS,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self._journal = journal
        self._spool = spool
        self._metrics = metrics
        self._destinations = destinations
        self._equipment = equipment
        self._clock = clock
        self._on_results = on_results
        self._thread_count = threads
        self.device = device
        self._warm_up_names = tuple(dict.fromkeys(warm_up))
        # Several processes share the journal: jobs are held under renewed leases.
        self._leases = leases
        self._owner = None if leases is None else leases.owner
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._runner = PipelineRunner(
            pipeline_factory, metrics, device, memory_probe, admission_wait, self._stopping
        )
        self._threads: list[threading.Thread] = []
        # job id -> (pipeline, reason): failures the journal could not take yet
        self._unrecorded: dict[int, tuple[str, str]] = {}
        self._unrecorded_lock = threading.Lock()

    def start(self) -> None:
        """Start the analysis threads, and the warm-up beside them (start never waits for it).

        A start that failed partway (no thread could be made) may be called again: it
        starts only the threads still missing.
        """
        wanted: list[tuple[str, Callable[[], None]]] = [
            (f"analysis-{index}", self._loop) for index in range(self._thread_count)
        ]
        if self._warm_up_names:
            wanted.insert(0, ("analysis-warm-up", self.warm_up))
        started = {thread.name for thread in self._threads}
        for name, target in wanted:
            if name not in started:
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Finish the jobs in hand (bounded by ``timeout``); queued jobs stay queued."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.record_unrecorded_failures()
                worked = self.run_next()
            except Exception:
                log.exception("analysis loop error")
                worked = False
            if not worked:
                self._wake.wait(5.0)

    def run_next(self) -> bool:
        """Claim and run one queued job; False if there was none."""
        until = None if self._leases is None else self._leases.until()
        job = self._journal.claim_job(self._clock(), self._owner, until)
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_claimed(self, job_id: int) -> bool:
        """Claim job ``job_id`` (named by a broker message) and run it; False if not queued.

        A job that is not queued was finished already, or is held by another
        worker whose lease is running: the message is a duplicate.
        """
        assert self._leases is not None, "a broker's worker holds its jobs under leases"
        job = self._journal.claim_job_by_id(
            job_id, self._leases.owner, self._clock(), self._leases.until()
        )
        if job is None:
            log.info("job %d is not queued (done, or held elsewhere): message skipped", job_id)
            return False
        self.run_job(job)
        return True

    def run_job(self, job: Row) -> None:
        try:
            self._run_job(job)
        finally:
            release_freed_host_memory()  # the job's arrays are gone; their pages go too

    def _run_job(self, job: Row) -> None:
        with log_context(job_id=job.id, study_id=job.study_id), self._holding(job.id):
            started = time.monotonic()
            try:
                self._analyse(job)
            except LeaseLost:
                log.warning("job %d: taken over by another worker; this result is dropped", job.id)
                return
            except Exception as exc:
                reason = describe_failure(exc)
                log.error("job %d (%s): analysis failed: %s", job.id, job.pipeline, reason)
                log.debug("job %d traceback", job.id, exc_info=True)
                self._record_failure(job.id, job.pipeline, reason)
                return
            elapsed = time.monotonic() - started
            self._metrics.jobs_finished.labels(pipeline=job.pipeline, outcome="ok").inc()
            log.info("job %d (%s): analysed in %.1f s", job.id, job.pipeline, elapsed)
            self._on_results()

    def _record_failure(self, job_id: int, pipeline: str, reason: str) -> bool:
        """Mark the job FAILED with ``reason``; True once the journal has it.

        When the journal cannot take it (its disk is full, its database away) the job
        would stay ANALYSING until the next restart: it is kept here instead, and every
        turn of the analysis loop tries again (:meth:`record_unrecorded_failures`).
        """
        try:
            self._journal.job_failed(job_id, reason, self._clock(), self._owner)
        except LeaseLost:
            log.warning("job %d: taken over by another worker meanwhile", job_id)
        except Exception as exc:
            with self._unrecorded_lock:
                first = job_id not in self._unrecorded
                self._unrecorded[job_id] = (pipeline, reason)
            if first:
                log.error(
                    "job %d: its failure cannot be written to the journal (%s); trying again"
                    " until it can",
                    job_id,
                    type(exc).__name__,
                )
            return False
        else:
            self._metrics.jobs_finished.labels(pipeline=pipeline, outcome="failed").inc()
        with self._unrecorded_lock:
            self._unrecorded.pop(job_id, None)
        return True

    def record_unrecorded_failures(self) -> int:
        """Write the failures the journal could not take before; how many are still left."""
        with self._unrecorded_lock:
            pending = list(self._unrecorded.items())
        for job_id, (pipeline, reason) in pending:
            if not self._record_failure(job_id, pipeline, reason):
                break  # the journal is still away: the next turn tries again
            log.info("job %d: its failure is recorded now", job_id)
        with self._unrecorded_lock:
            return len(self._unrecorded)

    def _analyse(self, job: Row) -> None:
        _, study, _ = self._journal.job_context(job.id)
        relpaths = self._journal.instance_relpaths(job.series_id)
        started = time.monotonic()

        def load() -> Volume:
            try:
                return load_images([self._spool.fetch(p) for p in relpaths])  # slices, or a DX
            finally:
                self._spool.evict(relpaths)  # copies from an object store are not kept

        # The volume is not held here: the pipeline may free voxels it is done with.
        result = self._runner.run(job, load)
        analysed = time.monotonic()
        # The encoders use the volume's geometry and headers, not its voxels: those are
        # freed first (300 MiB for 300 slices of 512 x 512), as the SEG's frames need room.
        result = dataclasses.replace(result, volume=result.volume.without_voxels())
        self._write_results(job, result)
        timings = (analysed - started, time.monotonic() - analysed)
        self._metrics.stage_seconds.labels(stage="analyse").observe(timings[0])
        self._metrics.stage_seconds.labels(stage="encode").observe(timings[1])
        specs = [self._delivery(name, study.calling_aet) for name in job.send_to]
        self._journal.job_analysed(job.id, specs, self._clock(), timings, self._owner)

    def _holding(self, job_id: int) -> AbstractContextManager[None]:
        return nullcontext() if self._leases is None else self._leases.holding(job_id)

    def _write_results(self, job: Row, result: AnalysisResult) -> None:
        """Encode and store the SEG (when there are segments) and the SR.

        A result without segments (a classifier) has no SEG: only ``sr.dcm`` is
        written, and a SEG left by an earlier run of the same job is removed, so
        that the sender, which sends the files that exist, sends the SR alone.
        """
        uids = ResultUIDs(job.seg_series_uid, job.seg_sop_uid, job.sr_series_uid, job.sr_sop_uid)
        seg, sr = self._build_results(result, uids, self._predecessor(job))
        seg_relpath = self._spool.result_relpath(job.id, "seg")
        if seg is not None:  # written as it is encoded: its frames are not copied
            self._spool.write_atomic(seg_relpath, lambda stream: save_dataset(seg, stream))
        else:
            self._spool.remove(seg_relpath)
        self._spool.write_atomic(self._spool.result_relpath(job.id, "sr"), _encode(sr))

    def warm_up(self, sample: bool = False) -> None:
        """Load the routes' pipelines at start, so that the first study does not wait for it.

        ``sample``: also run each on a synthetic chest CT and encode the result
        (:mod:`dicom_node.analysis.warm`), so that the first study is not slower either.
        """
        volume = None
        for name in self._warm_up_names:
            if self._stopping.is_set():
                return
            try:
                pipeline = self._runner.pipeline(name, self.device)
            except Exception as exc:  # the jobs that need it will try again, and fail visibly
                log.error(
                    "warm-up: pipeline %s on %s: %s", name, self.device, describe_failure(exc)
                )
                log.debug("warm-up traceback", exc_info=True)
                continue
            if sample:
                volume = volume or sample_volume()
                warm_with_sample(pipeline, volume, self.device, self._encode_sample)

    def _encode_sample(self, result: AnalysisResult) -> None:
        """Encode a sample run's SEG and SR as a job's would be, and drop them."""
        uids = ResultUIDs(generate_uid(), generate_uid(), generate_uid(), generate_uid())
        seg, sr = self._build_results(result, uids, predecessor=None)
        _encode(sr)
        if seg is not None:
            _encode(seg)

    def _build_results(
        self, result: AnalysisResult, uids: ResultUIDs, predecessor: Dataset | None
    ) -> tuple[Dataset | None, Dataset]:
        """The SEG (None for a result without segments) and the SR of ``result``."""
        seg = build_seg(result, uids, self._equipment) if result.segments else None
        return seg, build_sr(result, seg, uids, self._equipment, predecessor=predecessor)

    def _predecessor(self, job: Row) -> Dataset | None:
        if job.predecessor_id is None:
            return None
        path = self._spool.fetch(self._spool.result_relpath(job.predecessor_id, "sr"))
        if not path.exists():  # the earlier job failed after this one was created
            log.warning("job %d: predecessor job %d has no SR", job.id, job.predecessor_id)
            return None
        return pydicom.dcmread(path, stop_before_pixels=True)

    def _delivery(self, name: str, calling_aet: str) -> DeliverySpec:
        """Resolve a ``send_to`` name; ``source`` is the destination with the sender's AE title."""
        if name == SOURCE_DESTINATION:
            matches = [n for n, d in self._destinations.items() if d.ae_title == calling_aet]
            if not matches:
                error = f"no destination is configured with the sending AE title {calling_aet!r}"
                log.error("cannot send to source: %s", error)
                return DeliverySpec(name, calling_aet, "", 0, DeliveryState.DEAD, error)
            name = matches[0]
        dest = self._destinations.get(name)
        if dest is None:  # removed from the config since the job was created
            error = f"destination {name!r} is no longer configured"
            log.error("cannot send: %s", error)
            return DeliverySpec(name, "", "", 0, DeliveryState.DEAD, error)
        return DeliverySpec(name, dest.ae_title, dest.host, dest.port)


def describe_failure(exc: BaseException) -> str:
    """A failure's reason for the log, the journal and the dashboard.

    Messages raised by our own code are written without patient data; those of
    third-party libraries may quote element values, so only their type is kept
    (the full text is in the DEBUG log).
    """
    frames = traceback.extract_tb(exc.__traceback__)
    ours = bool(frames) and f"{os.sep}dicom_node{os.sep}" in frames[-1].filename
    if ours:
        return f"{type(exc).__name__}: {exc}"
    origin = frames[-1].filename.rsplit(os.sep, 2)[-2] if frames else "?"
    return f"{type(exc).__name__} raised in {origin} (details in the DEBUG log)"


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    save_dataset(ds, buffer)
    return buffer.getvalue()
