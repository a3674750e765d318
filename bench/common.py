"""Shared parts of the benchmarks: a synthetic CT series, the peers, timing and the report.

Nothing runs at import. The peers come from ``tests/peers.py`` and ``tests/nodes.py`` (the
same starters the tests use), so a benchmark measures what the tests exercise.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from nodes import NodeProcess, child_pids, node_settings  # noqa: E402
from peers import (  # noqa: E402
    LOCALHOST,
    Orthanc,
    PeerError,
    Storescp,
    dicom_files,
    peer_env,
    tool_path,
    wait_until,
)

from dicom_node.journal import Journal  # noqa: E402

CACHE_ROOT = Path("/tmp/dicom_node_bench")
SERIES_VERSION = 1  # bump when the generated files change
ROWS = COLUMNS = 512
PIXEL_SPACING_MM = 0.78125
SLICE_THICKNESS_MM = 1.25
SENDER_AET = "BENCHSCU"
SEND_TIMEOUT_S = 900.0
CONSOLE_WIDTH = 120


# --------------------------------------------------------------------------- data


def ct_series(slices: int, cache_root: Path = CACHE_ROOT) -> list[Path]:
    """``slices`` 512x512 int16 CT slices of one series; generated once, then reused."""
    if slices < 1:
        raise ValueError(f'slices must be at least 1, got "{slices}"')
    folder = cache_root / f"ct-{slices}-v{SERIES_VERSION}"
    if not (folder / ".complete").exists():
        partial = cache_root / f".partial-{slices}-{time.time_ns()}"
        partial.mkdir(parents=True)
        _write_series(partial, slices)
        (partial / ".complete").touch()
        if folder.exists():  # an older, interrupted attempt
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        partial.rename(folder)
    files = dicom_files(folder)
    if len(files) != slices:
        raise RuntimeError(f"cache {folder} holds {len(files)} files, expected {slices}")
    return files


def _write_series(folder: Path, slices: int) -> None:
    seed = ["dicom_node bench", str(slices), str(SERIES_VERSION)]
    study_uid = generate_uid(entropy_srcs=[*seed, "study"])
    series_uid = generate_uid(entropy_srcs=[*seed, "series"])
    frame_uid = generate_uid(entropy_srcs=[*seed, "frame"])
    phantom = _phantom()
    rng = np.random.default_rng(slices)
    for index in range(slices):
        sop_uid = generate_uid(entropy_srcs=[*seed, "instance", str(index)])
        ds = _ct_slice(study_uid, series_uid, frame_uid, sop_uid, index)
        noise = rng.normal(0, 12, size=(ROWS, COLUMNS))
        ds.PixelData = (phantom + noise).astype(np.int16).tobytes()
        ds.save_as(folder / f"CT{index + 1:05d}.dcm", enforce_file_format=True)


def _phantom() -> np.ndarray:
    """Stored values (HU + 1024): air, a water-like body ellipse and two lungs."""
    y, x = np.mgrid[-1 : 1 : ROWS * 1j, -1 : 1 : COLUMNS * 1j]
    image = np.zeros((ROWS, COLUMNS))
    image[(x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1] = 1064.0
    for centre in (-0.4, 0.4):
        image[((x - centre) / 0.3) ** 2 + (y / 0.45) ** 2 <= 1] = 224.0
    return image


def _ct_slice(study: str, series: str, frame: str, sop: str, index: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^CT", "BENCH", "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "BENCH1", "1", ""
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "dicom_node bench", "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-200.0, -200.0, -index * SLICE_THICKNESS_MM]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.SliceLocation = -index * SLICE_THICKNESS_MM
    ds.KVP, ds.PositionReferenceIndicator = 120, ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds


def warm_page_cache(files: Sequence[Path]) -> None:
    """Read every file once so that the first measurement does not pay for the disk."""
    for path in files:
        path.read_bytes()


def settle() -> None:
    """Write back every dirty page (``sync``) so that the unsynced writes of one contender
    (storescp does not fsync) are not flushed during the next one's measurement."""
    os.sync()


def evict_page_cache(folder: Path) -> None:
    """Write back, then drop from the page cache, every file under ``folder``, keeping them.

    The files must stay until the run ends. Deleting them at once was tried (2026-12-05):
    on an ext4 without a journal, as on the VM of docs/performance.md, the kernel then
    skips every inode freed in the last minute (five if its block is not yet written back)
    whenever it creates a file. With a few hundred files freed per measurement, creating
    one cost up to 1 ms of kernel CPU in the measurements that followed, whoever they
    were. Dropping the pages still frees the memory (see :func:`measure` in receive.py).
    """
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def file_creation_us(folder: Path, count: int = 200) -> float:
    """Microseconds per empty file created in a new ``folder`` (kept: removing files is
    what makes creating them slow, see :func:`evict_page_cache`).

    Every receiver creates a file per image. On an ext4 without a journal this went from
    16 µs to over 500 µs after a run had removed its files (docs/performance.md, item 15
    and "Where the CPU goes"), so runs are only comparable where this is alike.
    """
    folder.mkdir(parents=True)
    started = time.perf_counter()
    for index in range(count):
        os.close(os.open(folder / f"{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - started) / count * 1e6


def start_run(
    parser: argparse.ArgumentParser, baseline: Path | None, slices: int
) -> tuple[Path | None, list[Path]]:
    """What a receiving benchmark does first: ``--baseline DIR`` resolved and checked (a
    usage error when DIR holds no ``dicom_node`` package), the machine printed, and the
    series of ``slices`` made (or found) and read once. Returns both."""
    if baseline is not None:
        baseline = baseline.resolve()
        if not (baseline / "dicom_node" / "__init__.py").is_file():
            parser.error(f"--baseline {baseline}: no dicom_node package there")
    print(f"machine: {machine()}", flush=True)
    files = ct_series(slices)
    warm_page_cache(files)
    return baseline, files


def split(files: Sequence[Path], groups: int) -> list[list[Path]]:
    """``groups`` contiguous, near-equal slices of ``files`` (one per sender)."""
    if not 1 <= groups <= len(files):
        raise ValueError(f'cannot split {len(files)} files into "{groups}" groups')
    size = len(files)
    return [list(files[i * size // groups : (i + 1) * size // groups]) for i in range(groups)]


# --------------------------------------------------------------------------- receivers


class Receiver(Protocol):
    """A DICOM Storage SCP under test: started fresh for every measurement."""

    name: str
    aet: str

    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int | None: ...
    def start(self) -> None: ...
    def stored(self) -> int: ...
    def peak_rss_kib(self) -> int | None: ...
    def stop(self) -> None: ...


class StorescpReceiver:
    """dcmtk storescp writing into a fresh ``-od`` folder; ``--fork`` for concurrent loads."""

    name = "dcmtk storescp"
    aet = "STORESCP"

    def __init__(self, workdir: Path, fork: bool) -> None:
        self._scp = Storescp(
            workdir, aet=self.aet, extra_args=("+xa", "--fork") if fork else ("+xa",)
        )

    @property
    def port(self) -> int:
        return self._scp.port

    @property
    def pid(self) -> int | None:
        return self._scp.pid

    def start(self) -> None:
        self._scp.start()

    def stored(self) -> int:
        return len(self._scp.received_files())

    def peak_rss_kib(self) -> int | None:
        return None

    def stop(self) -> None:
        self._scp.stop()


class OrthancReceiver:
    """Orthanc 1.10 with fresh storage and index, logging at its default level."""

    name = "Orthanc"
    aet = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        self._orthanc = Orthanc(workdir, aet=self.aet, verbose=False)

    @property
    def port(self) -> int:
        return self._orthanc.dicom_port

    @property
    def pid(self) -> int | None:
        return self._orthanc.pid

    def start(self) -> None:
        self._orthanc.start()

    def stored(self) -> int:
        return int(self._orthanc.get("/statistics")["CountInstances"])

    def peak_rss_kib(self) -> int | None:
        return None

    def stop(self) -> None:
        self._orthanc.stop()


class NodeReceiver:
    """``dicom-node serve`` as a child process: no routes, fresh storage, no free-space floor."""

    aet = "AINODE"

    def __init__(self, workdir: Path, processes: int = 1, source: Path | None = None) -> None:
        """``processes``: node.receive_processes; ``source``: a folder with another
        revision's ``dicom_node`` package to run instead of this one's."""
        self.name = self.contender_name(processes, source)
        self._storage = workdir / "var"
        node = {"ae_title": self.aet, "receive_processes": processes}
        settings = node_settings(self._storage, node=node, routes=[])
        self._node = NodeProcess(settings, workdir, source)

    @property
    def port(self) -> int:
        return self._node.port

    @property
    def pid(self) -> int | None:
        return self._node.proc.pid if self._node.proc is not None else None

    @staticmethod
    def contender_name(processes: int, source: Path | None = None) -> str:
        name = "dicom_node" if processes == 1 else f"dicom_node x{processes}"
        return name if source is None else f"{name} @{source.name}"

    def package(self) -> Path:
        """The folder of the ``dicom_node`` package this contender runs."""
        return self._node.package()

    def start(self) -> None:
        # returns once the node has logged "ready": its receiving processes (if any) are
        # up and its worker is built, not only its listener
        self._node.start()

    def stored(self) -> int:
        """Instances in the journal; each must also be a file under ``instances/``."""
        journal = Journal(self._storage / "journal.sqlite")
        try:
            total = journal.state_counts()["instances"]["total"]
        finally:
            journal.close()
        files = len(dicom_files(self._storage / "instances"))
        if files != total:
            raise PeerError(f"node journal has {total} instances but {files} files")
        return total

    def peak_rss_kib(self) -> int | None:
        """The node's peak RSS; with receiving processes, the sum of every process's peak
        (an upper bound: they need not peak at once)."""
        assert self._node.proc is not None
        return tree_kib(self._node.proc.pid, "VmHWM")

    def stop(self) -> None:
        code = self._node.stop()
        if code != 0:
            raise PeerError(f"node exited with {code}:\n{self._node.log()[-4000:]}")


def tree_kib(pid: int, field_name: str) -> int:
    """``status_kib`` of ``pid`` added up with its children's (a node's receiving
    processes); a child that has ended meanwhile (or is a zombie: no sizes) counts 0."""
    total = status_kib(pid, field_name)
    for child in child_pids(pid):
        try:
            total += status_kib(child, field_name)
        except (FileNotFoundError, ProcessLookupError, KeyError):
            continue
    return total


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` and of its children that still run (a node's
    receiving processes), each with the children it has waited for (storescp ``--fork``'s
    one per association): ``/proc/PID/stat``; a child that ended meanwhile counts 0."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for index, process in enumerate((pid, *child_pids(pid))):
        try:
            stat = Path(f"/proc/{process}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            if index == 0:
                raise
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command, which may hold spaces
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        user += (utime + cutime) / ticks
        system += (stime + cstime) / ticks
    return user, system


def status_kib(pid: int, field_name: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (Linux), e.g. VmHWM, the peak resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(f'"{field_name}" not in /proc/{pid}/status')


class Counting(Protocol):
    """Anything that can say how many instances it holds (a receiver, the study node)."""

    def stored(self) -> int: ...


def wait_stored(receiver: Counting, expected: int, timeout: float = 10.0) -> int:
    """The receiver's stored count once it reaches ``expected`` (or what it has at the deadline)."""
    try:
        wait_until(lambda: receiver.stored() >= expected, timeout, 0.05, "stored instances")
    except TimeoutError:
        pass
    return receiver.stored()


# --------------------------------------------------------------------------- sending


def run_storescu(aet: str, port: int, groups: Sequence[Sequence[Path]], logdir: Path) -> float:
    """One dcmtk storescu per group, all at once; wall seconds from the first start to the last
    exit. Raises :class:`PeerError` if any of them fails."""
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    started = time.perf_counter()
    for index, group in enumerate(groups):
        args = [tool_path("storescu"), "-aec", aet, "-aet", SENDER_AET, "-R"]
        args += [LOCALHOST, str(port), *map(str, group)]
        with (logdir / f"storescu-{index}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(args, env=peer_env(), stdout=log, stderr=subprocess.STDOUT)
            )
    # Popen.wait(timeout) polls, in sleeps of up to 50 ms: the times came out on a 50 ms
    # grid, late by 25 ms on average (10 % of a 300-slice storescp run). A blocking wait
    # sees each exit at once; a timer kills the senders that pass the timeout.
    killed = threading.Event()

    def kill_all() -> None:
        killed.set()
        for proc in procs:
            proc.kill()

    overdue = threading.Timer(SEND_TIMEOUT_S, kill_all)
    overdue.start()
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        overdue.cancel()
    elapsed = time.perf_counter() - started
    if killed.is_set():
        raise PeerError(f"storescu still running after {SEND_TIMEOUT_S:.0f} s: killed")
    if any(codes):
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in logdir.glob("*.log"))
        raise PeerError(f"storescu exit codes {codes}:\n{logs}")
    return elapsed


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class CpuUse:
    """The CPU time one load took (Linux, ``/proc/stat``) over ``seconds`` of wall time on
    ``cpus`` CPUs: the senders' (storescu, children of this process), every CPU's busy
    time whoever spent it (the receiver, the kernel, the senders), and the time the
    hypervisor ran another guest while this one wanted its CPUs (steal: noise); and where
    known, the receiver's own processes' user and system time (the kernel's work in
    their system calls included, its work for them elsewhere not)."""

    senders: float
    machine: float
    stolen: float
    seconds: float
    cpus: int
    receiver_user: float | None = None  # the receiver's own processes, where known
    receiver_system: float | None = None

    @property
    def others(self) -> float:
        """CPU seconds not spent by the senders: the receiver's, and the kernel's for it."""
        return max(0.0, self.machine - self.senders)

    def share(self, cpu_seconds: float) -> float:
        """``cpu_seconds`` as a share of all CPUs' time (1.0: every CPU, all along)."""
        return cpu_seconds / (self.seconds * self.cpus) if self.seconds > 0 else 0.0


class CpuClock:
    """Start before a load, :meth:`stop` after it: its :class:`CpuUse`; with the
    receiver's ``pid``, its own user and system time too (:func:`tree_cpu_seconds`)."""

    def __init__(self, pid: int | None = None) -> None:
        self._pid = pid
        self._receiver = tree_cpu_seconds(pid) if pid is not None else (0.0, 0.0)
        lines = _lines("/proc/stat")
        self._start = _cpu_now(lines)
        self._cpus = _cpus_counted(lines)

    def stop(self) -> CpuUse:
        machine, stolen, senders, wall = (
            b - a for a, b in zip(self._start, _cpu_now(_lines("/proc/stat")), strict=True)
        )
        if self._pid is None:
            return CpuUse(senders, machine, stolen, wall, self._cpus)
        user, system = tree_cpu_seconds(self._pid)
        user, system = user - self._receiver[0], system - self._receiver[1]
        return CpuUse(senders, machine, stolen, wall, self._cpus, user, system)


def _cpus_counted(proc_stat: list[str]) -> int:
    """The CPUs whose time /proc/stat's "cpu" line sums (its cpuN lines), which is not
    ``os.cpu_count()`` everywhere (e.g. in a container that shows the host's)."""
    counted = sum(1 for line in proc_stat if re.match(r"cpu\d+ ", line))
    return counted or os.cpu_count() or 1


def _cpu_now(lines: list[str]) -> tuple[float, float, float, float]:
    """(busy and stolen seconds of every CPU since boot, CPU seconds of this process's
    waited-for children, a monotonic clock), from ``lines`` of /proc/stat. Busy: user,
    nice, system, irq and softirq time from its "cpu" line; zero where there is none."""
    fields = [int(value) for value in lines[0].split()[1:9]] if lines else []
    busy = stolen = 0.0
    if len(fields) == 8:  # user nice system idle iowait irq softirq steal
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:3]) + fields[5] + fields[6]) / ticks
        stolen = fields[7] / ticks
    times = os.times()
    return busy, stolen, times.children_user + times.children_system, time.monotonic()


@dataclass
class Series:
    """The measurements of one contender at one load: images/s per round, and the CPU
    time of each round where it was measured."""

    name: str
    rates: list[float] = field(default_factory=list)
    cpu: list[CpuUse] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


@dataclass(frozen=True)
class Target:
    """``subject`` must reach ``factor`` times ``baseline`` (ratio of medians)."""

    label: str
    subject: Series
    baseline: Series
    factor: float

    @property
    def ratio(self) -> float:
        return self.subject.median / self.baseline.median

    @property
    def passed(self) -> bool:
        return self.ratio >= self.factor


def machine() -> str:
    """CPU count and model, memory and load average: a busy machine gives noisy rates."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if "model name" in line),
        "unknown CPU",
    )
    mem_kib = next((int(line.split()[1]) for line in _lines("/proc/meminfo")), 0)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} CPUs, {cpu}, {mem_kib / 2**20:.1f} GiB RAM, load average {load}"


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def console() -> Console:
    return Console(width=CONSOLE_WIDTH, highlight=False)


def rates_table(title: str, series: Sequence[Series], baselines: Sequence[Series]) -> Table:
    """Median images/s per contender, each round, and the ratio to each baseline."""
    table = Table(title=title)
    table.add_column("contender")
    table.add_column("median img/s", justify="right")
    table.add_column("rounds img/s", justify="right")
    for base in baselines:
        table.add_column(f"vs {base.name}", justify="right")
    for row in series:
        ratios = [f"{row.median / base.median:.2f}x" for base in baselines]
        rounds = " ".join(f"{rate:.1f}" for rate in row.rates)
        table.add_row(row.name, f"{row.median:.1f}", rounds, *ratios)
    return table


def cpu_table(title: str, series: Sequence[Series], images: int) -> Table:
    """Medians over the rounds of the CPU time per image, and what it would allow.

    "CPU-bound at" is the rate at which that much CPU time per image would keep every
    CPU busy: where it is close to the measured rate, more speed needs less CPU per
    image, not more parallel work. "receiver user / sys": the receiver's processes' own
    time, in its code and in the kernel for its system calls (storescp's and the node's
    user time compare the two programs; most of the rest is the kernel's)."""
    table = Table(title=title)
    table.add_column("contender")
    for name in (
        "senders ms/img",
        "receiver + kernel ms/img",
        "of it receiver user / sys",
        "CPUs busy",
        "CPU-bound at img/s",
        "stolen",
    ):
        table.add_column(name, justify="right")
    for row in series:
        if not row.cpu:
            continue
        senders = statistics.median(use.senders for use in row.cpu) / images
        others = statistics.median(use.others for use in row.cpu) / images
        own = "-"
        users = [use.receiver_user for use in row.cpu if use.receiver_user is not None]
        systems = [use.receiver_system for use in row.cpu if use.receiver_system is not None]
        if users and systems:
            user, system = statistics.median(users) / images, statistics.median(systems) / images
            own = f"{1000 * user:.2f} / {1000 * system:.2f}"
        busy = statistics.median(use.share(use.machine) for use in row.cpu)
        stolen = statistics.median(use.share(use.stolen) for use in row.cpu)
        cpus = row.cpu[0].cpus
        ceiling = cpus / (senders + others) if senders + others > 0 else float("inf")
        table.add_row(
            row.name,
            f"{1000 * senders:.2f}",
            f"{1000 * others:.2f}",
            own,
            f"{100 * busy:.0f} %",
            f"{ceiling:.0f}",
            f"{100 * stolen:.0f} %",
        )
    return table


def targets_table(targets: Sequence[Target]) -> Table:
    table = Table(title="targets (ratio of medians)")
    for name in ("target", "measured", "required", "result"):
        table.add_column(name, justify="left" if name == "target" else "right")
    for target in targets:
        verdict = "[green]PASS[/]" if target.passed else "[red]FAIL[/]"
        table.add_row(target.label, f"{target.ratio:.2f}x", f">= {target.factor}x", verdict)
    return table


# --------------------------------------------------------------------------- studies


def restamp_series(sources: Sequence[Path], folder: Path, seed: str) -> list[Path]:
    """Copies of ``sources`` in ``folder`` as a new study: new Study, Series, Frame of
    Reference and SOP Instance UIDs (derived from ``seed``), everything else unchanged.

    The node treats a known SOP Instance UID as a duplicate and a known Study Instance UID
    as more of that study, so every study a benchmark sends must be new in this sense.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    frame = generate_uid(entropy_srcs=[seed, "frame"])
    written = []
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        sop = generate_uid(entropy_srcs=[seed, "instance", str(index)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = frame
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        target = folder / f"IM{index + 1:05d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def ct_studies(count: int, slices: int, cache_root: Path = CACHE_ROOT) -> list[list[Path]]:
    """``count`` distinct studies of ``slices`` synthetic CT slices each (the pixels of
    :func:`ct_series`, new UIDs per study); generated once into the cache, then reused."""
    if count < 1:
        raise ValueError(f'count must be at least 1, got "{count}"')
    base = ct_series(slices, cache_root)
    folder = cache_root / f"studies-{count}x{slices}-v{SERIES_VERSION}"
    if not (folder / ".complete").exists():
        partial = cache_root / f".partial-studies-{count}x{slices}-{time.time_ns()}"
        for number in range(count):
            seed = f"dicom_node bench study {number} of {count} x {slices} v{SERIES_VERSION}"
            restamp_series(base, partial / f"study-{number + 1:03d}", seed)
        (partial / ".complete").touch()
        if folder.exists():
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        partial.rename(folder)
    studies = [dicom_files(path) for path in sorted(folder.glob("study-*"))]
    if len(studies) != count or any(len(files) != slices for files in studies):
        raise RuntimeError(f"cache {folder} does not hold {count} studies of {slices} slices")
    return studies
