"""Operator commands: ``rules explain``, ``status`` and ``retry`` (real entry point)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from peers import GE_3SLICE, PHILIPS_L
from pydicom import Dataset
from pydicom.uid import generate_uid
from test_assemble import IDLE, Clock, Harness, ge_files

from dicom_node.config import parse_config
from dicom_node.domain import DeliveryState, JobState
from dicom_node.journal import DeliverySpec, Journal
from dicom_node.route import explain, rule_matches

ROUTES = [
    {"name": "chest-ct", "when": {"Modality": "CT", "SeriesDescription": {"contains": "mm"}}},
    {"name": "ge-ct", "when": {"Manufacturer": {"regex": "^GE"}, "Modality": ["CT", "PT"]}},
    {"name": "mr-brain", "when": {"Modality": "MR", "BodyPartExamined": {"present": True}}},
    {"name": "named", "when": {"PatientName": "nobody"}},
]


def settings(storage: Path, routes: list[dict] | None = None) -> dict:
    return {
        "node": {"ae_title": "AINODE"},
        "storage": {"path": str(storage)},
        "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 104}},
        "routes": [
            {"pipeline": "ct-chest", "send_to": ["pacs"], **route} for route in (routes or [])
        ],
    }


def write_config(tmp_path: Path, routes: list[dict] | None = None) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(settings(tmp_path / "var", routes), sort_keys=False))
    return path


def cli(*args: str | Path | int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- rules explain --------------------------------------------------------------------------


def ge_variant(folder: Path, **attrs: object) -> str:
    """Copies of the GE series as a new series with ``attrs`` changed; returns its UID."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for path in sorted(GE_3SLICE.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(folder / path.name, enforce_file_format=True)
    return series_uid


def series_blocks(stdout: str) -> dict[str, list[str]]:
    """stdout of ``rules explain`` as series UID -> that series' lines."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("series "):
            current = blocks.setdefault(line.split()[1].rstrip(":"), [line])
        elif line.startswith("  "):
            current.append(line.strip())
    return blocks


def uid_of(folder: Path) -> str:
    first = sorted(p for p in folder.iterdir() if p.is_file())[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def test_rules_explain_on_real_series(tmp_path: Path) -> None:
    config = write_config(tmp_path, ROUTES)
    scout = ge_variant(
        tmp_path / "scout",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        SeriesDescription="scout 5mm",
    )
    sagittal = ge_variant(tmp_path / "sag", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    (tmp_path / "notes.txt").write_text("not DICOM")
    folders = [PHILIPS_L, GE_3SLICE, tmp_path / "scout", tmp_path / "sag"]
    result = cli("rules", "explain", "--config", config, *folders, tmp_path / "notes.txt")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"skipped (not a DICOM file): {tmp_path / 'notes.txt'}" in out
    assert "4 series, 2 would create jobs, 1 file(s) skipped (not DICOM)" in out
    assert "Lung_Dx" not in out and "A0001" not in out  # no patient name or ID
    blocks = series_blocks(out)
    philips, ge = blocks[uid_of(PHILIPS_L)], blocks[uid_of(GE_3SLICE)]
    assert "modality CT, number 2, description '5mm', 64 instance(s)" in philips[0]
    assert philips[1:] == [
        "route chest-ct: MATCH",
        "route ge-ct: no match: Manufacturer: 'Philips' does not match regex '^GE'",
        "route mr-brain: no match: Modality: 'CT' is not 'MR'",
        "route mr-brain: no match: BodyPartExamined: missing",
        "route named: no match: PatientName: <patient data not shown> is not 'nobody'",
        "verdict: would create jobs for routes chest-ct",
    ]
    assert "3 instance(s)" in ge[0]
    assert "route chest-ct: no match: SeriesDescription: empty" in ge
    assert "route ge-ct: MATCH" in ge
    assert ge[-1] == "verdict: would create jobs for routes ge-ct"
    assert {"route chest-ct: MATCH", "route ge-ct: MATCH"} <= set(blocks[scout])
    assert blocks[scout][-2:] == [
        "not analysable: localizer/scout image",
        "verdict: nothing (not analysed: localizer/scout image)",
    ]
    assert blocks[sagittal][-2].startswith("not analysable: not axial (slice normal")
    assert blocks[sagittal][-1].startswith("verdict: nothing (not analysed: not axial")


def test_rules_explain_with_no_matching_route(tmp_path: Path) -> None:
    config = write_config(tmp_path, ROUTES[2:3])
    result = cli("rules", "explain", "--config", config, GE_3SLICE)
    assert result.returncode == 0, result.stderr
    assert "verdict: nothing (no route matches)" in result.stdout
    missing = cli("rules", "explain", "--config", config, tmp_path / "nowhere")
    assert missing.returncode == 2  # a usage error, as for send and evaluate
    assert "no such file or folder" in missing.stderr


def random_header(rng: random.Random) -> Dataset:
    ds = Dataset()
    choices: dict[str, list[object]] = {
        "Modality": ["CT", "MR", "PT", "", None],
        "SeriesDescription": ["Chest 5mm", "LUNG 1mm", "abc", "", None],
        "BodyPartExamined": ["CHEST", "ABDOMEN", "", None],
        "ImageType": [["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY"], "ORIGINAL"],
        "SliceThickness": ["5.0", "1.25", "5", None],
        "Manufacturer": ["GE MEDICAL SYSTEMS", "Philips", "SIEMENS", None],
    }
    for keyword, options in choices.items():
        value = rng.choice(options)
        if value is not None:
            setattr(ds, keyword, value)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    return ds


PROPERTY_RULES = [
    {"Modality": "CT"},
    {"Modality": ["CT", "PT"], "SliceThickness": 5},
    {"SeriesDescription": {"contains": "lung"}},
    {"SeriesDescription": {"regex": r"\d+mm$"}, "ImageType": "AXIAL"},
    {"BodyPartExamined": {"present": True}},
    {"BodyPartExamined": {"present": False}},
    {"Modality": {"not": ["MR", "PT"]}, "Manufacturer": {"equals": "Philips"}},
    {"ImageType": {"one_of": ["DERIVED", "LOCALIZER"]}, "SliceThickness": {"not": 1.25}},
    {},
]


def test_explain_never_disagrees_with_rule_matches() -> None:
    routes = parse_config(
        settings(Path("var"), [{"name": f"r{i}", "when": w} for i, w in enumerate(PROPERTY_RULES)])
    ).routes
    rng = random.Random(1234)
    seen = set()
    for _ in range(500):
        header = random_header(rng)
        result = explain(routes, header, 10)
        assert list(result.matching) == [r for r in routes if rule_matches(r.when, header)]
        for route, verdict in zip(routes, result.verdicts, strict=True):
            failing = [k for k in route.when if not rule_matches({k: route.when[k]}, header)]
            assert len(verdict.reasons) == len(failing)
            assert [reason.split(":")[0] for reason in verdict.reasons] == failing
            seen.add(verdict.matches)
        assert result.jobs == tuple(r.name for r in result.matching)  # analysable header
    assert seen == {True, False}


# -- status and retry -----------------------------------------------------------------------


def prepared_journal(root: Path) -> dict[str, int]:
    """One study, re-opened twice by late instances: a failed, a dead-letter, a done job."""
    harness = Harness(root, Clock(time.time() - 600))
    jobs: dict[str, int] = {}
    for name, late_uid in zip(
        ("failed", "dead", "done"), (None, "1.2.3.9.1", "1.2.3.9.2"), strict=True
    ):
        if late_uid is None:
            for path in ge_files():
                harness.receive(path)
        else:
            harness.receive(ge_files()[0], sop_uid=late_uid)
        harness.clock.now += IDLE
        harness.timers.fire_due(harness.clock.now)
        job = harness.journal.claim_job(harness.clock.now)
        assert job is not None
        jobs[name] = job.id
        if name == "failed":
            harness.journal.job_failed(job.id, "AnalysisError: no lungs", harness.clock.now)
            continue
        spec = DeliverySpec("pacs", "P", "127.0.0.1", 104)
        harness.journal.job_analysed(job.id, [spec], harness.clock.now)
        (delivery,) = harness.journal.job_deliveries(job.id)
        outcome = DeliveryState.DEAD if name == "dead" else DeliveryState.SENT
        harness.journal.delivery_attempted(delivery.id, outcome, harness.clock.now, "refused")
    harness.journal.close()
    return jobs


def test_status_text_and_json(tmp_path: Path) -> None:
    jobs = prepared_journal(tmp_path / "var")
    config = write_config(tmp_path)
    result = cli("status", "--config", config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"journal: {tmp_path / 'var' / 'journal.sqlite'}" in out
    assert "studies:    complete 1" in out
    assert "jobs:       dead_letter 1, done 1, failed 1" in out
    assert "deliveries: dead 1, sent 1" in out
    assert "instances:  total 5" in out
    assert "recent jobs (last 3):" in out
    assert "dead-letter jobs (1):" in out and "failed jobs (1):" in out
    failed_rows = [line for line in out.splitlines() if line.split()[:1] == [str(jobs["failed"])]]
    assert len(failed_rows) == 2  # in the recent jobs and in the failed jobs
    assert failed_rows[0].split()[1:5] == ["1", "ct", "ct-chest", "failed"]
    assert failed_rows[0].endswith("AnalysisError: no lungs")
    lines = out.splitlines()
    at = lines.index("         delivery to pacs (P): dead after 1 attempt(s):")
    assert lines[at + 1] == "           refused"  # whole, on its own line (it was cut at 60)

    data = json.loads(cli("status", "--config", config, "--json", "--limit", "2").stdout)
    assert data["counts"]["jobs"] == {"failed": 1, "dead_letter": 1, "done": 1}
    assert [job["id"] for job in data["recent_jobs"]] == [jobs["done"], jobs["dead"]]
    (dead,) = data["dead_letter_jobs"]
    assert dead["id"] == jobs["dead"] and dead["deliveries"][0]["last_error"] == "refused"
    (failed,) = data["failed_jobs"]
    assert failed["error"] == "AnalysisError: no lungs" and failed["age_seconds"] > 500


def test_status_and_retry_without_a_journal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    journal_path = tmp_path / "var" / "journal.sqlite"
    for args in (("status",), ("retry", "--failed")):
        result = cli(*args, "--config", config)
        assert result.returncode == 1
        assert f"no journal at {journal_path}" in result.stderr
    assert not journal_path.exists() and not (tmp_path / "var").exists()
    usage = cli("retry", "--config", config)
    assert usage.returncode == 2 and "give JOB_IDs, --dead-letter or --failed" in usage.stderr
    assert "usage: dicom-node retry" in usage.stderr  # its own usage, not the top level one


def test_retry_failed_and_dead_letter_jobs(tmp_path: Path) -> None:
    jobs = prepared_journal(tmp_path / "var")
    config = write_config(tmp_path)
    result = cli("retry", "--config", config, "--dead-letter", "--failed")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"job {jobs['dead']}: retried: 1 delivery(ies) pending again" in result.stdout
    assert f"job {jobs['failed']}: retried: queued for analysis again" in result.stdout
    assert "a running node picks this up by itself" in result.stdout
    journal = Journal(tmp_path / "var" / "journal.sqlite")
    try:
        assert journal.job(jobs["failed"]).state == JobState.QUEUED
        assert journal.job(jobs["dead"]).state == JobState.SENDING
        (delivery,) = journal.job_deliveries(jobs["dead"])
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0
        assert journal.job(jobs["done"]).state == JobState.DONE
    finally:
        journal.close()
    again = cli("retry", "--config", config, "--failed")
    assert again.returncode == 0 and again.stdout.strip() == "no jobs to retry"


@pytest.mark.parametrize("which", ["done", "unknown"])
def test_retry_refuses_jobs_that_cannot_be_retried(tmp_path: Path, which: str) -> None:
    jobs = prepared_journal(tmp_path / "var")
    config = write_config(tmp_path)
    job_id = jobs["done"] if which == "done" else 999
    result = cli("retry", "--config", config, jobs["failed"], job_id)
    assert result.returncode == 1
    assert f"job {jobs['failed']}: retried: queued for analysis again" in result.stdout
    expected = {
        "done": f"job {job_id}: not retried: it is done; only failed and dead_letter jobs "
        "can be retried (job retry: illegal transition done -> sending)",
        "unknown": f"job {job_id}: not retried: no such job",
    }
    assert expected[which] in result.stdout
    journal = Journal(tmp_path / "var" / "journal.sqlite")
    try:
        states = {name: journal.job(i).state for name, i in jobs.items()}
    finally:
        journal.close()
    assert states == {"failed": "queued", "dead": "dead_letter", "done": "done"}


def test_property_rules_cover_every_operator() -> None:
    used = {
        op
        for when in PROPERTY_RULES
        for test in when.values()
        if isinstance(test, dict)
        for op in test
    }
    assert used == {"contains", "regex", "present", "not", "equals", "one_of"}


def test_a_journal_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    """A wrong file restored in its place: every command says so, without a traceback."""
    config = write_config(tmp_path)
    journal = Path(parse_config(yaml.safe_load(config.read_text())).storage.path)
    journal.mkdir(parents=True, exist_ok=True)
    (journal / "journal.sqlite").write_bytes(b"not a database, not even close\n" * 64)
    expected = "journal.sqlite cannot be read (file is not a database): restore it from a backup"
    for args in (("status",), ("retry", "--failed"), ("migrate",)):
        done = cli(*args, "--config", config)
        assert done.returncode == 1, (args, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert done.stderr.count(str(journal / "journal.sqlite")) == 1, done.stderr


def test_status_into_a_reader_that_stops_early_is_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dicom-node status | head -1`` ended in a BrokenPipeError traceback once the reader
    had gone: here its stdout is a pipe whose reading end is closed."""
    import os

    from dicom_node import cli as cli_module

    prepared_journal(tmp_path / "var")
    config = write_config(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w", buffering=1) as gone:  # each line is written at once
        monkeypatch.setattr(sys, "stdout", gone)
        assert cli_module.main(["status", "--config", str(config)]) == 1
