"""Model packages beyond CT volumes: 2-D radiographs (DX), study classifiers and classifiers
of each finding (the running node with packages: test_packages_node.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dciodvfy import dciodvfy_errors
from model_packages import (
    CHEST_XRAY,
    PNEUMOTHORAX,
    PRIVATE,
    HalfContrast,
    base_spec,
    bright_region_spec,
    chest_image,
    classifier_spec,
    sr_content,
    write_dx,
    write_package,
)
from peers import GE_3SLICE
from pydicom.uid import generate_uid

from dicom_node.analysis.examples import HuRanges, save_torchscript
from dicom_node.analysis.pipelines import build_pipeline
from dicom_node.analysis.types import Volume
from dicom_node.analysis.volume import load_images, load_series
from dicom_node.encode.seg import build_seg
from dicom_node.encode.sr import build_sr
from dicom_node.encode.types import Equipment, ResultUIDs

CPU = torch.device("cpu")
EQUIPMENT = Equipment(device_serial_number="TEST-0003", device_observer_uid=generate_uid())


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


def test_dx_image_loads_as_a_one_slice_volume(tmp_path: Path) -> None:
    pixels = chest_image()
    volume = load_images([write_dx(tmp_path / "dx.dcm", pixels)])
    assert volume.hu.shape == (1, 128, 96)
    assert volume.spacing[1:] == (0.5, 0.5)  # ImagerPixelSpacing
    np.testing.assert_array_equal(volume.hu[0], pixels)
    inverted = load_images([write_dx(tmp_path / "m1.dcm", 4095 - pixels, monochrome1=True)])
    assert np.corrcoef(inverted.hu[0].ravel(), pixels.ravel())[0, 1] > 0.999  # as MONOCHROME2


def test_chest_radiograph_classifier_reports_evaluation_and_probability(tmp_path: Path) -> None:
    spec = classifier_spec("cxr-pneumothorax")
    write_package(tmp_path, spec, HalfContrast())
    volume = load_images([write_dx(tmp_path / "dx.dcm", chest_image())])
    result = build_pipeline("cxr-pneumothorax", CPU, tmp_path).run(volume)
    assert result.segments == ()
    (group,) = result.groups
    assert group.segment_keys == ()
    assert [e.value.value for e in group.evaluations] == [PNEUMOTHORAX["value"]]
    (probability,) = group.measurements
    assert 0.5 < probability.value < 1.0
    sr = _written_ok(build_sr(result, None, _uids(), EQUIPMENT), tmp_path / "sr.dcm")
    procedure = next(
        i for i in sr_content(sr) if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    )
    assert procedure.ConceptCodeSequence[0].CodeValue == CHEST_XRAY["value"]
    values = {i.ConceptCodeSequence[0].CodeValue for i in sr_content(sr) if i.ValueType == "CODE"}
    assert PNEUMOTHORAX["value"] in values
    numbers = [i for i in sr_content(sr) if i.ValueType == "NUM"]
    assert [float(n.MeasuredValueSequence[0].NumericValue) for n in numbers] == [
        pytest.approx(probability.value, abs=1e-3)
    ]
    assert PRIVATE in {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}
    items = sr.ContributingEquipmentSequence
    assert [i.DeviceUID for i in items if "DeviceUID" in i] == ["2.25.1002"]


def test_dx_segmentation_gives_valid_seg_and_planar_sr(tmp_path: Path) -> None:
    write_package(tmp_path, bright_region_spec("cxr-bright"), HuRanges([(1500.0, 2500.0)]))
    pixels = np.full((128, 96), 1000, dtype=np.uint16)
    pixels[10:30, 10:30] = 2000
    pixels[80:90, 60:70] = 2000
    source = write_dx(tmp_path / "dx.dcm", pixels)
    result = build_pipeline("cxr-bright", CPU, tmp_path).run(load_images([source]))
    assert [s.key for s in result.segments] == ["bright_1", "bright_2"]  # largest first
    big, small = result.segments
    assert big.volume_ml is None and big.mean_hu is None  # not reported for DX
    assert big.measurements[0].value == pytest.approx(400 * 0.25, rel=0.15)  # mm2
    assert small.measurements[0].value == pytest.approx(100 * 0.25, rel=0.25)
    uids = _uids()
    seg = _written_ok(build_seg(result, uids, EQUIPMENT), tmp_path / "seg.dcm")
    assert "FrameOfReferenceUID" not in seg and seg.PatientOrientation == ["L", "F"]
    sr = _written_ok(build_sr(result, seg, uids, EQUIPMENT), tmp_path / "sr.dcm")
    templates = [i for i in sr_content(sr) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert len(templates) == 2
    frames = [i for i in sr_content(sr) if i.ValueType == "IMAGE"]
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
    codes = [i.ConceptCodeSequence[0].CodeValue for i in sr_content(sr) if i.ValueType == "CODE"]
    assert codes.count("LIKELY") == 1
