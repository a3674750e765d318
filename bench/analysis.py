"""Analysis benchmark: the ct-chest pipeline and the SEG + SR encoders, stage by stage.

    .venv/bin/python bench/analysis.py [--device auto|cpu|cuda] [--rounds 3] [--quick]

Studies: a synthetic 300 x 512 x 512 chest phantom (``dicom_node.analysis.phantom``,
written once as DICOM files to a temporary folder) and the real Philips chest CT
(64 x 512 x 512, kernel L). Each study runs in a fresh child process, so that its peak
RSS (``resource.getrusage``) is its own; within it, round 1 warms up and the median of
the others is reported. Stages: load (``load_series``), preprocess, infer, postprocess
(the pipeline's stages), encode (``build_seg`` + ``build_sr``, written to memory).
Target: preprocess + infer + postprocess + encode <= 10 s on the CPU, <= 2 s on a GPU;
``--check-targets`` exits 3 when one is missed. ``--quick``: a 60-slice phantom, one
round (a smoke run; its times mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO_ROOT, console, machine
from rich.table import Table

STAGES = ("load", "preprocess", "infer", "postprocess", "encode")
TARGET_S = {"cpu": 10.0, "cuda": 2.0}
PHILIPS = REPO_ROOT.parent / "shared" / "data" / "real" / "lung-pet-ct-dx-A0001"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--check-targets", action="store_true")
    parser.add_argument("--study", help=argparse.SUPPRESS)  # child mode: one study, JSON out
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.study:
        print(json.dumps(_measure(Path(args.folder), args.device, args.rounds)))
        return 0
    out = console()
    out.print(f"machine: {machine()}")
    rounds = 1 if args.quick else max(2, args.rounds)
    with tempfile.TemporaryDirectory(prefix="dicom_node_bench_analysis_") as tmp:
        slices = 60 if args.quick else 300
        phantom = _write_phantom(Path(tmp), slices)
        studies = {f"phantom {slices} x 512 x 512": phantom}
        if (PHILIPS / "series2_5mm_kernelL").is_dir():
            studies["Philips CT 64 x 512 x 512 (kernel L)"] = PHILIPS / "series2_5mm_kernelL"
        results = {name: _child(folder, args.device, rounds) for name, folder in studies.items()}
    device = next(iter(results.values()))["device"]
    out.print(_table(results, device))
    missed = [
        name
        for name, r in results.items()
        if sum(r["median"][s] for s in STAGES[1:]) > TARGET_S[device.split(":")[0]]
    ]
    out.print(f"machine: {machine()}")
    return 3 if args.check_targets and missed and not args.quick else 0


def _child(folder: Path, device: str, rounds: int) -> dict:
    command = [sys.executable, __file__, "--study", "x", "--folder", str(folder)]
    command += ["--device", device, "--rounds", str(rounds)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"benchmark of {folder} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(folder: Path, preference: str, rounds: int) -> dict:
    """Run every stage ``rounds`` times on the series in ``folder``; times in seconds."""
    import torch
    from pydicom.uid import generate_uid

    from dicom_node.analysis.ct_chest import CtChestPipeline
    from dicom_node.analysis.device import select_device
    from dicom_node.analysis.volume import load_series
    from dicom_node.encode.seg import build_seg
    from dicom_node.encode.sr import build_sr
    from dicom_node.encode.types import Equipment, ResultUIDs

    device = select_device(preference)
    files = sorted(folder.glob("*.dcm"))
    equipment = Equipment(device_serial_number="BENCH", device_observer_uid=generate_uid())
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    candidates = 0
    for _ in range(rounds):
        pipeline = CtChestPipeline(device, airways_segment=True)
        marks = [time.perf_counter()]
        volume = load_series(files)
        marks.append(time.perf_counter())
        located = pipeline.locate(volume)  # as in the node, which keeps no reference:
        del volume  # the whole float32 volume goes before the body is labelled
        prepared = pipeline.crop(located)
        del located
        marks.append(_sync(torch, device))
        masks = pipeline.infer(prepared)
        marks.append(_sync(torch, device))
        result = pipeline.postprocess(prepared, masks)
        marks.append(_sync(torch, device))
        uids = ResultUIDs(generate_uid(), generate_uid(), generate_uid(), generate_uid())
        seg = build_seg(result, uids, equipment)
        sr = build_sr(result, seg, uids, equipment)
        for dataset in (seg, sr):
            dataset.save_as(io.BytesIO())
        marks.append(time.perf_counter())
        for stage, start, end in zip(STAGES, marks[:-1], marks[1:], strict=True):
            times[stage].append(end - start)
        candidates, shape = len(masks.candidates), list(prepared.volume.hu.shape)
        # Free this round's arrays before the next one loads its own: the peak RSS is
        # then one round's, as in the node, which analyses one job at a time per worker
        # (before 2026-12-05, third session, round 2 ran beside round 1's leftovers).
        del prepared, masks, result, seg, sr
        gc.collect()
    measured = {s: v[1:] or v for s, v in times.items()}  # round 1 warms up
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "median": {s: statistics.median(v) for s, v in measured.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0,
        "candidates": candidates,
        "shape": shape,
    }


def _sync(torch, device) -> float:  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _write_phantom(folder: Path, slices: int) -> Path:
    """The phantom as CT files (int16 HU, explicit VR little endian)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from dicom_node.analysis.phantom import chest_phantom

    volume, _ = chest_phantom(slices=slices, size=512, spacing=(1.0, 0.75, 0.75))
    for k, ds in enumerate(volume.datasets):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.PixelData = np.round(volume.hu[k]).astype(np.int16).tobytes()
        ds.save_as(folder / f"CT{k + 1:05d}.dcm", enforce_file_format=True)
    return folder


def _table(results: dict[str, dict], device: str) -> Table:
    target = TARGET_S[device.split(":")[0]]
    threads = next(iter(results.values()))["threads"]
    table = Table(title=f"ct-chest + encode on {device} ({threads} torch threads), median s")
    table.add_column("study")
    for stage in STAGES:
        table.add_column(stage, justify="right")
    table.add_column("ct-chest + encode", justify="right")
    table.add_column("peak RSS", justify="right")
    table.add_column("candidates", justify="right")
    table.add_column(f"target <= {target:g} s")
    for name, r in results.items():
        total = sum(r["median"][s] for s in STAGES[1:])
        memory = f"{r['peak_rss_mib']:.0f} MiB"
        if r["peak_gpu_mib"]:
            memory += f" (GPU {r['peak_gpu_mib']:.0f} MiB)"
        table.add_row(
            name,
            *(f"{r['median'][s]:.2f}" for s in STAGES),
            f"{total:.2f}",
            memory,
            str(r["candidates"]),
            "PASS" if total <= target else "FAIL",
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
