"""``dicom-node evaluate``: compare a pipeline's segments with reference segmentations.

Site acceptance testing. Each image series under DICOM_DIR is analysed by the
pipeline and every segment is compared with the reference labels mapped to it
(``--labels``; built-in maps for TotalSegmentator "total" label maps and for SEG
SegmentLabels). References are resampled onto the CT grid
(:mod:`dicom_node.analysis.reference`); Dice and volumes are counted there.
Series UIDs and file names are printed, never patient data.
Exit codes: 0 success, 1 the pipeline could not analyse a series, 2 bad input.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from rich.console import Console

from dicom_node.analysis.reference import (
    InvalidReference,
    Reference,
    is_label_map,
    label_map_stem,
    read_reference,
)
from dicom_node.analysis.types import AnalysisError, AnalysisResult, Pipeline
from dicom_node.evaluate_report import Evaluation, LabelScore, print_table, write_csv

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: TotalSegmentator "total" task (class map v2): lung lobes and trachea for our keys.
TOTALSEGMENTATOR_TOTAL: dict[str, tuple[int | str, ...]] = {
    "lung_left": (10, 11),
    "lung_right": (12, 13, 14),
    "airways": (16,),
}
NOT_IMAGES = frozenset({"SEG", "SR", "RTSTRUCT", "PR", "KO", "REG"})
LabelSpec = dict[str, tuple[int | str, ...]]


class EvaluationError(Exception):
    """Bad input: an unreadable reference, a reference off the CT grid, a bad label map."""


# -- label maps -----------------------------------------------------------------------------


def parse_label_spec(text: str) -> LabelSpec:
    """``--labels``: a YAML/JSON file or inline ``lung_left=10,11,lung_right=12,13,14``."""
    path = Path(text)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise EvaluationError(f"--labels {path}: cannot read: {exc}") from None
        return _coerce_spec(data, str(path))
    spec: dict[str, list[int | str]] = {}
    key = None
    for token in (t.strip() for t in text.replace(";", ",").split(",")):
        if "=" in token:
            key, token = (part.strip() for part in token.split("=", 1))
            spec.setdefault(key, [])
        if key is None or not token:
            raise EvaluationError(f'--labels "{text}": expected key=value,... near "{token}"')
        spec[key].append(int(token) if token.lstrip("-").isdigit() else token)
    return _coerce_spec(spec, text)


def _coerce_spec(data: object, source: str) -> LabelSpec:
    if not isinstance(data, dict) or not data:
        raise EvaluationError(f"--labels {source}: expected a mapping of segment keys to labels")
    spec: LabelSpec = {}
    for key, value in data.items():
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(isinstance(v, int | str) for v in values):
            raise EvaluationError(f"--labels {source}: {key}: invalid labels {value!r}")
        spec[str(key)] = tuple(values)
    return spec


def resolve_labels(spec: LabelSpec | None, reference: Reference) -> dict[str, tuple[int, ...]]:
    """Our segment key -> label values (label maps) or segment numbers (SEG)."""
    if reference.labelmap is not None:
        spec = TOTALSEGMENTATOR_TOTAL if spec is None else spec
        for key, values in spec.items():
            names = [v for v in values if isinstance(v, str)]
            if names:
                raise EvaluationError(f"{key}: label maps have integer labels, got {names}")
        return {key: tuple(int(v) for v in values) for key, values in spec.items()}
    if spec is None:
        return _default_seg_labels(reference.segment_labels)
    return {key: tuple(_segment_number(v, reference) for v in vs) for key, vs in spec.items()}


def _segment_number(value: int | str, reference: Reference) -> int:
    by_label = {label.casefold(): n for n, label in reference.segment_labels.items()}
    number = by_label.get(value.casefold()) if isinstance(value, str) else value
    if number not in reference.segment_labels:
        known = ", ".join(f"{n} {label!r}" for n, label in reference.segment_labels.items())
        raise EvaluationError(f"{reference.path.name}: no segment {value!r} (segments: {known})")
    return int(number)


def _default_seg_labels(segment_labels: dict[int, str]) -> dict[str, tuple[int, ...]]:
    """Match SegmentLabels case-insensitively: lung + left/right, body, trachea/airway."""
    found: dict[str, list[int]] = {}
    for number, label in segment_labels.items():
        key = _default_seg_key(label.casefold())
        if key is not None:
            found.setdefault(key, []).append(number)
    return {key: tuple(numbers) for key, numbers in found.items()}


def _default_seg_key(label: str) -> str | None:
    if "lung" in label:
        sides = [side for side in ("left", "right") if side in label]
        return f"lung_{sides[0]}" if len(sides) == 1 else None
    if label.strip() in ("body", "entire body"):
        return "body"
    if "trachea" in label or "airway" in label:
        return "airways"
    return None


# -- scores ---------------------------------------------------------------------------------


def evaluate_result(
    result: AnalysisResult, reference: Reference, spec: LabelSpec | None
) -> Evaluation:
    """Score every segment of ``result`` and every mapped key against ``reference``."""
    mapping = resolve_labels(spec, reference)
    ours = {segment.key: segment.mask for segment in result.segments}
    voxel_ml = float(np.prod(result.volume.spacing)) / 1000.0
    scores = []
    for key in [*ours, *(k for k in mapping if k not in ours)]:
        mask = ours.get(key, np.zeros(result.volume.hu.shape, dtype=bool))
        values = mapping.get(key)
        scores.append(_score(key, mask, reference, values, voxel_ml))
    used = {v for values in mapping.values() for v in values}
    unmapped = tuple(v for v in reference.present() if v not in used)
    return Evaluation(
        series_uid=str(result.volume.datasets[0].get("SeriesInstanceUID", "")),
        pipeline=result.pipeline,
        version=result.algorithm_version,
        reference=reference,
        scores=tuple(scores),
        unmapped=unmapped,
    )


def _score(
    key: str, ours: np.ndarray, reference: Reference, values: tuple[int, ...] | None, ml: float
) -> LabelScore:
    count = int(ours.sum())
    if values is None:
        return LabelScore(key, None, None, count, None, ml, "not in the reference")
    theirs = reference.mask(values)
    ref_count = int(theirs.sum())
    overlap = int(np.logical_and(ours, theirs).sum())
    dice = 2.0 * overlap / (count + ref_count) if count + ref_count else None
    note = {(True, False): "absent in reference", (False, True): "absent in ours"}.get(
        (count > 0, ref_count > 0), "" if dice is not None else "absent in both"
    )
    return LabelScore(key, values, dice, count, ref_count, ml, note)


# -- input discovery ------------------------------------------------------------------------


def find_series(dicom_dir: Path) -> dict[str, list[Path]]:
    """Image files under ``dicom_dir`` grouped by SeriesInstanceUID (SEG, SR, ... skipped)."""
    series: dict[str, list[Path]] = {}
    for path in _files(dicom_dir):
        ds = _header(path)
        if ds is None or ds.get("Modality") in NOT_IMAGES or "ImagePositionPatient" not in ds:
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append(path)
    return series


def find_references(reference: Path, series_uids: Sequence[str]) -> dict[str, list[Path]]:
    """Series UID -> reference files: SEG by ReferencedSeriesSequence, label maps by name.

    A label map named ``<SeriesInstanceUID>.nii.gz`` belongs to that series; one with
    another name (or a SEG without ReferencedSeriesSequence) only when there is one series.
    """
    found: dict[str, list[Path]] = {}
    for path in _files(reference):
        if is_label_map(path):
            uid: str | None = label_map_stem(path)
        else:
            ds = _header(path)
            if ds is None or ds.get("Modality") != "SEG":
                continue
            items = ds.get("ReferencedSeriesSequence") or []
            uid = str(items[0].SeriesInstanceUID) if items else None
        if uid not in series_uids and len(series_uids) == 1:
            uid = series_uids[0]
        if uid is not None and uid in series_uids:
            found.setdefault(uid, []).append(path)
    return found


def _header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError):
        return None


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    raise EvaluationError(f"{path}: no such file or folder")


# -- command --------------------------------------------------------------------------------


def run(
    pipeline_name: str,
    dicom_dir: Path,
    reference: Path,
    csv_path: Path | None = None,
    labels: str | None = None,
    device: str = "auto",
    models_path: Path | None = None,
) -> int:
    """``dicom-node evaluate``: analyse, compare, print; return the exit code.

    ``pipeline_name`` is a built-in pipeline or a model package under ``models_path``.
    """
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        spec = parse_label_spec(labels) if labels else None
        pairs = _pairs(dicom_dir, reference)
        pipeline = _pipeline(pipeline_name, device, models_path)
    except EvaluationError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    evaluations: list[Evaluation] = []
    code = EXIT_OK
    for series_uid, files, references in pairs:
        found, series_code = _evaluate_series(pipeline, series_uid, files, references, spec)
        for evaluation in found:
            print_table(evaluation, console)
        evaluations.extend(found)
        code = max(code, series_code)
    if csv_path is not None and evaluations:
        write_csv(evaluations, csv_path)
        console.print(f"wrote {csv_path}")
    if code == EXIT_OK and not any(
        score.reference_labels is not None for found in evaluations for score in found.scores
    ):
        # every row n/a: an acceptance script keyed on the exit status must not pass
        print(
            f"evaluate: nothing was compared: none of {pipeline.name}'s segments is in the"
            " reference (see --labels)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return code


def _pipeline(name: str, device: str, models_path: Path | None) -> Pipeline:
    from dicom_node.analysis.device import select_device
    from dicom_node.analysis.pipelines import build_pipeline

    try:
        return build_pipeline(name, select_device(device), models_path)
    except (ValueError, RuntimeError) as exc:
        raise EvaluationError(str(exc)) from None


def _pairs(dicom_dir: Path, reference: Path) -> list[tuple[str, list[Path], list[Path]]]:
    series = find_series(dicom_dir)
    if not series:
        raise EvaluationError(f"{dicom_dir}: no DICOM image series found")
    references = find_references(reference, list(series))
    if not references:
        raise EvaluationError(
            f"{reference}: no DICOM SEG or label map that belongs to one of the "
            f"{len(series)} series in {dicom_dir} (label maps are matched by the name "
            "<SeriesInstanceUID>.nii.gz when there are several series)"
        )
    for uid in series:
        if uid not in references:
            print(f"evaluate: series {uid}: no reference, skipped", file=sys.stderr)
    return [(uid, series[uid], references[uid]) for uid in series if uid in references]


def _evaluate_series(
    pipeline: Pipeline,
    series_uid: str,
    files: list[Path],
    references: list[Path],
    spec: LabelSpec | None,
) -> tuple[list[Evaluation], int]:
    """Load, read the references (bad input shows before the run), analyse, score."""
    from dicom_node.analysis.volume import load_series

    try:
        volume = load_series(files)
        refs = [read_reference(path, volume) for path in references]
        for ref in refs:
            resolve_labels(spec, ref)
        result = pipeline.run(volume)
    except (EvaluationError, InvalidReference, ValueError) as exc:
        print(f"evaluate: series {series_uid}: {exc}", file=sys.stderr)
        return [], EXIT_USAGE
    except AnalysisError as exc:
        message = f"{pipeline.name} could not analyse it: {exc}"
        print(f"evaluate: series {series_uid}: {message}", file=sys.stderr)
        return [], EXIT_FAILED
    return [evaluate_result(result, ref, spec) for ref in refs], EXIT_OK
