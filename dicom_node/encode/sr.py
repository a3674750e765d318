"""Analysis result + its SEG -> Comprehensive 3D SR following TID 1500.

TID 1500 Measurement Report with a device observer (TID 1004), one TID 1411
Volumetric ROI group per segment that references the SEG segment (and the
source series), with volume, mean attenuation (TID 1419 style) and the
segment's further measurements (e.g. %LAA-950, Perc15) measured by the
pipeline's algorithm. Measurements of several segments together (e.g. both
lungs) form a TID 1501 group: TID 1411 references exactly one segment, so that
group names the structure as finding type and site instead. Codes of a private
scheme (designator "99...") are declared in the CodingSchemeIdentificationSequence.
The evidence lists the SEG and every source image.

Model packages add: a segment of a single image (a radiograph) is a TID 1410
Planar ROI group referencing its SEG frame; volume or mean HU that a pipeline
does not report (None) are left out; per-finding classifications are the
segment's qualitative evaluations and probability NUMs; a classifier without
segments gives an SR without SEG (``seg=None``), its result a TID 1501 group.
The algorithm is Contributing Equipment with its Device UID (IHE AI Results).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeGuard

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.analysis.types import (
    AnalysisResult,
    Code,
    Evaluation,
    Measurement,
    Segment,
    SegmentGroup,
)
from dicom_node.encode.seg import (
    add_device_uid,
    algorithm_family,
    contributing_equipment,
    drop_incomplete_study_references,
    referenced_source_series,
    series_description,
    tracking_uid,
    tracking_uid_for_key,
)
from dicom_node.encode.source import readable_source
from dicom_node.encode.types import Equipment, ResultUIDs

#: Procedure reported (CID 100, extensible): CT of chest.
CT_OF_CHEST = hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest")
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")


def build_sr(
    result: AnalysisResult,
    seg: Dataset | None,
    uids: ResultUIDs,
    equipment: Equipment,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode the measurements of ``result`` as a TID 1500 report on ``seg``.

    ``seg`` is None only for a result without segments (a classifier).
    ``predecessor`` is an earlier SR of the same job that this one replaces; it
    is listed in the PredecessorDocumentsSequence.
    """
    items = seg.SegmentSequence if seg is not None else []
    numbers = {int(item.SegmentNumber): str(item.SegmentLabel) for item in items}
    if len(numbers) != len(result.segments):
        raise ValueError(
            f"SEG has {len(numbers)} segments but the result has {len(result.segments)}"
        )
    if not result.segments and not result.groups:
        raise ValueError(f"pipeline {result.pipeline!r} returned nothing to report")
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.algorithm_name,
        version=result.algorithm_version,
        family=algorithm_family(result),
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        _segment_group(algorithm, segment, number, seg, uids, result)
        for number, segment in enumerate(result.segments, start=1)
        if seg is not None
    ]
    groups += [_aggregate_group(algorithm, group, uids) for group in result.groups]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(equipment),
        procedure_reported=_code(result.procedure) if result.procedure else CT_OF_CHEST,
        imaging_measurements=groups,
    )
    evidence = [*([seg] if seg is not None else []), *result.volume.datasets]
    first = readable_source(evidence[0])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[first.dataset, *evidence[1:]],
        content=report,
        series_instance_uid=uids.sr_series_uid,
        series_number=equipment.sr_series_number,
        sop_instance_uid=uids.sr_sop_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        is_complete=True,
        institution_name=equipment.institution_name,
        previous_versions=[predecessor] if predecessor is not None else None,
        coding_schemes=_private_schemes(result) or None,
        contributing_equipment=contributing_equipment(result, equipment),
    )
    first.restore(sr, "SR")
    add_device_uid(sr, result, equipment)
    sr.ManufacturerModelName = equipment.model_name
    sr.SoftwareVersions = equipment.software_version
    sr.DeviceSerialNumber = equipment.device_serial_number
    sr.SeriesDescription = series_description(result, "measurements")
    drop_incomplete_study_references(sr)
    return sr


def _observation_context(equipment: Equipment) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=equipment.device_observer_uid,
        name=equipment.model_name,
        manufacturer_name=equipment.manufacturer,
        model_name=equipment.model_name,
        serial_number=equipment.device_serial_number,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _segment_group(
    algorithm: hd.sr.AlgorithmIdentification,
    segment: Segment,
    number: int,
    seg: Dataset,
    uids: ResultUIDs,
    result: AnalysisResult,
) -> (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
):
    """TID 1411 group for one segment (TID 1410 on a single image), referencing the SEG."""
    site = hd.sr.FindingSite(
        anatomic_location=_code(segment.finding_site or segment.type),
        laterality=_code(segment.laterality) if segment.laterality is not None else None,
    )
    # the same content in either template; only the segment reference differs
    content: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid(uids, segment), identifier=segment.label
        ),
        "finding_type": _code(segment.type),
        "finding_category": _code(segment.category),
        "algorithm_id": algorithm,
        "finding_sites": [site],
        "measurements": _segment_measurements(segment, algorithm),
        "qualitative_evaluations": _evaluations(segment.evaluations),
    }
    if len(result.volume.datasets) == 1:
        frame = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            frame_number=_frame_of_segment(seg, number),
            segment_number=number,
            source_image=hd.sr.SourceImageForSegmentation.from_source_image(
                result.volume.datasets[0]
            ),
        )
        planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=frame, **content
        )
        _frame_reference_only(planar)
        return planar
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(referenced_source_series(seg)),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=referenced, **content
    )


def _segment_measurements(
    segment: Segment, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    """Volume and mean HU when reported, then the segment's own measurements.

    None means not reported; NaN is read the same way (nothing to report either). A
    segment that reports its own Volume (a nodule candidate's, in mm3) gets no second
    one in mL: a reader would see the same quantity twice.
    """
    measurements = []
    own_volume = any(
        (m.name.value, m.name.scheme) == (codes.SCT.Volume.value, "SCT")
        for m in segment.measurements
    )
    if _reported(segment.volume_ml) and not own_volume:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=round(segment.volume_ml, 3),
                unit=MILLILITER,
                algorithm_id=algorithm,
            )
        )
    if _reported(segment.mean_hu):
        measurements.append(
            hd.sr.Measurement(
                name=codes.DCM.AttenuationCoefficient,
                value=round(segment.mean_hu, 3),
                unit=HOUNSFIELD_UNIT,
                derivation=codes.SCT.Mean,
                algorithm_id=algorithm,
            )
        )
    return measurements + [_measurement(m, algorithm) for m in segment.measurements]


def _reported(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _frame_reference_only(group: Iterable[Dataset]) -> None:
    """Drop Referenced Segment Number where a SEG frame is referenced (PS3.3 C.18.4.1).

    In the Image Reference Macro it is required only when no Referenced Frame Number
    is present; highdicom writes both, which dciodvfy reports as an error.
    """
    for item in group:
        for child in item.get("ContentSequence", []):
            for reference in child.get("ReferencedSOPSequence", []):
                if "ReferencedFrameNumber" in reference and "ReferencedSegmentNumber" in reference:
                    del reference.ReferencedSegmentNumber
            _frame_reference_only([child])


def _frame_of_segment(seg: Dataset, number: int) -> int:
    """The SEG frame (1-based) holding segment ``number`` of a single-image source.

    The Segment Identification of a frame is per frame, or shared by every frame
    (highdicom shares it when the SEG holds a single segment).
    """
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        identification = group.get("SegmentIdentificationSequence") or shared
        if identification and int(identification[0].ReferencedSegmentNumber) == number:
            return index
    raise ValueError(f"segment {number} has no frame in the SEG")


def _aggregate_group(
    algorithm: hd.sr.AlgorithmIdentification, group: SegmentGroup, uids: ResultUIDs
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for measurements of several segments together, e.g. both lungs."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid_for_key(uids, group.key), identifier=group.label
        ),
        finding_type=_code(group.type),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=_code(group.type))],
        measurements=[_measurement(m, algorithm) for m in group.measurements],
        qualitative_evaluations=_evaluations(group.evaluations),
    )


def _evaluations(evaluations: tuple[Evaluation, ...]) -> list[hd.sr.QualitativeEvaluation] | None:
    if not evaluations:
        return None
    return [hd.sr.QualitativeEvaluation(_code(e.name), _code(e.value)) for e in evaluations]


def _measurement(
    measurement: Measurement, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=_code(measurement.name),
        value=round(measurement.value, 3),
        unit=_code(measurement.unit),
        derivation=_code(measurement.derivation) if measurement.derivation is not None else None,
        algorithm_id=algorithm,
    )


def _private_schemes(result: AnalysisResult) -> list[CodingSchemeIdentificationItem]:
    """One CodingSchemeIdentificationSequence item per private ("99...") scheme used."""
    codes_used = [
        code
        for measurements in (
            *(s.measurements for s in result.segments),
            *(g.measurements for g in result.groups),
        )
        for m in measurements
        for code in (m.name, m.unit, m.derivation)
        if code is not None
    ]
    codes_used += [
        code
        for evaluations in (
            *(s.evaluations for s in result.segments),
            *(g.evaluations for g in result.groups),
        )
        for e in evaluations
        for code in (e.name, e.value)
    ]
    codes_used += [
        code
        for code in (
            *(g.type for g in result.groups),
            *(s.finding_site for s in result.segments),
            *(s.type for s in result.segments),
            *(s.category for s in result.segments),
            result.procedure,
            result.algorithm_family,
        )
        if code is not None
    ]
    schemes = sorted({c.scheme for c in codes_used if c.scheme.startswith("99")})
    return [
        CodingSchemeIdentificationItem(
            designator=scheme,
            name=f"{scheme} local codes of {result.algorithm_name}",
            responsible_organization="dicom_node",
        )
        for scheme in schemes
    ]


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)
