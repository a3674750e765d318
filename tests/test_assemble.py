"""Journal + completion with an injected clock and timers; real files in a temp spool."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.assemble import Assembler
from dicom_node.config import parse_config
from dicom_node.domain import DeliveryState, IllegalTransition, JobState
from dicom_node.journal import DeliverySpec, Journal, ReceivedInstance, Row
from dicom_node.store import Spool

GE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "dcmqi-ct-3slice" / "dicom"
IDLE = 10.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Timers:
    def __init__(self) -> None:
        self.pending: dict[str, tuple[float, Callable[[], None]]] = {}

    def call_at(self, key: str, at: float, callback: Callable[[], None]) -> None:
        self.pending[key] = (at, callback)

    def fire_due(self, now: float) -> int:
        due = [(key, cb) for key, (at, cb) in self.pending.items() if at <= now]
        for key, callback in due:
            del self.pending[key]
            callback()
        return len(due)


class Harness:
    def __init__(self, root: Path, clock: Clock, priority: str = "normal") -> None:
        self.clock = clock
        self.spool = Spool(root)
        self.spool.create()
        self.journal = Journal(self.spool.journal_path)
        self.journal.create()
        self.timers = Timers()
        self.new_jobs: list[int] = []
        config = parse_config(
            {
                "node": {"ae_title": "N"},
                "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 104}},
                "routes": [
                    {
                        "name": "ct",
                        "when": {"Modality": "CT"},
                        "pipeline": "ct-chest",
                        "send_to": ["pacs"],
                        "priority": priority,
                    }
                ],
            }
        )
        self.assembler = Assembler(
            self.journal,
            self.spool,
            config.routes,
            IDLE,
            clock,
            self.timers,
            on_jobs=self.new_jobs.extend,
        )

    def claimed_job(self) -> Row:
        """Receive the GE study, let it complete, and claim its job for analysis."""
        for path in ge_files():
            self.receive(path)
        self.clock.now += IDLE
        self.timers.fire_due(self.clock.now)
        job = self.journal.claim_job(self.clock.now)
        assert job is not None
        return job

    def receive(self, path: Path, sop_uid: str | None = None) -> None:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        relpath = self.spool.new_instance_relpath()
        self.spool.write_atomic(relpath, path.read_bytes())
        recorded = self.journal.record_instance(
            ReceivedInstance(
                sop_uid=sop_uid or ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID,
                modality=ds.Modality,
                relpath=relpath,
                transfer_syntax="1.2.840.10008.1.2",
                size=path.stat().st_size,
                calling_aet="SCANNER",
                received_at=self.clock(),
            )
        )
        self.assembler.instance_recorded(recorded)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "var", Clock())


def ge_files() -> list[Path]:
    return sorted(GE.glob("*.dcm"))


def test_study_completes_only_after_idle_time(harness: Harness) -> None:
    for path in ge_files():
        harness.receive(path)
        harness.clock.now += 3  # arrivals 3 s apart keep the study open
    assert harness.timers.fire_due(harness.clock.now) == 0
    harness.clock.now += 3  # 6 s after the last instance: timer fires, study not idle yet
    (study,) = harness.journal.open_studies()
    first_due = harness.timers.pending[f"study-{study.id}"][0]
    harness.clock.now = first_due
    harness.timers.fire_due(harness.clock.now)
    assert harness.new_jobs == []
    assert harness.journal.study(study.id).state == "open"
    # it rescheduled itself for last_received_at + idle
    assert harness.timers.pending[f"study-{study.id}"][0] == study.last_received_at + IDLE
    harness.clock.now = study.last_received_at + IDLE
    harness.timers.fire_due(harness.clock.now)
    assert harness.journal.study(study.id).state == "complete"
    (job_id,) = harness.new_jobs
    job = harness.journal.job(job_id)
    assert job.state == JobState.QUEUED
    assert job.instance_count == 3
    uids = {job.seg_series_uid, job.seg_sop_uid, job.sr_series_uid, job.sr_sop_uid}
    assert len(uids) == 4 and all(uid.startswith("2.25.") for uid in uids)


def test_duplicate_instance_is_stored_once(harness: Harness) -> None:
    path = ge_files()[0]
    harness.receive(path)
    harness.receive(path)
    assert harness.journal.state_counts()["instances"]["total"] == 1


def test_late_instance_reopens_and_supersedes(harness: Harness) -> None:
    files = ge_files()
    for path in files:
        harness.receive(path)
    harness.clock.now += IDLE
    harness.timers.fire_due(harness.clock.now)
    (first_job,) = harness.new_jobs
    # the first job's results exist and are being sent
    claimed = harness.journal.claim_job(harness.clock.now)
    assert claimed is not None and claimed.id == first_job
    harness.journal.job_analysed(
        first_job, [DeliverySpec("pacs", "P", "127.0.0.1", 104)], harness.clock.now
    )
    # a late instance (new SOP Instance UID in the same series) re-opens the study
    harness.clock.now += 100
    harness.receive(files[0], sop_uid="1.2.3.4.5.6.7.8.9")
    (study,) = harness.journal.open_studies()
    assert study.generation == 2
    harness.clock.now += IDLE
    harness.timers.fire_due(harness.clock.now)
    assert len(harness.new_jobs) == 2
    second = harness.journal.job(harness.new_jobs[1])
    assert second.predecessor_id == first_job
    assert second.instance_count == 4
    assert second.sr_sop_uid != harness.journal.job(first_job).sr_sop_uid


def test_completion_survives_restart(tmp_path: Path) -> None:
    clock = Clock()
    first = Harness(tmp_path / "var", clock)
    for path in ge_files():
        first.receive(path)
    first.journal.close()
    first.spool.release()  # the process ends: its hold on the storage goes with it
    # "restart": a fresh journal and assembler over the same storage, later in time
    clock.now += 3600
    second = Harness(tmp_path / "var", clock)
    assert second.assembler.resume() == 1
    second.timers.fire_due(clock.now)
    assert len(second.new_jobs) == 1


def test_restart_requeues_job_caught_mid_analysis(harness: Harness) -> None:
    job = harness.claimed_job()
    assert job.state == JobState.ANALYSING
    assert harness.journal.resume(harness.clock.now) == 1
    assert harness.journal.job(job.id).state == JobState.QUEUED


def test_delivery_outcomes_settle_the_job(harness: Harness) -> None:
    job = harness.claimed_job()
    harness.journal.job_analysed(
        job.id,
        [DeliverySpec("a", "A", "h", 1), DeliverySpec("b", "B", "h", 2)],
        harness.clock.now,
    )
    a, b = harness.journal.job_deliveries(job.id)
    harness.journal.delivery_attempted(
        a.id, DeliveryState.PENDING, harness.clock.now, "refused", retry_at=harness.clock.now + 5
    )
    assert (
        harness.journal.due_deliveries(harness.clock.now) == [b]
        or len(harness.journal.due_deliveries(harness.clock.now)) == 1
    )
    harness.journal.delivery_attempted(b.id, DeliveryState.SENT, harness.clock.now)
    assert harness.journal.job(job.id).state == JobState.SENDING
    harness.journal.delivery_attempted(a.id, DeliveryState.DEAD, harness.clock.now, "gave up")
    assert harness.journal.job(job.id).state == JobState.DEAD_LETTER
    with pytest.raises(IllegalTransition):
        harness.journal.delivery_attempted(b.id, DeliveryState.DEAD, harness.clock.now)


def test_operator_retry_of_failed_and_dead_letter_jobs(harness: Harness) -> None:
    job = harness.claimed_job()
    assert job.started_at == harness.clock.now
    harness.journal.job_failed(job.id, "AnalysisError: no lungs", harness.clock.now)
    assert harness.journal.retry_job(job.id, harness.clock.now) == "queued for analysis again"
    job = harness.journal.claim_job(harness.clock.now)
    assert job is not None
    with pytest.raises(IllegalTransition):  # analysing: nothing to retry
        harness.journal.retry_job(job.id, harness.clock.now)
    harness.journal.job_analysed(
        job.id, [DeliverySpec("pacs", "P", "h", 1)], harness.clock.now + 5, timings=(3.0, 1.0)
    )
    (delivery,) = harness.journal.job_deliveries(job.id)
    harness.journal.delivery_attempted(delivery.id, DeliveryState.DEAD, harness.clock.now, "down")
    row = harness.journal.job(job.id)
    assert row.state == JobState.DEAD_LETTER and row.analysis_seconds == 3.0
    assert row.analysed_at == harness.clock.now + 5 and row.finished_at == harness.clock.now
    assert [j.id for j in harness.journal.jobs_in_state(JobState.DEAD_LETTER)] == [job.id]
    assert harness.journal.retry_job(job.id, harness.clock.now) == "1 delivery(ies) pending again"
    (delivery,) = harness.journal.job_deliveries(job.id)
    assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0
    assert harness.journal.job(job.id).state == JobState.SENDING
    with pytest.raises(IllegalTransition):
        harness.journal.retry_job(job.id, harness.clock.now)  # sending: nothing to retry
    with pytest.raises(LookupError):
        harness.journal.retry_job(9999, harness.clock.now)


def test_a_journal_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.journal import JournalSchemaError

    Harness(tmp_path / "var", Clock()).journal.close()
    with sqlite3.connect(tmp_path / "var" / "journal.sqlite") as db:
        db.execute("UPDATE meta SET value = '0' WHERE key = 'schema'")
    with pytest.raises(JournalSchemaError, match="has schema version 0; this dicom_node uses"):
        Journal(tmp_path / "var" / "journal.sqlite").create()


def test_an_urgent_route_gives_urgent_jobs(tmp_path: Path) -> None:
    urgent = Harness(tmp_path / "urgent", Clock(), priority="urgent")
    assert urgent.claimed_job().priority == "urgent"
    normal = Harness(tmp_path / "normal", Clock())
    assert normal.claimed_job().priority == "normal"
