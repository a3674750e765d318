"""Real DICOM peers for the tests: Orthanc (a PACS) and dcmtk (storescu / storescp / echoscu).

Plain functions and classes; the pytest fixtures that use them live in ``conftest.py``.
Nothing here runs at import time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_REAL = REPO_ROOT.parent / "shared" / "data" / "real"
PHILIPS_L = SHARED_REAL / "lung-pet-ct-dx-A0001" / "series2_5mm_kernelL"
PHILIPS_B = SHARED_REAL / "lung-pet-ct-dx-A0001" / "series3_5mm_kernelB"
GE_3SLICE = SHARED_REAL / "dcmqi-ct-3slice" / "dicom"
SIEMENS_J2K = SHARED_REAL / "totalseg-example-ct-dicom" / "dicom"

ALLOW_MISSING_PEERS_ENV = "DICOM_NODE_ALLOW_MISSING_PEERS"
LOCALHOST = "127.0.0.1"

# pynetdicom installs console scripts with the same names as dcmtk's tools into the venv;
# these names must resolve to the dcmtk binaries, never to those scripts.
DCMTK_TOOLS = frozenset({"storescu", "storescp", "echoscu", "findscu", "movescu", "getscu"})
_EXTRA_TOOL_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")
_START_ATTEMPTS = 3  # free_port() can race with another process; retry on "port in use"


class PeerError(RuntimeError):
    """A peer process failed to start, answered with an error, or exited badly."""


# --------------------------------------------------------------------------- generic helpers


_handed_out: set[int] = set()
_port_choice = random.Random()  # seeded from os.urandom: processes started together differ
# 30000-32767 is Kubernetes' NodePort range: a CI runner on a node's host network may have
# rules for those ports that a bind cannot see
_BELOW = (20000, 30000)


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (and of binds to 0)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_ranges() -> list[range]:
    """Ports outside the ephemeral range: below it where there is room, else above it."""
    low, high = _ephemeral_ports()
    below = range(_BELOW[0], min(_BELOW[1], low))
    above = range(high + 1, 65536)
    return [r for r in (below, above) if len(r) >= 1000][:1]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))  # no SO_REUSEADDR: a port in TIME_WAIT counts as taken
        except OSError:
            return False
    return True


def free_port() -> int:
    """Return a TCP port on loopback that was free a moment ago and that this process has not
    handed out before.

    The port is drawn from outside the kernel's ephemeral range: a port from that range
    (a bind to port 0) can be taken, between this call and the peer's bind, as the local
    port of any outgoing connection, and two calls in a row could return the same one. A
    node's bind in CI once failed with "Address already in use" on such a port."""
    for ports in _port_ranges():
        for _ in range(200):
            port = _port_choice.choice(ports)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    while True:  # no room outside the range, or all draws taken: the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def _ready_or_stopped(
    ready: Callable[[], object], stop: Callable[[], None], timeout: float, what: str
) -> None:
    """Wait until a started peer is ready; stop it and raise :class:`PeerError` if not."""
    try:
        wait_until(ready, timeout, 0.1, what)
    except TimeoutError as exc:
        stop()
        raise PeerError(str(exc)) from exc
    except PeerError:
        stop()
        raise


def peer_env() -> dict[str, str]:
    """Environment for dcmtk and Orthanc: a copy of os.environ with TCP_NODELAY=1."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def dicom_files(folder: Path | str) -> list[Path]:
    """All regular files under ``folder`` (recursive), sorted; hidden files excluded."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _is_pynetdicom_script(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"pynetdicom" in head


def find_tool(name: str) -> Path | None:
    """Locate a peer binary on PATH (or the usual system dirs); dcmtk names skip pynetdicom."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    dirs += [str(Path(sys.executable).parent), *_EXTRA_TOOL_DIRS]  # venv bin: dciodvfy
    for directory in dirs:
        if not directory:
            continue
        candidate = Path(directory) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if name in DCMTK_TOOLS and _is_pynetdicom_script(candidate):
            continue
        return candidate
    return None


def tool_path(name: str) -> str:
    """Like :func:`find_tool` but raise :class:`PeerError` when the tool is missing."""
    found = find_tool(name)
    if found is None:
        raise PeerError(f'peer tool "{name}" not found on PATH, next to python or in /usr')
    return str(found)


def require_tools(*names: str) -> None:
    """Fail the test when a peer tool is missing (skip instead if the env var allows it)."""
    missing = [name for name in names if find_tool(name) is None]
    if not missing:
        return
    message = (
        f"missing peer tools: {', '.join(missing)} (install dcmtk / orthanc / dicom3tools; "
        f"set {ALLOW_MISSING_PEERS_ENV}=1 to skip instead)"
    )
    if os.environ.get(ALLOW_MISSING_PEERS_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------- dcmtk


def _run_dcmtk(args: list[str], timeout: float, check: bool) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, env=peer_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise PeerError(
            f"{' '.join(args[:1])} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


# storescu never proposes a file's own transfer syntax: it proposes the one chosen by a -x
# option (default: uncompressed) and converts, and dcmtk has no JPEG 2000 decoder.
STORESCU_PROPOSE_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def _transfer_syntax(path: Path) -> str:
    """Transfer syntax UID from the file meta; "" when the file is not DICOM Part 10."""
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except (InvalidDicomError, OSError):
        return ""


def storescu_propose_args(paths: Iterable[Path]) -> list[str]:
    """The storescu -x option that lets the files' compressed transfer syntax through."""
    files: list[Path] = []
    for path in paths:
        files.extend(dicom_files(path) if path.is_dir() else [path])
    compressed = sorted(
        {uid for uid in map(_transfer_syntax, files) if uid in STORESCU_PROPOSE_OPTION}
    )
    options = sorted({STORESCU_PROPOSE_OPTION[uid] for uid in compressed})
    if len(options) > 1:
        raise PeerError(f"storescu can propose one compressed transfer syntax, got {compressed}")
    return options


def storescu(
    host: str,
    port: int,
    called_aet: str,
    paths: Iterable[Path | str],
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
    check: bool = True,
    propose: str | None = "auto",
) -> subprocess.CompletedProcess[str]:
    """Send files (folders are scanned recursively) with dcmtk storescu; output captured.

    Proposes only the SOP classes found in the files (``-R``). ``propose="auto"`` adds the
    -x option for the files' compressed transfer syntax (e.g. ``-xv`` for JPEG 2000
    lossless); pass an explicit option such as ``"-xi"``, or None for storescu's default.
    """
    path_list = [Path(p) for p in paths]
    args = [tool_path("storescu"), "-aec", called_aet, "-aet", calling_aet, "-to", "10", "-R"]
    if propose == "auto":
        args += storescu_propose_args(path_list)
    elif propose is not None:
        args.append(propose)
    if any(p.is_dir() for p in path_list):
        args += ["+sd", "+r"]
    args += [*extra_args, host, str(port), *map(str, path_list)]
    return _run_dcmtk(args, timeout, check)


def echoscu(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "ECHOSCU",
    timeout: float = 10.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO a peer with dcmtk echoscu; raise :class:`PeerError` on failure if ``check``."""
    args = [tool_path("echoscu"), "-aec", called_aet, "-aet", calling_aet]
    args += ["-to", "5", "-ta", "5", "-td", "5"]
    args += [host, str(port)]
    return _run_dcmtk(args, timeout, check)


class Storescp:
    """dcmtk storescp on a free port writing into ``workdir / "received"``; context manager."""

    def __init__(
        self,
        workdir: Path,
        aet: str = "STORESCP",
        port: int | None = None,
        extra_args: Sequence[str] = ("+xa",),
        start_timeout: float = 15.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.host = LOCALHOST
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.output_dir = self.workdir / "received"
        self.log_path = self.workdir / "storescp.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start storescp and wait until it answers a C-ECHO (new port if one was taken)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                return self._launch()
            except PeerError as exc:
                taken = "address already in use" in _tail(self.log_path).lower()
                if not (taken and self._auto_port and attempt < _START_ATTEMPTS):
                    raise PeerError(
                        f"storescp did not start: {exc}\n{_tail(self.log_path)}"
                    ) from exc
                self.port = free_port()
        raise AssertionError("unreachable")

    def _launch(self) -> Self:
        args = [tool_path("storescp"), "-aet", self.aet, "-od", str(self.output_dir)]
        args += [*self.extra_args, str(self.port)]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                args, env=peer_env(), stdout=log, stderr=subprocess.STDOUT
            )
        _ready_or_stopped(self._accepts, self.stop, self.start_timeout, f"storescp on {self.port}")
        return self

    def _accepts(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerError(f"storescp exited with {self._proc.returncode}")
        try:
            echo = echoscu(self.host, self.port, self.aet, timeout=10.0, check=False)
        except subprocess.TimeoutExpired:
            return False
        return echo.returncode == 0

    @property
    def pid(self) -> int | None:
        """The running process's id (None before :meth:`start`)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        """Terminate storescp (SIGTERM, then SIGKILL after a deadline)."""
        if self._proc is not None:
            _terminate(self._proc)

    def received_files(self) -> list[Path]:
        """Files written so far by storescp, sorted."""
        return dicom_files(self.output_dir)

    def wait_for_files(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least ``count`` files were received; return them."""
        wait_until(
            lambda: len(self.received_files()) >= count,
            timeout,
            what=f"{count} files in {self.output_dir}",
        )
        return self.received_files()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- Orthanc


class Orthanc:
    """Orthanc 1.10 as a subprocess with its own config, storage and log under ``workdir``.

    ``modalities`` maps a modality name to ``[AET, host, port]`` so that Orthanc can C-STORE
    to our node (``send_study_to_modality``).
    """

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, Sequence[str | int]] | None = None,
        start_timeout: float = 30.0,
        verbose: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.host = LOCALHOST
        self.modalities = {name: list(v) for name, v in (modalities or {}).items()}
        self.start_timeout = start_timeout
        self.verbose = verbose
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        return {
            "Name": f"dicom-node-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "DicomAssociationCloseDelay": 0,
            "StableAge": 1,
            "WebDavEnabled": False,
        }

    # -- lifecycle

    def start(self) -> Self:
        """Write the config, start Orthanc and wait until ``GET /system`` answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                return self._launch()
            except PeerError as exc:
                taken = "already in use" in self.log_tail().lower()
                if not (taken and attempt < _START_ATTEMPTS):
                    raise PeerError(
                        f"Orthanc did not start: {exc}\n--- tail of {self.log_path} ---\n"
                        f"{self.log_tail()}"
                    ) from exc
                self.dicom_port, self.http_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _launch(self) -> Self:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        args = [tool_path("Orthanc")]
        if self.verbose:
            args.append("--verbose")  # before --logfile: --verbose resets log options
        args += [f"--logfile={self.log_path}", "--no-jobs", str(self.config_path)]
        self._proc = subprocess.Popen(
            args, env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _ready_or_stopped(
            self._answers, self.stop, self.start_timeout, f"Orthanc {self.url}/system"
        )
        return self

    def _answers(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerError(f"Orthanc exited with {self._proc.returncode}")
        try:
            self.get("/system", timeout=2.0)
        except (OSError, PeerError):
            return False
        return True

    @property
    def pid(self) -> int | None:
        """The running process's id (None before :meth:`start`)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL after ``timeout`` s)."""
        if self._proc is not None:
            _terminate(self._proc, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- HTTP (urllib only)

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0
    ) -> bytes:
        """One REST call; raise :class:`PeerError` with Orthanc's answer on an HTTP error."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            exc.close()
            raise PeerError(f"Orthanc {method} {path} -> HTTP {exc.code}: {detail}") from exc

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post(self, path: str, payload: Any, timeout: float = 120.0) -> Any:
        answer = self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)
        return json.loads(answer) if answer.strip() else None

    def upload(self, path: Path | str) -> dict[str, Any]:
        """POST one DICOM file to /instances; return Orthanc's answer (ID, Status, ...)."""
        answer = self.request("POST", "/instances", Path(path).read_bytes())
        return dict(json.loads(answer))

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return list(self.get("/instances"))

    def studies(self) -> list[str]:
        """Orthanc IDs of all stored studies."""
        return list(self.get("/studies"))

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """Instances of a study as flat dicts: instance main tags + ID, Modality, series UID."""
        series = {s["ID"]: s for s in self.get(f"/studies/{study_id}/series")}
        result = []
        for inst in self.get(f"/studies/{study_id}/instances"):
            parent = series[inst["ParentSeries"]]["MainDicomTags"]
            result.append(
                {
                    **inst["MainDicomTags"],
                    "ID": inst["ID"],
                    "ParentSeries": inst["ParentSeries"],
                    "Modality": parent.get("Modality", ""),
                    "SeriesInstanceUID": parent.get("SeriesInstanceUID", ""),
                }
            )
        return result

    def get_instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def find_instances_by_modality(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        """Expanded instance records of ``study_uid`` whose series has ``modality``."""
        query = {
            "Level": "Instance",
            "Query": {"StudyInstanceUID": study_uid, "Modality": modality},
            "Expand": True,
        }
        return list(self.post("/tools/find", query))

    def send_study_to_modality(self, modality_name: str, study_id: str) -> dict[str, Any]:
        """C-STORE a whole study to a configured modality, synchronously."""
        body = {"Resources": [study_id], "Synchronous": True}
        quoted = urllib.parse.quote(modality_name, safe="")
        return dict(self.post(f"/modalities/{quoted}/store", body))

    def echo_modality(self, modality_name: str) -> bool:
        """C-ECHO a configured modality from Orthanc; True when it answered."""
        quoted = urllib.parse.quote(modality_name, safe="")
        try:
            self.post(f"/modalities/{quoted}/echo", {"Timeout": 5}, timeout=30.0)
        except PeerError:
            return False
        return True


# --------------------------------------------------------------------------- test data


def patch_siemens_copy(dst_dir: Path | str) -> list[Path]:
    """Write copies of the Siemens J2K series with the blanked identifiers filled in.

    SOPInstanceUID / SOPClassUID come from the file meta; one deterministic Study and Series
    UID; PatientID "ANON-J2K". Pixel data stays encapsulated, transfer syntax unchanged.
    """
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=["dicom_node tests", "siemens-j2k", "study"])
    series_uid = generate_uid(entropy_srcs=["dicom_node tests", "siemens-j2k", "series"])
    written = []
    for src in dicom_files(SIEMENS_J2K):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = "ANON-J2K"
        out = dst / src.name
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written
