"""Association benchmark: one image per association, as many modalities and PACS routing
rules send, against dcmtk storescp, Orthanc and our node.

    .venv/bin/python bench/associations.py --associations 100 --rounds 3 [--quick]
        [--receive-processes auto|N ...] [--baseline DIR]

Each association is one dcmtk ``storescu`` run that sends one CT slice (513 KiB) and
proposes storescu's default presentation contexts: every storage SOP class it knows, 128
contexts, as a sender that does not know what it will send proposes them. The runs follow
each other; the time is from the first start to the last exit, so it includes starting
storescu (the same for every receiver). Every measurement gets a freshly started
receiver with empty storage. Prints associations per second (medians and rounds), the
ratios to storescp and Orthanc, and the CPU time per association (the receiver's own
user and system time among it). There is no target in issue #5 for this load; it is
measured because negotiating 128 contexts costs a Python receiver more than the image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import (
    LOCALHOST,
    SENDER_AET,
    CpuUse,
    PeerError,
    Receiver,
    Series,
    console,
    cpu_table,
    machine,
    peer_env,
    rates_table,
    start_run,
    tool_path,
)
from receive import Factory, receivers, show_packages, timed_load

from dicom_node.config import auto_receive_processes

ASSOCIATION_TIMEOUT_S = 60.0


def send_one_per_association(aet: str, port: int, files: Sequence[Path]) -> float:
    """One storescu run (one association, its default contexts) per file, one after the
    other; their wall seconds. Raises :class:`PeerError` if one fails."""
    env = peer_env()
    started = time.perf_counter()
    for path in files:
        args = [tool_path("storescu"), "-aec", aet, "-aet", SENDER_AET, LOCALHOST, str(port)]
        done = subprocess.run(
            [*args, str(path)], env=env, capture_output=True, timeout=ASSOCIATION_TIMEOUT_S
        )
        if done.returncode != 0:
            text = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise PeerError(f"storescu of {path.name} exited {done.returncode}:\n{text}")
    return time.perf_counter() - started


def measure(receiver: Receiver, files: Sequence[Path], workdir: Path) -> tuple[float, CpuUse]:
    """Associations/s against a fresh receiver, and the CPU time they took.

    Raises :class:`PeerError` when the receiver did not store every instance.
    """
    seconds, _rss, cpu = timed_load(
        receiver,
        len(files),
        workdir,
        lambda: send_one_per_association(receiver.aet, receiver.port, files),
    )
    rate = len(files) / seconds
    print(
        f"  {receiver.name:<15}: stored all {len(files)}/{len(files)} in {seconds:6.2f} s"
        f" = {rate:6.1f} associations/s",
        flush=True,
    )
    return rate, cpu


def run(
    files: Sequence[Path], rounds: int, tmp: Path, contenders: dict[str, Factory]
) -> list[Series]:
    """Alternate the receivers, ``rounds`` times; one :class:`Series` per receiver."""
    results = [Series(name) for name in contenders]
    for round_no in range(1, rounds + 1):
        print(f"round {round_no}/{rounds}", flush=True)
        for index, factory in enumerate(contenders.values()):
            workdir = tmp / f"r{round_no}-{index}"
            rate, cpu = measure(factory(workdir, 1), files, workdir)
            results[index].rates.append(rate)
            results[index].cpu.append(cpu)
    return results


def report(results: list[Series], associations: int) -> None:
    out = console()
    title = f"{associations} associations of one CT slice each, 128 proposed contexts"
    table = rates_table(title, results, baselines=results[:2])
    table.columns[1].header = "median assoc/s"
    table.columns[2].header = "rounds assoc/s"
    out.print(table)
    out.print(cpu_table("CPU time per association (= per image)", results, associations))
    out.print(f"machine after the run: {machine()}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--associations", type=int, default=100, help="associations (images) per measurement"
    )
    parser.add_argument("--rounds", type=int, default=3, help="measurements per receiver")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 associations, 1 round")
    parser.add_argument(
        "--receive-processes",
        type=lambda value: auto_receive_processes() if value == "auto" else int(value),
        nargs="+",
        default=[auto_receive_processes()],
        help="node.receive_processes of each node contender; default auto",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the node from DIR, a checkout of another revision, in each round",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.associations, args.rounds = 5, 1
    args.baseline, files = start_run(_parser(), args.baseline, args.associations)
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as tmp:
            contenders = receivers(args.receive_processes, args.baseline)
            show_packages(contenders, Path(tmp))
            results = run(files, args.rounds, Path(tmp), contenders)
    except (PeerError, subprocess.TimeoutExpired) as exc:
        print(f"association benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    report(results, args.associations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
