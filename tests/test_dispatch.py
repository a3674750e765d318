"""The receivers' side of scale-out: migrations that match the schema, broker priorities,
and the dispatcher's behaviour when the broker is away or a message was lost."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from kombu import Connection, Queue
from services import PostgresServer, RedisServer

from dicom_node.broker import PRIORITY, QUEUE, Publisher, celery_app
from dicom_node.config import ClusterSection
from dicom_node.dispatch import Dispatcher
from dicom_node.domain import JobState
from dicom_node.journal import JobSpec, Journal, ReceivedInstance
from dicom_node.schema import metadata
from dicom_node.web.metrics import Metrics


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_migrations_build_exactly_the_tables_of_the_schema(
    dialect: str, tmp_path: Path, postgres: PostgresServer
) -> None:
    location = tmp_path / "journal.sqlite" if dialect == "sqlite" else postgres.new_database()
    journal = Journal(location)
    journal.create()
    try:
        with journal._engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
        assert differences == []
    finally:
        journal.close()


def queued_jobs(journal: Journal, priorities: list[str]) -> list[int]:
    """One study with one series and a job per priority, all queued."""
    now = time.time()
    recorded = journal.record_instance(
        ReceivedInstance(
            "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.9", "CT",
            "instances/x/00/a.dcm", "1.2.840.10008.1.2.1", 1, "SCU", now,
        )
    )  # fmt: skip
    series_id = journal.study_snapshot(recorded.study_id).series[0].id
    specs = [
        JobSpec(series_id, f"route-{n}", "ct-chest", ("pacs",), 1, ("1", "2", "3", f"4.{n}"), p)
        for n, p in enumerate(priorities)
    ]
    ids = journal.complete_study(recorded.study_id, now, now, specs)
    assert ids is not None
    return ids


def taken_in_order(broker_url: str, count: int, wait: float = 20.0) -> list[int]:
    """Job ids in the order a worker (prefetch 1) receives them (at most ``count``)."""
    received: list[int] = []
    with Connection(broker_url) as conn:
        queue = Queue(QUEUE, routing_key=QUEUE)

        def on_message(body: Any, message: Any) -> None:
            received.append(int(message.payload[0][0]))
            message.ack()

        with conn.Consumer(queue, callbacks=[on_message], accept=["json"]) as consumer:
            consumer.qos(prefetch_count=1)
            deadline = time.monotonic() + wait
            while len(received) < count and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    continue
    return received


def test_an_urgent_job_is_taken_before_normal_jobs_waiting_in_the_broker(
    redis_server: RedisServer,
) -> None:
    publisher = Publisher(celery_app(redis_server.url, lease_seconds=10))
    try:
        for job_id, priority in [(1, "normal"), (2, "normal"), (3, "urgent"), (4, "normal")]:
            publisher.publish(job_id, priority)
    finally:
        publisher.close()
    assert PRIORITY["urgent"] < PRIORITY["normal"]
    assert taken_in_order(redis_server.url, 4) == [3, 1, 2, 4]


class _Assembler:
    def __init__(self) -> None:
        self.checked: list[int] = []

    def check(self, study_id: int) -> None:
        self.checked.append(study_id)


def make_dispatcher(journal: Journal, broker_url: str, **settings: Any) -> Dispatcher:
    cluster = ClusterSection(journal_url="postgresql://x@h/d", broker_url=broker_url, **settings)
    publisher = Publisher(celery_app(broker_url, cluster.lease_seconds))
    return Dispatcher(
        journal,
        cluster,
        _Assembler(),
        1.0,
        time.time,
        Metrics(),
        publisher,  # type: ignore[arg-type]
    )


def test_jobs_wait_in_the_journal_while_the_broker_is_away_then_go_once_it_is_back(
    postgres: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(postgres.new_database())
    journal.create()
    (job_id,) = queued_jobs(journal, ["normal"])
    redis = RedisServer(tmp_path / "redis")  # its port, not yet listening
    dispatcher = make_dispatcher(journal, redis.url)
    try:
        with caplog.at_level(logging.ERROR, logger="dicom_node.dispatch"):
            dispatcher.run_once()
            dispatcher.run_once()
        assert journal.job(job_id).dispatched_at is None  # not handed over: tried again later
        assert sum("broker unreachable" in r.getMessage() for r in caplog.records) == 1
        with redis:
            dispatcher.run_once()
            assert journal.job(job_id).dispatched_at is not None
            dispatcher.run_once()  # already handed over: not again
            assert taken_in_order(redis.url, 2, wait=3) == [job_id]
    finally:
        dispatcher.stop()
        journal.close()


def test_a_job_still_queued_long_after_its_message_is_handed_over_again(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    journal = Journal(postgres.new_database())
    journal.create()
    (job_id,) = queued_jobs(journal, ["normal"])
    dispatcher = make_dispatcher(journal, redis_server.url, redispatch_seconds=10)
    try:
        dispatcher.run_once()
        first = journal.job(job_id).dispatched_at
        assert taken_in_order(redis_server.url, 1) == [job_id]  # the message is lost here
        dispatcher.run_once()
        assert journal.job(job_id).dispatched_at == first  # not yet stale
        with journal._write() as conn:  # eleven seconds later
            from dicom_node.schema import jobs

            conn.execute(jobs.update().values(dispatched_at=first - 11))
        dispatcher.run_once()
        assert journal.job(job_id).dispatched_at > first
        assert taken_in_order(redis_server.url, 1) == [job_id]
    finally:
        dispatcher.stop()
        journal.close()


def test_a_job_whose_worker_lease_ran_out_is_queued_and_handed_over_again(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    journal = Journal(postgres.new_database())
    journal.create()
    (job_id,) = queued_jobs(journal, ["urgent"])
    dispatcher = make_dispatcher(journal, redis_server.url)
    try:
        dispatcher.run_once()
        assert taken_in_order(redis_server.url, 1) == [job_id]
        now = time.time()
        assert journal.claim_job_by_id(job_id, "worker-a", now, now + 0.2) is not None
        dispatcher.run_once()  # lease still running: nothing happens
        assert journal.job(job_id).state == JobState.ANALYSING
        time.sleep(0.3)
        dispatcher.run_once()
        job = journal.job(job_id)
        assert job.state == JobState.QUEUED and job.lease_owner is None
        assert taken_in_order(redis_server.url, 1) == [job_id]
    finally:
        dispatcher.stop()
        journal.close()


def test_a_study_left_open_by_a_receiver_that_went_away_is_completed_by_another(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    journal = Journal(postgres.new_database())
    journal.create()
    now = time.time()
    stale, fresh = (
        journal.record_instance(
            ReceivedInstance(
                f"1.2.{n}.1",
                "1.2.840.10008.5.1.4.1.1.2",
                f"1.2.{n}",
                f"1.2.{n}.9",
                "CT",
                f"instances/gone/00/{n}.dcm",
                "1.2.840.10008.1.2.1",
                1,
                "SCU",
                received_at,
            )
        )  # fmt: skip
        for n, received_at in ((1, now - 30), (2, now))
    )
    dispatcher = make_dispatcher(journal, redis_server.url)
    try:
        dispatcher.run_once()
        assembler = dispatcher._assembler
        assert isinstance(assembler, _Assembler)
        assert assembler.checked == [stale.study_id]  # the fresh one is its receiver's
        dispatcher.run_once()  # looked for again only after ADOPT_INTERVAL_SECONDS
        assert assembler.checked == [stale.study_id]
        assert fresh.study_id != stale.study_id
    finally:
        dispatcher.stop()
        journal.close()
