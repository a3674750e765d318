"""Receive benchmark: dcmtk storescp, Orthanc and our node, fed by dcmtk storescu.

    .venv/bin/python bench/receive.py --slices 300 --rounds 3 [--concurrency 1 4] [--quick]
        [--receive-processes auto|N ...] [--baseline DIR]

Every round runs each load against each receiver in turn (storescp, Orthanc, node, storescp,
...); every measurement gets a freshly started receiver with empty storage, so no run sees
duplicates. A load of concurrency N splits the series into N groups and runs N storescu
processes at once; the time is from the first start to the last exit. Each receiver must
then hold every instance, or the run stops with exit status 1. Prints the medians, the
ratios, the CPU time per image (the senders', everything else's, how busy the CPUs
were), the node's peak RSS, the targets, and what creating an empty file cost in the
run's folder before and after it (slow file creation slows every receiver);
``--check-targets`` exits 3 when one is missed.
``--baseline DIR`` adds the node of another revision (a checkout in DIR) to the alternation,
for before/after figures measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from common import (
    CpuClock,
    CpuUse,
    NodeReceiver,
    OrthancReceiver,
    PeerError,
    Receiver,
    Series,
    StorescpReceiver,
    Target,
    console,
    cpu_table,
    evict_page_cache,
    file_creation_us,
    machine,
    rates_table,
    run_storescu,
    settle,
    split,
    start_run,
    targets_table,
    wait_stored,
)

from dicom_node.config import auto_receive_processes

Factory = Callable[[Path, int], Receiver]  # (workdir, concurrency) -> a fresh contender


def receivers(node_processes: Sequence[int], baseline: Path | None = None) -> dict[str, Factory]:
    """name -> factory: the peers, then the node with each ``node.receive_processes``
    (and the same from ``baseline``, another revision's checkout, right after each);
    the order is the order of the alternation."""
    found: dict[str, Factory] = {
        "dcmtk storescp": lambda workdir, level: StorescpReceiver(workdir, fork=level > 1),
        "Orthanc": lambda workdir, level: OrthancReceiver(workdir),
    }
    for processes in node_processes:
        for source in (None, baseline) if baseline is not None else (None,):
            name = NodeReceiver.contender_name(processes, source)
            found[name] = _node_factory(processes, source)
    return found


def _node_factory(processes: int, source: Path | None = None) -> Factory:
    def make(workdir: Path, _level: int) -> Receiver:
        return NodeReceiver(workdir, processes, source)

    return make


def show_packages(contenders: dict[str, Factory], tmp: Path) -> None:
    """Print which ``dicom_node`` package each node contender runs."""
    for name, factory in contenders.items():
        contender = factory(tmp / "package-check", 1)
        if isinstance(contender, NodeReceiver):
            print(f"{name}: runs {contender.package()}", flush=True)


ONE_ASSOC_VS_STORESCP = 0.5
ONE_ASSOC_VS_ORTHANC = 1.5
CONCURRENT_VS_STORESCP = 0.8


def measure(
    receiver: Receiver, files: Sequence[Path], level: int, workdir: Path
) -> tuple[float, int | None, CpuUse]:
    """Images/s of one load against a fresh receiver, its peak RSS in KiB if known, and
    the CPU time the load took.

    Raises :class:`PeerError` when the receiver did not store every instance.
    """
    seconds, rss, cpu = timed_load(
        receiver,
        len(files),
        workdir,
        lambda: run_storescu(receiver.aet, receiver.port, split(files, level), workdir),
    )
    stored = len(files)
    rate = len(files) / seconds
    peak = "" if rss is None else f", peak RSS {rss / 1024:.0f} MiB"
    print(
        f"  {receiver.name:<15} x{level}: stored all {stored}/{len(files)} "
        f"in {seconds:6.2f} s = {rate:7.1f} img/s{peak}; CPUs busy"
        f" {100 * cpu.share(cpu.machine):.0f} %",
        flush=True,
    )
    return rate, rss, cpu


def timed_load(
    receiver: Receiver, expected: int, workdir: Path, send: Callable[[], float]
) -> tuple[float, int | None, CpuUse]:
    """Start ``receiver`` fresh, ``send`` to it (its wall seconds), stop it: the seconds,
    its peak RSS in KiB if known, and the CPU time the load took.

    Raises :class:`PeerError` when the receiver did not store all ``expected`` instances.
    """
    receiver.start()
    try:
        settle()
        clock = CpuClock(receiver.pid)
        seconds = send()
        cpu = clock.stop()
        stored = wait_stored(receiver, expected)
        rss = receiver.peak_rss_kib()
    finally:
        receiver.stop()
    if stored != expected:
        raise PeerError(f"{receiver.name} stored {stored} of {expected} instances")
    # Free the page cache of the measurement's files (they are removed with the whole run's
    # folder at the end): on the VM of docs/performance.md, writing past about 1 GB of new
    # page cache made every write 10x slower for the rest of a run (the guest's first use
    # of memory), whoever was measured then.
    evict_page_cache(workdir)
    return seconds, rss, cpu


def run(
    files: Sequence[Path],
    rounds: int,
    levels: Sequence[int],
    tmp: Path,
    contenders: dict[str, Factory],
) -> tuple[dict[int, list[Series]], dict[tuple[str, int], int]]:
    """Alternate the receivers for each load, ``rounds`` times.

    Returns the rates per load (one :class:`Series` per receiver) and each node's peak RSS
    (KiB, highest over the rounds) per (node, load).
    """
    results = {level: [Series(name) for name in contenders] for level in levels}
    peak_rss: dict[tuple[str, int], int] = {}
    for round_no in range(1, rounds + 1):
        print(f"round {round_no}/{rounds}", flush=True)
        for level in levels:
            for index, (name, factory) in enumerate(contenders.items()):
                workdir = tmp / f"r{round_no}-c{level}-{index}"
                rate, rss, cpu = measure(factory(workdir, level), files, level, workdir)
                results[level][index].rates.append(rate)
                results[level][index].cpu.append(cpu)
                if rss is not None:
                    key = (name, level)
                    peak_rss[key] = max(rss, peak_rss.get(key, 0))
    return results, peak_rss


def targets(results: dict[int, list[Series]]) -> list[Target]:
    """The issue's targets for the loads that were run, for each node contender."""
    found: list[Target] = []
    for level, (storescp, orthanc, *nodes) in results.items():
        for node in nodes:
            if level == 1:
                label = f"1 assoc: {node.name} vs "
                found.append(Target(label + "storescp", node, storescp, ONE_ASSOC_VS_STORESCP))
                found.append(Target(label + "Orthanc", node, orthanc, ONE_ASSOC_VS_ORTHANC))
            else:
                label = f"{level} assoc: {node.name} vs storescp"
                found.append(Target(label, node, storescp, CONCURRENT_VS_STORESCP))
    return found


def report(
    results: dict[int, list[Series]], peak_rss: dict[tuple[str, int], int], slices: int
) -> bool:
    """Print one table per load, the nodes' peak RSS and the targets; True if all pass."""
    out = console()
    for level, series in results.items():
        title = f"receive {slices} CT slices, {level} association(s) at once"
        out.print(rates_table(title, series, baselines=series[:2]))
        out.print(cpu_table(f"CPU time, {level} association(s) at once", series, slices))
    for (name, level), rss in peak_rss.items():
        out.print(f"{name} peak RSS (VmHWM, all its processes) x{level}: {rss / 1024:.0f} MiB")
    found = targets(results)
    out.print(targets_table(found))
    out.print(f"machine after the run: {machine()}")
    return all(target.passed for target in found)


def _processes(value: str) -> int:
    """A number of receiving processes, or "auto": as many as the node would choose here."""
    return auto_receive_processes() if value == "auto" else int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="CT slices in the series")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per receiver")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4], help="storescu processes at once"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 20 slices, 1 round, concurrency 1 2, receive processes 1 2",
    )
    parser.add_argument(
        "--receive-processes",
        type=_processes,
        nargs="+",
        default=[auto_receive_processes()],
        help="node.receive_processes of each node contender (e.g. 1 2: two nodes); the"
        " default, auto, is what the node chooses on this machine",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the node from DIR, a checkout of another revision (e.g. git"
        " worktree add DIR HEAD~1), right after this one in each round",
    )
    parser.add_argument("--check-targets", action="store_true", help="exit 3 if a target fails")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.slices, args.rounds, args.concurrency = 20, 1, [1, 2]
        args.receive_processes = [1, 2]
    args.baseline, files = start_run(_parser(), args.baseline, args.slices)
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as tmp:
            creation = [file_creation_us(Path(tmp) / "creation-before")]
            print(f"creating an empty file here: {creation[0]:.0f} us", flush=True)
            contenders = receivers(args.receive_processes, args.baseline)
            show_packages(contenders, Path(tmp))
            results, peak_rss = run(files, args.rounds, args.concurrency, Path(tmp), contenders)
            creation.append(file_creation_us(Path(tmp) / "creation-after"))
    except PeerError as exc:
        print(f"receive benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    passed = report(results, peak_rss, args.slices)
    print(
        f"creating an empty file in the benchmark's folder: {creation[0]:.0f} us before the"
        f" run, {creation[1]:.0f} us after it (runs compare where these are alike)"
    )
    return 3 if args.check_targets and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
