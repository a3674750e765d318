"""The node of the study benchmark (``bench/study.py``) and its waits and targets.

:class:`StudyNode` is ``dicom-node serve`` as a child process, receive-only or with the
usual ct-chest route whose SEG + SR go to a dcmtk storescp started alongside; the waits
read the node's journal (SQLite in WAL mode, so reading beside the node is safe).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    LOCALHOST,
    PeerError,
    Storescp,
    dicom_files,
    node_settings,
    tree_kib,
    wait_until,
)
from nodes import NodeProcess, chest_route
from rich.table import Table

from dicom_node.domain import JobState
from dicom_node.journal import Journal

NODE_AET = "AINODE"
PACS_AET = "PACS"
RESULT_TIMEOUT_S = 300.0
MAX_ASSOCIATIONS = 32  # the node's default node.max_associations; loads stay at or below it


@dataclass(frozen=True)
class Check:
    """``measured`` must be at most ``limit`` (a ceiling, unlike common.Target's floor)."""

    label: str
    measured: float
    limit: float
    unit: str

    @property
    def passed(self) -> bool:
        return self.measured <= self.limit


def checks_table(checks: Sequence[Check]) -> Table:
    table = Table(title="targets")
    for name in ("target", "measured", "required", "result"):
        table.add_column(name, justify="left" if name == "target" else "right")
    for check in checks:
        verdict = "[green]PASS[/]" if check.passed else "[red]FAIL[/]"
        measured = f"{check.measured:.2f}{check.unit}"
        table.add_row(check.label, measured, f"<= {check.limit:g}{check.unit}", verdict)
    return table


class StudyNode:
    """``dicom-node serve`` as a child process; with ``analyse``, a route to ct-chest whose
    SEG + SR go to a dcmtk storescp started alongside."""

    def __init__(self, workdir: Path, idle: float, analyse: bool, fork: bool = False) -> None:
        self.workdir = workdir
        self.storage = workdir / "var"
        self.idle = idle
        self.pacs: Storescp | None = None
        if analyse:
            extra = ("+xa", "--fork") if fork else ("+xa",)
            self.pacs = Storescp(workdir / "pacs", aet=PACS_AET, extra_args=extra)
        self._node: NodeProcess | None = None
        self._journal: Journal | None = None

    @property
    def port(self) -> int:
        assert self._node is not None, "node not started"
        return self._node.port

    def start(self) -> None:
        """storescp first: the node's config names the port it got."""
        destinations: dict[str, Any] = {}
        routes: list[dict[str, Any]] = []
        if self.pacs is not None:
            self.pacs.start()
            destinations = {
                "pacs": {"ae_title": PACS_AET, "host": LOCALHOST, "port": self.pacs.port}
            }
            routes = [chest_route(["pacs"])]
        settings = node_settings(
            self.storage,
            # every sender here is on loopback, i.e. one source host: its default limit (8)
            # would refuse the 9th storescu of a load, as it should for one real host
            node={
                "ae_title": NODE_AET,
                "max_associations_per_source": MAX_ASSOCIATIONS,
                "receive_processes": "auto",  # the product's default, measured as it ships
            },
            completion={"study_idle_seconds": self.idle},
            destinations=destinations,
            routes=routes,
        )
        self._node = NodeProcess(settings, self.workdir)
        try:
            self._node.start()
        except Exception:
            self.stop()
            raise
        self._journal = Journal(self.storage / "journal.sqlite")

    @property
    def journal(self) -> Journal:
        assert self._journal is not None, "node not started"
        return self._journal

    def stored(self) -> int:
        """Instances in the journal; each must also be a file under ``instances/``."""
        total = self.journal.state_counts()["instances"]["total"]
        files = len(dicom_files(self.storage / "instances"))
        if files != total:
            raise PeerError(f"node journal has {total} instances but {files} files")
        return total

    def rss_kib(self, field_name: str) -> int:
        """A ``/proc/PID/status`` size of the node: the sum over its processes (its
        receiving processes included; for VmHWM an upper bound, as they need not peak at
        once)."""
        assert self._node is not None and self._node.proc is not None
        return tree_kib(self._node.proc.pid, field_name)

    def stop(self) -> None:
        if self._journal is not None:
            self._journal.close()
        node = self._node
        code = node.stop() if node is not None and node.proc is not None else 0
        if self.pacs is not None:
            self.pacs.stop()
        if code != 0:
            assert node is not None
            raise PeerError(f"node exited with {code}:\n{node.log()[-4000:]}")


def wait_results(node: StudyNode, before: set[Path], study_uid: str) -> tuple[float, list[Path]]:
    """Poll the destination's folder (10 ms) for two new files; stop early on a failed job."""
    assert node.pacs is not None
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    next_check = 0.0
    while True:
        new = [p for p in node.pacs.received_files() if p not in before]
        if len(new) >= 2:
            return time.time(), new
        now = time.monotonic()
        if now >= next_check:  # the journal less often: reading it costs CPU of the node
            for job in node.journal.jobs_for_study(study_uid):
                if job.state == JobState.FAILED:
                    raise PeerError(f"ct-chest failed on the latency study: {job.error}")
            next_check = now + 0.5
        if now >= deadline:
            raise PeerError(f"no SEG + SR at the destination after {RESULT_TIMEOUT_S:.0f} s")
        time.sleep(0.01)


def finished_job(journal: Journal, study_uid: str) -> Any:
    def done() -> Any:
        jobs = journal.jobs_for_study(study_uid)
        return jobs[0] if len(jobs) == 1 and jobs[0].state == JobState.DONE else None

    try:
        return wait_until(done, 30.0, 0.05, "the job to be done")
    except TimeoutError as exc:
        states = [job.state for job in journal.jobs_for_study(study_uid)]
        raise PeerError(f"latency study: jobs in states {states}, expected one done") from exc


def wait_jobs_done(node: StudyNode, count: int) -> None:
    """Every study's job done and its SEG + SR at storescp; a failed job is an error."""
    assert node.pacs is not None
    pacs = node.pacs

    def settled() -> bool:
        jobs = node.journal.state_counts()["jobs"]
        if jobs.get(JobState.FAILED) or jobs.get(JobState.DEAD_LETTER):
            raise PeerError(f"jobs did not all succeed: {jobs}")
        return jobs.get(JobState.DONE, 0) >= count and len(pacs.received_files()) >= 2 * count

    try:
        wait_until(settled, RESULT_TIMEOUT_S + 60.0 * count, 0.5, f"{count} jobs done")
    except TimeoutError as exc:
        jobs = node.journal.state_counts()["jobs"]
        raise PeerError(f"{exc}: jobs {jobs}, {len(pacs.received_files())} files") from exc
    if (done := node.journal.state_counts()["jobs"].get(JobState.DONE, 0)) != count:
        raise PeerError(f"{done} jobs done, expected one per study ({count})")
