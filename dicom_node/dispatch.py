"""A receiver's share of the cluster's housekeeping, every ``cluster.poll_seconds``.

With a shared journal (docs/scale-out.md) each ``serve`` process, on its own
thread, and all of them harmlessly at once:

1. queues again the jobs whose worker's lease ran out (killed worker, lost host);
2. hands queued jobs to the broker: new ones at once (it is woken when a study
   completes here), and any still queued ``redispatch_seconds`` after it was
   last handed over (a message lost with a broker restart);
3. completes studies left open by a receiver that went away (their completion
   timer went with it);
4. wakes the local sender (and the local worker, without a broker): results and
   retries made by other processes are found in the journal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from dicom_node.assemble import Assembler
from dicom_node.broker import Publisher
from dicom_node.config import ClusterSection
from dicom_node.journal import Journal
from dicom_node.web.metrics import Metrics

log = logging.getLogger(__name__)

# A study counts as abandoned by its receiver this long after its own idle window;
# they are looked for this often (a study whose routing fails is retried by its timer).
ADOPT_GRACE_SECONDS = 5.0
ADOPT_INTERVAL_SECONDS = 10.0


class Dispatcher:
    def __init__(
        self,
        journal: Journal,
        settings: ClusterSection,
        assembler: Assembler,
        idle_seconds: float,
        clock: Callable[[], float],
        metrics: Metrics,
        publisher: Publisher | None,
        wake: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._journal = journal
        self._settings = settings
        self._assembler = assembler
        self._idle = idle_seconds
        self._clock = clock
        self._metrics = metrics
        self._publisher = publisher
        self._wake_others = tuple(wake)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker_down = False
        self._adopted_at = float("-inf")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._publisher is not None:
            self._publisher.close()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception as exc:  # the database is away: the next round tries again
                log.error("cluster housekeeping failed: %s", type(exc).__name__)
                log.debug("housekeeping traceback", exc_info=True)
            self._wake.wait(self._settings.poll_seconds)

    def run_once(self) -> None:
        now = self._clock()
        for job_id in self._journal.requeue_expired(now):
            log.warning("job %d: its worker's lease ran out; queued again", job_id)
            self._metrics.jobs_requeued.inc()
        if self._publisher is not None:
            self._dispatch(now)
        if now - self._adopted_at >= ADOPT_INTERVAL_SECONDS:
            self._adopted_at = now
            overdue = self._journal.overdue_open_studies(now, self._idle + ADOPT_GRACE_SECONDS)
            for study in overdue:
                self._assembler.check(study.id)
        for wake in self._wake_others:
            wake()

    def _dispatch(self, now: float) -> None:
        assert self._publisher is not None
        for job in self._journal.jobs_to_dispatch(now, self._settings.redispatch_seconds):
            if not self._journal.mark_dispatched(job.id, job.dispatched_at, now):
                continue  # another receiver handed it over just now
            try:
                self._publisher.publish(job.id, job.priority)
            except Exception as exc:
                self._journal.undo_dispatch(job.id, now)
                if not self._broker_down:
                    log.error("broker unreachable (%s): jobs wait in the journal", exc)
                self._broker_down = True
                return
            if self._broker_down:
                log.warning("broker reachable again: handing over queued jobs")
                self._broker_down = False
            self._metrics.jobs_dispatched.inc()
            log.info("job %d handed to the broker (%s)", job.id, job.priority)
