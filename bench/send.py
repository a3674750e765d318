"""Send benchmark: our C-STORE SCU (``dicom_node.send.store_files``) vs dcmtk storescu.

    .venv/bin/python bench/send.py --slices 300 --rounds 3 [--quick]

Both send the same series over one association to one dcmtk storescp, in alternation
(storescu, node, storescu, node, ...). storescu runs as a process (the time includes its
start); ``store_files`` runs in this process, already imported (the time includes reading
the file headers and the association, as storescu's does). storescp's folder is emptied
before each send and must then hold every instance, or the run stops with exit status 1.
``--check-targets`` exits 3 when the node is below 0.5x storescu.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common import (
    LOCALHOST,
    SENDER_AET,
    PeerError,
    Series,
    Storescp,
    Target,
    console,
    ct_series,
    machine,
    rates_table,
    run_storescu,
    settle,
    targets_table,
    wait_until,
    warm_page_cache,
)

from dicom_node.send import Peer, SendError, store_files

NODE_VS_STORESCU = 0.5
Sender = Callable[[Storescp, Sequence[Path], Path], float]


def send_storescu(scp: Storescp, files: Sequence[Path], workdir: Path) -> float:
    return run_storescu(scp.aet, scp.port, [files], workdir)


def send_node(scp: Storescp, files: Sequence[Path], workdir: Path) -> float:
    peer = Peer(scp.aet, LOCALHOST, scp.port)
    started = time.perf_counter()
    try:
        store_files(SENDER_AET, peer, list(files))
    except SendError as exc:
        raise PeerError(f"store_files failed: {exc}") from exc
    return time.perf_counter() - started


SENDERS: dict[str, Sender] = {"dcmtk storescu": send_storescu, "dicom_node": send_node}


def measure(
    name: str, sender: Sender, scp: Storescp, files: Sequence[Path], workdir: Path
) -> float:
    """Images/s of one send; raise :class:`PeerError` unless storescp got every file."""
    shutil.rmtree(scp.output_dir)
    scp.output_dir.mkdir()
    settle()
    seconds = sender(scp, files, workdir)
    try:
        wait_until(lambda: len(scp.received_files()) >= len(files), 10.0, what="received files")
    except TimeoutError:
        pass
    stored = len(scp.received_files())
    if stored != len(files):
        raise PeerError(f"storescp got {stored} of {len(files)} instances from {name}")
    rate = len(files) / seconds
    print(
        f"  {name:<15}: stored all {stored}/{len(files)} in {seconds:6.2f} s = {rate:7.1f} img/s",
        flush=True,
    )
    return rate


def run(files: Sequence[Path], rounds: int, tmp: Path) -> list[Series]:
    """Alternate the senders ``rounds`` times against one storescp; rates per sender."""
    results = [Series(name) for name in SENDERS]
    with Storescp(tmp / "storescp") as scp:
        for round_no in range(1, rounds + 1):
            print(f"round {round_no}/{rounds}", flush=True)
            for index, (name, sender) in enumerate(SENDERS.items()):
                workdir = tmp / f"r{round_no}-{index}"
                results[index].rates.append(measure(name, sender, scp, files, workdir))
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="CT slices in the series")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per sender")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 slices, 1 round")
    parser.add_argument("--check-targets", action="store_true", help="exit 3 if a target fails")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.slices, args.rounds = 20, 1
    print(f"machine: {machine()}", flush=True)
    files = ct_series(args.slices)
    warm_page_cache(files)
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as tmp:
            storescu, node = run(files, args.rounds, Path(tmp))
    except PeerError as exc:
        print(f"send benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    out = console()
    title = f"send {args.slices} CT slices to dcmtk storescp, 1 association"
    out.print(rates_table(title, [storescu, node], baselines=[storescu]))
    target = Target("send: node vs storescu", node, storescu, NODE_VS_STORESCU)
    out.print(targets_table([target]))
    out.print(f"machine after the run: {machine()}")
    return 3 if args.check_targets and not target.passed else 0


if __name__ == "__main__":
    sys.exit(main())
