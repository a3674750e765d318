"""HTTP: ``/healthz``, ``/metrics`` (Prometheus), ``/`` (dashboard), ``/api/...``.

A stdlib threading HTTP server: the node needs a handful of read-only pages,
not a web framework.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.journal import Journal
from dicom_node.web.metrics import Metrics

log = logging.getLogger(__name__)


class WebServer:
    def __init__(
        self, host: str, port: int, journal: Journal, metrics: Metrics, healthy: Callable[[], bool]
    ) -> None:
        self._journal = journal
        self._metrics = metrics
        self._healthy = healthy
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="web", daemon=True)
        self._thread.start()
        log.info("web on http://%s:%d", *self.address)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server._dispatch(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s", format % args)

        return Handler

    def _dispatch(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/healthz": self._healthz,
            "/metrics": self._metrics_page,
            "/": self._dashboard,
            "/api/status": self._api_status,
            "/api/studies": self._api_studies,
            "/api/jobs": self._api_jobs,
        }
        page = routes.get(path)
        try:
            status, content_type, body = page() if page else (404, "text/plain", b"not found\n")
        except Exception:
            log.exception("error serving %s", path)
            status, content_type, body = 500, "text/plain", b"internal error\n"
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def _healthz(self) -> tuple[int, str, bytes]:
        if self._healthy():
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"not accepting associations\n"

    def _metrics_page(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)

    def _api_status(self) -> tuple[int, str, bytes]:
        return _json(self._journal.state_counts())

    def _api_studies(self) -> tuple[int, str, bytes]:
        rows = self._journal.recent_studies()
        return _json([_public(row._asdict()) for row in rows])

    def _api_jobs(self) -> tuple[int, str, bytes]:
        rows = self._journal.recent_jobs()
        return _json([_public(row._asdict()) for row in rows])

    def _dashboard(self) -> tuple[int, str, bytes]:
        counts = self._journal.state_counts()
        jobs = self._journal.recent_jobs(limit=25)
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>"
            for cells in (
                (j.id, j.study_id, j.series_id, j.route, j.pipeline, j.state, j.error or "")
                for j in jobs
            )
        )
        summary = "".join(
            f"<li>{html.escape(kind)}: {html.escape(json.dumps(value))}</li>"
            for kind, value in counts.items()
        )
        body = (
            "<!doctype html><html><head><meta charset='utf-8'><title>dicom_node</title></head>"
            f"<body><h1>dicom_node</h1><ul>{summary}</ul><h2>Recent jobs</h2>"
            "<table border='1'><tr><th>job</th><th>study</th><th>series</th><th>route</th>"
            f"<th>pipeline</th><th>state</th><th>error</th></tr>{rows}</table></body></html>"
        )
        return 200, "text/html; charset=utf-8", body.encode()


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "relpath"}


def _json(value: Any) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(value, default=str).encode()
