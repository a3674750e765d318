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
"""

from __future__ import annotations

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
    algorithm_family,
    drop_incomplete_study_references,
    referenced_source_series,
    tracking_uid,
    tracking_uid_for_key,
)
from dicom_node.encode.types import Equipment, ResultUIDs

#: Procedure reported (CID 100, extensible): CT of chest.
CT_OF_CHEST = hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest")
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")


def build_sr(
    result: AnalysisResult,
    seg: Dataset,
    uids: ResultUIDs,
    equipment: Equipment,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode the measurements of ``result`` as a TID 1500 report on ``seg``.

    ``predecessor`` is an earlier SR of the same job that this one replaces; it
    is listed in the PredecessorDocumentsSequence.
    """
    numbers = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    if len(numbers) != len(result.segments):
        raise ValueError(
            f"SEG has {len(numbers)} segments but the result has {len(result.segments)}"
        )
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.algorithm_name,
        version=result.algorithm_version,
        family=algorithm_family(result),
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        _measurement_group(algorithm, segment, number, seg, uids)
        for number, segment in enumerate(result.segments, start=1)
    ]
    groups += [_aggregate_group(algorithm, group, uids) for group in result.groups]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(equipment),
        procedure_reported=_code(result.procedure) if result.procedure else CT_OF_CHEST,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *result.volume.datasets],
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
    )
    sr.ManufacturerModelName = equipment.model_name
    sr.SoftwareVersions = equipment.software_version
    sr.DeviceSerialNumber = equipment.device_serial_number
    sr.SeriesDescription = f"{result.pipeline} measurements"
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


def _measurement_group(
    algorithm: hd.sr.AlgorithmIdentification,
    segment: Segment,
    number: int,
    seg: Dataset,
    uids: ResultUIDs,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group for one segment, referencing SEG segment ``number``."""
    site = hd.sr.FindingSite(
        anatomic_location=_code(segment.finding_site or segment.type),
        laterality=_code(segment.laterality) if segment.laterality is not None else None,
    )
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(referenced_source_series(seg)),
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=round(segment.volume_ml, 3),
            unit=MILLILITER,
            algorithm_id=algorithm,
        ),
        hd.sr.Measurement(
            name=codes.DCM.AttenuationCoefficient,
            value=round(segment.mean_hu, 3),
            unit=HOUNSFIELD_UNIT,
            derivation=codes.SCT.Mean,
            algorithm_id=algorithm,
        ),
        *(_measurement(m, algorithm) for m in segment.measurements),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(uids, segment), identifier=segment.label
        ),
        referenced_segment=referenced,
        finding_type=_code(segment.type),
        finding_category=_code(segment.category),
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=measurements,
        qualitative_evaluations=_evaluations(segment.evaluations),
    )


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
