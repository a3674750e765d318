"""Our node in tests: in-process (:func:`running_node`) or a real process (:class:`NodeProcess`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import yaml
from peers import LOCALHOST, free_port, wait_until
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.app import Node, build_node
from dicom_node.config import NodeConfig, parse_config
from dicom_node.filepool import unused_ready_file


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started and that still run (Linux: /proc/PID/task/*/children),
    e.g. a node's receiving processes (node.receive_processes)."""
    children: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children.extend(int(child) for child in path.read_text().split())
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    return children


def partial_files(tmp: Path) -> list[Path]:
    """Files in a spool's ``tmp/`` other than empty ready files (dicom_node.filepool)."""
    return [path for path in tmp.iterdir() if not unused_ready_file(path.name, path.stat().st_size)]


def node_settings(storage: Path, **sections: Any) -> dict[str, Any]:
    """A config dict on free ports; ``sections`` replace or extend the defaults."""
    settings: dict[str, Any] = {
        # one receiving process unless a test says otherwise: the product's default
        # ("auto": one per CPU) is tested on its own (tests/test_receivers.py)
        "node": {
            "ae_title": "AINODE",
            "host": LOCALHOST,
            "port": free_port(),
            "receive_processes": 1,
        },
        # no watermark by default: a test machine's disk may be nearly full
        "storage": {"path": str(storage), "min_free_bytes": 0},
        "completion": {"study_idle_seconds": 1.0},
        "destinations": {},
        "routes": [],
        "sending": {"max_attempts": 3, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0},
        "analysis": {"device": "cpu"},
        "web": {"host": LOCALHOST, "port": free_port()},
    }
    for key, value in sections.items():
        if (
            isinstance(value, dict)
            and isinstance(settings.get(key), dict)
            and key != "destinations"
        ):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


def chest_route(send_to: list[str], name: str = "chest") -> dict[str, Any]:
    """The usual route of these tests: every CT series to ct-chest."""
    return {"name": name, "when": {"Modality": "CT"}, "pipeline": "ct-chest", "send_to": send_to}


def pacs_destination(pacs: Any, **options: Any) -> dict[str, Any]:
    """``destinations`` naming an Orthanc peer ``pacs``."""
    return {"pacs": {"ae_title": pacs.aet, "host": LOCALHOST, "port": pacs.dicom_port, **options}}


@contextmanager
def running_node(settings: dict[str, Any]) -> Iterator[Node]:
    """Build and start a node in this process; stop it afterwards."""
    config: NodeConfig = parse_config(settings)
    node = build_node(config)
    node.start()
    try:
        yield node
    finally:
        node.stop(timeout=10)


def echo_ok(port: int, ae_title: str = "AINODE", calling: str = "TESTSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate(LOCALHOST, port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


READY = " ready: "  # dicom_node VERSION ready: AE on host:port


class NodeProcess:
    """``dicom-node serve`` as a child process, as an operator would run it."""

    def __init__(self, settings: dict[str, Any], workdir: Path, source: Path | None = None) -> None:
        """``source``: run the ``dicom_node`` package in this folder (e.g. a ``git
        worktree`` of another revision) instead of the installed one."""
        self.settings = settings
        self.source = source
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.log_path = workdir / "node.log"
        self.port = int(settings["node"]["port"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        """Start ``serve`` and wait until start-up has finished: it answers C-ECHO (its
        listener opens first) and has logged "ready" (its analysis worker is built)."""
        started = self.log().count(READY)  # the log is appended to across restarts
        env = self.environment()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        wait_until(lambda: self._ready(started), timeout, 0.05, f"node ready on port {self.port}")
        return self

    def environment(self) -> dict[str, str]:
        """The environment ``serve`` runs in."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.source is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                path for path in (str(self.source), env.get("PYTHONPATH")) if path
            )
        return env

    def package(self) -> Path:
        """Where the ``dicom_node`` package that ``serve`` runs comes from."""
        done = subprocess.run(
            [sys.executable, "-c", "import dicom_node; print(dicom_node.__file__)"],
            env=self.environment(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=True,
        )
        return Path(done.stdout.strip()).parent

    def _ready(self, started: int) -> bool:
        """Raises if the process has exited (at any point of its start-up)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        if self.log().count(READY) <= started:
            return False
        try:
            return echo_ok(self.port)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean-up, no drain (a crash or power cut for the process)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def send(node: Node, datasets: Sequence[pydicom.Dataset], calling: str = "SCANNER") -> list[int]:
    """C-STORE ``datasets`` to the node over one association, as a modality would; the
    statuses. Each SOP class is proposed in the first dataset's transfer syntax."""
    ae = AE(ae_title=calling)
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate(LOCALHOST, node.receiver.address[1], ae_title="AINODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
