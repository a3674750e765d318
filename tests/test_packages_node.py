"""Model packages in the running node: a route names a package built at test time, the
study arrives by C-STORE and the results arrive at dcmtk storescp (dciodvfy on each).

A CT volume and a single DX radiograph (no Image Plane geometry) give a SEG and an SR;
a classifier package gives an SR alone, with its evaluation and probability.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dciodvfy import dciodvfy_errors
from model_packages import (
    ANATOMY,
    CHEST,
    CHEST_XRAY,
    FINDING,
    LUNG,
    PNEUMOTHORAX,
    PNEUMOTHORAX_PROBABILITY,
    HalfContrast,
    aerated_network,
    base_spec,
    bright_region_spec,
    chest_image,
    classifier_spec,
    sr_content,
    write_dx,
    write_package,
)
from nodes import node_settings, running_node, send
from peers import GE_3SLICE, LOCALHOST, Storescp, free_port, require_tools, wait_until
from test_commitment import finished_job, node_with_fake_pacs

from dicom_node.analysis.examples import HuRanges
from dicom_node.app import Node
from dicom_node.domain import DeliveryState, JobState

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DEVICE_UID = "2.25.1002"  # base_spec's Device UID of version 2.0.0

pytestmark = pytest.mark.slow


def _settings(tmp_path: Path, scp: Storescp, modality: str, pipeline: str) -> dict[str, Any]:
    return node_settings(
        tmp_path / "var",
        destinations={"archive": {"ae_title": scp.aet, "host": LOCALHOST, "port": scp.port}},
        routes=[
            {
                "name": pipeline,
                "when": {"Modality": modality},
                "pipeline": pipeline,
                "send_to": ["archive"],
            }
        ],
        analysis={"device": "cpu", "models_path": str(tmp_path / "models")},
    )


def _results(node: Node, scp: Storescp) -> dict[str, pydicom.Dataset]:
    """Once the one job is done (its delivery settled): what storescp got, by SOP class."""
    settled = (JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER)
    wait_until(
        lambda: [j for j in node.journal.recent_jobs() if j.state in settled],
        120,
        0.1,
        "the job to be done",
    )
    (job,) = node.journal.recent_jobs()
    assert job.state == JobState.DONE, job.error
    files = scp.received_files()
    for path in files:
        assert dciodvfy_errors(path) == [], path.name
    datasets = [pydicom.dcmread(path) for path in files]
    by_class = {str(ds.SOPClassUID): ds for ds in datasets}
    assert len(by_class) == len(datasets), "one object of each class expected"
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= {job.seg_sop_uid, job.sr_sop_uid}
    return by_class


def _named(sr: pydicom.Dataset, code_value: str) -> list[pydicom.Dataset]:
    return [i for i in sr_content(sr) if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def _evidence(sr: pydicom.Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def _device_uids(dataset: pydicom.Dataset) -> list[str]:
    return [i.DeviceUID for i in dataset.ContributingEquipmentSequence if "DeviceUID" in i]


def test_a_ct_study_routed_to_a_package_gives_seg_and_sr(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu", "dciodvfy")
    write_package(tmp_path / "models", base_spec("lungs-test"), aerated_network())
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    with Storescp(tmp_path / "scp") as scp:
        with running_node(_settings(tmp_path, scp, "CT", "lungs-test")) as node:
            assert send(node, ge, calling="MODALITY") == [0, 0, 0]
            results = _results(node, scp)
    assert set(results) == {SEG_STORAGE, COMPREHENSIVE_3D_SR}
    seg, sr = results[SEG_STORAGE], results[COMPREHENSIVE_3D_SR]
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Aerated lung"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == LUNG["value"]
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ANATOMY["value"]
    assert _device_uids(seg) == _device_uids(sr) == [DEVICE_UID]
    # which source series, beside others of the study in the PACS
    assert sr.SeriesDescription == f"lungs-test measurements of series {ge[0].SeriesNumber}"
    assert seg.SeriesDescription == f"lungs-test SEG of series {ge[0].SeriesNumber}"


def test_a_dx_image_routed_to_a_2d_package_gives_seg_and_planar_sr(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu", "dciodvfy")
    write_package(tmp_path / "models", bright_region_spec("cxr-bright"), HuRanges([(1500, 2500)]))
    pixels = np.full((128, 96), 1000, dtype=np.uint16)
    pixels[10:30, 10:30] = 2000  # 400 pixels of 0.5 x 0.5 mm: 100 mm2
    dx = pydicom.dcmread(write_dx(tmp_path / "dx.dcm", pixels))
    assert "ImagePositionPatient" not in dx and "ImageOrientationPatient" not in dx
    with Storescp(tmp_path / "scp") as scp:
        with running_node(_settings(tmp_path, scp, "DX", "cxr-bright")) as node:
            assert send(node, [dx], calling="MODALITY") == [0]
            results = _results(node, scp)
    assert set(results) == {SEG_STORAGE, COMPREHENSIVE_3D_SR}
    seg, sr = results[SEG_STORAGE], results[COMPREHENSIVE_3D_SR]
    assert "FrameOfReferenceUID" not in seg and seg.PatientOrientation == ["L", "F"]
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == dx.StudyInstanceUID
    (source,) = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert source.ReferencedSOPInstanceUID == dx.SOPInstanceUID
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Bright region 1"
    assert "RecommendedDisplayCIELabValue" in segment  # the label's colour
    assert _device_uids(seg) == _device_uids(sr) == [DEVICE_UID]
    (procedure,) = _named(sr, "121058")
    assert procedure.ConceptCodeSequence[0].CodeValue == CHEST_XRAY["value"]
    (area,) = [i for i in sr_content(sr) if i.ValueType == "NUM"]
    assert area.ConceptNameCodeSequence[0].CodeValue == "42798000"  # Area, in mm2
    assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(100, rel=0.15)
    frames = [i for i in sr_content(sr) if i.ValueType == "IMAGE"]
    referenced = {str(f.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for f in frames}
    assert str(seg.SOPInstanceUID) in referenced  # TID 1410: the segment's SEG frame
    assert _evidence(sr) == {str(seg.SOPInstanceUID), str(dx.SOPInstanceUID)}


def test_a_classifier_package_sends_an_sr_alone(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu", "dciodvfy")
    write_package(tmp_path / "models", classifier_spec("cxr-pneumothorax"), HalfContrast())
    dx = pydicom.dcmread(write_dx(tmp_path / "dx.dcm", chest_image()))
    with Storescp(tmp_path / "scp") as scp:
        with running_node(_settings(tmp_path, scp, "DX", "cxr-pneumothorax")) as node:
            assert send(node, [dx], calling="MODALITY") == [0]
            results = _results(node, scp)
            (job,) = node.journal.recent_jobs()
            (delivery,) = node.journal.job_deliveries(job.id)
            seg_file = node.spool.path(node.spool.result_relpath(job.id, "seg"))
    assert set(results) == {COMPREHENSIVE_3D_SR}
    assert delivery.attempts == 1 and delivery.last_error is None
    assert not seg_file.exists()
    sr = results[COMPREHENSIVE_3D_SR]
    assert sr.SOPInstanceUID == job.sr_sop_uid
    assert _evidence(sr) == {str(dx.SOPInstanceUID)}  # no SEG to refer to
    # Finding (121071): the group's finding type (Thorax), then the class found
    findings = [i.ConceptCodeSequence[0].CodeValue for i in _named(sr, FINDING["value"])]
    assert findings == [CHEST["value"], PNEUMOTHORAX["value"]]
    (probability,) = _named(sr, PNEUMOTHORAX_PROBABILITY["value"])
    assert 0.5 < float(probability.MeasuredValueSequence[0].NumericValue) <= 1.0  # 3 decimals
    assert _device_uids(sr) == [DEVICE_UID]
    assert sr.SeriesDescription == "cxr-pneumothorax measurements of series 1"


# -- with analysis.models_path passed to routing, and the spool to storage commitment -------


def test_routing_refuses_what_a_package_does_not_accept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The route matches every series; the package's model.yaml accepts CT only."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    write_package(tmp_path / "models", base_spec("lungs-test"), aerated_network())
    settings = node_settings(
        tmp_path / "var",
        destinations={"pacs": {"ae_title": "P", "host": LOCALHOST, "port": free_port()}},
        routes=[{"name": "all", "when": {}, "pipeline": "lungs-test", "send_to": ["pacs"]}],
        analysis={"device": "cpu", "models_path": str(tmp_path / "models")},
    )
    dx = pydicom.dcmread(write_dx(tmp_path / "dx.dcm", chest_image()))
    with running_node(settings) as node:
        assert send(node, [dx], calling="MODALITY") == [0]
        wait_until(lambda: "complete (1 series" in caplog.text, 30, 0.1, "the study to complete")
        assert node.journal.recent_jobs() == []
    assert "not analysed: Modality DX is not one the pipeline accepts ['CT']" in caplog.text


def test_a_classifier_sr_alone_is_committed(tmp_path: Path) -> None:
    """Storage commitment lists what was sent: the SR alone."""
    write_package(tmp_path / "models", classifier_spec("cxr"), HalfContrast())
    dx = pydicom.dcmread(write_dx(tmp_path / "dx.dcm", chest_image()))
    route = {"name": "cxr", "when": {"Modality": "DX"}, "pipeline": "cxr", "send_to": ["pacs"]}
    with node_with_fake_pacs(
        tmp_path,
        ["ok"],
        routes=[route],
        analysis={"device": "cpu", "models_path": str(tmp_path / "models")},
    ) as (node, fake):
        assert send(node, [dx], calling="MODALITY") == [0]
        (job,) = finished_job(node, JobState.DONE)  # type: ignore[misc]
        (delivery,) = node.journal.job_deliveries(job.id)
    assert delivery.state == DeliveryState.SENT and delivery.committed_at is not None
    (action,) = fake.actions
    refs = [str(r.ReferencedSOPInstanceUID) for r in action.ReferencedSOPSequence]
    assert refs == [job.sr_sop_uid] and fake.stored == [job.sr_sop_uid]
