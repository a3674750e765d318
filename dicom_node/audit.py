"""Append-only audit trail: one JSON object per line, DICOM PS3.15 A.5 event types.

Records who talked to the node and what moved: application start/stop,
associations accepted or refused, instances received, results sent and
storage commitments. Identifiers are AE titles, addresses and UIDs; no patient
names, IDs or birth dates. The file is opened in append mode and every record
is flushed as one ``write``; it is never rewritten by the node.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventType:
    """An audit event ID (CID 400) with the action code it is recorded with."""

    code: str
    meaning: str
    action: str  # C create, R read, U update, D delete, E execute


APPLICATION_ACTIVITY = EventType("110100", "Application Activity", "E")
INSTANCES_TRANSFERRED = EventType("110104", "DICOM Instances Transferred", "C")
RESULTS_TRANSFERRED = EventType("110104", "DICOM Instances Transferred", "R")
SECURITY_ALERT = EventType("110113", "Security Alert", "E")
USER_AUTHENTICATION = EventType("110114", "User Authentication", "E")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8  # EventOutcomeIndicator
REFUSAL_RECORD_SECONDS = 60.0  # one record per address and reason in this time, at most
MAX_REFUSAL_KEYS = 1024


class AuditTrail:
    """Writes audit records; a disabled trail (``path=None``) writes nothing."""

    def __init__(self, path: Path | None, clock: Callable[[], float]) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        # (address, reason) -> (time of its last record, refusals not recorded since)
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}

    def open(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.fsync(fd)
            os.close(fd)

    def record(self, event: EventType, outcome: int = SUCCESS, **fields: Any) -> None:
        """Append one record; ``fields`` carry participants and object UIDs.

        Never raises: a failing audit file is logged, and the work it records goes on.
        """
        if self._path is None:
            return
        entry = {
            "ts": datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
            "event_id": {"code": event.code, "scheme": "DCM", "meaning": event.meaning},
            "action": event.action,
            "outcome": outcome,
            **{key: value for key, value in fields.items() if value is not None},
        }
        line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
        with self._lock:
            fd = self._fd
            if fd is None:
                return
            try:
                os.write(fd, line)
            except OSError as exc:
                log.error("cannot append to the audit trail %s: %s", self._path, exc.strerror)

    # -- the node's events ------------------------------------------------------

    def application(self, activity: str, ae_title: str) -> None:
        self.record(APPLICATION_ACTIVITY, subtype=activity, local_ae=ae_title)

    def association(self, calling_aet: str, address: str, accepted: bool, reason: str) -> None:
        event = USER_AUTHENTICATION if accepted else SECURITY_ALERT
        outcome = SUCCESS if accepted else MINOR_FAILURE
        self.record(event, outcome, calling_aet=calling_aet, address=address, detail=reason)

    def connection_refused(
        self, address: str, reason: str, subtype: str = "connection refused"
    ) -> None:
        """A connection turned away before any association (a source outside the allowed
        networks, a connection cap, a failed TLS handshake), or an association request
        rejected before it could be decoded (``subtype`` "association rejected": an AE
        title that is not one): a Security Alert.

        A flood must not fill the disk with the trail: per address and reason at most one
        record every :data:`REFUSAL_RECORD_SECONDS`, with how many were left out before it.
        """
        now = self._clock()
        key = (address, reason)
        with self._lock:
            last, left_out = self._refusals.get(key, (None, 0))
            if last is not None and now - last < REFUSAL_RECORD_SECONDS:
                self._refusals[key] = (last, left_out + 1)
                return
            self._refusals[key] = (now, 0)
            if len(self._refusals) > MAX_REFUSAL_KEYS:  # forget the quiet ones
                self._refusals = {
                    k: v for k, v in self._refusals.items() if now - v[0] < REFUSAL_RECORD_SECONDS
                }
        self.record(
            SECURITY_ALERT,
            MINOR_FAILURE,
            address=address,
            detail=reason,
            subtype=subtype,
            left_out=left_out or None,
        )

    def instance_received(
        self, calling_aet: str, study_uid: str | None, sop_uid: str, status: int
    ) -> None:
        outcome = SUCCESS if status == 0 else MINOR_FAILURE
        self.record(
            INSTANCES_TRANSFERRED,
            outcome,
            calling_aet=calling_aet,
            study_uid=study_uid,
            sop_instance_uids=[sop_uid],
            status=f"0x{status:04X}",
        )

    def results_sent(
        self,
        destination: str,
        ae_title: str,
        sop_uids: Sequence[str],
        error: str | None = None,
        commitment: bool = False,
    ) -> None:
        self.record(
            RESULTS_TRANSFERRED,
            SUCCESS if error is None else MINOR_FAILURE,
            destination=destination,
            called_aet=ae_title,
            sop_instance_uids=list(sop_uids),
            detail=error,
            subtype="storage commitment" if commitment else "C-STORE",
        )
