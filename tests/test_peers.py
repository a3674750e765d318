"""Self-test of tests/peers.py against the real peers (Orthanc 1.10, dcmtk)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from peers import (
    GE_3SLICE,
    SIEMENS_J2K,
    Orthanc,
    Storescp,
    dicom_files,
    patch_siemens_copy,
    require_tools,
    storescu,
    wait_until,
)
from pydicom.uid import JPEG2000Lossless

pytestmark = pytest.mark.peers


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_wait_until_raises_with_what() -> None:
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_until(lambda: False, timeout=0.2, what="the impossible")


def test_orthanc_answers_and_accepts_uploads(orthanc: Orthanc) -> None:
    system = orthanc.get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port

    for path in dicom_files(GE_3SLICE):
        assert orthanc.upload(path)["Status"] == "Success"

    assert len(orthanc.instances()) == 3
    (study_id,) = orthanc.studies()
    records = orthanc.study_instances(study_id)
    assert {r["SOPInstanceUID"] for r in records} == _sop_uids(dicom_files(GE_3SLICE))
    assert {r["Modality"] for r in records} == {"CT"}

    study_uid = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
    assert len(orthanc.find_instances_by_modality(study_uid, "CT")) == 3
    assert orthanc.find_instances_by_modality(study_uid, "SEG") == []

    stored = pydicom.dcmread(io.BytesIO(orthanc.get_instance_file(records[0]["ID"])))
    assert stored.SOPInstanceUID == records[0]["SOPInstanceUID"]


def test_dcmtk_storescu_to_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    require_tools("storescu")
    j2k = tmp_path / "j2k"
    patched = patch_siemens_copy(j2k)
    result = storescu(orthanc.host, orthanc.dicom_port, orthanc.aet, [GE_3SLICE, j2k])
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(orthanc.instances()) == 23, timeout=10, what="23 instances in Orthanc")
    assert len(orthanc.studies()) == 2

    j2k_study_uid = str(pydicom.dcmread(patched[0]).StudyInstanceUID)
    j2k_records = orthanc.find_instances_by_modality(j2k_study_uid, "CT")
    assert len(j2k_records) == 20
    stored = pydicom.dcmread(io.BytesIO(orthanc.get_instance_file(j2k_records[0]["ID"])))
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless  # not transcoded on the way


def test_orthanc_cstores_study_to_storescp(tmp_path: Path, storescp: Storescp) -> None:
    require_tools("Orthanc")
    modalities = {"scp": [storescp.aet, storescp.host, storescp.port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        for path in dicom_files(GE_3SLICE):
            orthanc.upload(path)
        assert orthanc.echo_modality("scp")
        (study_id,) = orthanc.studies()
        orthanc.send_study_to_modality("scp", study_id)

    received = storescp.wait_for_files(3, timeout=10)
    assert len(received) == 3
    assert _sop_uids(received) == _sop_uids(dicom_files(GE_3SLICE))


def test_patched_siemens_copies_are_valid(tmp_path: Path) -> None:
    sources = dicom_files(SIEMENS_J2K)
    patched = patch_siemens_copy(tmp_path / "j2k")
    again = patch_siemens_copy(tmp_path / "j2k-again")
    assert len(patched) == len(sources) == 20

    study_uids = set()
    for src, out in zip(sources, patched, strict=True):
        original = pydicom.dcmread(src)
        ds = pydicom.dcmread(out)
        assert ds.SOPInstanceUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.PatientID == "ANON-J2K"
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ds.PixelData == original.PixelData
        study_uids.add((ds.StudyInstanceUID, ds.SeriesInstanceUID))
    assert len(study_uids) == 1
    assert _sop_uids(again) == _sop_uids(patched)
    assert (
        pydicom.dcmread(again[0]).StudyInstanceUID == pydicom.dcmread(patched[0]).StudyInstanceUID
    )
