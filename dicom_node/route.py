"""Complete study x routing rules -> planned jobs. Pure apart from logging.

A rule's ``when`` maps DICOM keywords to tests, all of which must hold for a
series (tested on one instance header of the series):

- a scalar: the value equals it (for a multi-valued element: any value does);
- a list: the value is one of them;
- a mapping with one operator: ``equals``, ``one_of``, ``not`` (scalar or list),
  ``contains`` (case-insensitive substring), ``regex`` (search), ``present``.

Every matching rule yields a job, provided the series can be analysed at all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue

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
    routes: Sequence[Route], series: Iterable[SeriesInfo], previous: Sequence[PreviousJob]
) -> list[PlannedJob]:
    """Jobs for every (series, matching route) that is analysable and not already done."""
    planned = []
    for info in series:
        matching = [route for route in routes if rule_matches(route.when, info.header)]
        if not matching:
            log.info("series %d: no route matches", info.series_id)
            continue
        reason = skip_reason(info.header, info.instance_count)
        if reason is not None:
            log.info("series %d: not analysed: %s", info.series_id, reason)
            continue
        for route in matching:
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


def skip_reason(header: Dataset, instance_count: int) -> str | None:
    """Why a series cannot be analysed as a volume, or None if it can."""
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
    orientation = header.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return "no ImageOrientationPatient"
    normal = np.cross(np.array(orientation[:3], float), np.array(orientation[3:], float))
    if abs(normal[2]) < AXIAL_MIN_COSINE:
        return f"not axial (slice normal {np.round(normal, 2).tolist()})"
    if instance_count < MIN_SLICES:
        return f"too few slices for a volume ({instance_count} < {MIN_SLICES})"
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
    skip: str | None  # why the series is not analysable, or None
    jobs: tuple[str, ...]  # names of the routes that would create a job

    @property
    def verdict(self) -> str:
        if self.jobs:
            return "would create jobs for routes " + ", ".join(self.jobs)
        if not self.matching:
            return "nothing (no route matches)"
        return f"nothing (not analysed: {self.skip})"


def explain(routes: Sequence[Route], header: Dataset, instance_count: int) -> SeriesExplanation:
    """Explain routing for one series, using the very tests :func:`rule_matches` uses.

    Ignores jobs already done for the series (``plan_jobs``' ``previous``).
    """
    verdicts = tuple(_route_verdict(route, header) for route in routes)
    matching = tuple(route for route, v in zip(routes, verdicts, strict=True) if v.matches)
    skip = skip_reason(header, instance_count)
    jobs = tuple(route.name for route in matching) if skip is None else ()
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
