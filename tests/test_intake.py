"""Recording received instances in a SQLite journal (dicom_node.intake.SQLiteIntake).

The receive path writes these rows through a ``sqlite3`` connection of its own, beside
the journal's SQLAlchemy engine; the rest of the journal must see exactly what it wrote,
and a refused instance must leave nothing behind. (PostgreSQL journals record through
SQLAlchemy: tests/test_journal_shared.py.)
"""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from test_journal_shared import received

from dicom_node.domain import StudyState
from dicom_node.journal import Journal, ReceivedInstance, UIDConflict


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal(tmp_path / "journal.sqlite")
    journal.create()
    yield journal
    journal.close()


def instance(study_uid: str, series_uid: str, at: float = 100.0) -> ReceivedInstance:
    """A new instance of that study and series, with study and series details."""
    new = received(study_uid, series_uid, generate_uid(), at)
    return dataclasses.replace(
        new, study_details={"PatientID": "P1"}, series_details={"Modality": "CT"}
    )


def counts(path: Path) -> tuple[int, int, int]:
    with sqlite3.connect(path) as db:
        return tuple(  # type: ignore[return-value]
            db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("studies", "series", "instances")
        )


def test_rows_are_seen_by_the_rest_of_the_journal_and_by_another_journal(
    journal: Journal, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    first = journal.record_instance(instance(study_uid, series_uid, at=100.0))
    second = journal.record_instance(instance(study_uid, series_uid, at=105.0))
    assert first.opened and not first.duplicate
    assert second.study_id == first.study_id and not second.opened and not second.duplicate

    snapshot = journal.study_snapshot(first.study_id)  # read through SQLAlchemy
    assert snapshot.study.last_received_at == 105.0
    assert [(s.series_uid, s.instance_count) for s in snapshot.series] == [(series_uid, 2)]
    other = Journal(tmp_path / "journal.sqlite")
    try:
        assert [row.study_uid for row in other.open_studies()] == [study_uid]
    finally:
        other.close()


def test_a_known_sop_instance_uid_is_a_duplicate_and_changes_nothing(journal: Journal) -> None:
    received = instance(generate_uid(), generate_uid())
    assert not journal.has_instance(received.sop_uid)
    journal.record_instance(received)
    assert journal.has_instance(received.sop_uid)
    before = counts(Path(journal.path))

    again = journal.record_instance(received)

    assert again.duplicate and not again.opened
    assert counts(Path(journal.path)) == before


def test_a_series_of_another_study_is_refused_and_rolled_back(journal: Journal) -> None:
    series_uid = generate_uid()
    journal.record_instance(instance(generate_uid(), series_uid))
    before = counts(Path(journal.path))

    with pytest.raises(UIDConflict):
        # its new study row is inserted before the series is checked: it must go too
        journal.record_instance(instance(generate_uid(), series_uid))

    assert counts(Path(journal.path)) == before
    journal.record_instance(instance(generate_uid(), generate_uid()))  # the next one works
    assert counts(Path(journal.path))[0] == before[0] + 1


def test_a_study_uid_of_another_patient_is_refused_and_nothing_is_merged(
    journal: Journal,
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    journal.record_instance(instance(study_uid, series_uid))  # PatientID P1
    before = counts(Path(journal.path))
    for other in (
        {"PatientID": "P2"},  # another patient, a new series of the same study
        {},  # no Patient ID at all
    ):
        stray = dataclasses.replace(instance(study_uid, generate_uid()), study_details=other)
        with pytest.raises(UIDConflict, match="another patient"):
            journal.record_instance(stray)
        assert counts(Path(journal.path)) == before
    journal.record_instance(instance(study_uid, generate_uid()))  # the same patient: fine
    assert counts(Path(journal.path)) == (before[0], before[1] + 1, before[2] + 1)


def test_an_instance_of_a_completed_study_reopens_it(journal: Journal) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    first = journal.record_instance(instance(study_uid, series_uid, at=100.0))
    assert journal.complete_study(first.study_id, 100.0, now=200.0, specs=[]) == []

    late = journal.record_instance(instance(study_uid, series_uid, at=300.0))

    assert late.reopened and late.opened and late.study_id == first.study_id
    study = journal.study(first.study_id)
    assert (study.state, study.generation, study.completed_at) == (StudyState.OPEN, 2, None)


def test_recording_after_close_opens_the_connection_again(journal: Journal) -> None:
    journal.record_instance(instance(generate_uid(), generate_uid()))
    journal.close()
    received = instance(generate_uid(), generate_uid())

    assert not journal.record_instance(received).duplicate
    assert journal.has_instance(received.sop_uid)


class _CommitFailsOnce:
    """A sqlite3 connection whose next commit fails, as on a full disk (SQLITE_FULL)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.failed = False

    def commit(self) -> None:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        self._db.commit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_a_failed_commit_is_rolled_back_and_the_next_instance_is_recorded(
    journal: Journal,
) -> None:
    journal.record_instance(instance(generate_uid(), generate_uid()))  # opens the connection
    assert journal._receiving is not None
    sqlite_intake = journal._receiving._intake
    assert sqlite_intake._db is not None
    failing = _CommitFailsOnce(sqlite_intake._db)
    sqlite_intake._db = failing  # type: ignore[assignment]
    before = counts(Path(journal.path))

    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        journal.record_instance(instance(generate_uid(), generate_uid()))

    assert failing.failed and not failing.in_transaction
    assert counts(Path(journal.path)) == before
    assert not journal.record_instance(instance(generate_uid(), generate_uid())).duplicate
    assert counts(Path(journal.path))[2] == before[2] + 1


def test_a_receiving_process_opens_the_journal_without_sqlalchemy(
    journal: Journal, tmp_path: Path
) -> None:
    """What a receiving process imports (dicom_node.receivers and what it starts) leaves
    SQLAlchemy and Alembic out, and its journal sees what the node's journal wrote."""
    from dicom_node.intake import ReceivingJournal

    probe = (
        "import sys\n"
        "import dicom_node.receivers, dicom_node.receive, dicom_node.reindex\n"
        "import dicom_node.store, dicom_node.audit, dicom_node.logs\n"
        "print(sorted(m for m in ('sqlalchemy', 'alembic') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

    study_uid, series_uid = generate_uid(), generate_uid()
    ours = dataclasses.replace(
        instance(study_uid, series_uid), relpath="instances/receiver-2/ab/x_1.dcm"
    )
    journal.record_instance(instance(study_uid, series_uid))  # instances/... of the node
    receiving = ReceivingJournal(Path(journal.path))
    try:
        assert not receiving.record_instance(ours).duplicate
        assert receiving.record_instance(ours).duplicate
        assert receiving.has_instance(ours.sop_uid)
        assert journal.has_instance(ours.sop_uid)  # one journal
        assert receiving.stored_patient_id(ours.sop_uid) == "P1"
        assert journal.stored_patient_id(ours.sop_uid) == "P1"
        assert receiving.stored_patient_id(generate_uid()) is None
        assert journal.stored_patient_id(generate_uid()) is None
        for prefix in ("instances/receiver-2/", "instances/", "instances/receiver-2/ab/x%", ""):
            assert receiving.all_instance_relpaths(prefix) == journal.all_instance_relpaths(prefix)
        assert receiving.all_instance_relpaths("instances/receiver-2/") == {ours.relpath}
    finally:
        receiving.close()
