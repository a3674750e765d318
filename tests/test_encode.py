"""SEG and TID 1500 SR built from a real ct-chest result: written, read back, validated."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import subprocess
import sys
import tracemalloc

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from dciodvfy import dciodvfy_errors
from peers import PHILIPS_L
from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from dicom_node.analysis.ct_chest import CtChestPipeline
from dicom_node.analysis.volume import load_series
from dicom_node.encode import standard
from dicom_node.encode.seg import build_seg, tracking_uid
from dicom_node.encode.sr import build_sr
from dicom_node.encode.types import Equipment, ResultUIDs

PHILIPS_HFS = PHILIPS_L
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _uids() -> ResultUIDs:
    return ResultUIDs(generate_uid(), generate_uid(), generate_uid(), generate_uid())


@pytest.fixture(scope="module")
def equipment() -> Equipment:
    return Equipment(device_serial_number="TEST-0001", device_observer_uid=generate_uid())


@pytest.fixture(scope="module")
def result():
    # the anatomy segments only: candidate groups are covered by tests/test_nodules.py
    pipeline = CtChestPipeline(torch.device("cpu"), airways_segment=True, nodules=False)
    return pipeline.run(load_series(sorted(PHILIPS_HFS.glob("*.dcm"))))


@pytest.fixture(scope="module")
def written(result, equipment, tmp_path_factory):
    """(uids, SEG path, SR path, SR-with-predecessor path), built once."""
    folder = tmp_path_factory.mktemp("encode")
    uids = _uids()
    seg = build_seg(result, uids, equipment)
    seg.save_as(folder / "seg.dcm")
    sr = build_sr(result, seg, uids, equipment)
    sr.save_as(folder / "sr.dcm")
    first = pydicom.dcmread(folder / "sr.dcm")
    second_uids = ResultUIDs(
        uids.seg_series_uid, uids.seg_sop_uid, uids.sr_series_uid, generate_uid()
    )
    build_sr(result, seg, second_uids, equipment, predecessor=first).save_as(folder / "sr2.dcm")
    return uids, folder / "seg.dcm", folder / "sr.dcm", folder / "sr2.dcm"


@pytest.fixture(scope="module")
def seg(written):
    return pydicom.dcmread(written[1])


@pytest.fixture(scope="module")
def sr(written):
    return pydicom.dcmread(written[2])


def test_seg_identity_and_equipment(seg, result, written, equipment):
    source = result.volume.datasets[0]
    uids = written[0]
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.SOPInstanceUID == uids.seg_sop_uid
    assert seg.SeriesInstanceUID == uids.seg_series_uid != source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesNumber == equipment.seg_series_number
    assert seg.SegmentationType == "BINARY"
    assert (seg.Manufacturer, seg.ManufacturerModelName) == ("dicom_node", "dicom_node")
    assert seg.SoftwareVersions == equipment.software_version
    assert seg.DeviceSerialNumber == "TEST-0001"


def test_seg_references_every_source_instance(seg, result):
    sources = {ds.SOPInstanceUID for ds in result.volume.datasets}
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == result.volume.datasets[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence} == sources


def test_seg_segments_describe_structures_with_laterality(seg):
    described = {}
    for item in seg.SegmentSequence:
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        modifiers = type_item.get("SegmentedPropertyTypeModifierCodeSequence", [])
        described[item.SegmentNumber] = (
            item.SegmentLabel,
            type_item.CodeValue,
            [m.CodeMeaning for m in modifiers],
            item.SegmentAlgorithmType,
        )
    assert described == {
        1: ("Body", "38266002", [], "AUTOMATIC"),
        2: ("Left lung", "39607008", ["Left"], "AUTOMATIC"),
        3: ("Right lung", "39607008", ["Right"], "AUTOMATIC"),
        4: ("Airways", "110726009", [], "AUTOMATIC"),
    }
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == CtChestPipeline.version


def test_seg_frames_round_trip_the_masks(seg, result):
    """Every frame equals the mask slice of the source image it is derived from."""
    slice_of = {ds.SOPInstanceUID: k for k, ds in enumerate(result.volume.datasets)}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        derivation = group.DerivationImageSequence[0].SourceImageSequence[0]
        k = slice_of[derivation.ReferencedSOPInstanceUID]
        np.testing.assert_array_equal(frame.astype(bool), result.segments[number - 1].mask[k])
        seen.add((number, k))
    expected = {
        (n, k)
        for n, segment in enumerate(result.segments, start=1)
        for k in np.flatnonzero(segment.mask.any(axis=(1, 2)))
    }
    assert seen == expected  # empty frames omitted, none missing


def _groups(sr):
    report = sr.ContentSequence
    measurements = next(i for i in report if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return measurements.ContentSequence


def _find(items, code_value):
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def test_sr_identity_and_evidence(sr, seg, result, written, equipment):
    uids = written[0]
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (uids.sr_sop_uid, uids.sr_series_uid)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    assert (sr.ManufacturerModelName, sr.DeviceSerialNumber) == ("dicom_node", "TEST-0001")
    assert sr.SoftwareVersions == equipment.software_version
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    sources = {ds.SOPInstanceUID for ds in result.volume.datasets}
    assert evidence == sources | {seg.SOPInstanceUID}
    assert "PredecessorDocumentsSequence" not in sr


def test_sr_device_observer(sr, equipment):
    observer = _find(sr.ContentSequence, "121012")  # Device Observer UID
    assert [item.UID for item in observer] == [equipment.device_observer_uid]


def test_sr_measurement_groups_match_the_result(sr, seg, result):
    groups = _groups(sr)
    assert len(groups) == len(result.segments) + len(result.groups)
    segment_groups = groups[: len(result.segments)]
    for number, (group, segment) in enumerate(zip(segment_groups, result.segments, strict=True), 1):
        items = group.ContentSequence
        (referenced,) = _find(items, "121191")  # Referenced Segment
        ref = referenced.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref.ReferencedSegmentNumber == number
        (volume,) = _find(items, "118565006")
        (mean,) = [i for i in _find(items, "112031") if _derivation(i) == "373098007"]
        assert float(volume.MeasuredValueSequence[0].NumericValue) == pytest.approx(
            segment.volume_ml, abs=1e-3
        )
        assert float(mean.MeasuredValueSequence[0].NumericValue) == pytest.approx(
            segment.mean_hu, abs=1e-3
        )
        assert mean.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
        (finding,) = _find(items, "121071")
        assert finding.ConceptCodeSequence[0].CodeValue == segment.type.value
        (site,) = _find(items, "363698007")
        laterality = [i.ConceptCodeSequence[0].CodeMeaning for i in site.get("ContentSequence", [])]
        expected = [segment.laterality.meaning] if segment.laterality else []
        assert laterality == expected


def _derivation(item) -> str | None:
    """CodeValue of a NUM item's Derivation (121401), if it has one."""
    found = _find(item.get("ContentSequence", []), "121401")
    return found[0].ConceptCodeSequence[0].CodeValue if found else None


def _numbers(items) -> dict[tuple[str, str | None], tuple[float, str]]:
    """(concept name, derivation) -> (value, unit) of the NUM items of a group."""
    found = {}
    for item in items:
        if item.ValueType != "NUM":
            continue
        derivation = _find(item.get("ContentSequence", []), "121401")  # Derivation
        key = (
            item.ConceptNameCodeSequence[0].CodeMeaning,
            derivation[0].ConceptCodeSequence[0].CodeMeaning if derivation else None,
        )
        value = item.MeasuredValueSequence[0]
        found[key] = (
            float(value.NumericValue),
            value.MeasurementUnitsCodeSequence[0].CodeValue,
        )
    return found


LUNG_MEASURES = {
    ("Volume", None): "ml",
    ("Attenuation Coefficient", "Mean"): "[hnsf'U]",
    ("Lung volume percentage below -950 HU", None): "%",
    ("Attenuation Coefficient", "15th percentile"): "[hnsf'U]",
}


def test_sr_lung_densitometry_per_lung(sr, result):
    """Each lung's group, which references that lung's segment, holds all four measures."""
    groups = _groups(sr)[: len(result.segments)]
    for number, (group, segment) in enumerate(zip(groups, result.segments, strict=True), 1):
        found = _numbers(group.ContentSequence)
        (referenced,) = _find(group.ContentSequence, "121191")
        assert referenced.ReferencedSOPSequence[0].ReferencedSegmentNumber == number
        if segment.type.meaning != "Lung":
            assert set(found) == set(list(LUNG_MEASURES)[:2]), segment.key
            continue
        assert {k: unit for k, (_, unit) in found.items()} == LUNG_MEASURES, segment.key
        laa, perc15 = segment.measurements
        assert found[list(LUNG_MEASURES)[2]][0] == pytest.approx(laa.value, abs=1e-3)
        assert found[list(LUNG_MEASURES)[3]][0] == pytest.approx(perc15.value, abs=1e-3)


def test_sr_lungs_total_group(sr, result):
    """TID 1501 group: no segment reference, finding site Lung without laterality."""
    total = _groups(sr)[len(result.segments)]
    assert total.ContentTemplateSequence[0].TemplateIdentifier == "1501"
    items = total.ContentSequence
    assert _find(items, "121191") == []
    (site,) = _find(items, "363698007")
    assert site.ConceptCodeSequence[0].CodeValue == "39607008"
    assert "ContentSequence" not in site
    found = _numbers(items)
    assert {k: unit for k, (_, unit) in found.items()} == LUNG_MEASURES
    left, right = (s for s in result.segments if s.key in ("lung_left", "lung_right"))
    total_ml = found[("Volume", None)][0]
    assert total_ml == pytest.approx(round(left.volume_ml, 3) + round(right.volume_ml, 3), abs=2e-3)


def test_sr_declares_the_private_coding_scheme(sr):
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99DICOMNODE"


def test_tracking_uids_are_shared_by_seg_and_sr(sr, seg):
    in_seg = [item.TrackingUID for item in seg.SegmentSequence]
    in_sr = [_find(group.ContentSequence, "112040")[0].UID for group in _groups(sr)]
    assert in_seg == in_sr[: len(in_seg)] and len(set(in_sr)) == len(in_sr) == 5


def test_predecessor_is_referenced(written, sr):
    second = pydicom.dcmread(written[3])
    previous = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert previous.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID


@pytest.mark.parametrize("index", [1, 2, 3], ids=["seg", "sr", "sr-with-predecessor"])
def test_dciodvfy_finds_no_errors(written, index):
    assert dciodvfy_errors(written[index]) == []


def test_tracking_uid_is_deterministic_per_segment(result, written):
    uids = written[0]
    first = [tracking_uid(uids, segment) for segment in result.segments]
    again = [tracking_uid(uids, segment) for segment in result.segments]
    other = [tracking_uid(_uids(), segment) for segment in result.segments]
    assert first == again
    assert len(set(first)) == 4 and not set(first) & set(other)
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in first)


def test_source_values_highdicom_refuses_reach_the_seg_and_sr_as_received(
    result, equipment, caplog
):
    """A birth date of 00000000, a sex of U, a study time out of range and absent Type 2
    attributes: highdicom refused the first three and failed on the others; the SEG and
    SR now carry each as the source has it, and the log names them without values."""
    first = copy.deepcopy(result.volume.datasets[0])
    odd = {
        "PatientBirthDate": ("DA", "00000000"),
        "PatientSex": ("CS", "U"),
        "StudyTime": ("TM", "25:61"),
    }
    for keyword, (vr, value) in odd.items():
        first[keyword] = DataElement(
            tag_for_keyword(keyword), vr, value, validation_mode=config.IGNORE
        )
    del first.StudyID, first.AccessionNumber
    volume = dataclasses.replace(result.volume, datasets=(first, *result.volume.datasets[1:]))
    odd_result = dataclasses.replace(result, volume=volume)
    before = copy.deepcopy(first)
    with caplog.at_level(logging.INFO, logger="dicom_node.encode.source"):
        uids = _uids()
        seg = build_seg(odd_result, uids, equipment)
        sr = build_sr(odd_result, seg, uids, equipment)
    assert first == before  # the source is left as it was
    for built in (seg, sr):
        for keyword, (_vr, value) in odd.items():
            assert built[keyword].value == value, keyword
        assert built.StudyID == "" and built.AccessionNumber == ""  # Type 2: present, empty
        assert built.PatientID == first.PatientID and built.PatientName == first.PatientName
        written = io.BytesIO()
        built.save_as(written, enforce_file_format=True)  # and it can be written
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "the source's PatientBirthDate, PatientSex, StudyTime: not valid DICOM values;"
        " the SEG has them as received",
        "the source has no AccessionNumber, StudyID: the SEG has it empty",
        "the source's PatientBirthDate, PatientSex, StudyTime: not valid DICOM values;"
        " the SR has them as received",
    ]
    assert not any(value in " ".join(messages) for _vr, value in odd.values())


def test_mask_shape_mismatch_is_refused(result, equipment):
    body = result.segments[0]
    bad = dataclasses.replace(body, mask=body.mask[:-1])
    broken = dataclasses.replace(result, segments=(bad, *result.segments[1:]))
    with pytest.raises(ValueError, match="'body' mask shape"):
        build_seg(broken, _uids(), equipment)


def test_algorithm_is_contributing_equipment_with_a_versioned_device_uid(seg, sr, result):
    """IHE AI Results: one item per algorithm; the built-in's Device UID follows its version."""
    from dicom_node.encode.types import derived_device_uid

    expected = derived_device_uid(result.algorithm_name, result.algorithm_version)
    for dataset in (seg, sr):
        (item,) = [i for i in dataset.ContributingEquipmentSequence if "DeviceUID" in i]
        assert item.DeviceUID == expected
        assert (item.ManufacturerModelName, item.SoftwareVersions) == (
            result.algorithm_name,
            result.algorithm_version,
        )
        assert item.Manufacturer == "dicom_node"
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert derived_device_uid(result.algorithm_name, "9.9.9") != expected
    assert derived_device_uid(result.algorithm_name, result.algorithm_version) == expected


def test_seg_is_the_same_as_with_highdicoms_own_pixel_check(result, equipment, monkeypatch):
    """StackedSegmentation skips two whole-volume copies, not a byte of the output."""
    from dicom_node.encode import seg as seg_module

    uids = _uids()
    lean = seg_module.StackedSegmentation
    ours = build_seg(result, uids, equipment)
    monkeypatch.setattr(seg_module, "StackedSegmentation", hd.seg.Segmentation)
    theirs = build_seg(result, uids, equipment)

    assert type(ours) is lean and type(theirs) is hd.seg.Segmentation
    assert ours.SegmentsOverlap == theirs.SegmentsOverlap == "YES"  # the lungs are in the body
    assert ours.NumberOfFrames == theirs.NumberOfFrames
    assert ours.PixelData == theirs.PixelData
    assert ours.PerFrameFunctionalGroupsSequence == theirs.PerFrameFunctionalGroupsSequence
    assert ours.SegmentSequence == theirs.SegmentSequence


def _stack_of(*masks: np.ndarray) -> np.ndarray:
    """Masks stacked as seg._stack hands them over: segments first in memory, last in shape."""
    return np.moveaxis(np.stack(masks).astype(np.uint8), 0, -1)


@pytest.mark.parametrize(
    ("case", "expected"),
    [("disjoint", "NO"), ("one shared voxel", "YES"), ("in the last slab", "YES"), ("empty", "NO")],
)
def test_overlap_check_answers_as_highdicom(case, expected):
    from dicom_node.encode.seg import OVERLAP_SLAB_FRAMES, StackedSegmentation

    frames = OVERLAP_SLAB_FRAMES * 2 + 3  # three slabs, the last one short
    first, second, third = (np.zeros((frames, 6, 5), dtype=bool) for _ in range(3))
    if case != "empty":
        first[:, :3], second[:, 3:], third[2, 0, 0] = True, True, False
    if case == "one shared voxel":
        third[4, 1, 1] = True  # inside ``first``
    if case == "in the last slab":
        third[frames - 1, 4, 4] = True  # inside ``second``
    array = _stack_of(first, second, third)
    numbers = np.array([1, 2, 3])
    binary = hd.seg.SegmentationTypeValues.BINARY

    ours = StackedSegmentation._check_and_cast_pixel_array(array, numbers, binary, np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(array, numbers, binary, np.uint8)

    assert ours[1].value == theirs[1].value == expected
    assert ours[0] is array  # not copied
    assert np.array_equal(ours[0], theirs[0])


def test_arrays_the_overlap_check_does_not_know_go_to_highdicom():
    from dicom_node.encode.seg import StackedSegmentation

    binary = hd.seg.SegmentationTypeValues.BINARY
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[0, 0, 0] = True
    not_binary = _stack_of(mask, mask) * 2
    with pytest.raises(ValueError, match="must be binary"):
        StackedSegmentation._check_and_cast_pixel_array(
            not_binary, np.array([1, 2]), binary, np.uint8
        )
    with pytest.raises(ValueError, match="does not match"):
        StackedSegmentation._check_and_cast_pixel_array(
            _stack_of(mask, mask), np.array([1, 2, 3]), binary, np.uint8
        )
    as_bool = np.moveaxis(np.stack([mask, mask]), 0, -1)  # highdicom's own path, as before
    args = (as_bool, np.array([1, 2]), binary, np.uint8)
    array, overlap = StackedSegmentation._check_and_cast_pixel_array(*args)
    their_array, their_overlap = hd.seg.Segmentation._check_and_cast_pixel_array(*args)
    assert overlap == their_overlap and overlap.value == "YES"
    assert array.dtype == their_array.dtype and np.array_equal(array, their_array)


def test_the_encoders_load_neither_torch_nor_simpleitk():
    """A receive-only node imports the encoders but analyses nothing: torch and SimpleITK
    would add about 90 MiB to its resident memory (the SEG stack once pulled both in
    through ``analysis.morphology``; its box helper now lives in ``analysis.grid``)."""
    code = (
        "import sys, dicom_node.encode.seg, dicom_node.encode.sr; "
        "print(sorted(m for m in ('torch', 'SimpleITK') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_highdicoms_module_table_read_lazily_is_the_same(tmp_path, monkeypatch):
    """Every module of highdicom's table, read one at a time, is what its full parse gives."""
    import highdicom._standard_utils as standard_utils

    lookup = standard_utils.get_module_attribute_map
    assert isinstance(lookup, standard._Lookup)
    assert isinstance(lookup(), standard.ModuleAttributes)
    table = standard.ModuleAttributes(lookup()._table)  # its own: every module gets parsed
    full = lookup.original()
    try:
        assert list(table) == list(full) and len(table) == len(full) > 400
        assert not table._parsed
        for module, attributes in full.items():
            assert module in table and table[module] == attributes
        assert "no-such-module" not in table
        with pytest.raises(KeyError):
            table["no-such-module"]
    finally:
        lookup.original.cache_clear()  # type: ignore[attr-defined]

    broken = tmp_path / "broken.json"
    for text in ('["a"]', '{"a": {}}', '{"a": [] "b": []}', '{"a": [1]', '{"\u00e9": []}'):
        broken.write_text(text)
        with pytest.raises(ValueError):
            standard.ModuleAttributes(broken)
    # the file changed after it was read (highdicom upgraded in place): the full parse
    changing = tmp_path / "changing.json"
    changing.write_text('{"a": [{"keyword": "A"}], "b": []}')
    table = standard.ModuleAttributes(changing, lambda: {"a": [{"keyword": "whole"}]})
    changing.write_text('{"xyz": [], "a": [{"keyword": "A"}]}')
    assert table["a"] == [{"keyword": "whole"}]
    # no such file (or not the expected JSON): highdicom's own parse answers
    monkeypatch.setattr(standard.resources, "files", lambda _package: tmp_path)
    fallback = standard._Lookup(lambda: {"from": ["highdicom"]})
    assert fallback() == {"from": ["highdicom"]}


def test_a_seg_and_an_sr_parse_only_the_modules_they_need(written):
    """Building them (the ``written`` fixture) parsed a few of the 436 modules; the
    table itself keeps only where each module lies. highdicom's full parse kept 62 MiB of
    Python objects for the life of the process."""
    import highdicom._standard_utils as standard_utils

    table = standard_utils.get_module_attribute_map()
    assert isinstance(table, standard.ModuleAttributes)
    assert 0 < len(table._parsed) < 40, sorted(table._parsed)
    tracemalloc.start()
    try:
        fresh = standard.ModuleAttributes(table._table)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(fresh) == len(table)
    assert kept < 1 * 2**20, f"{kept / 2**20:.1f} MiB kept"
    assert peak < 80 * 2**20, f"{peak / 2**20:.1f} MiB while reading"  # bytes + text


def test_save_dataset_writes_the_same_bytes_without_copying_the_frames(tmp_path):
    """A large Pixel Data value is written from a buffer: the file is what ``save_as``
    writes, and no copy of the value is made (pydicom's own path makes two)."""
    from dicom_node.encode.seg import save_dataset

    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = 1
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = np.random.default_rng(2).bytes(8 * 2**20)
    value = ds.PixelData
    reference = tmp_path / "reference.dcm"
    ds.save_as(reference, enforce_file_format=True)
    tracemalloc.start()
    try:
        with (tmp_path / "streamed.dcm").open("wb") as stream:
            save_dataset(ds, stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "streamed.dcm").read_bytes() == reference.read_bytes()
    assert ds.PixelData is value  # left as it was
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB"

    # an odd length is padded when written: pydicom's own way, which gets that right
    ds.PixelData = value[:-1]
    ds.save_as(reference, enforce_file_format=True)
    with (tmp_path / "streamed.dcm").open("wb") as stream:
        save_dataset(ds, stream)
    assert (tmp_path / "streamed.dcm").read_bytes() == reference.read_bytes()
