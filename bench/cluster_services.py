"""The scale-out pieces of ``bench/workers.py``: worker processes and a gate on the broker.

(Not ``bench/services.py``: with ``tests/`` on the path, that name is ``tests/services.py``.)

PostgreSQL and redis-server are the starters of ``tests/services.py`` (re-exported here), the
receiver is ``tests/nodes.py``'s :class:`NodeProcess`; this module adds what a benchmark needs
beyond the tests: ``dicom-node worker`` processes limited to one thread (and pinned to one CPU
with ``taskset`` where there is one), and :class:`QueueGate`, which keeps the jobs that the
receiver handed to Redis away from the workers until every worker is up and warm.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from common import PeerError, wait_until
from services import (  # tests/services.py
    PostgresServer,
    RedisServer,
    WorkerProcess,
    require_services,
)

from dicom_node.broker import QUEUE

__all__ = [
    "BenchWorker",
    "CpuUse",
    "PostgresServer",
    "QueueGate",
    "RedisServer",
    "machine_cpu_seconds",
    "process_cpu_seconds",
    "require_services",
    "wait_workers_ready",
]

WORKER_START_TIMEOUT_S = 120.0
# Every library that would start a thread per CPU gets one: a worker is given one core.
ONE_THREAD_ENV = {
    name: "1"
    for name in (
        "OMP_NUM_THREADS",  # torch's intra-op threads, OpenMP in general
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",  # SimpleITK
    )
}
HOLD_PREFIX = "bench-hold:"


class BenchWorker(WorkerProcess):
    """``dicom-node worker --name NAME`` as a child process with one thread, on CPU ``cpu``."""

    def __init__(self, config_path: Path, name: str, log_path: Path, cpu: int | None) -> None:
        pinned = cpu is not None and shutil.which("taskset") is not None
        super().__init__(
            config_path,
            name,
            log_path,
            ["--concurrency", "1"],
            ONE_THREAD_ENV,
            ["taskset", "-c", str(cpu)] if pinned else [],
        )
        self.cpu = cpu
        self.pinned = pinned

    def start(self) -> BenchWorker:  # type: ignore[override]
        """Start the process; :meth:`ready_with` says when it consumes, warm."""
        self.launch()
        return self

    def ready_with(self, pipeline: str) -> bool:
        """Its "ready" line and its warm-up of ``pipeline`` are in the log; an exit is an error."""
        if f"warm-up: pipeline {pipeline}" in self.log():
            raise PeerError(f"worker {self.name} could not load {pipeline}:\n{self.tail()}")
        return self.ready() and f"pipeline {pipeline} loaded" in self.log()

    def tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (``/proc/PID/stat``)."""
        assert self.proc is not None
        return process_cpu_seconds(self.proc.pid)


def wait_workers_ready(workers: list[BenchWorker], pipeline: str, gate: QueueGate) -> None:
    """Every worker warm (pipeline loaded) and blocked on the broker, waiting for messages."""

    def ready() -> bool:
        return all(w.ready_with(pipeline) for w in workers) and gate.waiting() >= len(workers)

    try:
        wait_until(ready, WORKER_START_TIMEOUT_S, 0.1, f"{len(workers)} workers ready")
    except TimeoutError as exc:
        logs = "\n".join(f"--- {w.name}\n{w.tail(2000)}" for w in workers)
        raise PeerError(f"{exc}; {gate.waiting()} consumers waiting\n{logs}") from exc


class QueueGate:
    """Holds the analysis queue's messages in Redis aside and lets them all go at once.

    The receiver publishes each job to the Celery queue :data:`dicom_node.broker.QUEUE`
    (kombu's Redis transport: one list per priority step, named after the queue).
    :meth:`hold` renames those lists, so a worker that starts finds nothing; :meth:`release`
    renames them back in one transaction, so every warm worker sees every job at the same
    instant. The messages themselves are not touched.
    """

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=10)
        self._held: list[bytes] = []

    def _queue_keys(self, prefix: str = "") -> list[bytes]:
        return sorted(self._redis.scan_iter(match=f"{prefix}{QUEUE}*"))

    def queued(self) -> int:
        """Messages waiting in the queue's lists (not held)."""
        return sum(int(self._redis.llen(key)) for key in self._queue_keys())

    def hold(self) -> int:
        """Move the queue's lists aside; the number of messages held."""
        keys = self._queue_keys()
        pipe = self._redis.pipeline(transaction=True)
        for key in keys:
            pipe.rename(key, HOLD_PREFIX.encode() + key)
        pipe.execute()
        self._held = [HOLD_PREFIX.encode() + key for key in keys]
        return sum(int(self._redis.llen(key)) for key in self._held)

    def release(self) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for key in self._held:
            pipe.rename(key, key[len(HOLD_PREFIX) :])
        pipe.execute()
        self._held = []

    def waiting(self) -> int:
        """Clients blocked in BRPOP: Celery consumers waiting for a message."""
        return sum(1 for client in self._redis.client_list() if client.get("cmd") == "brpop")

    def close(self) -> None:
        self._redis.close()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux ``/proc/PID/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the machine has been busy (all CPUs), and stolen by the hypervisor."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used between two samples ``seconds`` apart (Linux ``/proc``)."""

    seconds: float
    workers: float
    receiver: float
    busy: float  # the whole machine, every process (the above included)
    steal: float  # wanted by this VM but run elsewhere by the hypervisor

    @classmethod
    def sample(cls, team: Sequence[BenchWorker], receiver_pid: int) -> CpuUse:
        """Cumulative counters now (a difference of two samples is a measurement)."""
        busy, steal = machine_cpu_seconds()
        workers = sum(w.cpu_seconds() for w in team)
        rx = process_cpu_seconds(receiver_pid)
        return cls(time.monotonic(), workers, rx, busy, steal)

    def since(self, before: CpuUse) -> CpuUse:
        return CpuUse(*(getattr(self, f) - getattr(before, f) for f in _CPU_FIELDS))

    def cores(self) -> str:
        """Average CPUs: workers / receiver / everything else / stolen."""
        rest = self.busy - self.workers - self.receiver
        values = (self.workers, self.receiver, rest, self.steal)
        return " / ".join(f"{value / self.seconds:.2f}" for value in values)


_CPU_FIELDS = ("seconds", "workers", "receiver", "busy", "steal")
