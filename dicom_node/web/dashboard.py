"""The dashboard page: server-rendered HTML. Every value from a DICOM header or an
error message is untrusted and goes through :func:`esc`."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from dicom_node.web.echo import EchoStatus

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ok{color:#06702a}.bad{color:#b00020;font-weight:bold}
.muted{color:#777}pre{background:#f7f7f7;padding:1em;overflow:auto}
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} s"


def age(then: float | None, now: float) -> str:
    if then is None:
        return ""
    delta = max(0.0, now - then)
    if delta < 120:
        return f"{delta:.0f} s ago"
    if delta < 7200:
        return f"{delta / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(then))


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], css_id: str) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table id='{css_id}'><tr>{head}</tr>{body}</table>"


def stage_times(study: Mapping[str, Any]) -> dict[str, float | None]:
    """Seconds spent per stage for a study's latest job (None where not reached)."""
    jobs = study["jobs"]
    last = jobs[-1] if jobs else None
    completed = study.get("completed_at")
    send = None
    if last and last["finished_at"] is not None and last["analysed_at"] is not None:
        send = last["finished_at"] - last["analysed_at"]
    return {
        "receive": study["last_received_at"] - study["first_received_at"],
        "wait": None if completed is None else completed - study["last_received_at"],
        "analyse": last["analysis_seconds"] if last else None,
        "encode": last["encode_seconds"] if last else None,
        "send": send,
    }


def _study_rows(studies: list[dict[str, Any]], now: float) -> list[list[str]]:
    rows = []
    for study in studies:
        details = study.get("details") or {}
        series = "<br>".join(
            f"{esc(s['modality'])} {esc((s.get('details') or {}).get('SeriesDescription', ''))}"
            f" ({esc(s['instance_count'])})"
            for s in study["series"]
        )
        jobs = "<br>".join(
            f"#{esc(j['id'])} {esc(j['route'])}: {esc(j['state'])}" for j in study["jobs"]
        )
        stages = stage_times(study)
        rows.append(
            [
                esc(study["id"]),
                esc(details.get("PatientName", "")),
                esc(details.get("StudyDescription", "")),
                esc(study["calling_aet"]),
                series,
                esc(study["state"]),
                jobs,
                " / ".join(
                    f"{name} {seconds(value)}"
                    for name, value in stages.items()
                    if value is not None
                ),
                esc(age(study["last_received_at"], now)),
            ]
        )
    return rows


def _problem(job: Mapping[str, Any]) -> str:
    """The job's own error, or why each of its deliveries died."""
    reasons = [job["error"]] if job.get("error") else []
    reasons += [
        f"{d['destination']}: {d['last_error']} (after {d['attempts']} attempt(s))"
        for d in job.get("deliveries", [])
        if d["state"] == "dead"
    ]
    return "<br>".join(esc(reason) for reason in reasons)


def _problem_rows(jobs: list[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            esc(job["id"]),
            esc(job["study_id"]),
            esc(job["route"]),
            f"<span class='bad'>{esc(job['state'])}</span>",
            _problem(job),
            f"<form method='post' action='/jobs/{int(job['id'])}/retry'>"
            f"<button type='submit'>Retry</button></form>",
        ]
        for job in jobs
    ]


def _destination_rows(status: Mapping[str, EchoStatus | None], now: float) -> list[list[str]]:
    rows = []
    for name, result in status.items():
        if result is None:
            state = "<span class='muted'>not checked yet</span>"
        elif result.ok:
            state = "<span class='ok'>echo OK</span>"
        else:
            state = f"<span class='bad'>DOWN</span> {esc(result.error)}"
        rows.append([esc(name), state, esc(age(result.checked_at if result else None, now))])
    return rows


def render(
    counts: Mapping[str, Mapping[str, int]],
    studies: list[dict[str, Any]],
    problems: list[Mapping[str, Any]],
    destinations: Mapping[str, EchoStatus | None],
    config: Mapping[str, Any],
    refresh_seconds: int,
    now: float,
) -> str:
    refresh = f"<meta http-equiv='refresh' content='{refresh_seconds}'>" if refresh_seconds else ""
    summary = " &middot; ".join(
        f"{esc(kind)}: " + ", ".join(f"{esc(k)} {esc(v)}" for k, v in sorted(values.items()))
        for kind, values in counts.items()
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>dicom_node</title>{refresh}<style>{STYLE}</style></head><body>"
        f"<h1>dicom_node</h1><p id='summary'>{summary}</p>"
        "<h2>Studies</h2>"
        + table(
            [
                "#",
                "patient",
                "study",
                "from AE",
                "series (instances)",
                "state",
                "jobs",
                "time per stage",
                "last instance",
            ],
            _study_rows(studies, now),
            "studies",
        )
        + "<h2>Failed and dead-letter jobs</h2>"
        + (
            table(
                ["job", "study", "route", "state", "error", ""], _problem_rows(problems), "problems"
            )
            if problems
            else "<p id='problems'>None.</p>"
        )
        + "<h2>Destinations</h2>"
        + table(["name", "C-ECHO", "checked"], _destination_rows(destinations, now), "destinations")
        + "<h2>Configuration</h2><pre id='config'>"
        + esc(json.dumps(config, indent=2, default=str))
        + "</pre></body></html>"
    )
