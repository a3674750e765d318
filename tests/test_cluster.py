"""Scale-out end to end: two receivers and two workers on PostgreSQL, Redis and one storage.

Everything is a real process: PostgreSQL and redis-server from Debian, two
``dicom-node serve`` receivers, two ``dicom-node worker`` processes and Orthanc
as the PACS. Ten studies (copies of the real Philips chest CT with new UIDs) go
to the two receivers; one worker is killed (SIGKILL) in the middle of a job. Every
study must still come back to Orthanc with exactly one SEG and one SR.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from nodes import NodeProcess, chest_route, node_settings, pacs_destination, running_node, send
from peers import (
    GE_3SLICE,
    LOCALHOST,
    PHILIPS_L,
    Orthanc,
    dicom_files,
    free_port,
    storescu,
    wait_until,
)
from pydicom.uid import generate_uid
from services import PostgresServer, RedisServer, S3Server, WorkerProcess, require_services

from dicom_node.domain import JobState
from dicom_node.journal import Journal

pytestmark = [pytest.mark.peers, pytest.mark.slow]

STUDIES = 10
LEASE_SECONDS = 4.0


def copy_as_new_study(sources: list[Path], folder: Path, number: int) -> list[Path]:
    """The series with new Study/Series/SOP/Frame of Reference UIDs: study ``number``."""
    folder.mkdir(parents=True)
    study, series, frame = (generate_uid() for _ in range(3))
    paths = []
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"CLUSTER-{number:02d}"
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def cluster_settings(
    storage: Path,
    name: str,
    journal_url: str,
    broker_url: str,
    pacs: Orthanc,
    object_store: dict[str, str] | None = None,
) -> dict[str, Any]:
    settings = node_settings(
        storage,
        destinations=pacs_destination(pacs),
        routes=[chest_route(["pacs"])],
        cluster={
            "journal_url": journal_url,
            "broker_url": broker_url,
            "node_name": name,
            "lease_seconds": LEASE_SECONDS,
            "poll_seconds": 0.5,
        },
        analysis={"device": "cpu", "warm_up": True},
    )
    if object_store is not None:
        settings["storage"]["object_store"] = object_store
    return settings


def test_two_receivers_two_workers_one_killed_mid_job_every_study_comes_back_once(
    tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer, orthanc: Orthanc
) -> None:
    journal_url = postgres.new_database()
    shared = tmp_path / "shared"
    sources = dicom_files(PHILIPS_L)
    studies = [copy_as_new_study(sources, tmp_path / f"study-{n}", n) for n in range(STUDIES)]
    study_uids = [str(pydicom.dcmread(paths[0]).StudyInstanceUID) for paths in studies]

    receivers = [
        NodeProcess(
            cluster_settings(shared, f"rx{n}", journal_url, redis_server.url, orthanc),
            tmp_path / f"rx{n}",
        )
        for n in (1, 2)
    ]
    worker_config = tmp_path / "worker.yaml"
    worker_config.write_text(yaml.safe_dump(receivers[0].settings))
    metrics_port = free_port()  # worker 2's own /metrics
    workers = [
        WorkerProcess(worker_config, "w1", tmp_path / "worker-1.log"),
        WorkerProcess(
            worker_config, "w2", tmp_path / "worker-2.log", ["--metrics-port", str(metrics_port)]
        ),
    ]
    journal = Journal(journal_url)
    try:
        for receiver in receivers:
            receiver.start()
        for worker in workers:
            worker.start()
        for number, paths in enumerate(studies):  # alternate receivers, one study at a time
            storescu(LOCALHOST, receivers[number % 2].port, "AINODE", paths)

        # Kill the first worker seen analysing a job, in the middle of it.
        def job_of_worker_one() -> Any:
            for job in journal.jobs_in_state(JobState.ANALYSING):
                if job.lease_owner and job.lease_owner.startswith("w1-"):
                    return job
            return None

        killed_job = wait_until(job_of_worker_one, 120, interval=0.05, what="worker 1 busy")
        workers[0].kill()

        def all_done() -> bool:
            jobs = journal.recent_jobs(limit=100)
            failed = [job for job in jobs if job.state in (JobState.FAILED, "dead_letter")]
            assert not failed, [(job.id, job.state, job.error) for job in failed]
            return len(jobs) == STUDIES and all(job.state == JobState.DONE for job in jobs)

        wait_until(all_done, 300, interval=0.5, what="every job done")

        for uid in study_uids:
            assert len(orthanc.find_instances_by_modality(uid, "SEG")) == 1, uid
            assert len(orthanc.find_instances_by_modality(uid, "SR")) == 1, uid
        jobs = {job.id: job for job in journal.recent_jobs(limit=100)}
        assert jobs[killed_job.id].state == JobState.DONE
        assert jobs[killed_job.id].lease_owner.startswith("w2-")  # finished by the other
        for job_id in jobs:
            (delivery,) = journal.job_deliveries(job_id)
            assert delivery.state == "sent" and delivery.attempts == 1  # sent once, by one
        received_by = {row.relpath.split("/")[1] for row in _instances(journal)}
        assert received_by == {"rx1", "rx2"}
        assert "queued again" in receivers[0].log() + receivers[1].log()
        url = f"http://{LOCALHOST}:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            exported = response.read().decode()
        done_by_two = sum(1 for job in jobs.values() if job.lease_owner.startswith("w2-"))
        assert (
            f'dicom_node_jobs_analysed_total{{outcome="ok",pipeline="ct-chest"}} {done_by_two}.0'
            in exported
        )
        # the analysis is the workers': the receivers never loaded torch (about 180 MiB)
        assert workers[1].proc is not None and _loads_torch(workers[1].proc.pid)
        for receiver in receivers:
            assert receiver.proc is not None and not _loads_torch(receiver.proc.pid)
    finally:
        journal.close()
        for worker in workers:
            if worker.proc is not None:
                worker.stop()
        for receiver in receivers:
            if receiver.proc is not None:
                receiver.stop()


def test_with_an_object_store_receivers_and_a_worker_share_no_folder(
    tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer, orthanc: Orthanc
) -> None:
    """Each process has its own folder; instances and results travel through the bucket."""
    journal_url = postgres.new_database()
    sources = dicom_files(PHILIPS_L)
    studies = [copy_as_new_study(sources, tmp_path / f"study-{n}", n) for n in range(2)]
    with S3Server(tmp_path / "s3") as s3:
        receivers = [
            NodeProcess(
                cluster_settings(
                    tmp_path / f"rx{n}-own", f"rx{n}", journal_url, redis_server.url, orthanc,
                    s3.settings(),
                ),
                tmp_path / f"rx{n}",
            )
            for n in (1, 2)
        ]  # fmt: skip
        worker_settings = cluster_settings(
            tmp_path / "worker-own", "w", journal_url, redis_server.url, orthanc, s3.settings()
        )
        worker_config = tmp_path / "worker.yaml"
        worker_config.write_text(yaml.safe_dump(worker_settings))
        worker = WorkerProcess(worker_config, "w", tmp_path / "worker.log")
        journal = Journal(journal_url)
        try:
            for receiver in receivers:
                receiver.start()
            worker.start()
            for number, paths in enumerate(studies):
                storescu(LOCALHOST, receivers[number].port, "AINODE", paths)

            def all_done() -> bool:
                jobs = journal.recent_jobs(limit=10)
                finished_badly = [j for j in jobs if j.state in (JobState.FAILED, "dead_letter")]
                assert not finished_badly, [(j.id, j.state, j.error) for j in finished_badly]
                return len(jobs) == 2 and all(job.state == JobState.DONE for job in jobs)

            wait_until(all_done, 240, interval=0.5, what="both jobs done")
            for paths in studies:
                uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
                assert len(orthanc.find_instances_by_modality(uid, "SEG")) == 1
                assert len(orthanc.find_instances_by_modality(uid, "SR")) == 1
            keys = s3.keys()
            for job in journal.recent_jobs(limit=10):
                assert {f"results/{job.id}/seg.dcm", f"results/{job.id}/sr.dcm"} <= set(keys)
            instance_keys = {key for key in keys if key.startswith("instances/")}
            assert instance_keys == {row.relpath for row in _instances(journal)}
            assert {key.split("/")[1] for key in instance_keys} == {"rx1", "rx2"}
            # the worker fetched both series and kept no copy; it wrote only results
            assert not list((tmp_path / "worker-own" / "instances").rglob("*.dcm"))
            # each receiver holds only what it received itself
            for n in (1, 2):
                own = list((tmp_path / f"rx{n}-own" / "instances").rglob("*.dcm"))
                assert len(own) == len(sources)
                assert all(f"instances/rx{n}/" in path.as_posix() for path in own)
        finally:
            journal.close()
            if worker.proc is not None:
                worker.stop()
            for receiver in receivers:
                if receiver.proc is not None:
                    receiver.stop()


def _instances(journal: Journal) -> list[Any]:
    import sqlalchemy as sa

    from dicom_node.schema import instances

    with journal._read() as conn:
        return list(conn.execute(sa.select(instances.c.relpath)))


def test_a_receiver_refuses_with_a700_while_postgresql_is_away_and_records_again_after(
    tmp_path: Path,
) -> None:
    require_services()
    first, second, third = (pydicom.dcmread(path) for path in dicom_files(GE_3SLICE))
    with PostgresServer(tmp_path / "pg") as server:
        settings = node_settings(
            tmp_path / "var", cluster={"journal_url": server.new_database(), "node_name": "rx"}
        )
        with running_node(settings) as node:
            assert send(node, [first]) == [0x0000]
            server.stop()
            assert send(node, [second]) == [0xA700]  # not acknowledged: the sender retries
            server.start()
            assert send(node, [second, third]) == [0x0000, 0x0000]
            assert node.journal.state_counts()["instances"] == {"total": 3}
            files = sorted((tmp_path / "var" / "instances" / "rx").rglob("*.dcm"))
            recorded = node.journal.all_instance_relpaths()
            assert [f"instances/rx/{p.parent.name}/{p.name}" for p in files] == sorted(recorded)
