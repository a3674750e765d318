"""Runs a job's pipeline on the worker's device, or on the CPU when the GPU cannot.

Pipelines stay loaded (built once per pipeline and device, on first use or by
the worker's warm-up). On a CUDA device one job at a time runs on the GPU
(:func:`device_gate`) while other analysis threads load series and encode
results; a job is admitted only when the device has the memory it is estimated
to need, and one that does not fit, or runs out of memory, is run on the CPU
instead of failing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from dicom_node.analysis.device import (
    CPU,
    MemoryProbe,
    device_gate,
    is_out_of_memory,
    release_cached,
)
from dicom_node.analysis.types import AnalysisResult, Pipeline, Volume
from dicom_node.journal import Row
from dicom_node.web.metrics import Metrics

# The worker's logger: running a job's pipeline is part of the worker's log.
log = logging.getLogger("dicom_node.worker")

# GPU memory a job needs per voxel of its volume unless its pipeline declares
# ``memory_bytes(volume)``: the float32 volume plus a few same-sized intermediates.
DEFAULT_BYTES_PER_VOXEL = 16
# How long a job waits for GPU memory held elsewhere before it runs on the CPU.
ADMISSION_WAIT_SECONDS = 30.0
ADMISSION_POLL_SECONDS = 0.5
_MIB = 1 << 20


class PipelineRunner:
    """Builds the worker's pipelines once per (name, device), keeps them, runs jobs on them."""

    def __init__(
        self,
        pipeline_factory: Callable[[str, torch.device], Pipeline],
        metrics: Metrics,
        device: torch.device,
        memory_probe: MemoryProbe,
        admission_wait: float,
        stopping: threading.Event,
    ) -> None:
        self._factory = pipeline_factory
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        self._building: dict[tuple[str, str], threading.Lock] = {}
        self._pipelines_lock = threading.Lock()
        self._metrics = metrics
        self._device = device
        self._memory_probe = memory_probe
        self._admission_wait = admission_wait
        self._stopping = stopping  # the worker's: a stopping worker waits for no memory

    def run(self, job: Row, load: Callable[[], Volume]) -> AnalysisResult:
        """Run the job's pipeline on the worker's device, or on the CPU if the GPU cannot.

        ``load`` reads the series. Its volume is handed to the pipeline with no other
        reference left here, so that a pipeline can free the voxels it no longer needs
        (ct-chest keeps the body's crop). A job that falls back to the CPU after its GPU
        run began reads the series again.
        """
        if self._device.type != "cuda":
            return self.pipeline(job.pipeline, self._device).run(load())
        loaded = [load()]  # before the gate: another job can use the GPU meanwhile
        with device_gate(self._device):  # our other GPU jobs have finished once we hold it
            try:
                pipeline = self.pipeline(job.pipeline, self._device)
                if self._admitted(job, pipeline, loaded[0]):
                    return pipeline.run(loaded.pop())
                reason = "memory"
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                log.warning("job %d (%s): out of memory on %s", job.id, job.pipeline, self._device)
                reason = "out_of_memory"
            # the exception, and the frames holding its tensors, are gone here
            release_cached(self._device)
        log.warning("job %d (%s): running it on the CPU instead", job.id, job.pipeline)
        self._metrics.cpu_fallbacks.labels(pipeline=job.pipeline, reason=reason).inc()
        return self.pipeline(job.pipeline, CPU).run(loaded.pop() if loaded else load())

    def _admitted(self, job: Row, pipeline: Pipeline, volume: Volume) -> bool:
        """Whether the device has the memory the job needs, waiting a bounded time for it.

        Called holding the device gate, so what is missing is held by another
        process or by torch's cache: the cache is emptied once, then free
        memory is polled for ``admission_wait`` seconds.
        """
        need = memory_needed(pipeline, volume)
        deadline = time.monotonic() + self._admission_wait
        emptied = False
        while True:
            free, total = self._memory_probe(self._device)
            if free >= need:
                return True
            if not emptied:
                release_cached(self._device)
                emptied = True
                continue
            remaining = deadline - time.monotonic()
            if need > total or remaining <= 0 or self._stopping.is_set():
                log.warning(
                    "job %d (%s): needs about %d MiB of %s; %d MiB of %d MiB free",
                    job.id,
                    job.pipeline,
                    need // _MIB,
                    self._device,
                    free // _MIB,
                    total // _MIB,
                )
                return False
            self._stopping.wait(min(ADMISSION_POLL_SECONDS, remaining))

    def pipeline(self, name: str, device: torch.device) -> Pipeline:
        """The pipeline ``name`` on ``device``, built on first use and kept (models stay loaded).

        One lock per (name, device): a pipeline is built once even when the
        warm-up and a job ask for it together, and building one never holds up
        the use of another.
        """
        key = (name, str(device))
        with self._pipelines_lock:
            if key in self._pipelines:
                return self._pipelines[key]
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._pipelines_lock:
                if key in self._pipelines:
                    return self._pipelines[key]
            started = time.monotonic()
            pipeline = self._factory(name, device)
            log.info("pipeline %s loaded on %s in %.1f s", name, device, time.monotonic() - started)
            with self._pipelines_lock:
                self._pipelines[key] = pipeline
            return pipeline


def memory_needed(pipeline: Pipeline, volume: Volume) -> int:
    """Device memory the pipeline needs for ``volume``: its own ``memory_bytes`` or an estimate."""
    declared = getattr(pipeline, "memory_bytes", None)
    if callable(declared):
        return int(declared(volume))
    return int(volume.hu.size) * DEFAULT_BYTES_PER_VOXEL
