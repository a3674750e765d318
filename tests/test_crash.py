"""SIGKILL while dcmtk's storescu is sending: no acknowledged instance is lost."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from nodes import NodeProcess, node_settings, partial_files
from peers import (
    LOCALHOST,
    PHILIPS_B,
    PHILIPS_L,
    peer_env,
    require_tools,
    storescu,
    tool_path,
    wait_until,
)

from dicom_node.journal import Journal


def acknowledged(storescu_output: str) -> list[Path]:
    """Files storescu saw a successful C-STORE response for (from its -v log)."""
    current, done = None, []
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_sigkill_during_receive_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    require_tools("storescu")
    settings = node_settings(tmp_path / "var", completion={"study_idle_seconds": 2})
    files = sorted(PHILIPS_L.glob("*.dcm")) + sorted(PHILIPS_B.glob("*.dcm"))
    node = NodeProcess(settings, tmp_path / "node").start()
    instances = tmp_path / "var" / "instances"
    sender = subprocess.Popen(
        [
            tool_path("storescu"),
            "-v",
            "-aec",
            "AINODE",
            "-aet",
            "SCANNER",
            "-to",
            "10",
            LOCALHOST,
            str(node.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=peer_env(),
    )
    wait_until(lambda: len(list(instances.glob("*/*.dcm"))) >= 20, 60, 0.005, "20 stored files")
    node.kill()
    output, _ = sender.communicate(timeout=60)
    acked = acknowledged(output)
    # killed mid-series: some acknowledged (stored ones may not be acknowledged yet), not all
    assert 10 <= len(acked) < len(files), output[-2000:]

    with NodeProcess(settings, tmp_path / "node") as restarted:
        journal = Journal(tmp_path / "var" / "journal.sqlite")
        stored = {
            pydicom.dcmread(tmp_path / "var" / relpath, stop_before_pixels=True).SOPInstanceUID
            for relpath in journal.all_instance_relpaths()
        }
        for path in acked:
            assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID in stored
        assert partial_files(tmp_path / "var" / "tmp") == []
        # the scanner sends the whole series again; what was stored is acknowledged again
        again = storescu(LOCALHOST, restarted.port, "AINODE", files, calling_aet="SCANNER")
        assert again.returncode == 0
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert journal.study_instance_count(study_uid) == len(files)
        assert len(journal.all_instance_relpaths()) == len(files)
        wait_until(
            lambda: [s.state for s in journal.recent_studies()] == ["complete"],
            30,
            0.1,
            "study completion after restart",
        )
        journal.close()
    assert restarted.proc is not None and restarted.proc.returncode == 0


def test_instance_files_missing_from_the_journal_are_indexed_again(tmp_path: Path) -> None:
    """A receive commit is not WAL-synced: after a power failure the file may outlive its row.

    The file was fsynced before the success status, so it is indexed again at start from
    its own bytes (sender AE from the file meta); a stray file that is not DICOM is moved
    to quarantine/, never deleted.
    """
    import sqlite3

    from nodes import running_node, send
    from peers import GE_3SLICE

    settings = node_settings(tmp_path / "var")
    datasets = [pydicom.dcmread(path) for path in sorted(GE_3SLICE.glob("*.dcm"))[:2]]
    with running_node(settings) as node:
        assert send(node, datasets, calling="SCANNER") == [0, 0]
        stored = node.journal.all_instance_relpaths()
    assert len(stored) == 2
    lost = sorted(stored)[0]
    with sqlite3.connect(tmp_path / "var" / "journal.sqlite") as db:  # the row a crash lost
        db.execute("DELETE FROM instances WHERE relpath = ?", (lost,))
    stray = tmp_path / "var" / "instances" / "ab" / "stray.dcm"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"never acknowledged")
    with running_node(settings) as node:
        assert node.journal.all_instance_relpaths() == stored
        assert not stray.exists()
        assert (tmp_path / "var" / "quarantine" / "stray.dcm").read_bytes() == b"never acknowledged"
        with sqlite3.connect(tmp_path / "var" / "journal.sqlite") as db:
            row = db.execute(
                "SELECT calling_aet, sop_uid FROM instances WHERE relpath = ?", (lost,)
            ).fetchone()
        assert row[0] == "SCANNER"
        assert row[1] in {str(ds.SOPInstanceUID) for ds in datasets}
        # a resend of both is acknowledged without storing anything twice
        assert send(node, datasets, calling="SCANNER") == [0, 0]
        assert node.journal.all_instance_relpaths() == stored
