"""Analysis result -> DICOM Segmentation (BINARY) with highdicom.

One segment per :class:`~dicom_node.analysis.types.Segment`; the SEG shares
the Study and Frame of Reference of the source series, starts a new series and
references every source instance (frames are derived from the source images).
Laterality is a SegmentedPropertyTypeModifierCodeSequence (0062,0011) item,
as dcmqi writes it. A label colour becomes the Recommended Display CIELab Value.
Following IHE AI Results, the algorithm is a Contributing Equipment item
(Processing Equipment) with its maker, name, version and a Device UID that
changes with the version. Images without a Frame of Reference (projection
radiographs) give a SEG without one, which then carries the source's Patient
Orientation (Type 2C).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from typing import BinaryIO, cast

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.analysis.grid import bounding_box
from dicom_node.analysis.sparse import sparse_zeros
from dicom_node.analysis.types import AnalysisResult, Code, Segment
from dicom_node.encode import standard
from dicom_node.encode.source import readable_source
from dicom_node.encode.types import AlgorithmEquipment, Equipment, ResultUIDs, derived_device_uid

standard.install()  # highdicom's module table, read one module at a time

#: CID 7162 Surface Processing Algorithm Family: what the built-in pipelines do.
ALGORITHM_FAMILY = codes.cid7162.MorphologicalOperations
#: CID 7005 purpose of the algorithm's Contributing Equipment item.
PROCESSING_EQUIPMENT = codes.cid7005.ProcessingEquipment


OVERLAP_SLAB_FRAMES = 16  # frames per step of StackedSegmentation's overlap check


class StackedSegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, with a lighter pixel check for :func:`_stack`'s arrays.

    For a 4D uint8 BINARY array, highdicom 0.28's check sums the segments axis in
    uint64 (8 bytes per voxel) to find overlaps, keeps that sum, and then copies the
    whole 4D array with ``astype(uint8)``, though it is uint8 already. For a 300-slice
    CT with 7 segments those are 600 MiB and 525 MiB more, and they set the peak of
    the whole analysis (measured: 1227 MiB before ``build_seg``, 2260 MiB during it).
    Here the same answer (SegmentsOverlap YES or NO) is found slab by slab with a
    small per-voxel count, and the array is used as it is. Any other array, or one that
    highdicom would refuse (not binary, a segment count that does not match), goes
    through highdicom's own check. The output is the same, byte for byte
    (tests/test_encode.py).
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: np.ndarray | hd.Volume,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray | hd.Volume, hd.seg.SegmentsOverlapValues]:
        ours = (
            type(pixel_array) is np.ndarray
            and pixel_array.ndim == 4
            and pixel_array.dtype == np.uint8
            and dtype is np.uint8
            and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
            and pixel_array.shape[-1] == len(segment_numbers) > 1
        )
        if not ours or cast(np.ndarray, pixel_array).max() > 1:
            return super()._check_and_cast_pixel_array(
                pixel_array, segment_numbers, segmentation_type, dtype
            )
        overlap = segments_overlap(cast(np.ndarray, pixel_array))
        values = hd.seg.SegmentsOverlapValues
        return pixel_array, values.YES if overlap else values.NO


def segments_overlap(stack: np.ndarray) -> bool:
    """Whether any voxel is in two segments of a binary (frames, rows, columns, segments)
    uint8 stack; needs one count per voxel of a slab of frames."""
    frames, segments = stack.shape[0], stack.shape[-1]
    for start in range(0, frames, OVERLAP_SLAB_FRAMES):
        slab = stack[start : start + OVERLAP_SLAB_FRAMES]
        count = slab[..., 0].astype(np.uint16)  # up to 65535 segments without wrapping
        for index in range(1, segments):
            count += slab[..., index]
        if (count > 1).any():
            return True
    return False


STREAMED_PIXEL_BYTES = 2**20  # Pixel Data this large is written from a buffer


def save_dataset(dataset: Dataset, stream: BinaryIO) -> None:
    """``dataset.save_as(stream)`` (a Part 10 file) without copies of its Pixel Data.

    pydicom writes an element's value into a buffer of its own and then writes a copy of
    that buffer: two copies of a SEG's frames (65 MiB for 2000 frames of 512 x 512) on
    top of the dataset's own. A value that is a buffer (:class:`io.BytesIO`, which shares
    the bytes it is made from) is written from it in chunks instead; the bytes written
    are the same. The dataset is left as it was.
    """
    element = dataset["PixelData"] if "PixelData" in dataset else None
    value = element.value if element is not None else None
    # an odd length is padded when written, and pydicom 3.0 takes a buffer's length
    # before padding it: such a value (highdicom pads its frames) goes the usual way
    if not isinstance(value, bytes) or len(value) < STREAMED_PIXEL_BYTES or len(value) % 2:
        dataset.save_as(stream, enforce_file_format=True)
        return
    assert element is not None
    element.value = io.BytesIO(value)
    try:
        dataset.save_as(stream, enforce_file_format=True)
    finally:
        element.value = value


def build_seg(
    result: AnalysisResult, uids: ResultUIDs, equipment: Equipment
) -> hd.seg.Segmentation:
    """Encode ``result`` as a BINARY Segmentation referencing every source image."""
    if not result.segments:
        raise ValueError(f"pipeline {result.pipeline!r} returned no segments to encode")
    volume = result.volume
    expected = volume.hu.shape
    for segment in result.segments:
        if segment.mask.shape != expected:
            raise ValueError(
                f"segment {segment.key!r} mask shape {segment.mask.shape} "
                f"differs from the volume's {expected}"
            )
    pixels = _stack(result.segments, expected)
    first = readable_source(volume.datasets[0])
    seg = StackedSegmentation(
        source_images=[first.dataset, *volume.datasets[1:]],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(result, uids),
        series_instance_uid=uids.seg_series_uid,
        series_number=equipment.seg_series_number,
        sop_instance_uid=uids.seg_sop_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        content_description=f"{result.pipeline} segmentation",
        content_label=_content_label(result.pipeline),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
        contributing_equipment=contributing_equipment(result, equipment),
    )
    first.restore(seg, "SEG")
    add_device_uid(seg, result, equipment)
    seg.SeriesDescription = series_description(result, "SEG")
    if "FrameOfReferenceUID" not in seg:
        seg.PatientOrientation = volume.datasets[0].get("PatientOrientation") or ""
    drop_incomplete_study_references(seg)
    if equipment.institution_name:
        seg.InstitutionName = equipment.institution_name
    return seg


def _stack(segments: Sequence[Segment], shape: tuple[int, ...]) -> np.ndarray:
    """The masks stacked along a new first axis, seen with segments last (highdicom's layout).

    Stacked segments-first, so that each frame of a segment is contiguous: an axis=-1
    stack interleaves every voxel and took ~2 s for 300 slices x 7 segments. Only each
    mask's bounding box is copied; the rest of the stack stays zero pages that were never
    written (a nodule spans a few slices and rows). Handed over as uint8, highdicom's
    BINARY frame type: no per-frame cast, and :class:`StackedSegmentation` takes it as
    it is.
    """
    stacked = sparse_zeros((len(segments), *shape))
    for target, segment in zip(stacked, segments, strict=True):
        mask = segment.mask.astype(bool, copy=False)
        box = bounding_box(mask)
        if box is not None:
            target[box] = mask[box]
    return np.moveaxis(stacked.view(np.uint8), 0, -1)


def segment_descriptions(
    result: AnalysisResult, uids: ResultUIDs
) -> list[hd.seg.SegmentDescription]:
    """Segment Description macro items, numbered from 1 in result order."""
    algorithm = algorithm_identification(result)
    descriptions = []
    for number, segment in enumerate(result.segments, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            segmented_property_category=_code(segment.category),
            segmented_property_type=_code(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid(uids, segment),
            tracking_id=segment.label,
            display_color=_color(segment.color),
        )
        if segment.laterality is not None:
            type_item = description.SegmentedPropertyTypeCodeSequence[0]
            type_item.SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(_code(segment.laterality))
            ]
        descriptions.append(description)
    return descriptions


def algorithm_equipment(result: AnalysisResult, equipment: Equipment) -> AlgorithmEquipment:
    """The algorithm's maker and Device UID: declared by a model package, else derived."""
    return AlgorithmEquipment(
        manufacturer=result.manufacturer or equipment.manufacturer,
        model_name=result.algorithm_name,
        software_version=result.algorithm_version,
        device_uid=result.device_uid
        or derived_device_uid(result.algorithm_name, result.algorithm_version),
    )


def contributing_equipment(
    result: AnalysisResult, equipment: Equipment
) -> list[hd.ContributingEquipment]:
    """One Contributing Equipment item for the algorithm (its Device UID: add_device_uid)."""
    algorithm = algorithm_equipment(result, equipment)
    return [
        hd.ContributingEquipment(
            manufacturer=algorithm.manufacturer,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=algorithm.model_name,
            software_versions=algorithm.software_version,
            contribution_description=f"{result.pipeline} analysis",
        )
    ]


def series_description(result: AnalysisResult, what: str) -> str:
    """``<pipeline> <what>``, and the source series' number where it has one
    (``ct-chest SEG of series 3``): a study whose kernels were analysed apart gets a result
    series for each, and a PACS lists them side by side under one series number."""
    number = str(result.volume.datasets[0].get("SeriesNumber", "") or "").strip()
    text = f"{result.pipeline} {what}" + (f" of series {number}" if number else "")
    return text[:64]  # LO


def add_device_uid(dataset: Dataset, result: AnalysisResult, equipment: Equipment) -> None:
    """Device UID (0018,1002) in the algorithm's item: highdicom has no argument for it.

    highdicom adds items of its own (the source's acquisition equipment, itself),
    so the algorithm's item is found by its maker, name and version.
    """
    algorithm = algorithm_equipment(result, equipment)
    for item in dataset.ContributingEquipmentSequence:
        identity = tuple(
            item.get(keyword)
            for keyword in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")
        )
        if identity == (algorithm.manufacturer, algorithm.model_name, algorithm.software_version):
            item.DeviceUID = algorithm.device_uid
            return
    raise ValueError(f"no Contributing Equipment item for {algorithm.model_name!r}")


def algorithm_identification(result: AnalysisResult) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=result.algorithm_name,
        family=algorithm_family(result),
        version=result.algorithm_version,
    )


def algorithm_family(result: AnalysisResult) -> hd.sr.CodedConcept:
    """The result's CID 7162 algorithm family; morphological operations by default."""
    if result.algorithm_family is None:
        return ALGORITHM_FAMILY
    return _code(result.algorithm_family)


def tracking_uid(uids: ResultUIDs, segment: Segment) -> str:
    """Deterministic Tracking UID of a segment: the same in the SEG and the SR, and on resend."""
    return tracking_uid_for_key(uids, segment.key)


def tracking_uid_for_key(uids: ResultUIDs, key: str) -> str:
    """Deterministic Tracking UID of whatever ``key`` names in the result (segment or group)."""
    name = f"{uids.seg_sop_uid}/{key}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def segment_number(result: AnalysisResult, key: str) -> int:
    """The SegmentNumber that :func:`build_seg` gives the segment ``key``."""
    for number, segment in enumerate(result.segments, start=1):
        if segment.key == key:
            return number
    raise KeyError(f"no segment {key!r} in result of {result.pipeline!r}")


def referenced_source_series(seg: Dataset) -> str:
    """SeriesInstanceUID of the images the SEG was derived from."""
    return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)


def drop_incomplete_study_references(dataset: Dataset) -> None:
    """Remove ReferencedStudySequence items without a SOP Class UID.

    highdicom copies this Type 3 sequence from the source images; de-identified
    data often keep only the instance UID, which dciodvfy reports as an error.
    """
    items = [
        item
        for item in dataset.get("ReferencedStudySequence", [])
        if item.get("ReferencedSOPClassUID") and item.get("ReferencedSOPInstanceUID")
    ]
    if items:
        dataset.ReferencedStudySequence = items
    elif "ReferencedStudySequence" in dataset:
        del dataset.ReferencedStudySequence


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _color(rgb: tuple[int, int, int] | None) -> hd.color.CIELabColor | None:
    return hd.color.CIELabColor.from_rgb(*rgb) if rgb is not None else None


def _content_label(pipeline: str) -> str:
    """ContentLabel is a CS: upper case, digits, underscore, at most 16 characters."""
    label = "".join(c if c.isalnum() else "_" for c in pipeline.upper())
    return label[:16] or "SEGMENTATION"
