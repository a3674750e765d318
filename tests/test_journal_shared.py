"""The journal shared between processes: migrations, concurrent intake, leases, spool names.

A real PostgreSQL (Debian's; conftest's ``postgres`` starts it once for the module)
with a fresh database per test. Concurrency is real: several :class:`Journal` objects
(each with its own write lock and connections) in threads, and separate Python
processes, released together.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from peers import GE_3SLICE, REPO_ROOT
from pydicom.uid import generate_uid
from services import PostgresServer

from dicom_node.config import ConfigError, parse_config
from dicom_node.database import head_revision
from dicom_node.domain import DeliveryState, JobState, StudyState
from dicom_node.journal import (
    DeliverySpec,
    JobSpec,
    Journal,
    JournalSchemaError,
    ReceivedInstance,
    Recorded,
)
from dicom_node.leases import LeaseKeeper, LeaseLost
from dicom_node.reindex import reindex_orphans
from dicom_node.schema import metadata
from dicom_node.store import NameInUse, Spool

pytestmark = pytest.mark.peers

NOW = 1_000_000.0
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.new_database()


@pytest.fixture
def journals(url: str) -> Iterator[Callable[[], Journal]]:
    """Opens Journals on the test's database (the first one creates it); closes them all."""
    opened: list[Journal] = []

    def open_journal() -> Journal:
        journal = Journal(url)
        if not opened:
            journal.create()
        opened.append(journal)
        return journal

    yield open_journal
    for journal in opened:
        journal.close()


def received(study_uid: str, series_uid: str, sop_uid: str, at: float) -> ReceivedInstance:
    return ReceivedInstance(
        sop_uid=sop_uid,
        sop_class_uid=CT_IMAGE,
        study_uid=study_uid,
        series_uid=series_uid,
        modality="CT",
        relpath=f"instances/n/{sop_uid[-2:]}/{sop_uid}.dcm",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=1000,
        calling_aet="SCANNER",
        received_at=at,
    )


def new_study(journal: Journal, at: float = NOW - 60) -> tuple[Recorded, int]:
    """Record one instance of a new study; (its outcome, its series id)."""
    recorded = journal.record_instance(received(generate_uid(), generate_uid(), generate_uid(), at))
    (series_row,) = journal.study_snapshot(recorded.study_id).series
    return recorded, series_row.id


def queue_jobs(journal: Journal, count: int, now: float = NOW) -> list[int]:
    """Complete a new one-instance study with ``count`` jobs (one route each)."""
    recorded, series_id = new_study(journal)
    specs = [
        JobSpec(
            series_id,
            f"route-{index}",
            "ct-chest",
            ("pacs",),
            1,
            (generate_uid(), generate_uid(), generate_uid(), generate_uid()),
        )
        for index in range(count)
    ]
    ids = journal.complete_study(recorded.study_id, NOW - 60, now, specs)
    assert ids is not None and len(ids) == count
    return ids


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released at the same moment; their results, in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a call did not return"
    if errors:
        raise errors[0]
    return results


def outcome(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` returning the LeaseLost it raised instead of raising it."""

    def run() -> Any:
        try:
            return call()
        except LeaseLost as exc:
            return exc

    return run


# -- separate processes --------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, pathlib, sys, time
    from dicom_node.journal import Journal, ReceivedInstance
    task = json.loads(pathlib.Path(sys.argv[1]).read_text())
    journal = Journal(task["url"])
    pathlib.Path(task["ready"]).touch()
    go, deadline = pathlib.Path(task["go"]), time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.0005)
    if task["items"] is None:
        journal.create()
        out = None
    else:
        out = [journal.record_instance(ReceivedInstance(**i)).duplicate for i in task["items"]]
    journal.close()
    print(json.dumps(out))
    """
)


class Children:
    """Python processes that open the journal, wait for :meth:`go`, then act together."""

    def __init__(self, folder: Path, url: str, tasks: list[list[ReceivedInstance] | None]) -> None:
        self.go_file = folder / "go"
        self.procs: list[subprocess.Popen[str]] = []
        self.ready: list[Path] = []
        for index, items in enumerate(tasks):
            ready = folder / f"ready-{index}"
            task = {
                "url": url,
                "ready": str(ready),
                "go": str(self.go_file),
                "items": None if items is None else [asdict(item) for item in items],
            }
            task_file = folder / f"task-{index}.json"
            task_file.write_text(json.dumps(task))
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(task_file)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.procs.append(proc)
            self.ready.append(ready)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while not all(path.exists() for path in self.ready):
            for proc in self.procs:
                assert proc.poll() is None, (
                    f"child exited early: {proc.stderr and proc.stderr.read()}"
                )
            assert time.monotonic() < deadline, "children not ready"
            time.sleep(0.01)

    def go(self) -> None:
        self.go_file.touch()

    def results(self) -> list[Any]:
        """Each child's output, once all have exited; fails naming the first that failed."""
        done = [proc.communicate(timeout=60) for proc in self.procs]
        for proc, (_, err) in zip(self.procs, done, strict=True):
            assert proc.returncode == 0, err
        return [json.loads(out) for out, _ in done]

    def kill(self) -> None:
        """Stop any child still running and close every pipe."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


# -- migrations ----------------------------------------------------------------------------


def _tables(engine: sa.Engine) -> dict[str, dict[str, bool]]:
    """Table -> column -> nullable, as the database reports them."""
    inspector = sa.inspect(engine)
    return {
        table: {column["name"]: column["nullable"] for column in inspector.get_columns(table)}
        for table in inspector.get_table_names()
    }


def _indexes(engine: sa.Engine, table: str) -> set[tuple[str | None, tuple[Any, ...], bool]]:
    """The table's plain indexes (PostgreSQL also lists unique constraints as indexes)."""
    return {
        (index["name"], tuple(index["column_names"]), bool(index["unique"]))
        for index in sa.inspect(engine).get_indexes(table)
        if "duplicates_constraint" not in index
    }


def _revision(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT version_num FROM alembic_version")))


def test_fresh_postgres_and_sqlite_journals_have_the_same_tables_at_head(
    url: str, tmp_path: Path
) -> None:
    sqlite_path = tmp_path / "journal.sqlite"
    for location in (url, sqlite_path):
        journal = Journal(location)
        journal.create()
        journal.close()
    pg = sa.create_engine(url)
    lite = sa.create_engine(f"sqlite:///{sqlite_path}")
    try:
        assert _revision(pg) == _revision(lite) == [head_revision()]
        pg_tables, lite_tables = _tables(pg), _tables(lite)
        assert pg_tables == lite_tables
        # the migrations build exactly the tables dicom_node.schema declares
        declared = {t.name: {c.name: c.nullable for c in t.columns} for t in metadata.sorted_tables}
        assert {k: v for k, v in pg_tables.items() if k != "alembic_version"} == declared
        for table in declared:
            assert _indexes(pg, table) == _indexes(lite, table)
    finally:
        pg.dispose()
        lite.dispose()


def test_create_twice_changes_nothing(journals: Callable[[], Journal], url: str) -> None:
    journal = journals()
    recorded, _ = new_study(journal)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            before = sorted(conn.execute(sa.text("SELECT key, value FROM meta")))
        journals().create()
        journal.create()
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.text("SELECT key, value FROM meta"))) == before
        assert _revision(engine) == [head_revision()]
    finally:
        engine.dispose()
    assert journal.study(recorded.study_id).state == StudyState.OPEN
    assert len(journal.all_instance_relpaths()) == 1


def test_processes_creating_a_new_postgres_journal_at_once_all_succeed(
    url: str, tmp_path: Path
) -> None:
    children = Children(tmp_path, url, [None, None, None])
    journal = Journal(url)
    try:
        children.wait_ready()
        children.go()
        journal.create()  # and this process too, at the same moment
        assert children.results() == [None, None, None]
    finally:
        children.kill()
        journal.close()
    engine = sa.create_engine(url)
    try:
        assert _revision(engine) == [head_revision()]
        with engine.connect() as conn:
            assert list(conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema'"))) == [
                ("3",)
            ]
    finally:
        engine.dispose()


def test_processes_creating_a_new_sqlite_journal_at_once_all_succeed(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sqlite")
    children = Children(tmp_path, path, [None, None, None])
    try:
        children.wait_ready()
        children.go()
        outputs = children.results()
    finally:
        children.kill()
    assert outputs == [None, None, None]


def test_a_legacy_sqlite_journal_is_upgraded_stamped_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    journal.create()
    job_ids = queue_jobs(journal, 2)
    claimed = journal.claim_job(NOW)
    assert claimed is not None
    before = {job.id: job._asdict() for job in journal.recent_jobs()}
    journal.close()
    # What a journal of schema version 2 (before Alembic) holds: no alembic_version, no
    # jobs.priority, and none of the columns revision 0002 adds.
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE alembic_version")
        for column in ("priority", "dispatched_at", "lease_owner", "lease_until"):
            db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    db.close()

    journal = Journal(path)
    journal.create()
    after = {job.id: job._asdict() for job in journal.recent_jobs()}
    journal.close()
    assert sorted(after) == sorted(before) == sorted(job_ids)
    assert after == before  # the new columns read as their defaults (normal, no lease)
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        assert _revision(engine) == [head_revision()]
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT value FROM meta WHERE key = 'schema'")) == "3"
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_journal_from_a_newer_version_is_refused_clearly(
    kind: str, url: str, tmp_path: Path
) -> None:
    location: Path | str = (
        url.replace("dicom_node@", "dicom_node:s3cret@") if kind == "postgresql" else tmp_path / "j"
    )
    journal = Journal(location)
    journal.create()
    journal.close()
    engine_url = url if kind == "postgresql" else f"sqlite:///{location}"
    engine = sa.create_engine(engine_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
        journal = Journal(location)
        with pytest.raises(JournalSchemaError) as raised:
            journal.create()
        journal.close()
        message = str(raised.value)
        assert "cannot be upgraded by this dicom_node" in message
        assert f"newest known revision {head_revision()}" in message
        assert "ffff" in message
        assert "s3cret" not in message
        assert _revision(engine) == ["ffff"]  # left as it was
    finally:
        engine.dispose()


# -- concurrent intake ---------------------------------------------------------------------


def test_threads_and_processes_recording_one_new_study_at_once(
    journals: Callable[[], Journal], url: str, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    shared = [generate_uid() for _ in range(3)]  # every participant stores these too
    per_participant = 12
    threads, processes = 4, 2

    def batch(index: int) -> list[ReceivedInstance]:
        own = [generate_uid() for _ in range(per_participant)]
        uids = [shared[0], *own[:6], shared[1], *own[6:], shared[2]]
        return [received(study_uid, series_uid, uid, NOW + index) for uid in uids]

    batches = [batch(index) for index in range(threads + processes)]
    thread_journals = [journals() for _ in range(threads)]
    children = Children(tmp_path, url, list(batches[threads:]))
    try:
        children.wait_ready()

        def record_all(journal: Journal, items: list[ReceivedInstance]) -> list[Recorded]:
            return [journal.record_instance(item) for item in items]

        results = together(
            children.go,
            *[partial(record_all, j, b) for j, b in zip(thread_journals, batches, strict=False)],
        )[1:]
        child_duplicates: list[list[bool]] = children.results()
    finally:
        children.kill()

    study_ids = {r.study_id for rows in results for r in rows}
    duplicates = [[r.duplicate for r in rows] for rows in results] + child_duplicates
    outcomes = [
        (item.sop_uid, dup)
        for items, dups in zip(batches, duplicates, strict=True)
        for item, dup in zip(items, dups, strict=True)
    ]
    distinct = {uid for uid, _ in outcomes}
    assert len(distinct) == (threads + processes) * per_participant + len(shared)
    # each UID is new to exactly one participant, a duplicate to every other
    for uid in distinct:
        news = [not dup for other, dup in outcomes if other == uid]
        assert sum(news) == 1
        assert len(news) == (threads + processes if uid in shared else 1)

    journal = thread_journals[0]
    (study_id,) = study_ids
    snapshot = journal.study_snapshot(study_id)
    assert snapshot.study.study_uid == study_uid and snapshot.study.generation == 1
    assert snapshot.study.last_received_at == NOW + threads + processes - 1
    (series_row,) = snapshot.series
    assert series_row.instance_count == len(distinct)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM studies")) == 1
            assert conn.scalar(sa.text("SELECT count(*) FROM series")) == 1
            sops = list(conn.scalars(sa.text("SELECT sop_uid FROM instances")))
    finally:
        engine.dispose()
    assert sorted(sops) == sorted(distinct)


def test_completion_racing_a_late_instance_never_loses_it(
    journals: Callable[[], Journal],
) -> None:
    completer, receiver = journals(), journals()
    completed = reopened = 0
    for round_ in range(25):
        first, series_id = new_study(completer, at=NOW)
        spec = JobSpec(series_id, "r", "ct-chest", ("pacs",), 1, ("1", "2", "3", f"4.{round_}"))
        snapshot = completer.study(first.study_id)
        late = received(snapshot.study_uid, generate_uid(), generate_uid(), NOW + 9)
        ids, recorded = together(
            partial(
                completer.complete_study,
                first.study_id,
                snapshot.last_received_at,
                NOW + 10,
                [spec],
            ),
            partial(receiver.record_instance, late),
        )
        study = receiver.study(first.study_id)
        # either order is fine; the study must never be left COMPLETE without the instance
        assert study.state == StudyState.OPEN
        assert study.last_received_at == NOW + 9
        assert not recorded.duplicate and recorded.study_id == first.study_id
        if ids is None:  # the instance came first: the plan was stale
            assert not recorded.reopened and study.generation == 1
            assert receiver.study_snapshot(first.study_id).jobs == ()
        else:  # the completion came first: the instance re-opened the study
            assert recorded.reopened and recorded.opened and study.generation == 2
            assert study.completed_at is None
            completed += 1
        reopened += recorded.reopened
    assert completed == reopened


def test_an_instance_recorded_after_the_snapshot_with_an_older_time_stops_completion(
    journals: Callable[[], Journal],
) -> None:
    journal = journals()
    first, series_id = new_study(journal, at=NOW)
    snapshot = journal.study(first.study_id)
    late = received(snapshot.study_uid, generate_uid(), generate_uid(), NOW - 5)
    assert not journal.record_instance(late).duplicate  # after the snapshot, before completion
    spec = JobSpec(series_id, "r", "ct-chest", ("pacs",), 1, ("1", "2", "3", "4"))
    ids = journal.complete_study(
        first.study_id, snapshot.last_received_at, NOW + 10, [spec], seen_instances=1
    )
    assert ids is None  # the plan did not include the new series


def test_a_late_instance_waits_for_a_completion_in_progress_and_reopens(
    journals: Callable[[], Journal], url: str
) -> None:
    receiver = journals()
    first, _ = new_study(receiver, at=NOW)
    study_uid = receiver.study(first.study_id).study_uid
    engine = sa.create_engine(url)
    result: list[Recorded] = []
    try:
        with engine.connect() as conn, conn.begin():  # another node completing the study
            conn.execute(
                sa.text("SELECT id FROM studies WHERE id = :id FOR UPDATE"), {"id": first.study_id}
            )
            late = received(study_uid, generate_uid(), generate_uid(), NOW + 9)
            thread = threading.Thread(target=lambda: result.append(receiver.record_instance(late)))
            thread.start()
            thread.join(0.5)
            assert thread.is_alive(), "recorded without waiting for the study's row lock"
            conn.execute(
                sa.text("UPDATE studies SET state = 'complete', completed_at = :t WHERE id = :id"),
                {"t": NOW + 10, "id": first.study_id},
            )
        thread.join(10)
        (recorded,) = result
        assert recorded.reopened
        study = receiver.study(first.study_id)
        assert (study.state, study.generation, study.completed_at) == (StudyState.OPEN, 2, None)

        # and the other way round: a receiver is recording, the completion must wait and
        # then see the new last_received_at
        snapshot = receiver.study(first.study_id)
        with engine.connect() as conn, conn.begin():
            conn.execute(
                sa.text("UPDATE studies SET last_received_at = :t WHERE id = :id"),
                {"t": NOW + 11, "id": first.study_id},
            )
            outcome_: list[Any] = []
            thread = threading.Thread(
                target=lambda: outcome_.append(
                    receiver.complete_study(first.study_id, snapshot.last_received_at, NOW + 20, [])
                )
            )
            thread.start()
            thread.join(0.5)
            assert thread.is_alive(), "completed without waiting for the study's row lock"
        thread.join(10)
        assert outcome_ == [None]
        assert receiver.study(first.study_id).state == StudyState.OPEN
    finally:
        engine.dispose()


def test_processes_asking_for_the_node_uid_at_once_get_the_same_one(
    journals: Callable[[], Journal],
) -> None:
    one, two = journals(), journals()

    def slow_uid() -> str:  # widens the window between the look-up and the insert
        time.sleep(0.2)
        return generate_uid()

    first, second = together(
        partial(one.meta_value, "node_uid", slow_uid),
        partial(two.meta_value, "node_uid", slow_uid),
    )
    assert first == second == one.meta_value("node_uid", generate_uid)


# -- leases --------------------------------------------------------------------------------


def test_a_job_is_claimed_by_id_once(journals: Callable[[], Journal]) -> None:
    one, two = journals(), journals()
    for job_id in queue_jobs(one, 10):
        rows = together(
            partial(one.claim_job_by_id, job_id, "w1", NOW, NOW + 60),
            partial(two.claim_job_by_id, job_id, "w2", NOW, NOW + 60),
        )
        (row,) = [r for r in rows if r is not None]
        assert row.state == JobState.ANALYSING and row.lease_until == NOW + 60
        assert one.job(job_id).lease_owner == row.lease_owner
        assert one.claim_job_by_id(job_id, "w1", NOW, NOW + 60) is None
    assert one.claim_job_by_id(999_999, "w1", NOW, NOW + 60) is None


def test_concurrent_claimers_take_each_queued_job_exactly_once(
    journals: Callable[[], Journal],
) -> None:
    claimers = [journals() for _ in range(4)]
    job_ids = queue_jobs(claimers[0], 24)

    def drain(journal: Journal, owner: str) -> list[int]:
        taken = []
        while (row := journal.claim_job(NOW, owner=owner, until=NOW + 60)) is not None:
            assert row.lease_owner == owner
            taken.append(row.id)
        return taken

    taken = together(*[partial(drain, j, f"w{i}") for i, j in enumerate(claimers)])
    claimed = [job_id for ids in taken for job_id in ids]
    assert sorted(claimed) == sorted(job_ids)  # every job once, none twice
    for index, ids in enumerate(taken):
        for job_id in ids:
            job = claimers[0].job(job_id)
            assert (job.state, job.lease_owner) == (JobState.ANALYSING, f"w{index}")


def test_a_claim_skips_a_job_another_claimer_has_locked(
    journals: Callable[[], Journal], url: str
) -> None:
    journal = journals()
    locked, free = queue_jobs(journal, 2)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn, conn.begin():  # another node in the middle of a claim
            conn.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": locked})
            taken: list[Any] = []
            thread = threading.Thread(target=lambda: taken.append(journal.claim_job(NOW)))
            thread.start()
            thread.join(5)
            assert not thread.is_alive(), "claim_job waited for a locked job instead of skipping"
        thread.join(10)
        assert [row.id for row in taken] == [free]
    finally:
        engine.dispose()
    assert journal.job(locked).state == JobState.QUEUED


def test_renewal_requeueing_and_fenced_outcomes(journals: Callable[[], Journal]) -> None:
    journal = journals()
    held, expired, unleased, queued, other = queue_jobs(journal, 5)
    assert journal.mark_dispatched(expired, None, NOW)
    assert journal.claim_job_by_id(held, "w1", NOW, NOW + 60) is not None
    assert journal.claim_job_by_id(expired, "w1", NOW, NOW + 5) is not None
    assert journal.claim_job_by_id(other, "w2", NOW, NOW + 60) is not None
    unleased_row = journal.claim_job(NOW)  # a single-node claim: no lease at all
    assert unleased_row is not None and unleased_row.id == unleased

    assert journal.renew_leases("w1", [held, other, queued, 999_999], NOW + 90) == {held}
    assert journal.job(held).lease_until == NOW + 90
    assert journal.job(other).lease_until == NOW + 60  # not w1's: untouched
    assert journal.renew_leases("w1", [], NOW + 90) == set()

    assert sorted(journal.requeue_expired(NOW + 10)) == sorted([expired, unleased])
    for job_id in (expired, unleased):
        job = journal.job(job_id)
        assert job.state == JobState.QUEUED
        assert (job.dispatched_at, job.lease_owner, job.lease_until) == (None, None, None)
    assert journal.job(held).state == journal.job(other).state == JobState.ANALYSING
    assert journal.job(queued).state == JobState.QUEUED
    assert journal.requeue_expired(NOW + 10) == []
    assert journal.renew_leases("w1", [held, expired], NOW + 95) == {held}

    # fencing: only the lease's holder writes the outcome
    spec = DeliverySpec("pacs", "PACS", "127.0.0.1", 104)
    snapshot = journal.job(other)._asdict()
    for call in (
        lambda: journal.job_analysed(other, [spec], NOW + 20, owner="w1"),
        lambda: journal.job_failed(other, "boom", NOW + 20, owner="w1"),
        lambda: journal.job_analysed(expired, [spec], NOW + 20, owner="w1"),  # requeued since
        lambda: journal.job_failed(expired, "boom", NOW + 20, owner="w1"),
    ):
        with pytest.raises(LeaseLost):
            call()
    assert journal.job(other)._asdict() == snapshot
    assert journal.due_deliveries(NOW + 1000) == []
    assert journal.job(expired).state == JobState.QUEUED
    # re-claimed by w2: the old holder w1 stays fenced off
    assert journal.claim_job_by_id(expired, "w2", NOW + 20, NOW + 80) is not None
    with pytest.raises(LeaseLost):
        journal.job_analysed(expired, [], NOW + 21, owner="w1")
    assert journal.job(expired).lease_owner == "w2"

    journal.job_analysed(other, [spec], NOW + 30, owner="w2")
    job = journal.job(other)
    assert (job.state, job.lease_until) == (JobState.SENDING, None)
    journal.job_failed(held, "boom", NOW + 30, owner="w1")
    assert journal.job(held).state == JobState.FAILED
    assert journal.requeue_expired(NOW + 1000) == [expired]  # only still-analysing jobs


def test_requeue_racing_an_outcome_write_lets_exactly_one_win(
    journals: Callable[[], Journal],
) -> None:
    worker, receiver = journals(), journals()
    for job_id in queue_jobs(worker, 12):
        assert worker.claim_job_by_id(job_id, "w1", NOW, NOW + 5) is not None
        requeued, written = together(
            partial(receiver.requeue_expired, NOW + 10),
            outcome(partial(worker.job_analysed, job_id, [], NOW + 10, owner="w1")),
        )
        won_by_worker = not isinstance(written, LeaseLost)
        assert (job_id in requeued) != won_by_worker
        expected = JobState.QUEUED if job_id in requeued else JobState.SENDING
        assert worker.job(job_id).state == expected


def test_lease_keeper_renews_held_jobs_and_drops_lost_ones(
    journals: Callable[[], Journal], caplog: pytest.LogCaptureFixture
) -> None:
    journal = journals()
    kept, lost = queue_jobs(journal, 2)
    clock = [NOW]
    keeper = LeaseKeeper(journal, "w1", 30.0, lambda: clock[0])
    assert journal.claim_job_by_id(kept, "w1", NOW, keeper.until()) is not None
    assert journal.claim_job_by_id(lost, "w1", NOW, NOW + 5) is not None
    assert journal.requeue_expired(NOW + 10) == [lost]  # e.g. the worker lost the database
    with keeper.holding(kept), keeper.holding(lost):
        clock[0] = NOW + 20
        keeper.renew()
    assert journal.job(kept).lease_until == NOW + 50
    assert journal.job(lost).state == JobState.QUEUED and journal.job(lost).lease_until is None
    assert f"job {lost}: lease lost" in caplog.text
    clock[0] = NOW + 100
    keeper.renew()  # no longer held: nothing renewed
    assert journal.job(kept).lease_until == NOW + 50


def test_dispatch_stamps(journals: Callable[[], Journal]) -> None:
    one, two = journals(), journals()
    job_ids = queue_jobs(one, 6)
    assert [j.id for j in one.jobs_to_dispatch(NOW, 600)] == sorted(job_ids)
    # two receivers dispatching at once: each job is stamped by exactly one
    for job_id in job_ids:
        won = together(
            partial(one.mark_dispatched, job_id, None, NOW),
            partial(two.mark_dispatched, job_id, None, NOW + 0.5),
        )
        assert sorted(won) == [False, True]
    first = job_ids[0]
    stamp = one.job(first).dispatched_at
    assert one.mark_dispatched(first, None, NOW + 1) is False  # stamped already
    assert one.jobs_to_dispatch(NOW + 599, 600) == []
    assert {j.id for j in one.jobs_to_dispatch(NOW + 601, 600)} == set(job_ids)
    assert one.mark_dispatched(first, stamp, NOW + 601) is True  # re-dispatch, once
    assert one.mark_dispatched(first, stamp, NOW + 602) is False
    one.undo_dispatch(first, stamp)  # not the current stamp: nothing happens
    assert one.job(first).dispatched_at == NOW + 601
    one.undo_dispatch(first, NOW + 601)
    assert one.job(first).dispatched_at is None
    assert [j.id for j in one.jobs_to_dispatch(NOW + 602, 600)][0] == first
    # claimed jobs are neither dispatched nor stamped
    assert one.claim_job_by_id(first, "w1", NOW, NOW + 60) is not None
    assert first not in {j.id for j in one.jobs_to_dispatch(NOW + 10_000, 600)}
    assert one.mark_dispatched(first, None, NOW + 603) is False


def test_two_senders_claim_a_delivery_once_until_it_is_due_again(
    journals: Callable[[], Journal],
) -> None:
    one, two = journals(), journals()
    (job_id,) = queue_jobs(one, 1)
    assert one.claim_job_by_id(job_id, "w1", NOW, NOW + 60) is not None
    specs = [DeliverySpec(f"pacs{i}", "PACS", "127.0.0.1", 104 + i) for i in range(8)]
    one.job_analysed(job_id, specs, NOW, owner="w1")
    due = one.due_deliveries(NOW)
    assert len(due) == 8
    for delivery in due:
        won = together(
            partial(one.claim_delivery, delivery.id, NOW, NOW + 30),
            partial(two.claim_delivery, delivery.id, NOW, NOW + 30),
        )
        assert sorted(won) == [False, True]
    assert one.due_deliveries(NOW + 29) == []
    delivery_id = due[0].id
    assert one.claim_delivery(delivery_id, NOW + 29, NOW + 60) is False
    assert len(one.due_deliveries(NOW + 30)) == 8
    assert two.claim_delivery(delivery_id, NOW + 30, NOW + 60) is True
    one.delivery_attempted(delivery_id, DeliveryState.SENT, NOW + 31)
    assert one.claim_delivery(delivery_id, NOW + 100, NOW + 130) is False  # sent: not pending


# -- spool names ---------------------------------------------------------------------------


def test_a_spool_name_is_held_by_one_open_spool(tmp_path: Path) -> None:
    first, second, other = (Spool(tmp_path, name=n) for n in ("a", "a", "b"))
    first.create()
    other.create()  # another name is fine
    with pytest.raises(NameInUse, match="'a'"):
        second.create()
    first.release()
    second.create()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from dicom_node.store "
         "import Spool; Spool(Path(sys.argv[1]), name='c').create(); print('held', flush=True); "
         "sys.stdin.read()", str(tmp_path)],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(NameInUse):
            Spool(tmp_path, name="c").create()
    finally:
        holder.communicate(timeout=30)  # closing its stdin ends it
    third = Spool(tmp_path, name="c")
    third.create()
    for spool in (second, other, third):
        spool.release()

    relpath = second.new_instance_relpath()
    assert relpath.startswith("instances/a/") and second.instances_prefix == "instances/a/"
    path = second.write_atomic(relpath, b"x")
    assert path.parent.parent == tmp_path / "instances" / "a"
    assert second.tmp == tmp_path / "tmp" / "a" and second.tmp.is_dir()


def test_reindexing_one_named_spool_never_touches_anothers_files(
    journals: Callable[[], Journal], tmp_path: Path
) -> None:
    journal = journals()
    one, two = Spool(tmp_path, name="n_1"), Spool(tmp_path, name="nx1")
    for spool in (one, two):
        spool.create()
    first, second = sorted(GE_3SLICE.glob("*.dcm"))[:2]
    mine = one.new_instance_relpath()
    one.write_atomic(mine, first.read_bytes())
    theirs = {two.new_instance_relpath(): path.read_bytes() for path in (first, second)}
    theirs[two.new_instance_relpath()] = b"not dicom"
    for relpath, data in theirs.items():
        two.write_atomic(relpath, data)

    assert reindex_orphans(one, journal) == 1
    assert journal.all_instance_relpaths() == {mine}
    for relpath, data in theirs.items():  # untouched: neither indexed, moved nor removed
        assert two.path(relpath).read_bytes() == data
    assert not (tmp_path / "quarantine").exists()
    assert reindex_orphans(one, journal) == 0

    # the other spool's own re-index: its copy of `first` is a duplicate, the junk is moved
    assert reindex_orphans(two, journal) == 1
    assert one.path(mine).read_bytes() == first.read_bytes()
    assert len(journal.all_instance_relpaths(two.instances_prefix)) == 1
    assert journal.all_instance_relpaths(one.instances_prefix) == {mine}  # '_' is no wildcard
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    for spool in (one, two):
        spool.release()


# -- configuration -------------------------------------------------------------------------

MINIMAL: dict[str, Any] = {"node": {"ae_title": "NODE"}}


def _problems(cluster: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config({**MINIMAL, "cluster": cluster})
    return raised.value.problems


def test_cluster_configuration_is_validated() -> None:
    default = parse_config(MINIMAL).cluster
    assert not default.enabled and default.broker_url is None
    assert default.journal_location(Path("/var/j.sqlite")) == Path("/var/j.sqlite")

    (problem,) = _problems({"broker_url": "redis://127.0.0.1:6379/0"})
    assert problem.startswith("cluster") and "broker_url needs journal_url" in problem
    (problem,) = _problems({"journal_url": "mysql://u:p@db/dicom"})
    assert problem.startswith("cluster.journal_url:") and "postgresql" in problem
    assert "u:p" not in problem
    for bad in ("-lead", "has space", "a/b", "x" * 64, ""):
        (problem,) = _problems({"node_name": bad})
        assert problem.startswith("cluster.node_name:")
    (problem,) = _problems({"lease_seconds": 1})
    assert problem.startswith("cluster.lease_seconds:")

    config = parse_config(
        {
            **MINIMAL,
            "cluster": {
                "journal_url": "postgresql://u:p@db:5432/dicom",
                "broker_url": "redis://cache:6379/0",
                "node_name": "recv-1." + "x" * 55,
            },
        }
    ).cluster
    assert config.enabled
    assert config.journal_location(Path("unused")) == "postgresql+psycopg://u:p@db:5432/dicom"
    with pytest.raises(JournalSchemaError, match="only postgresql"):
        Journal("mysql+pymysql://u:p@db/dicom")


def test_the_patient_of_a_stored_instance_is_read_back_on_postgres(
    journals: Callable[[], Journal],
) -> None:
    """Its study's details are a JSON column there (a dict), text on SQLite."""
    journal = journals()
    first = dataclasses.replace(
        received(generate_uid(), generate_uid(), generate_uid(), NOW),
        study_details={"PatientID": "P-7"},
    )
    journal.record_instance(first)
    assert journal.stored_patient_id(first.sop_uid) == "P-7"
    assert journal.stored_patient_id(generate_uid()) is None
