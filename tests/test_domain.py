"""Domain transitions and backoff: pure functions."""

from __future__ import annotations

import pytest

from dicom_node.domain import (
    JOB_TRANSITIONS,
    DeliveryState,
    IllegalTransition,
    JobState,
    StudyState,
    backoff_seconds,
    check_delivery,
    check_job,
    check_study,
    job_state_after_deliveries,
)


def test_job_happy_path() -> None:
    state = JobState.QUEUED
    for new in (JobState.ANALYSING, JobState.SENDING, JobState.DONE):
        state = check_job(state, new)
    assert state is JobState.DONE


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (JobState.QUEUED, JobState.DONE),
        (JobState.QUEUED, JobState.SENDING),
        (JobState.DONE, JobState.QUEUED),
        (JobState.FAILED, JobState.ANALYSING),
        (JobState.SENDING, JobState.ANALYSING),
        (JobState.SUPERSEDED, JobState.QUEUED),
    ],
)
def test_illegal_job_transitions(current: JobState, new: JobState) -> None:
    with pytest.raises(IllegalTransition, match=f"{current.value} -> {new.value}"):
        check_job(current, new)


def test_terminal_job_states_have_no_way_out_except_an_operator_retry() -> None:
    assert JOB_TRANSITIONS[JobState.DONE] == frozenset()
    assert JOB_TRANSITIONS[JobState.FAILED] == frozenset({JobState.QUEUED})
    assert JOB_TRANSITIONS[JobState.DEAD_LETTER] == frozenset({JobState.SENDING})


def test_study_reopens() -> None:
    assert check_study(StudyState.OPEN, StudyState.COMPLETE) is StudyState.COMPLETE
    assert check_study(StudyState.COMPLETE, StudyState.OPEN) is StudyState.OPEN
    with pytest.raises(IllegalTransition):
        check_study(StudyState.OPEN, StudyState.OPEN)


def test_delivery_transitions() -> None:
    assert check_delivery(DeliveryState.PENDING, DeliveryState.SENT) is DeliveryState.SENT
    with pytest.raises(IllegalTransition):
        check_delivery(DeliveryState.SENT, DeliveryState.PENDING)


def test_storage_commitment_delivery_transitions() -> None:
    P, C, S, D = (
        DeliveryState.PENDING,
        DeliveryState.COMMITTING,
        DeliveryState.SENT,
        DeliveryState.DEAD,
    )
    assert check_delivery(P, C) is C  # stored, N-ACTION sent
    assert check_delivery(C, S) is S  # N-EVENT-REPORT confirmed every object
    assert check_delivery(C, P) is P  # failures reported or no report in time: retry
    assert check_delivery(C, D) is D  # ... after the attempt limit
    for current, new in ((S, C), (D, C), (C, C)):
        with pytest.raises(IllegalTransition, match=f"{current.value} -> {new.value}"):
            check_delivery(current, new)


def test_job_state_after_deliveries() -> None:
    P, S, D = DeliveryState.PENDING, DeliveryState.SENT, DeliveryState.DEAD
    assert job_state_after_deliveries([S, P]) is None
    assert job_state_after_deliveries([S, S]) is JobState.DONE
    assert job_state_after_deliveries([S, D]) is JobState.DEAD_LETTER
    assert job_state_after_deliveries([]) is None
    C = DeliveryState.COMMITTING
    assert job_state_after_deliveries([S, C]) is None  # still waiting for the report
    assert job_state_after_deliveries([D, C]) is None


def test_backoff_grows_exponentially_and_is_capped() -> None:
    delays = [backoff_seconds(n, 2.0, 60.0, 0.0) for n in range(1, 8)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff_seconds(3, 2.0, 60.0, 0.999) == pytest.approx(4.0, rel=0.01)
    with pytest.raises(ValueError, match="attempt must be >= 1, got 0"):
        backoff_seconds(0, 1.0, 2.0, 0.0)
    with pytest.raises(ValueError, match="jitter"):
        backoff_seconds(1, 1.0, 2.0, 1.0)
