"""Celery: how receivers hand analysis jobs to ``dicom-node worker`` processes.

A message carries only a job id; the job itself (its series, pipeline, result UIDs)
is in the shared journal, which stays the only truth. The broker is a way to wake
the right worker, so its delivery guarantees can be modest:

- messages are acknowledged late (after the job's outcome is in the journal), one
  at a time per worker thread, and requeued if the worker process is lost;
- a message for a job that is no longer queued is skipped (a duplicate);
- a job whose worker died mid-way is found by its expired lease and dispatched
  again (:mod:`dicom_node.leases`), whether or not the broker redelivers.

Priorities use the Redis transport's priority lists: ``urgent`` before ``normal``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

TASK_ANALYSE = "dicom_node.analyse"
QUEUE = "dicom_node.analysis"
# Redis transport: lower numbers are consumed first (kombu's priority steps 0, 3, 6, 9).
PRIORITY = {"urgent": 0, "normal": 6}


def celery_app(broker_url: str, lease_seconds: float) -> Celery:
    """The Celery app of receivers (publishing) and workers (consuming)."""
    app = Celery("dicom_node", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        # An unacknowledged message returns to the queue after this long. Kept well
        # above a job's duration, so a slow job is not handed out twice; a killed
        # worker's job comes back sooner through its lease.
        broker_transport_options={
            "visibility_timeout": max(3600.0, 10 * lease_seconds),
            "priority_steps": [0, 3, 6, 9],
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
    )
    return app


class Publisher:
    """Hands job ids to the broker (from a receiver's dispatcher thread)."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def publish(self, job_id: int, priority: str) -> None:
        self._app.send_task(
            TASK_ANALYSE,
            args=[job_id],
            queue=QUEUE,
            priority=PRIORITY.get(priority, PRIORITY["normal"]),
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )

    def close(self) -> None:
        pool: Any = self._app.pool
        pool.force_close_all()
