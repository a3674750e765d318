"""The audit trail (PS3.15 A.5 event types, JSON lines) and no patient data in logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
import pytest
from nodes import echo_ok, node_settings, running_node, send
from peers import GE_3SLICE, LOCALHOST, Storescp, require_tools, wait_until

from dicom_node.audit import AuditTrail

NAME, PATIENT_ID, BIRTH_DATE = "Privacy^Probe^Zz", "PID-7f3a9", "19450101"


def probe_study() -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    for ds in datasets:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH_DATE
    return datasets


def read_trail(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_trail_and_no_patient_data_in_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_tools("storescp", "echoscu")
    caplog.set_level(logging.INFO)
    with Storescp(tmp_path / "scp") as scp:
        settings = node_settings(
            tmp_path / "var",
            node={"allowed_calling_aets": ["SCANNER"]},
            destinations={"archive": {"ae_title": scp.aet, "host": LOCALHOST, "port": scp.port}},
            routes=[
                {
                    "name": "chest",
                    "when": {"Modality": "CT"},
                    "pipeline": "ct-chest",
                    "send_to": ["archive"],
                }
            ],
        )
        with running_node(settings) as node:
            datasets = probe_study()
            assert send(node, datasets) == [0, 0, 0]
            assert not echo_ok(node.receiver.address[1], calling="INTRUDER")
            scp.wait_for_files(2, timeout=120)
            wait_until(
                lambda: [j.state for j in node.journal.recent_jobs()] == ["done"],
                60,
                0.2,
                "the job to be done",
            )
            job = node.journal.recent_jobs()[0]
    trail_path = tmp_path / "var" / "audit.jsonl"
    trail = read_trail(trail_path)
    events = [(r["event_id"]["code"], r.get("subtype"), r["outcome"]) for r in trail]
    assert events[0] == ("110100", "start", 0) and events[-1] == ("110100", "stop", 0)
    received = [r for r in trail if r["event_id"]["code"] == "110104" and r["action"] == "C"]
    assert {r["sop_instance_uids"][0] for r in received} == {
        str(d.SOPInstanceUID) for d in datasets
    }
    assert all(r["calling_aet"] == "SCANNER" and r["status"] == "0x0000" for r in received)
    alerts = [r for r in trail if r["event_id"]["code"] == "110113"]
    assert [a["calling_aet"] for a in alerts] == ["INTRUDER"]
    assert any(r["event_id"]["code"] == "110114" and r["calling_aet"] == "SCANNER" for r in trail)
    sent = [r for r in trail if r["event_id"]["code"] == "110104" and r["action"] == "R"]
    assert sent and set(sent[-1]["sop_instance_uids"]) == {job.seg_sop_uid, job.sr_sop_uid}
    text = trail_path.read_text()
    for secret in (NAME, "Privacy", PATIENT_ID, BIRTH_DATE):
        assert secret not in text
        assert secret not in caplog.text, f"{secret!r} logged at INFO or above"
    # append-only: a second run adds to the same file
    with running_node(settings):
        pass
    again = read_trail(trail_path)
    assert again[: len(trail)] == trail and len(again) == len(trail) + 2


def test_refused_connections_are_audited_at_most_once_a_minute_per_reason(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    trail = AuditTrail(tmp_path / "audit.jsonl", lambda: now[0])
    trail.open()
    for second in range(5):  # a flood from one address
        now[0] = 1000.0 + second
        trail.connection_refused("10.1.2.3", "node.max_connections (6) reached")
    trail.connection_refused("10.1.2.4", "node.max_connections (6) reached")
    now[0] = 1061.0
    trail.connection_refused("10.1.2.3", "node.max_connections (6) reached")
    trail.close()
    records = read_trail(tmp_path / "audit.jsonl")
    assert [(r["address"], r.get("left_out")) for r in records] == [
        ("10.1.2.3", None),
        ("10.1.2.4", None),
        ("10.1.2.3", 4),  # the four of the first minute, counted in the next record
    ]
    assert all(r["event_id"]["meaning"] == "Security Alert" and r["outcome"] == 4 for r in records)
