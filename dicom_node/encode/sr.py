"""Analysis result + its SEG -> Comprehensive 3D SR following TID 1500.

TID 1500 Measurement Report with a device observer (TID 1004), one TID 1411
Volumetric ROI group per segment that references the SEG segment (and the
source series), with volume and mean attenuation (TID 1419 style) measured by
the pipeline's algorithm. The evidence lists the SEG and every source image.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.analysis.types import AnalysisResult, Code, Segment
from dicom_node.encode.seg import (
    ALGORITHM_FAMILY,
    drop_incomplete_study_references,
    referenced_source_series,
    tracking_uid,
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
    groups = [
        _measurement_group(result, segment, number, seg, uids)
        for number, segment in enumerate(result.segments, start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(equipment),
        procedure_reported=CT_OF_CHEST,
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
    result: AnalysisResult, segment: Segment, number: int, seg: Dataset, uids: ResultUIDs
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group for one segment, referencing SEG segment ``number``."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.algorithm_name, version=result.algorithm_version, family=ALGORITHM_FAMILY
    )
    site = hd.sr.FindingSite(
        anatomic_location=_code(segment.type),
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
    )


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)
