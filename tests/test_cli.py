"""``dicom-node echo`` and ``dicom-node send`` against dcmtk's storescp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import yaml
from peers import GE_3SLICE, LOCALHOST, Storescp, free_port, require_tools


def write_config(tmp_path: Path, port: int, host: str = LOCALHOST) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "AINODE"},
                "destinations": {"archive": {"ae_title": "STORESCP", "host": host, "port": port}},
            }
        )
    )
    return path


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_echo_and_send(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu")
    with Storescp(tmp_path / "scp") as scp:
        config = write_config(tmp_path, scp.port)
        echo = cli("echo", "--config", config, "archive")
        assert echo.returncode == 0, echo.stderr
        assert "echo archive (STORESCP@127.0.0.1" in echo.stdout
        (tmp_path / "not-dicom.txt").write_text("hello")
        send = cli("send", "--config", config, "archive", GE_3SLICE, tmp_path / "not-dicom.txt")
        assert send.returncode == 0, send.stderr
        assert "sent 3 file(s) to archive" in send.stdout
        assert "skipped (not a DICOM file)" in send.stderr
        received = scp.wait_for_files(3)
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in GE_3SLICE.glob("*.dcm")}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in received} == sent


def test_echo_and_send_failures_are_clear(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())  # nobody listens there
    echo = cli("echo", "--config", config, "archive")
    assert echo.returncode == 1
    assert "echo archive: FAILED: association with STORESCP" in echo.stderr
    assert "was not established: [Errno 111] Connection refused" in echo.stderr
    assert "TCP Initialisation Error" not in echo.stderr  # said once, by the node
    unknown = cli("echo", "--config", config, "nowhere")
    assert unknown.returncode == 2
    assert "unknown destination 'nowhere' (known: archive)" in unknown.stderr
    send = cli("send", "--config", config, "archive", GE_3SLICE)
    assert send.returncode == 1
    assert "send archive: FAILED" in send.stderr
    missing = cli("send", "--config", config, "archive", tmp_path / "no-such-folder")
    assert missing.returncode == 2
    assert "no such file or folder" in missing.stderr


def test_a_destination_host_that_does_not_resolve_is_a_clear_failure(tmp_path: Path) -> None:
    config = write_config(tmp_path, 104, host="no-such-host.invalid")  # RFC 2606: never resolves
    for command in ("echo", "send"):
        args = (GE_3SLICE,) if command == "send" else ()
        done = cli(command, "--config", config, "archive", *args)
        assert done.returncode == 1, done.stderr
        assert (
            f"{command} archive: FAILED: association with STORESCP@no-such-host.invalid:104"
            " was not established: cannot resolve 'no-such-host.invalid'" in done.stderr
        )
        assert "Traceback" not in done.stderr


def test_send_without_dicom_files_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())  # nobody listens: nothing may be tried
    empty = tmp_path / "empty"
    empty.mkdir()
    done = cli("send", "--config", config, "archive", empty)
    assert done.returncode == 2, done.stderr
    assert "send archive: no DICOM files in the paths given" in done.stderr
    assert "sent 0" not in done.stdout
    (empty / "notes.txt").write_text("not DICOM")
    done = cli("send", "--config", config, "archive", empty)
    assert done.returncode == 2, done.stderr
    assert "skipped (not a DICOM file)" in done.stderr
    assert "send archive: no DICOM files in the paths given" in done.stderr


def test_status_limit_must_be_positive(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    for limit in ("-5", "0", "x"):
        done = cli("status", "--config", config, "--limit", limit)
        assert done.returncode == 2, (limit, done.stderr)
        assert "argument --limit:" in done.stderr
        assert "Traceback" not in done.stderr


def test_log_level_in_any_case(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    done = cli("--log-level", "debug", "check-config", "--config", config)
    assert done.returncode == 0, done.stderr
    wrong = cli("--log-level", "verbose", "check-config", "--config", config)
    assert wrong.returncode == 2
    assert "invalid choice: 'verbose'" in wrong.stderr
