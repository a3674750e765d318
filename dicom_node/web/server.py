"""HTTP: ``/healthz``, ``/metrics`` (Prometheus), ``/`` (dashboard) and the REST API.

A stdlib threading HTTP server: the node serves a handful of pages, not a web
application. Everything but ``/healthz`` is behind ``web.token`` (Bearer) or
``web.basic_auth`` when either is configured. See :data:`OPENAPI` for the API.

HEAD is answered like GET without the body; any other method a path does not
serve gets 405 with an ``Allow`` header (unknown paths stay 404). Every POST
changes state, so one sent from another site's page (Origin or Referer not
this host) is refused with 403; requests with neither header (curl, scripts)
are not browser cross-site requests and pass.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.config import NodeConfig
from dicom_node.domain import IllegalTransition, JobState
from dicom_node.journal import Journal
from dicom_node.web import dashboard
from dicom_node.web.echo import DestinationMonitor
from dicom_node.web.metrics import Metrics
from dicom_node.web.openapi import OPENAPI

log = logging.getLogger(__name__)
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

Response = tuple[int, str, bytes]
JSON = "application/json"
SQLITE_MAX_INTEGER = 2**63 - 1  # larger ids cannot exist in the journal (and SQLite rejects them)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    params: tuple[str, ...] = ()


class WebServer:
    def __init__(
        self,
        config: NodeConfig,
        journal: Journal,
        metrics: Metrics,
        monitor: DestinationMonitor,
        healthy: Callable[[], bool],
        on_retry: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._journal = journal
        self._metrics = metrics
        self._monitor = monitor
        self._healthy = healthy
        self._on_retry = on_retry
        self._clock = clock
        self._routes: list[tuple[str, re.Pattern[str], Callable[[Request], Response]]] = [
            ("GET", re.compile(r"/healthz"), self._healthz),
            ("GET", re.compile(r"/metrics"), self._metrics_page),
            ("GET", re.compile(r"/"), self._dashboard),
            ("POST", re.compile(r"/jobs/([0-9]+)/retry"), self._retry_form),
            ("GET", re.compile(r"/api/openapi.json"), lambda _r: _json(OPENAPI)),
            ("GET", re.compile(r"/api/status"), lambda _r: _json(self._journal.state_counts())),
            ("GET", re.compile(r"/api/studies"), self._api_studies),
            ("GET", re.compile(r"/api/jobs"), self._api_jobs),
            ("GET", re.compile(r"/api/jobs/([0-9]+)"), self._api_job),
            ("POST", re.compile(r"/api/jobs/([0-9]+)/retry"), self._api_retry),
            ("GET", re.compile(r"/api/destinations"), self._api_destinations),
            ("GET", re.compile(r"/api/config"), lambda _r: _json(self._public_config())),
        ]
        web = config.web
        self._httpd = ThreadingHTTPServer((web.host, web.port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._monitor.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="web", daemon=True)
        self._thread.start()
        log.info("web on http://%s:%d", *self.address)
        web = self._config.web
        if web.host not in _LOOPBACK and web.token is None and web.basic_auth is None:
            log.warning(
                "web.host %s: the dashboard and the API, which show patient names and IDs,"
                " are open to every host that reaches this port; set web.token or"
                " web.basic_auth (docs/operations.md 6.1)",
                web.host,
            )

    def stop(self) -> None:
        self._monitor.stop()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # an idle HTTP connection does not hold its thread forever

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server._dispatch(self, "GET")

            def do_HEAD(self) -> None:  # noqa: N802
                server._dispatch(self, "HEAD")

            def do_POST(self) -> None:  # noqa: N802
                server._dispatch(self, "POST")

            def __getattr__(self, name: str) -> Callable[[], None]:
                # Any other method (PUT, DELETE, OPTIONS, ...): 405 or 404 from our
                # own dispatch rather than http.server's HTML 501 page.
                if name.startswith("do_"):
                    return lambda: server._dispatch(self, name[3:])
                raise AttributeError(name)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s", format % args)

        return Handler

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path, _, query = handler.path.partition("?")
        request = Request(
            method, path, _parse_query(query), {k.lower(): v for k, v in handler.headers.items()}
        )
        status, content_type, body = self._respond(request)
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("X-Content-Type-Options", "nosniff")
        handler.send_header(
            "Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'"
        )
        if status == 401:
            handler.send_header("WWW-Authenticate", 'Basic realm="dicom_node"')
        if status == 303:
            handler.send_header("Location", "/")
        if status == 405:
            handler.send_header("Allow", ", ".join(self._allowed_methods(path)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)

    def _respond(self, request: Request) -> Response:
        if request.path != "/healthz" and not self._authorised(request.headers):
            return 401, "text/plain", b"authentication required\n"
        if not self._allowed_methods(request.path):
            return 404, "text/plain", b"not found\n"
        wanted = "GET" if request.method == "HEAD" else request.method
        for method, pattern, view in self._routes:
            match = pattern.fullmatch(request.path)
            if match and method == wanted:
                if method != "GET" and not _same_origin(request.headers):
                    return _error(request.path, 403, "cross-site request refused")
                try:
                    return view(replace(request, params=match.groups()))
                except Exception:
                    log.exception("error serving %s %s", request.method, request.path)
                    return 500, "text/plain", b"internal error\n"
        return _error(request.path, 405, "method not allowed")

    def _allowed_methods(self, path: str) -> list[str]:
        """The methods served on ``path`` (HEAD wherever GET is); empty for an unknown path."""
        methods = [method for method, pattern, _ in self._routes if pattern.fullmatch(path)]
        if "GET" in methods:
            methods.insert(methods.index("GET") + 1, "HEAD")
        return methods

    def _authorised(self, headers: dict[str, str]) -> bool:
        web = self._config.web
        if web.token is None and web.basic_auth is None:
            return True
        # The scheme is case-insensitive (RFC 7235): Bearer, bearer, BEARER.
        scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if (
            web.token is not None
            and scheme == "bearer"
            and hmac.compare_digest(credentials.encode(), web.token.get_secret_value().encode())
        ):
            return True
        if web.basic_auth is not None and scheme == "basic":
            pair = f"{web.basic_auth.username}:{web.basic_auth.password.get_secret_value()}"
            expected = base64.b64encode(pair.encode()).decode()
            return hmac.compare_digest(credentials.encode(), expected.encode())
        return False

    # -- pages ----------------------------------------------------------------

    def _healthz(self, _request: Request) -> Response:
        if self._healthy():
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"not accepting associations, or the journal was replaced\n"

    def _metrics_page(self, _request: Request) -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)

    def _dashboard(self, _request: Request) -> Response:
        problems = self._journal.jobs_in_state(JobState.FAILED) + self._journal.jobs_in_state(
            JobState.DEAD_LETTER
        )
        page = dashboard.render(
            counts=self._journal.state_counts(),
            studies=self._journal.studies_overview(limit=50),
            problems=[
                self._journal.job_detail(row.id) or {}
                for row in sorted(problems, key=lambda r: -r.id)
            ],
            destinations=self._monitor.status(),
            config=self._public_config(),
            refresh_seconds=self._config.web.refresh_seconds,
            now=self._clock(),
        )
        return 200, "text/html; charset=utf-8", page.encode()

    def _retry_form(self, request: Request) -> Response:
        # the same-origin check is done for every POST in _respond
        status, _, body = self._api_retry(request)
        return (303, "text/plain", b"") if status == 200 else (status, JSON, body)

    # -- REST API -------------------------------------------------------------

    def _api_studies(self, request: Request) -> Response:
        return _json(self._journal.studies_overview(limit=_limit(request)))

    def _api_jobs(self, request: Request) -> Response:
        state = request.query.get("state")
        if state is not None:
            try:
                rows = self._journal.jobs_in_state(JobState(state), limit=_limit(request))
            except ValueError:
                known = ", ".join(s.value for s in JobState)
                return _json({"error": f"unknown state {state!r} (known: {known})"}, 400)
        else:
            rows = self._journal.recent_jobs(limit=_limit(request))
        return _json([row._asdict() for row in rows])

    def _api_job(self, request: Request) -> Response:
        job_id = _job_id(request.params[0])
        detail = None if job_id is None else self._journal.job_detail(job_id)
        return _json(detail) if detail is not None else _json({"error": "no such job"}, 404)

    def _api_retry(self, request: Request) -> Response:
        job_id = _job_id(request.params[0])
        if job_id is None:
            return _json({"error": f"no job {request.params[0]}"}, 404)
        try:
            outcome = self._journal.retry_job(job_id, self._clock())
        except LookupError:
            return _json({"error": f"no job {job_id}"}, 404)
        except IllegalTransition as exc:
            return _json({"error": f"job {job_id} cannot be retried: {exc}"}, 409)
        log.info("job %d: retry requested over HTTP: %s", job_id, outcome)
        self._on_retry()
        return _json({"job": job_id, "outcome": outcome})

    def _api_destinations(self, _request: Request) -> Response:
        return _json(
            {
                name: None if status is None else status.__dict__
                for name, status in self._monitor.status().items()
            }
        )

    def _public_config(self) -> dict[str, Any]:
        """The effective configuration; secrets come out as '**********'."""
        return self._config.model_dump(mode="json", exclude_none=True, by_alias=True)


def _parse_query(query: str) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(query))


def _limit(request: Request) -> int:
    try:
        return max(1, min(500, int(request.query.get("limit", "50"))))
    except ValueError:
        return 50


def _job_id(digits: str) -> int | None:
    """The job id in a path, or None for one too large to exist (SQLite's INTEGER is 64-bit)."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(SQLITE_MAX_INTEGER)):
        return None  # and int() is never asked to parse thousands of digits
    value = int(digits)
    return value if value <= SQLITE_MAX_INTEGER else None


def _same_origin(headers: dict[str, str]) -> bool:
    """A browser POST must come from our own pages (no cross-site retry clicks)."""
    origin = headers.get("origin") or headers.get("referer")
    if not origin:
        return True  # not a browser cross-site request
    host = headers.get("host", "")
    return re.match(rf"https?://{re.escape(host)}(/|$)", origin) is not None


def _json(value: Any, status: int = 200) -> Response:
    return status, JSON, json.dumps(value, default=str).encode()


def _error(path: str, status: int, message: str) -> Response:
    """An error in the style of its path: JSON under /api/, plain text elsewhere."""
    if path.startswith("/api/"):
        return _json({"error": message}, status)
    return status, "text/plain", f"{message}\n".encode()
