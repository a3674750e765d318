"""Model packages made at test time: model.yaml written from a dict, tiny TorchScript weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import yaml
from peers import REPO_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.analysis.examples import HuRanges, save_torchscript

EXAMPLE_YAML = REPO_ROOT / "models" / "example-hu-threshold" / "model.yaml"
ANATOMY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}
CHEST_XRAY = {"value": "399208008", "scheme": "SCT", "meaning": "Plain chest X-ray"}
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def write_package(
    models: Path, spec: dict[str, Any], module: torch.nn.Module | None = None
) -> Path:
    """``models/<name>/model.yaml`` from ``spec`` and, if given, ``module`` as its weights."""
    folder = models / spec["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    if module is not None:
        save_torchscript(module, folder / spec["network"]["file"])
    return folder


def base_spec(name: str, **sections: Any) -> dict[str, Any]:
    """A CT segmentation package scoring HU -950..-500 as label 1 (the network: HuRanges)."""
    spec: dict[str, Any] = {
        "name": name,
        "version": "2.0.0",
        "device_uids": {"1.0.0": "2.25.1001", "2.0.0": "2.25.1002"},
        "manufacturer": "Test Models Inc",
        "accepts": {"modalities": ["CT"]},
        "network": {"format": "torchscript", "file": "model.pt"},
        "segmentation": {
            "activation": "softmax",
            "labels": [
                {
                    "value": 1,
                    "key": "aerated",
                    "label": "Aerated lung",
                    "category": ANATOMY,
                    "type": LUNG,
                    "color": [200, 40, 40],
                }
            ],
        },
    }
    spec.update(copy.deepcopy(sections))
    return spec


def aerated(hu: np.ndarray) -> np.ndarray:
    """What HuRanges([(-950, -500)]) labels 1: strictly inside the range."""
    return (hu > -950) & (hu < -500)


def aerated_network() -> torch.nn.Module:
    return HuRanges([(-950.0, -500.0)])


def example_spec() -> dict[str, Any]:
    """The shipped example package's model.yaml."""
    return yaml.safe_load(EXAMPLE_YAML.read_text(encoding="utf-8"))


FINDING = {"value": "121071", "scheme": "DCM", "meaning": "Finding"}
NORMAL = {"value": "17621005", "scheme": "SCT", "meaning": "Normal"}
PNEUMOTHORAX = {"value": "36118008", "scheme": "SCT", "meaning": "Pneumothorax"}
CHEST = {"value": "51185008", "scheme": "SCT", "meaning": "Thorax"}
PRIVATE = "99TESTAI"
PNEUMOTHORAX_PROBABILITY = {
    "value": "PNXP",
    "scheme": PRIVATE,
    "meaning": "Pneumothorax probability",
}


class HalfContrast(torch.nn.Module):
    """A 2-D 'classifier': class 1 when the left half of the image is brighter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        difference = (x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))) * 4
        return torch.stack([-difference, difference], dim=1)


def classifier_spec(name: str) -> dict[str, Any]:
    """A chest radiograph classifier package (no segmentation): Normal or Pneumothorax,
    with the pneumothorax probability as a private-code NUM (the network: HalfContrast)."""
    spec = base_spec(
        name,
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
                {"index": 1, "code": PNEUMOTHORAX, "probability": PNEUMOTHORAX_PROBABILITY},
            ],
        },
    )
    del spec["segmentation"]
    return spec


def bright_region_spec(name: str) -> dict[str, Any]:
    """A 2-D DX segmentation package: each bright region (1500..2500) its own finding
    with its area (the network: HuRanges([(1500, 2500)]))."""
    spec = base_spec(
        name,
        accepts={"modalities": ["DX"], "max_slices": 1},
        procedure=CHEST_XRAY,
        input={"dimensions": 2, "spacing": [1.0, 1.0]},
    )
    label = spec["segmentation"]["labels"][0]
    label.update(key="bright", label="Bright region", measurements=["area"], split=True)
    return spec


def chest_image() -> np.ndarray:
    """128 x 96 pixels of 1000 with a brighter (2000) block in the left half."""
    pixels = np.full((128, 96), 1000, dtype=np.uint16)
    pixels[20:100, 8:40] = 2000
    return pixels


def write_dx(path: Path, pixels: np.ndarray, monochrome1: bool = False) -> Path:
    """A synthetic DX For Presentation chest image: no patient position or orientation."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Dx", "DX1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "120000", "A1"
    ds.ReferringPhysicianName, ds.StudyID = "", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "DX", 1, 1, "Test"
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def sr_content(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of an SR, depth first."""
    found: list[pydicom.Dataset] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            found.append(item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found
