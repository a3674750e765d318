"""OpenAPI 3.1 description of the REST API, served at ``/api/openapi.json``."""

from __future__ import annotations

from typing import Any

from dicom_node import __version__

_JOB_STATES = ["queued", "analysing", "sending", "done", "failed", "dead_letter", "superseded"]


_UNAUTHORISED = {"description": "authentication required (web.token / web.basic_auth)"}
_ERROR = {
    "application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}
}


def _get(
    summary: str, schema: dict[str, Any], errors: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
        "401": _UNAUTHORISED,
    }
    for status, description in (errors or {}).items():
        responses[status] = {"description": description, "content": _ERROR}
    return {"get": {"summary": summary, "responses": responses, **extra}}


_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 500},
}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}
_OBJECT = {"type": "object"}
_LIST = {"type": "array", "items": {"type": "object"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "dicom_node",
        "version": __version__,
        "description": "Read the node's journal and retry failed work. Every endpoint but "
        "/healthz needs 'Authorization: Bearer <web.token>' or basic auth when configured "
        "(the scheme is case-insensitive). HEAD is answered like GET, without the body. Any "
        "other method a path does not list answers 405 with an Allow header (JSON "
        '{"error": ...} under /api/); unknown paths answer 404. A POST whose Origin or Referer '
        "is not this host is refused with 403; send neither (curl, scripts) or this host's. "
        "DICOM header text in responses is untrusted input: escape it before display.",
    },
    "paths": {
        "/healthz": {
            "get": {
                "summary": "200 while the node accepts associations, else 503",
                "responses": {"200": {"description": "ok"}, "503": {"description": "down"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text exposition",
                "responses": {"200": {"description": "metrics"}},
            }
        },
        "/api/status": _get(
            "Counts by state of studies, jobs, deliveries; instance total", _OBJECT
        ),
        "/api/studies": _get(
            "Recent studies with their series, jobs, stage timestamps and display details",
            _LIST,
            parameters=[_LIMIT],
        ),
        "/api/jobs": _get(
            "Recent jobs, optionally only those in one state",
            _LIST,
            {"400": "unknown state"},
            parameters=[_LIMIT, {"name": "state", "in": "query", "schema": {"enum": _JOB_STATES}}],
        ),
        "/api/jobs/{job_id}": _get(
            "One job with its deliveries (404 if unknown)",
            _OBJECT,
            {"404": "no such job"},
            parameters=[_JOB_ID],
        ),
        "/api/jobs/{job_id}/retry": {
            "post": {
                "summary": "Retry a failed job (analyse again) or a dead-letter job (resend)",
                "parameters": [_JOB_ID],
                "responses": {
                    "200": {"description": "retried; body says what was done"},
                    "401": _UNAUTHORISED,
                    "403": {
                        "description": "cross-site request refused (Origin/Referer not this host)",
                        "content": _ERROR,
                    },
                    "404": {"description": "no such job", "content": _ERROR},
                    "409": {
                        "description": "the job is not failed or dead-lettered",
                        "content": _ERROR,
                    },
                },
            }
        },
        "/api/destinations": _get("Latest C-ECHO result per destination", _OBJECT),
        "/api/config": _get("The effective configuration, secrets masked", _OBJECT),
    },
}
