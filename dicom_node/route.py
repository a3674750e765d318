"""Complete study x routing rules -> planned jobs. Pure apart from logging.

A rule's ``when`` maps DICOM keywords to tests, all of which must hold for a
series (tested on one instance header of the series):

- a scalar: the value equals it (for a multi-valued element: any value does);
- a list: the value is one of them;
- a mapping with one operator: ``equals``, ``one_of``, ``not`` (scalar or list),
  ``contains`` (case-insensitive substring), ``regex`` (search), ``present``.

Every matching rule yields a job, provided its pipeline can analyse the series
(:func:`skip_reason` with the pipeline's :class:`Needs`): the built-in ``ct-chest``
needs an axial volume of at least three slices; a model package declares what it
accepts in its ``model.yaml`` (modalities, body parts, slice counts, 2-D or 3-D),
so a 2-D package takes a single radiograph without Image Plane geometry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicom_node.analysis.packages import PackageError, load_spec, package_names
from dicom_node.analysis.pipelines import PIPELINE_NAMES
from dicom_node.config import Condition, Route, Scalar

log = logging.getLogger(__name__)

NON_IMAGE_MODALITIES = frozenset(
    {"SR", "SEG", "KO", "PR", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "FID"}
)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
MIN_SLICES = 3
# |cos| of the angle between the slice normal and the patient's z axis; 0.9 allows
# about 25 degrees of gantry tilt or oblique reconstruction.
AXIAL_MIN_COSINE = 0.9


@dataclass(frozen=True)
class Needs:
    """What a pipeline needs of a series, checked before a job is made for it.

    The checks every pipeline shares (an image, not a secondary capture, localizer,
    dose report or multi-frame object) always apply; these add to them.
    """

    geometry: bool = True  # Image Orientation (Patient): slices of a volume
    axial: bool = True  # slice normal within ~25 degrees of the patient's z axis
    min_slices: int = MIN_SLICES
    max_slices: int | None = None
    modalities: tuple[str, ...] = ()  # empty: any
    body_parts: tuple[str, ...] = ()  # BodyPartExamined; empty, or absent in the header: any
    lossless: bool = False  # it measures densities: no lossy-compressed pixel data


#: The built-in pipelines' needs (``ct-chest``: an axial CT volume, whose densities it
#: measures: emphysema and nodule figures off lossy JPEG differ, e.g. %LAA-950 of a lung
#: 1.66 % lossless, 1.91 % at 12-bit and 4.62 % at 8-bit JPEG on the GE 3-slice CT).
VOLUME = Needs(lossless=True)
#: Transfer syntaxes that are always lossy (JPEG 2000 and HTJ2K may be either: Lossy
#: Image Compression tells).
LOSSY_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 and 4)
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    }
)
#: A pipeline whose needs are unknown here (a package read without ``models_path``):
#: only the shared checks; the package itself refuses what it does not accept.
ANY_IMAGE = Needs(geometry=False, axial=False, min_slices=1)


def pipeline_needs(pipeline: str, models_path: Path | None) -> Needs:
    """The needs of ``pipeline``: a built-in's, or those a package's model.yaml declares.

    A package with ``input.dimensions: 2`` needs no geometry (a radiograph has none);
    a 3-D one needs at least two slices with geometry, and axial slices unless it
    reorients (``input.orientation``). Reads YAML only (no torch).
    """
    if pipeline in PIPELINE_NAMES:
        return VOLUME
    if models_path is None or pipeline not in package_names(models_path):
        return ANY_IMAGE
    try:
        spec = load_spec(models_path / pipeline)
    except PackageError as exc:  # the job will fail with it, visibly
        log.warning("package %s: cannot read what it accepts: %s", pipeline, exc)
        return ANY_IMAGE
    accepts, volume = spec.accepts, spec.input.dimensions == 3
    return Needs(
        geometry=volume,
        axial=volume and spec.input.orientation is None,
        min_slices=max(accepts.min_slices, 2 if volume else 1),
        max_slices=accepts.max_slices,
        modalities=tuple(accepts.modalities),
        body_parts=tuple(part.upper() for part in accepts.body_parts),
    )


@dataclass(frozen=True)
class SeriesInfo:
    series_id: int
    header: Dataset  # one instance of the series, without pixel data
    instance_count: int


@dataclass(frozen=True)
class PreviousJob:
    series_id: int
    route: str
    instance_count: int


@dataclass(frozen=True)
class PlannedJob:
    series_id: int
    route: str
    pipeline: str
    send_to: tuple[str, ...]
    instance_count: int
    priority: str = "normal"  # the route's: "urgent" jobs are claimed before "normal" ones


def plan_jobs(
    routes: Sequence[Route],
    series: Iterable[SeriesInfo],
    previous: Sequence[PreviousJob],
    models_path: Path | None = None,
) -> list[PlannedJob]:
    """Jobs for every (series, matching route) that the route's pipeline can analyse and
    that is not already done. ``models_path`` (``analysis.models_path``) is where the
    packages' model.yaml say what they accept; without it packages get the shared checks."""
    planned = []
    needs: dict[str, Needs] = {}
    for info in series:
        matching = [route for route in routes if rule_matches(route.when, info.header)]
        if not matching:
            log.info("series %d: no route matches", info.series_id)
            continue
        for route in matching:
            if route.pipeline not in needs:
                needs[route.pipeline] = pipeline_needs(route.pipeline, models_path)
            reason = skip_reason(info.header, info.instance_count, needs[route.pipeline])
            if reason is not None:
                log.info(
                    "series %d: not analysed: %s (route %r)", info.series_id, reason, route.name
                )
                continue
            if _already_done(info, route, previous):
                log.info("series %d: unchanged since its last %r job", info.series_id, route.name)
                continue
            planned.append(
                PlannedJob(
                    info.series_id,
                    route.name,
                    route.pipeline,
                    tuple(route.send_to),
                    info.instance_count,
                    route.priority,
                )
            )
    return planned


def _already_done(info: SeriesInfo, route: Route, previous: Sequence[PreviousJob]) -> bool:
    return any(
        job.series_id == info.series_id
        and job.route == route.name
        and job.instance_count == info.instance_count
        for job in previous
    )


def skip_reason(header: Dataset, instance_count: int, needs: Needs = VOLUME) -> str | None:
    """Why a pipeline with ``needs`` cannot analyse the series, or None if it can."""
    modality = str(header.get("Modality", ""))
    sop_class = str(header.get("SOPClassUID", ""))
    image_type = [str(v).upper() for v in _values(header.get("ImageType", []))]
    if modality in NON_IMAGE_MODALITIES:
        return f"not an image series (Modality {modality})"
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return f"secondary capture (SOP Class {sop_class})"
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer/scout image"
    if "DOSE" in " ".join(image_type) or "DOSE" in str(header.get("SeriesDescription", "")).upper():
        return "dose report"
    if int(header.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame images are not supported yet"
    if needs.modalities and modality not in needs.modalities:
        return f"Modality {modality} is not one the pipeline accepts {list(needs.modalities)}"
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if needs.body_parts and body_part and body_part not in needs.body_parts:
        return f"BodyPartExamined {body_part!r} is not one of {list(needs.body_parts)}"
    if needs.geometry:
        reason = _volume_geometry(header, needs.axial)
        if reason is not None:
            return reason
    if needs.lossless:
        reason = _lossy(header)
        if reason is not None:
            return reason
    if instance_count < needs.min_slices:
        what = "a volume" if needs.geometry else "the pipeline"
        return f"too few slices for {what} ({instance_count} < {needs.min_slices})"
    if needs.max_slices is not None and instance_count > needs.max_slices:
        return f"too many images for the pipeline ({instance_count} > {needs.max_slices})"
    return None


def _lossy(header: Dataset) -> str | None:
    """Why the series' pixel data are lossy-compressed (so densities measured on them are
    not those of the scan), or None."""
    what = "the pipeline measures densities"
    if str(header.get("LossyImageCompression", "") or "").strip() == "01":
        return f"lossy-compressed images (Lossy Image Compression 01; {what})"
    meta = getattr(header, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax in LOSSY_SYNTAXES:
        return f"lossy-compressed images ({UID(syntax).name}; {what})"
    return None


def _volume_geometry(header: Dataset, axial: bool) -> str | None:
    orientation = header.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return "no ImageOrientationPatient"
    normal = np.cross(np.array(orientation[:3], float), np.array(orientation[3:], float))
    if axial and abs(normal[2]) < AXIAL_MIN_COSINE:
        return f"not axial (slice normal {np.round(normal, 2).tolist()})"
    return None


def rule_matches(when: dict[str, Scalar | list[Scalar] | Condition], header: Dataset) -> bool:
    return all(_test(keyword, test, header) for keyword, test in when.items())


def _test(keyword: str, test: Scalar | list[Scalar] | Condition, header: Dataset) -> bool:
    element = header.get(keyword)
    values = [] if element is None else _values(element)
    if isinstance(test, Condition):
        return _condition(test, values)
    if isinstance(test, list):
        return any(_equal(value, option) for value in values for option in test)
    return any(_equal(value, test) for value in values)


def _condition(cond: Condition, values: list[object]) -> bool:
    text = "\\".join(str(v) for v in values)
    if cond.present is not None:
        return bool(text.strip()) == cond.present
    if cond.equals is not None:
        return any(_equal(v, cond.equals) for v in values)
    if cond.one_of is not None:
        return any(_equal(v, option) for v in values for option in cond.one_of)
    if cond.not_ is not None:
        excluded = cond.not_ if isinstance(cond.not_, list) else [cond.not_]
        return not any(_equal(v, option) for v in values for option in excluded)
    if cond.contains is not None:
        return cond.contains.lower() in text.lower()
    assert cond.regex is not None  # Condition guarantees exactly one operator
    return re.search(cond.regex, text) is not None


def _values(element: object) -> list[object]:
    if isinstance(element, MultiValue | list | tuple):
        return list(element)
    return [element]


def _equal(value: object, expected: Scalar) -> bool:
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        try:
            return float(value) == float(expected)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
    return str(value).strip() == str(expected).strip()


# -- explaining a decision (``dicom-node rules explain``) ----------------------------------

# Values of the Patient module (group 0010: name, ID, birth date, ...) never appear in reasons.
_PATIENT_GROUP = 0x0010
_SHOWN_CHARS = 64


@dataclass(frozen=True)
class RouteVerdict:
    """One route against one series: whether it matches and, if not, every failing test."""

    route: str
    matches: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class SeriesExplanation:
    """What :func:`plan_jobs` would decide for a series, with reasons."""

    verdicts: tuple[RouteVerdict, ...]
    matching: tuple[Route, ...]
    # why the matching routes' pipelines cannot analyse it: the reason when all refuse
    # it for one reason, else "route NAME: reason; ..."; None if all of them can
    skip: str | None
    jobs: tuple[str, ...]  # names of the routes that would create a job

    @property
    def verdict(self) -> str:
        if self.jobs:
            return "would create jobs for routes " + ", ".join(self.jobs)
        if not self.matching:
            return "nothing (no route matches)"
        return f"nothing (not analysed: {self.skip})"


def explain(
    routes: Sequence[Route],
    header: Dataset,
    instance_count: int,
    models_path: Path | None = None,
) -> SeriesExplanation:
    """Explain routing for one series, using the very tests :func:`plan_jobs` uses.

    Ignores jobs already done for the series (``plan_jobs``' ``previous``).
    """
    verdicts = tuple(_route_verdict(route, header) for route in routes)
    matching = tuple(route for route, v in zip(routes, verdicts, strict=True) if v.matches)
    skips = {
        route.name: skip_reason(header, instance_count, pipeline_needs(route.pipeline, models_path))
        for route in matching
    }
    jobs = tuple(route.name for route in matching if skips[route.name] is None)
    reasons = {reason for reason in skips.values() if reason is not None}
    refused = [f"route {name}: {reason}" for name, reason in skips.items() if reason is not None]
    skip = reasons.pop() if len(reasons) == 1 and not jobs else "; ".join(refused) or None
    return SeriesExplanation(verdicts, matching, skip, jobs)


def _route_verdict(route: Route, header: Dataset) -> RouteVerdict:
    reasons = tuple(
        why_not(keyword, test, header)
        for keyword, test in route.when.items()
        if not _test(keyword, test, header)
    )
    return RouteVerdict(route.name, not reasons, reasons)


def why_not(keyword: str, test: Scalar | list[Scalar] | Condition, header: Dataset) -> str:
    """Why ``test`` fails on ``header``'s ``keyword``, e.g. ``Modality: 'MR' is not 'CT'``."""
    element = header.get(keyword)
    values = [] if element is None else _values(element)
    text = "\\".join(str(v) for v in values)
    if isinstance(test, Condition) and test.present is False:
        return f"{keyword}: {_shown(keyword, text)} is present (expected absent)"
    if element is None:
        return f"{keyword}: missing"
    if not text.strip():
        return f"{keyword}: empty"
    return f"{keyword}: {_shown(keyword, text)} {_failed_test(test)}"


def _failed_test(test: Scalar | list[Scalar] | Condition) -> str:
    if isinstance(test, list):
        return f"is not one of {test!r}"
    if not isinstance(test, Condition):
        return f"is not {test!r}"
    if test.equals is not None:
        return f"is not {test.equals!r}"
    if test.one_of is not None:
        return f"is not one of {test.one_of!r}"
    if test.not_ is not None:
        return f"is excluded by not: {test.not_!r}"
    if test.contains is not None:
        return f"does not contain {test.contains!r}"
    return f"does not match regex {test.regex!r}"


def _shown(keyword: str, text: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is not None and tag >> 16 == _PATIENT_GROUP:
        return "<patient data not shown>"
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return repr(text)
