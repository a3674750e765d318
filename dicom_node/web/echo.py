"""Live C-ECHO status of the configured destinations, refreshed in the background."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dicom_node.config import Destination
from dicom_node.send import Peer, SendError, echo

log = logging.getLogger(__name__)

ECHO_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class EchoStatus:
    ok: bool
    checked_at: float
    error: str | None = None


class DestinationMonitor:
    """C-ECHOes every destination each ``interval`` seconds; the dashboard reads the results."""

    def __init__(
        self,
        calling_aet: str,
        destinations: Mapping[str, Destination],
        interval: float,
        clock: Callable[[], float],
    ) -> None:
        self._calling_aet = calling_aet
        self._destinations = dict(destinations)
        self._interval = interval
        self._clock = clock
        self._status: dict[str, EchoStatus] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self._destinations:
            return
        self._thread = threading.Thread(target=self._loop, name="echo-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def status(self) -> dict[str, EchoStatus | None]:
        with self._lock:
            return {name: self._status.get(name) for name in self._destinations}

    def check_all(self) -> None:
        for name, dest in self._destinations.items():
            peer = Peer(dest.ae_title, dest.host, dest.port, dest.tls)
            try:
                echo(self._calling_aet, peer, timeout=ECHO_TIMEOUT_SECONDS)
                result = EchoStatus(True, self._clock())
            except (SendError, OSError) as exc:
                result = EchoStatus(False, self._clock(), str(exc))
            with self._lock:
                previous = self._status.get(name)
                self._status[name] = result
            if previous is None and not result.ok:  # down from the start: say so once
                log.warning("destination %s is DOWN: %s", name, result.error)
            elif previous is not None and previous.ok != result.ok:
                if result.ok:
                    log.warning("destination %s is now up", name)
                else:
                    log.warning("destination %s is now DOWN: %s", name, result.error)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.check_all()
            except Exception:
                log.exception("destination check failed")
            self._stopping.wait(self._interval)
