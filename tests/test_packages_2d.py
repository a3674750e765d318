"""Model packages beyond CT volumes: 2-D radiographs (DX), study classifiers, classifiers of
each finding, and a package named by a route of the real node (SEG + SR arrive)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dciodvfy import dciodvfy_errors
from model_packages import (
    ANATOMY,
    CHEST_XRAY,
    LUNG,
    aerated_network,
    base_spec,
    write_dx,
    write_package,
)
from nodes import node_settings, running_node
from peers import GE_3SLICE, LOCALHOST, Storescp, require_tools
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.analysis.examples import HuRanges, save_torchscript
from dicom_node.analysis.pipelines import build_pipeline
from dicom_node.analysis.types import Volume
from dicom_node.analysis.volume import load_images, load_series
from dicom_node.encode.seg import build_seg
from dicom_node.encode.sr import build_sr
from dicom_node.encode.types import Equipment, ResultUIDs

CPU = torch.device("cpu")
EQUIPMENT = Equipment(device_serial_number="TEST-0003", device_observer_uid=generate_uid())
FINDING = {"value": "121071", "scheme": "DCM", "meaning": "Finding"}
NORMAL = {"value": "17621005", "scheme": "SCT", "meaning": "Normal"}
PNEUMOTHORAX = {"value": "36118008", "scheme": "SCT", "meaning": "Pneumothorax"}
CHEST = {"value": "51185008", "scheme": "SCT", "meaning": "Thorax"}
PRIVATE = "99TESTAI"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


class HalfContrast(torch.nn.Module):
    """A 2-D 'classifier': class 1 when the left half of the image is brighter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        difference = (x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))) * 4
        return torch.stack([-difference, difference], dim=1)


class Brightest(torch.nn.Module):
    """A finding 'classifier': one logit, positive when the crop's maximum exceeds 2700 HU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1).max(dim=1).values - 2700.0) / 100.0)[:, None]


def _uids() -> ResultUIDs:
    return ResultUIDs(generate_uid(), generate_uid(), generate_uid(), generate_uid())


def _written_ok(dataset: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    dataset.save_as(path)
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(path)


def _content(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    found: list[pydicom.Dataset] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            found.append(item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def _chest_image() -> np.ndarray:
    pixels = np.full((128, 96), 1000, dtype=np.uint16)
    pixels[20:100, 8:40] = 2000  # left half brighter
    return pixels


def test_dx_image_loads_as_a_one_slice_volume(tmp_path: Path) -> None:
    pixels = _chest_image()
    volume = load_images([write_dx(tmp_path / "dx.dcm", pixels)])
    assert volume.hu.shape == (1, 128, 96)
    assert volume.spacing[1:] == (0.5, 0.5)  # ImagerPixelSpacing
    np.testing.assert_array_equal(volume.hu[0], pixels)
    inverted = load_images([write_dx(tmp_path / "m1.dcm", 4095 - pixels, monochrome1=True)])
    assert np.corrcoef(inverted.hu[0].ravel(), pixels.ravel())[0, 1] > 0.999  # as MONOCHROME2


def test_chest_radiograph_classifier_reports_evaluation_and_probability(tmp_path: Path) -> None:
    spec = base_spec(
        "cxr-pneumothorax",
        accepts={"modalities": ["DX", "CR"], "max_slices": 1},
        procedure=CHEST_XRAY,
        input={"dimensions": 2, "size": [64, 64], "normalise": "zscore"},
        classification={
            "activation": "softmax",
            "concept": FINDING,
            "finding": CHEST,
            "label": "Chest radiograph",
            "classes": [
                {"index": 0, "code": NORMAL},
                {
                    "index": 1,
                    "code": PNEUMOTHORAX,
                    "probability": {
                        "value": "PNXP",
                        "scheme": PRIVATE,
                        "meaning": "Pneumothorax probability",
                    },
                },
            ],
        },
    )
    del spec["segmentation"]
    write_package(tmp_path, spec, HalfContrast())
    volume = load_images([write_dx(tmp_path / "dx.dcm", _chest_image())])
    result = build_pipeline("cxr-pneumothorax", CPU, tmp_path).run(volume)
    assert result.segments == ()
    (group,) = result.groups
    assert group.segment_keys == ()
    assert [e.value.value for e in group.evaluations] == [PNEUMOTHORAX["value"]]
    (probability,) = group.measurements
    assert 0.5 < probability.value < 1.0
    sr = _written_ok(build_sr(result, None, _uids(), EQUIPMENT), tmp_path / "sr.dcm")
    procedure = next(i for i in _content(sr) if i.ConceptNameCodeSequence[0].CodeValue == "121058")
    assert procedure.ConceptCodeSequence[0].CodeValue == CHEST_XRAY["value"]
    values = {i.ConceptCodeSequence[0].CodeValue for i in _content(sr) if i.ValueType == "CODE"}
    assert PNEUMOTHORAX["value"] in values
    numbers = [i for i in _content(sr) if i.ValueType == "NUM"]
    assert [float(n.MeasuredValueSequence[0].NumericValue) for n in numbers] == [
        pytest.approx(probability.value, abs=1e-3)
    ]
    assert PRIVATE in {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}
    items = sr.ContributingEquipmentSequence
    assert [i.DeviceUID for i in items if "DeviceUID" in i] == ["2.25.1002"]


def test_dx_segmentation_gives_valid_seg_and_planar_sr(tmp_path: Path) -> None:
    spec = base_spec(
        "cxr-bright",
        accepts={"modalities": ["DX"]},
        procedure=CHEST_XRAY,
        input={"dimensions": 2, "spacing": [1.0, 1.0]},
    )
    label = spec["segmentation"]["labels"][0]
    label.update(key="bright", label="Bright region", measurements=["area"], split=True)
    write_package(tmp_path, spec, HuRanges([(1500.0, 2500.0)]))
    pixels = np.full((128, 96), 1000, dtype=np.uint16)
    pixels[10:30, 10:30] = 2000
    pixels[80:90, 60:70] = 2000
    source = write_dx(tmp_path / "dx.dcm", pixels)
    result = build_pipeline("cxr-bright", CPU, tmp_path).run(load_images([source]))
    assert [s.key for s in result.segments] == ["bright_1", "bright_2"]  # largest first
    big, small = result.segments
    assert math.isnan(big.volume_ml) and math.isnan(big.mean_hu)  # not reported for DX
    assert big.measurements[0].value == pytest.approx(400 * 0.25, rel=0.15)  # mm2
    assert small.measurements[0].value == pytest.approx(100 * 0.25, rel=0.25)
    uids = _uids()
    seg = _written_ok(build_seg(result, uids, EQUIPMENT), tmp_path / "seg.dcm")
    assert "FrameOfReferenceUID" not in seg and seg.PatientOrientation == ["L", "F"]
    sr = _written_ok(build_sr(result, seg, uids, EQUIPMENT), tmp_path / "sr.dcm")
    templates = [i for i in _content(sr) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert len(templates) == 2
    frames = [i for i in _content(sr) if i.ValueType == "IMAGE"]
    assert {str(f.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for f in frames} >= {
        str(seg.SOPInstanceUID)
    }


def _with_findings(volume: Volume) -> Volume:
    hu = volume.hu.copy()
    hu[:, 200:210, 100:110] = 3000.0  # classified positive
    hu[:, 300:306, 350:356] = 2400.0  # classified negative
    return dataclasses.replace(volume, hu=hu)


def test_each_finding_is_classified(tmp_path: Path) -> None:
    likely = {"value": "LIKELY", "scheme": PRIVATE, "meaning": "Malignancy likely"}
    probability = {"value": "MALP", "scheme": PRIVATE, "meaning": "Malignancy probability"}
    spec = base_spec("findings")
    spec["segmentation"]["labels"][0].update(
        key="nodule",
        label="Nodule",
        split=True,
        type={"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
        classifier={
            "network": {"format": "torchscript", "file": "classifier.pt"},
            "crop_size": [3, 16, 16],
            "classification": {
                "activation": "sigmoid",
                "concept": {"value": "MALIG", "scheme": PRIVATE, "meaning": "Malignancy"},
                "classes": [{"index": 0, "code": likely, "probability": probability}],
            },
        },
    )
    folder = write_package(tmp_path, spec, HuRanges([(2200.0, 3500.0)]))
    save_torchscript(Brightest(), folder / "classifier.pt")
    volume = _with_findings(load_series(sorted(GE_3SLICE.glob("*.dcm"))))
    result = build_pipeline("findings", CPU, tmp_path).run(volume)
    first, second = result.segments
    assert (first.label, second.label) == ("Nodule 1", "Nodule 2")
    assert [e.value.value for e in first.evaluations] == ["LIKELY"]
    assert second.evaluations == ()
    assert first.measurements[0].value > 0.9 > 0.1 > second.measurements[0].value
    uids = _uids()
    seg = _written_ok(build_seg(result, uids, EQUIPMENT), tmp_path / "seg.dcm")
    sr = _written_ok(build_sr(result, seg, uids, EQUIPMENT), tmp_path / "sr.dcm")
    codes = [i.ConceptCodeSequence[0].CodeValue for i in _content(sr) if i.ValueType == "CODE"]
    assert codes.count("LIKELY") == 1


def _send(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate(LOCALHOST, port, ae_title="AINODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.mark.slow
def test_node_routes_a_study_to_a_package_and_sends_seg_and_sr(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu", "dciodvfy")
    models = tmp_path / "models"
    write_package(models, base_spec("lungs-test"), aerated_network())
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    with Storescp(tmp_path / "scp") as scp:
        settings = node_settings(
            tmp_path / "var",
            destinations={"archive": {"ae_title": scp.aet, "host": LOCALHOST, "port": scp.port}},
            routes=[
                {
                    "name": "lungs",
                    "when": {"Modality": "CT"},
                    "pipeline": "lungs-test",
                    "send_to": ["archive"],
                }
            ],
            analysis={"device": "cpu", "models_path": str(models)},
        )
        with running_node(settings) as node:
            assert _send(node.receiver.address[1], ge) == [0, 0, 0]
            files = scp.wait_for_files(2, timeout=120)
    by_class = {str(pydicom.dcmread(p).SOPClassUID): p for p in files}
    assert set(by_class) == {SEG_STORAGE, COMPREHENSIVE_3D_SR}
    for path in by_class.values():
        assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(by_class[SEG_STORAGE])
    assert seg.SegmentSequence[0].SegmentLabel == "Aerated lung"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == LUNG["value"]
    assert (
        seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue
        == (ANATOMY["value"])
    )
    device_uids = [i.DeviceUID for i in seg.ContributingEquipmentSequence if "DeviceUID" in i]
    assert device_uids == ["2.25.1002"]
    sr = pydicom.dcmread(by_class[COMPREHENSIVE_3D_SR])
    assert sr.SeriesDescription == "lungs-test measurements"
