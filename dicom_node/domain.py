"""Domain states and their legal transitions. Pure: no I/O, no clocks.

A study is OPEN while instances arrive, COMPLETE once it has been idle for
``completion.study_idle_seconds`` and routed. A new instance re-opens it.

A job analyses one series for one route::

    QUEUED -> ANALYSING -> SENDING -> DONE
                  |           |
                  v           v
                FAILED     DEAD_LETTER      (terminal; visible in logs and journal)

    ANALYSING -> QUEUED             (restart while analysing: run again, same UIDs)
    QUEUED -> SUPERSEDED            (a newer job for the same series and route replaced it)
    FAILED -> QUEUED, DEAD_LETTER -> SENDING   (an operator's retry)

Each job has one delivery per destination::

    PENDING -> SENT | PENDING (retry later) | DEAD
    PENDING -> COMMITTING -> SENT | PENDING (retry later) | DEAD

A destination with ``storage_commitment`` takes the second path (PS3.4 Annex J):
after the C-STOREs the delivery is COMMITTING until the peer's N-EVENT-REPORT
confirms every object (SENT); a failure list or no report in time is a failed
attempt like a failed C-STORE.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class IllegalTransition(Exception):
    """A state change the domain does not allow."""

    def __init__(self, kind: str, current: enum.Enum, new: enum.Enum) -> None:
        super().__init__(f"{kind}: illegal transition {current.value} -> {new.value}")
        self.current = current
        self.new = new


class StudyState(enum.StrEnum):
    OPEN = "open"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    ANALYSING = "analysing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    SUPERSEDED = "superseded"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    COMMITTING = "committing"  # stored; waiting for the storage commitment report
    SENT = "sent"
    DEAD = "dead"


STUDY_TRANSITIONS: Mapping[StudyState, frozenset[StudyState]] = {
    StudyState.OPEN: frozenset({StudyState.COMPLETE}),
    StudyState.COMPLETE: frozenset({StudyState.OPEN}),
}

JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.ANALYSING, JobState.SUPERSEDED}),
    JobState.ANALYSING: frozenset({JobState.SENDING, JobState.FAILED, JobState.QUEUED}),
    JobState.SENDING: frozenset({JobState.DONE, JobState.DEAD_LETTER}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),  # operator-requested retry
    JobState.DEAD_LETTER: frozenset({JobState.SENDING}),  # operator-requested resend
    JobState.SUPERSEDED: frozenset(),
}

DELIVERY_TRANSITIONS: Mapping[DeliveryState, frozenset[DeliveryState]] = {
    DeliveryState.PENDING: frozenset(
        {DeliveryState.SENT, DeliveryState.COMMITTING, DeliveryState.DEAD}
    ),
    DeliveryState.COMMITTING: frozenset(
        {DeliveryState.SENT, DeliveryState.PENDING, DeliveryState.DEAD}
    ),
    DeliveryState.SENT: frozenset(),
    DeliveryState.DEAD: frozenset({DeliveryState.PENDING}),  # operator-requested resend
}

UNFINISHED_JOB_STATES = frozenset({JobState.QUEUED, JobState.ANALYSING, JobState.SENDING})
UNSETTLED_DELIVERY_STATES = frozenset({DeliveryState.PENDING, DeliveryState.COMMITTING})


def check_study(current: StudyState, new: StudyState) -> StudyState:
    if new not in STUDY_TRANSITIONS[current]:
        raise IllegalTransition("study", current, new)
    return new


def check_job(current: JobState, new: JobState) -> JobState:
    if new not in JOB_TRANSITIONS[current]:
        raise IllegalTransition("job", current, new)
    return new


def check_delivery(current: DeliveryState, new: DeliveryState) -> DeliveryState:
    if new not in DELIVERY_TRANSITIONS[current]:
        raise IllegalTransition("delivery", current, new)
    return new


def job_state_after_deliveries(states: list[DeliveryState]) -> JobState | None:
    """The job's next state once its deliveries settle; None while any is unsettled."""
    if not states or any(s in UNSETTLED_DELIVERY_STATES for s in states):
        return None
    if DeliveryState.DEAD in states:
        return JobState.DEAD_LETTER
    return JobState.DONE


def backoff_seconds(attempt: int, initial: float, maximum: float, jitter: float) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, with jitter.

    ``jitter`` in [0, 1) scales the delay down by up to 50% ("equal jitter"), so
    peers that failed together do not retry in lockstep.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    base = min(maximum, initial * 2.0 ** (attempt - 1))
    return base * (1.0 - 0.5 * jitter)
