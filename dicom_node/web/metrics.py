"""Prometheus metrics, in a registry owned by the node (nothing global)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            "dicom_node_instances_received", "New instances stored", registry=r
        )
        self.instances_duplicate = Counter(
            "dicom_node_instances_duplicate",
            "Instances received again and acknowledged",
            registry=r,
        )
        self.instances_rejected = Counter(
            "dicom_node_instances_rejected", "C-STORE requests refused", ["reason"], registry=r
        )
        self.bytes_received = Counter(
            "dicom_node_received_bytes", "Bytes of stored instances", registry=r
        )
        self.analysis_seconds = Histogram(
            "dicom_node_analysis_seconds",
            "Time to load, analyse and encode one series",
            ["pipeline"],
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.jobs_finished = Counter(
            "dicom_node_jobs_analysed", "Analysis outcomes", ["pipeline", "outcome"], registry=r
        )
        self.sends = Counter(
            "dicom_node_send_attempts",
            "C-STORE send attempts",
            ["destination", "outcome"],
            registry=r,
        )

    def watch_journal(self, counts: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Export the journal's counts by state as gauges, read at scrape time."""
        self.registry.register(_JournalCollector(counts))


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
        yield GaugeMetricFamily(
            "dicom_node_instances_stored",
            "Instances in the journal",
            value=counts.get("instances", {}).get("total", 0),
        )
