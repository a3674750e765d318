"""End to end: Orthanc (the PACS) C-STOREs a real chest CT to the node and gets SEG + SR back."""

from __future__ import annotations

import json
import urllib.request
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from dciodvfy import dciodvfy_errors
from nodes import NodeProcess, chest_route, node_settings, pacs_destination
from peers import LOCALHOST, PHILIPS_L, Orthanc, free_port, require_tools, wait_until

pytestmark = pytest.mark.slow


def _results(orthanc: Orthanc, study_uid: str) -> tuple[list, list] | None:
    """The SEG and SR instances of the study once both have arrived."""
    segs = orthanc.find_instances_by_modality(study_uid, "SEG")
    srs = orthanc.find_instances_by_modality(study_uid, "SR")
    return (segs, srs) if segs and srs else None


def _sr_references(sr: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs referenced anywhere in the SR's content tree."""
    found: set[str] = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                found.add(str(ref.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_orthanc_study_comes_back_with_seg_and_sr(tmp_path: Path) -> None:
    require_tools("Orthanc", "dciodvfy")
    node_port = free_port()
    files = sorted(PHILIPS_L.glob("*.dcm"))
    with Orthanc(
        tmp_path / "orthanc", modalities={"ainode": ["AINODE", LOCALHOST, node_port]}
    ) as pacs:
        settings = node_settings(
            tmp_path / "var",
            node={"port": node_port, "receive_processes": "auto"},  # as the node ships
            destinations=pacs_destination(pacs),
            routes=[chest_route(["source"], name="chest-ct")],
        )
        for path in files:
            pacs.upload(path)
        (study_id,) = pacs.studies()
        with NodeProcess(settings, tmp_path / "node") as node:
            pacs.send_study_to_modality("ainode", study_id)
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            segs, srs = wait_until(
                lambda: _results(pacs, study_uid),
                240,
                0.5,
                f"SEG and SR in Orthanc; node log:\n{node.log()[-3000:]}",
            )
            web_port = settings["web"]["port"]
            status_url = f"http://{LOCALHOST}:{web_port}/api/status"
            wait_until(
                lambda: (
                    json.load(urllib.request.urlopen(status_url, timeout=5))["jobs"] == {"done": 1}
                ),
                30,
                0.2,
                "the job to be done (sender recorded the delivery)",
            )
            health = urllib.request.urlopen(f"http://{LOCALHOST}:{web_port}/healthz", timeout=5)
            assert health.status == 200
            metrics = urllib.request.urlopen(f"http://{LOCALHOST}:{web_port}/metrics", timeout=5)
            exposition = metrics.read().decode()
            assert 'dicom_node_instances_received_total{calling_aet="ORTHANC"} 64.0' in exposition
            assert "dicom_node_store_seconds_count 64.0" in exposition
            assert 'dicom_node_associations_total{outcome="accepted"}' in exposition
            for stage in ("receive", "wait", "analyse", "encode", "send"):
                assert f'dicom_node_stage_seconds_count{{stage="{stage}"}} 1.0' in exposition
            assert 'dicom_node_jobs{state="done"} 1.0' in exposition
        assert len(segs) == 1 and len(srs) == 1

        seg_bytes = pacs.get_instance_file(segs[0]["ID"])
        sr_bytes = pacs.get_instance_file(srs[0]["ID"])
    (tmp_path / "seg.dcm").write_bytes(seg_bytes)
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []

    seg = pydicom.dcmread(BytesIO(seg_bytes))
    sr = pydicom.dcmread(BytesIO(sr_bytes))
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    source_uids = {str(ds.SOPInstanceUID) for ds in source}
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID not in {source[0].SeriesInstanceUID, sr.SeriesInstanceUID}
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == source_uids
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert labels[:4] == ["Body", "Left lung", "Right lung", "Airways"], labels
    # then the nodule/mass candidates, largest first: the annotated left-lung tumour
    mass = seg.SegmentSequence[4]
    assert mass.SegmentLabel == "Mass 1"
    assert mass.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    modifier = mass.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    assert modifier[0].CodeMeaning == "Left"
    assert all(label.startswith(("Nodule ", "Mass ")) for label in labels[4:]), labels
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.Manufacturer and seg.ManufacturerModelName and seg.SoftwareVersions
    # the SR references the SEG, in its content and in its evidence
    assert str(seg.SOPInstanceUID) in _sr_references(sr)
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert str(seg.SOPInstanceUID) in evidence
    assert source_uids <= evidence
