"""Long fuzz run against an in-process node: mutated A-ASSOCIATE-RQ and C-STORE PDUs.

    .venv/bin/python bench/fuzz_long.py --seconds 600 --seed 1

The same cases as ``tests/test_hostile.py::test_fuzzed_pdus_never_break_the_node``,
many more of them, under a time budget. Prints the cases tried per kind, C-ECHO
checks, the peak RSS over the baseline (VmHWM, Linux) and files written outside
``storage.path``; exits 1 if the node stopped answering or wrote outside it.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pdus  # noqa: E402
from nodes import echo_ok, node_settings, running_node  # noqa: E402


def _status_mb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(field)


def _outside(root: Path, storage: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and storage not in p.parents}


def run(seconds: float, seed: int, check_every: int) -> int:
    rng = random.Random(seed)
    tried: Counter[str] = Counter()
    echo_failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = node_settings(root / "var", node={"idle_timeout_seconds": 1.0})
        with running_node(settings) as node:
            port = node.receiver.address[1]
            storage = Path(node.config.storage.path).resolve()
            before = _outside(root, storage)
            Path("/proc/self/clear_refs").write_text("5")
            baseline = _status_mb("VmRSS")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                target = rng.choice(["associate", "store"])
                pdus.fuzz_once(port, target, pdus.random_edits(rng))
                tried[target] += 1
                if sum(tried.values()) % check_every == 0 and not echo_ok(port):
                    echo_failures += 1
            final_echo = echo_ok(port)
            written_outside = _outside(root, storage) - before
    total = sum(tried.values())
    print(f"cases tried: {total} ({dict(tried)}) in {seconds:.0f} s, seed {seed}")
    print(f"C-ECHO checks failed: {echo_failures}; C-ECHO at the end: {final_echo}")
    print(f"peak RSS: +{_status_mb('VmHWM') - baseline} MB over {baseline} MB")
    print(f"files written outside storage.path: {len(written_outside)}")
    return 0 if final_echo and not echo_failures and not written_outside else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=100, help="C-ECHO every N cases")
    args = parser.parse_args()
    return run(args.seconds, args.seed, args.check_every)


if __name__ == "__main__":
    raise SystemExit(main())
