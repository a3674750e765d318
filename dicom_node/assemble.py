"""Study completion: a study is complete once idle for ``study_idle_seconds``.

Closing an association does not end a study (PS3.4 B.4): only time does. A
timer is scheduled when a study opens (or re-opens); when it fires, the study
is either idle, and is routed, or the timer is set again for
``last_received_at + idle``. On start every open study gets a timer again, so
completion survives restarts. The clock and the scheduler are injected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.uid import generate_uid

from dicom_node.config import Route
from dicom_node.journal import JobSpec, Journal, Recorded, StudySnapshot
from dicom_node.logs import log_context
from dicom_node.route import PlannedJob, PreviousJob, SeriesInfo, plan_jobs
from dicom_node.store import Spool
from dicom_node.web.metrics import Metrics

log = logging.getLogger(__name__)

# When routing a study fails unexpectedly, try again after this long.
RETRY_AFTER_ERROR_SECONDS = 30.0


class Timers(Protocol):
    """Runs ``callback`` at wall-clock time ``at`` (seconds since the epoch)."""

    def call_at(self, key: str, at: float, callback: Callable[[], None]) -> None: ...


class Assembler:
    def __init__(
        self,
        journal: Journal,
        spool: Spool,
        routes: Sequence[Route],
        idle_seconds: float,
        clock: Callable[[], float],
        timers: Timers,
        on_jobs: Callable[[list[int]], None],
        uid_prefix: str | None = None,
        metrics: Metrics | None = None,
        models_path: Path | None = None,
    ) -> None:
        self._metrics = metrics
        self._models_path = models_path  # where the packages say what they accept
        self._journal = journal
        self._spool = spool
        self._routes = list(routes)
        self._idle = idle_seconds
        self._clock = clock
        self._timers = timers
        self._on_jobs = on_jobs
        self._uid_prefix = uid_prefix
        self._lock = threading.Lock()

    def resume(self) -> int:
        """Schedule completion for every study still open in the journal."""
        open_studies = self._journal.open_studies()
        for study in open_studies:
            self._schedule(study.id, study.last_received_at + self._idle)
        return len(open_studies)

    def instance_recorded(self, recorded: Recorded) -> None:
        """Called by the receiver after each new instance is in the journal."""
        if recorded.reopened:
            log.info("study %d re-opened by a new instance", recorded.study_id)
        if recorded.opened:
            self._schedule(recorded.study_id, self._clock() + self._idle)

    def check(self, study_id: int) -> list[int] | None:
        """Complete and route the study if idle, else check again later.

        Returns the created job ids, or None if the study is not complete yet.
        """
        with log_context(study_id=study_id):
            try:
                return self._check(study_id)
            except Exception:
                log.exception("study %d: routing failed; trying again later", study_id)
                self._schedule(study_id, self._clock() + RETRY_AFTER_ERROR_SECONDS)
                return None

    def _check(self, study_id: int) -> list[int] | None:
        snapshot = self._journal.study_snapshot(study_id)
        study = snapshot.study
        if study.state != "open":
            return None
        now = self._clock()
        due = study.last_received_at + self._idle
        if now < due:
            self._schedule(study_id, due)
            return None
        specs = [
            self._spec(job)
            for job in plan_jobs(
                self._routes, self._series(snapshot), _previous(snapshot), self._models_path
            )
        ]
        seen = sum(row.instance_count for row in snapshot.series)
        job_ids = self._journal.complete_study(study_id, study.last_received_at, now, specs, seen)
        if job_ids is None:  # an instance arrived while we planned
            self._schedule(study_id, self._clock() + self._idle)
            return None
        log.info(
            "study %d complete (%d series, generation %d): %d job(s)",
            study_id,
            len(snapshot.series),
            study.generation,
            len(job_ids),
        )
        if self._metrics is not None:
            stages = self._metrics.stage_seconds
            stages.labels(stage="receive").observe(study.last_received_at - study.first_received_at)
            stages.labels(stage="wait").observe(now - study.last_received_at)
        if job_ids:
            self._on_jobs(job_ids)
        return job_ids

    def _series(self, snapshot: StudySnapshot) -> list[SeriesInfo]:
        infos = []
        for row in snapshot.series:
            relpath = snapshot.first_relpath[row.id]
            header = pydicom.dcmread(self._spool.fetch(relpath), stop_before_pixels=True)
            self._spool.evict([relpath])
            infos.append(SeriesInfo(row.id, header, row.instance_count))
        return infos

    def _spec(self, job: PlannedJob) -> JobSpec:
        # Result UIDs are fixed now, so every (re)send of this job's results is
        # the same object and never a duplicate.
        uids = (
            generate_uid(self._uid_prefix),
            generate_uid(self._uid_prefix),
            generate_uid(self._uid_prefix),
            generate_uid(self._uid_prefix),
        )
        return JobSpec(
            job.series_id,
            job.route,
            job.pipeline,
            job.send_to,
            job.instance_count,
            uids,
            job.priority,
        )

    def _schedule(self, study_id: int, at: float) -> None:
        with self._lock:
            self._timers.call_at(f"study-{study_id}", at, partial(self._fire, study_id))

    def _fire(self, study_id: int) -> None:
        self.check(study_id)


def _previous(snapshot: StudySnapshot) -> list[PreviousJob]:
    return [PreviousJob(job.series_id, job.route, job.instance_count) for job in snapshot.jobs]


class SchedulerTimers:
    """:class:`Timers` on an APScheduler background scheduler (one job per key)."""

    def __init__(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(
            timezone="UTC", job_defaults={"misfire_grace_time": None, "coalesce": True}
        )

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def call_at(self, key: str, at: float, callback: Callable[[], None]) -> None:
        run_date = datetime.fromtimestamp(at, tz=UTC)
        self._scheduler.add_job(
            callback, "date", run_date=run_date, id=key, replace_existing=True, max_instances=4
        )
