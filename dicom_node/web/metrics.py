"""Prometheus metrics, in a registry owned by the node (nothing global).

Counters are updated where things happen; journal counts, queue depths,
active associations and GPU memory are read at scrape time.
"""

from __future__ import annotations

import sys
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# (metric name, its labels as sorted (name, value) pairs)
CounterKey = tuple[str, tuple[tuple[str, str], ...]]

STAGES = ("receive", "wait", "analyse", "encode", "send")
STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
STORE_SECONDS = "dicom_node_store_seconds"
# 1-2 ms is a CT slice on a quiet local disk (docs/performance.md); seconds mean trouble.
STORE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_STORE_BOUNDS = (*STORE_BUCKETS, float("inf"))  # one count each (the last: above every bucket)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # declared in the order a scrape lists them
        self._declare_receiving()
        self.stage_seconds = Histogram(
            "dicom_node_stage_seconds",
            "Time spent per stage: receive (first to last instance), wait (idle window),"
            " analyse, encode, send (results written to all destinations settled)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self._declare_analysis()
        self._declare_sending()

    def _declare_receiving(self) -> None:
        """Associations and C-STORE requests: stored, duplicate, refused."""
        r = self.registry
        self.instances_received = Counter(
            "dicom_node_instances_received",
            "New instances stored, by calling AE title",
            ["calling_aet"],
            registry=r,
        )
        self.bytes_received = Counter(
            "dicom_node_received_bytes",
            "Bytes of stored instances, by calling AE title",
            ["calling_aet"],
            registry=r,
        )
        self.instances_duplicate = Counter(
            "dicom_node_instances_duplicate",
            "Instances received again and acknowledged without storing",
            ["calling_aet"],
            registry=r,
        )
        self.instances_rejected = Counter(
            "dicom_node_instances_rejected", "C-STORE requests refused", ["reason"], registry=r
        )
        self.associations = Counter(
            "dicom_node_associations",
            "Associations requested of the node, by outcome",
            ["outcome"],
            registry=r,
        )
        self.store_seconds = _StoreTimes()
        r.register(self.store_seconds)

    def _declare_analysis(self) -> None:
        """Analysis outcomes, CPU fallbacks and the jobs of scale-out workers."""
        r = self.registry
        self.jobs_finished = Counter(
            "dicom_node_jobs_analysed", "Analysis outcomes", ["pipeline", "outcome"], registry=r
        )
        self.cpu_fallbacks = Counter(
            "dicom_node_analysis_cpu_fallbacks",
            "Jobs meant for the GPU that ran on the CPU, by reason: memory (too little free"
            " to admit the job) or out_of_memory (the GPU ran out during the job)",
            ["pipeline", "reason"],
            registry=r,
        )
        self.jobs_dispatched = Counter(
            "dicom_node_jobs_dispatched",
            "Jobs handed to the broker for `dicom-node worker` processes (scale-out)",
            registry=r,
        )
        self.jobs_requeued = Counter(
            "dicom_node_jobs_requeued",
            "Jobs queued again because their worker's lease ran out (scale-out)",
            registry=r,
        )

    def _declare_sending(self) -> None:
        """Attempts to send results."""
        self.sends = Counter(
            "dicom_node_send_attempts",
            "C-STORE send attempts of results, by destination and outcome",
            ["destination", "outcome"],
            registry=self.registry,
        )

    def counter_totals(self) -> dict[CounterKey, float]:
        """Every counter's value by (metric name, labels), and the store times' counts:
        what another receiving process reports to the main one (:mod:`dicom_node.receivers`)."""
        totals: dict[CounterKey, float] = {}
        for family in self.registry.collect():
            if family.type != "counter":
                continue
            for sample in family.samples:
                if sample.name == family.name + "_total":
                    totals[(family.name, tuple(sorted(sample.labels.items())))] = sample.value
        totals.update(self.store_seconds.totals())
        return totals

    def add_counts(self, deltas: Mapping[CounterKey, float]) -> None:
        """Add what another process counted; unknown names and non-increases are skipped."""
        counters = {
            family.name: metric
            for metric in vars(self).values()
            if isinstance(metric, Counter)
            for family in metric.collect()
        }
        for (name, labels), delta in deltas.items():
            if delta <= 0:
                continue
            if name == STORE_SECONDS:
                self.store_seconds.add(labels, delta)
                continue
            counter = counters.get(name)
            if counter is not None:
                (counter.labels(**dict(labels)) if labels else counter).inc(delta)

    def watch_journal(self, counts: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Export the journal's counts by state (and the queue depths) at scrape time."""
        self.registry.register(_JournalCollector(counts))

    def watch_associations(self, active: Callable[[], int]) -> None:
        self.registry.register(
            _GaugeCollector("dicom_node_associations_active", "Associations open right now", active)
        )

    def watch_receiving_processes(self, ready: Callable[[], int]) -> None:
        """Processes that receive now, the node's own included (node.receive_processes)."""
        self.registry.register(
            _GaugeCollector(
                "dicom_node_receiving_processes",
                "Processes receiving now, the node's own included (node.receive_processes"
                " when all are up)",
                ready,
            )
        )

    def watch_gpu(self) -> None:
        """GPU memory held by torch, where torch is loaded and CUDA is in use."""
        self.registry.register(
            _GaugeCollector(
                "dicom_node_gpu_memory_bytes", "GPU memory allocated by torch", _gpu_memory
            )
        )


def _gpu_memory() -> int:
    torch = sys.modules.get("torch")  # never import torch for a scrape
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))


class _StoreTimes(Collector):
    """``dicom_node_store_seconds``: how long storing a received instance took, from its
    whole dataset received to its success status (the file written and fsynced, renamed,
    its folder fsynced, the journal row committed).

    A histogram kept as plain counts, not prometheus_client's, so that the counts of the
    other receiving processes can be added to the main process's like their counters
    (:meth:`Metrics.counter_totals`, :meth:`Metrics.add_counts`): one total per bucket
    (not cumulative, the last one above every bound), and the sum.
    """

    _SUM = ("part", "sum")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0.0] * len(_STORE_BOUNDS)
        self._sum = 0.0
        self._keys: dict[tuple[tuple[str, str], ...], int] = {
            (("part", "bucket"), ("le", _bound(bound))): index
            for index, bound in enumerate(_STORE_BOUNDS)
        }

    def observe(self, seconds: float) -> None:
        index = bisect_left(STORE_BUCKETS, seconds)  # the first bound >= seconds
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def totals(self) -> dict[CounterKey, float]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        found: dict[CounterKey, float] = {(STORE_SECONDS, (self._SUM,)): total}
        for labels, index in self._keys.items():
            found[(STORE_SECONDS, labels)] = counts[index]
        return found

    def add(self, labels: tuple[tuple[str, str], ...], delta: float) -> None:
        index = self._keys.get(labels)
        with self._lock:
            if index is not None:
                self._counts[index] += delta
            elif labels == (self._SUM,):
                self._sum += delta

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0.0, []
        for bound, count in zip(_STORE_BOUNDS, counts, strict=True):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        yield HistogramMetricFamily(
            STORE_SECONDS,
            "Time to store a received instance durably: from its whole dataset received to"
            " its success status (write, fsyncs, rename, journal row)",
            buckets=buckets,
            sum_value=total,
        )


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _GaugeCollector(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._read())


class _JournalCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        for kind in ("studies", "jobs", "deliveries"):
            family = GaugeMetricFamily(
                f"dicom_node_{kind}",
                f"{kind.capitalize()} in the journal by state",
                labels=["state"],
            )
            for state, count in sorted(counts.get(kind, {}).items()):
                family.add_metric([state], count)
            yield family
        queues = GaugeMetricFamily(
            "dicom_node_queue_depth",
            "Work waiting: queued analyses, pending deliveries",
            labels=["queue"],
        )
        queues.add_metric(["analysis"], counts.get("jobs", {}).get("queued", 0))
        queues.add_metric(["delivery"], counts.get("deliveries", {}).get("pending", 0))
        yield queues
        yield GaugeMetricFamily(
            "dicom_node_instances_stored",
            "Instances in the journal",
            value=counts.get("instances", {}).get("total", 0),
        )
