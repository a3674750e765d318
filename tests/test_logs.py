"""Log formats and the id context (dicom_node.logs), in-process and through the CLI."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from peers import LOCALHOST, free_port

from dicom_node.logs import ProcessFilter, log_context, make_handler


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A private logger writing JSON lines to a buffer (the root logger is left alone)."""
    stream = io.StringIO()
    handler = make_handler("json", stream)
    logger = logging.getLogger("dicom_node.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_ids_only_inside_the_context(captured) -> None:
    logger, stream, _ = captured
    logger.info("before %s", "any")
    with log_context(study_id=3, calling_aet="SCANNER"):
        logger.warning("stored %d of %d", 1, 2)
        with log_context(job_id=12, study_id=4):
            logger.info("nested")
        logger.info("back")
    logger.info("after")
    before, stored, nested, back, after = lines(stream)
    assert stored["msg"] == "stored 1 of 2"
    assert stored["level"] == "WARNING" and stored["logger"] == "dicom_node.test_logs"
    assert datetime.fromisoformat(str(stored["ts"])).utcoffset().total_seconds() == 0
    assert (stored["study_id"], stored["calling_aet"]) == (3, "SCANNER")
    assert "job_id" not in stored
    assert (nested["study_id"], nested["job_id"], nested["calling_aet"]) == (4, 12, "SCANNER")
    assert (back["study_id"], back["calling_aet"]) == (3, "SCANNER") and "job_id" not in back
    for outside in (before, after):
        assert not {"study_id", "job_id", "calling_aet", "exc"} & set(outside)


def test_context_is_restored_after_an_exception_and_exceptions_are_serialised(captured) -> None:
    logger, stream, _ = captured
    with pytest.raises(RuntimeError), log_context(job_id=7):
        try:
            raise RuntimeError("decoder exploded")
        except RuntimeError:
            logger.exception("job failed")
            raise
    logger.error("outside")
    failed, outside = lines(stream)
    assert failed["job_id"] == 7 and failed["msg"] == "job failed"
    assert "Traceback" in str(failed["exc"]) and "RuntimeError: decoder exploded" in failed["exc"]
    assert "job_id" not in outside and "exc" not in outside


def test_context_does_not_leak_into_other_threads(captured) -> None:
    logger, stream, _ = captured
    with log_context(study_id=1):
        thread = threading.Thread(target=logger.info, args=("from a thread",))
        thread.start()
        thread.join()
    (line,) = lines(stream)
    assert "study_id" not in line


def test_explicit_extra_wins_and_unknown_ids_are_refused(captured) -> None:
    logger, stream, _ = captured
    with log_context(job_id=1, study_id=None):
        logger.info("explicit", extra={"job_id": 2})
    (line,) = lines(stream)
    assert line["job_id"] == 2 and "study_id" not in line
    with pytest.raises(ValueError, match="patient_id"), log_context(patient_id="X"):
        pass


def test_text_format_appends_ids() -> None:
    stream = io.StringIO()
    handler = make_handler("text", stream)
    record = logging.LogRecord("dicom_node.x", logging.INFO, __file__, 1, "sent %s", ("a",), None)
    with log_context(study_id=5, job_id=9):
        handler.handle(record)
    plain = logging.LogRecord("dicom_node.x", logging.INFO, __file__, 1, "idle", (), None)
    handler.handle(plain)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("INFO    dicom_node.x: sent a [study=5 job=9]")
    assert second.endswith("dicom_node.x: idle")
    with pytest.raises(ValueError, match="'xml'"):
        make_handler("xml")


def test_a_text_record_is_one_line_whatever_its_values_hold() -> None:
    """A peer's AE title with CR LF (pynetdicom quotes it in its own message) must not
    start a line that reads like a record of its own; a traceback keeps its lines."""
    stream = io.StringIO()
    handler = make_handler("text", stream)
    forged = "EVIL\r\n2026-12-06 00:00:00,000 INFO    dicom_node: all fine\x1b[0m"
    record = logging.LogRecord(
        "pynetdicom.acse", logging.ERROR, __file__, 1, "Invalid AE '%s'", (forged,), None
    )
    with log_context(calling_aet="A\nB"):
        handler.handle(record)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.LogRecord(
            "dicom_node.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    handler.handle(failed)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(
        "pynetdicom.acse: Invalid AE 'EVIL\\x0d\\x0a2026-12-06 00:00:00,000 INFO    "
        "dicom_node: all fine\\x1b[0m' [aet=A\\x0aB]"
    ), lines[0]
    assert lines[1].endswith("dicom_node.x: failed")
    assert lines[2] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: boom"


def test_a_receiving_process_names_itself_on_each_record() -> None:
    records = []
    for fmt in ("text", "json"):
        stream = io.StringIO()
        handler = make_handler(fmt, stream)
        handler.addFilter(ProcessFilter("receiver-2"))
        record = logging.LogRecord("dicom_node.x", logging.INFO, __file__, 1, "stored", (), None)
        with log_context(calling_aet="CT1"):
            handler.handle(record)
        records.append(stream.getvalue().strip())
    text, line = records
    assert text.endswith("dicom_node.x: stored [aet=CT1 process=receiver-2]")
    assert json.loads(line)["process"] == "receiver-2"


def run_cli(*args: str | Path, env_format: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DICOM_NODE_LOG_FORMAT"}
    if env_format is not None:
        env["DICOM_NODE_LOG_FORMAT"] = env_format
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def failed_job_config(tmp_path: Path) -> tuple[Path, int]:
    """A journal with one failed job, and a config pointing at it."""
    import time

    from test_assemble import Clock, Harness

    harness = Harness(tmp_path / "var", Clock(time.time()))
    job = harness.claimed_job()
    harness.journal.job_failed(job.id, "AnalysisError: no lungs", harness.clock.now)
    harness.journal.close()
    config = tmp_path / "node.yaml"
    settings = {"node": {"ae_title": "AINODE"}, "storage": {"path": str(tmp_path / "var")}}
    config.write_text(yaml.safe_dump(settings))
    return config, job.id


def test_cli_writes_json_log_lines_with_the_job_id(tmp_path: Path) -> None:
    config, job_id = failed_job_config(tmp_path)
    result = run_cli("--log-format", "json", "retry", "--config", config, str(job_id))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    audit = [r for r in records if r["logger"] == "dicom_node.ops"]
    assert audit == [
        {
            "ts": audit[0]["ts"],
            "level": "INFO",
            "logger": "dicom_node.ops",
            "msg": "operator retry: queued for analysis again",
            "job_id": job_id,
        }
    ]


def test_cli_log_format_from_environment_and_text_default(tmp_path: Path) -> None:
    config, job_id = failed_job_config(tmp_path)
    text = run_cli("retry", "--config", config, str(job_id))
    assert text.returncode == 0, text.stderr
    assert f"dicom_node.ops: operator retry: queued for analysis again [job={job_id}]" in (
        text.stderr
    )
    json_config, json_job = failed_job_config(tmp_path / "json")
    as_json = run_cli("retry", "--config", json_config, str(json_job), env_format="json")
    assert as_json.returncode == 0, as_json.stderr
    records = [json.loads(line) for line in as_json.stderr.splitlines()]
    assert [r["msg"] for r in records if r["logger"] == "dicom_node.ops"] == [
        "operator retry: queued for analysis again"
    ]
    bad = run_cli("status", "--config", config, env_format="xml")
    assert bad.returncode == 2
    assert "log format 'xml' is not one of ['text', 'json']" in bad.stderr
    port = free_port()
    settings = {
        "node": {"ae_title": "AINODE"},
        "destinations": {"pacs": {"ae_title": "P", "host": LOCALHOST, "port": port}},
    }
    config.write_text(yaml.safe_dump(settings))
    refused = run_cli("echo", "--config", config, "pacs", env_format="json")
    assert refused.returncode == 1
    # the CLI's own message stays plain text and carries the reason; pynetdicom's own
    # lines for the failed connection are not logged
    assert refused.stderr.splitlines() == [
        f"echo pacs: FAILED: association with P@{LOCALHOST}:{port} was not established:"
        " [Errno 111] Connection refused"
    ], refused.stderr


_VALUE_QUOTING = """
import warnings
import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from dicom_node.logs import configure_logging

configure_logging("DEBUG")
hd.sr.PnameContentItem(  # highdicom checks the name: a UserWarning quoting it
    name=codes.DCM.PersonObserverName,
    value="Lung_Dx-A0001",
    relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT,
)
Dataset().PatientBirthDate = "1979-02-30"  # pydicom: a warning and a WARNING record
import logging
logging.getLogger("dicom_node").info("still logging")
"""


def test_pydicom_and_highdicom_do_not_put_element_values_in_the_log() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _VALUE_QUOTING], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Lung_Dx-A0001" not in done.stderr and "1979-02-30" not in done.stderr, done.stderr
    assert "dicom_node: still logging" in done.stderr  # DEBUG: everything else is logged


_UID_CHECKS = """
import struct
import sys
sys.path.insert(0, "tests")
import pdus
import pydicom.valuerep as valuerep
from pynetdicom import StoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_RQ
from dicom_node.logs import configure_logging

checked = [0]
check_ui = valuerep.VALIDATORS["UI"]
def counting(*args, **kwargs):
    checked[0] += 1
    return check_ui(*args, **kwargs)
valuerep.VALIDATORS["UI"] = counting

contexts = b"".join(
    pdus.presentation_context(2 * i + 1, str(cx.abstract_syntax), [pdus.IMPLICIT_VR_LE])
    for i, cx in enumerate(StoragePresentationContexts)
)
fixed = struct.pack(">HH", 1, 0) + b"AINODE".ljust(16) + b"SCANNER".ljust(16) + bytes(32)
user = pdus._item(0x50, pdus._item(0x51, struct.pack(">L", 16384)) + pdus._item(0x52, b"1.2.3"))
application = pdus._item(0x10, pdus.APPLICATION_CONTEXT.encode())
rq = pdus.pdu(pdus.A_ASSOCIATE_RQ, fixed + application + contexts + user)
def decoded():
    checked[0] = 0
    request = A_ASSOCIATE_RQ()
    request.decode(rq)
    found = request.to_primitive().presentation_context_definition_list
    assert len(found) == len(StoragePresentationContexts) == 120
    return checked[0]
before = decoded()
configure_logging("INFO")
print(before, decoded())
"""


def test_the_uids_of_an_association_request_are_not_matched_only_to_warn() -> None:
    """pydicom matched every UID pynetdicom decodes against a regular expression only to
    warn (warnings the node does not show): a quarter of the set-up of an association
    that proposes 120 contexts."""
    done = subprocess.run(
        [sys.executable, "-c", _UID_CHECKS],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    before, after = (int(count) for count in done.stdout.split())
    assert before > 256 and after == 0, done.stdout


_EVENT_HANDLERS = """
import logging, sys
from pynetdicom import AE, evt
from pynetdicom.association import Association
from dicom_node.logs import configure_logging, quiet_pynetdicom_events

configure_logging("DEBUG")  # the node's own DEBUG: pynetdicom stays at WARNING
if sys.argv[1] == "info":  # someone looking at pynetdicom's own messages
    logging.getLogger("pynetdicom").setLevel(logging.INFO)
quiet_pynetdicom_events()
assoc = Association(AE(), mode="requestor")
print(len(assoc.get_handlers(evt.EVT_PDU_RECV)), len(assoc.get_handlers(evt.EVT_DIMSE_SENT)))
"""


@pytest.mark.parametrize(("pynetdicom_level", "bound"), [("warning", "0 0"), ("info", "1 1")])
def test_pynetdicom_formats_no_messages_that_its_logger_drops(
    pynetdicom_level: str, bound: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _EVENT_HANDLERS, pynetdicom_level],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == bound.split(), done.stdout
