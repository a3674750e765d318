"""What ``dicom-node evaluate`` reports: the scores per label, as a table and as CSV.

Split from :mod:`dicom_node.evaluate`, which computes them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dicom_node.analysis.reference import Reference

CSV_COLUMNS = (
    "series_instance_uid", "pipeline", "pipeline_version", "reference", "label",
    "reference_labels", "dice", "ours_voxels", "reference_voxels", "ours_ml",
    "reference_ml", "difference_ml", "difference_percent", "note",
)  # fmt: skip
TABLE_COLUMNS: tuple[str, ...] = (
    "label", "reference_labels", "dice", "ours_ml", "reference_ml", "difference_ml",
    "difference_percent", "ours_voxels", "reference_voxels", "note",
)  # fmt: skip


@dataclass(frozen=True)
class LabelScore:
    """Our segment ``key`` against the reference labels mapped to it."""

    key: str
    reference_labels: tuple[int, ...] | None  # None: the key is not in the label map
    dice: float | None
    ours_voxels: int
    reference_voxels: int | None
    voxel_ml: float
    note: str

    @property
    def ours_ml(self) -> float:
        return self.ours_voxels * self.voxel_ml

    @property
    def reference_ml(self) -> float | None:
        return None if self.reference_voxels is None else self.reference_voxels * self.voxel_ml

    @property
    def difference_ml(self) -> float | None:
        return None if self.reference_ml is None else self.ours_ml - self.reference_ml

    @property
    def difference_percent(self) -> float | None:
        if self.difference_ml is None or not self.reference_voxels:
            return None
        return 100.0 * self.ours_voxels / self.reference_voxels - 100.0


@dataclass(frozen=True)
class Evaluation:
    series_uid: str
    pipeline: str
    version: str
    reference: Reference
    scores: tuple[LabelScore, ...]
    unmapped: tuple[int, ...]  # reference labels present but mapped to no key


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _row(score: LabelScore) -> dict[str, str]:
    labels = score.reference_labels
    return {
        "label": score.key,
        "reference_labels": "n/a" if labels is None else ",".join(map(str, labels)),
        "dice": _fmt(score.dice, ".4f"),
        "ours_voxels": str(score.ours_voxels),
        "reference_voxels": _fmt(score.reference_voxels, "d"),
        "ours_ml": f"{score.ours_ml:.2f}",
        "reference_ml": _fmt(score.reference_ml, ".2f"),
        "difference_ml": _fmt(score.difference_ml, "+.2f"),
        "difference_percent": _fmt(score.difference_percent, "+.1f"),
        "note": score.note,
    }


def csv_rows(evaluation: Evaluation) -> list[dict[str, str]]:
    """The table rows with series, pipeline and reference; ``n/a`` is an empty cell."""
    common = {
        "series_instance_uid": evaluation.series_uid,
        "pipeline": evaluation.pipeline,
        "pipeline_version": evaluation.version,
        "reference": evaluation.reference.path.name,
    }
    rows = []
    for score in evaluation.scores:
        cells = {k: ("" if v == "n/a" else v) for k, v in _row(score).items()}
        rows.append({**common, **cells})
    return rows


def write_csv(evaluations: Sequence[Evaluation], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for evaluation in evaluations:
            writer.writerows(csv_rows(evaluation))


def print_table(evaluation: Evaluation, console: Console) -> None:
    table = Table(
        title=f"{evaluation.pipeline} {evaluation.version} vs {evaluation.reference.path.name}\n"
        f"series {evaluation.series_uid or '(no SeriesInstanceUID)'}",
        caption=_caption(evaluation),
    )
    columns = TABLE_COLUMNS
    for name in columns:
        numeric = name not in ("label", "reference_labels", "note")
        table.add_column(name.replace("_", " "), justify="right" if numeric else "left")
    for score in evaluation.scores:
        row = _row(score)
        table.add_row(*(row[name] for name in columns))
    console.print(table)


def _caption(evaluation: Evaluation) -> str:
    coverage = 100 * evaluation.reference.coverage
    caption = f"difference = ours - reference; reference covers {coverage:.1f}% of the CT grid"
    if evaluation.unmapped:
        shown = ", ".join(map(str, evaluation.unmapped[:12]))
        more = "" if len(evaluation.unmapped) <= 12 else f" (+{len(evaluation.unmapped) - 12})"
        caption += f"; reference labels not evaluated: {shown}{more}"
    return caption
