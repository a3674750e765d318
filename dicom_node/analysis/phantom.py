"""A synthetic chest CT with known lesions, for the benchmark and the tests.

Not anatomy: an elliptic body of soft tissue with a spine, two ellipsoid lungs of
-850 HU, vessels crossing the slices, a trachea that splits into two main bronchi, and
spherical solid lesions at known places (one of them against the chest wall), plus
Gaussian noise. Slice headers are real enough for the SEG and SR encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from dicom_node.analysis.types import Volume

LUNG_HU = -850.0
TISSUE_HU = 40.0
BONE_HU = 500.0
LESION_HU = 30.0
NOISE_HU = 15.0


@dataclass(frozen=True)
class Lesion:
    """A solid sphere: centre in patient mm (LPS), diameter in mm."""

    centre: tuple[float, float, float]
    diameter: float
    side: str  # the lung it lies in or against


def chest_phantom(
    slices: int = 300,
    size: int = 512,
    spacing: tuple[float, float, float] = (1.0, 0.75, 0.75),
    seed: int = 0,
) -> tuple[Volume, tuple[Lesion, ...]]:
    """The phantom volume (head-first supine, slices ordered feet to head) and its lesions."""
    dz, dy, dx = spacing
    rng = np.random.default_rng(seed)
    y = (np.arange(size) - size / 2) * dy  # LPS y: posterior is +
    x = (np.arange(size) - size / 2) * dx  # LPS x: patient's left is +
    z = (np.arange(slices) - slices / 2) * dz
    height = slices * dz
    half_width, half_depth = 0.42 * size * dx, 0.3 * size * dy
    lesions = (
        Lesion((0.55 * half_width, -0.2 * half_depth, -0.15 * height), 20.0, "left"),
        Lesion((-0.45 * half_width, 0.1 * half_depth, 0.05 * height), 10.0, "right"),
        Lesion((-0.5 * half_width, -0.3 * half_depth, -0.25 * height), 7.0, "right"),
        # against the back wall of the left lung, half in the chest wall
        Lesion((0.48 * half_width, 0.62 * half_depth, 0.0), 16.0, "left"),
    )
    vessels = [
        (side * half_width * rng.uniform(0.3, 0.7), half_depth * rng.uniform(-0.4, 0.4))
        for side in (-1, 1, -1, 1, -1, 1)
    ]
    hu = np.empty((slices, size, size), dtype=np.float32)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    body = (xx / half_width) ** 2 + (yy / half_depth) ** 2 <= 1.0
    spine = (xx / 18.0) ** 2 + ((yy - 0.75 * half_depth) / 15.0) ** 2 <= 1.0
    for k in range(slices):
        t = (z[k] + height / 2) / height  # 0 at the bottom slice, 1 at the top
        image = np.where(body, TISSUE_HU, -1000.0)
        image[spine] = BONE_HU
        shrink = np.sqrt(max(0.0, 1.0 - ((t - 0.45) / 0.5) ** 2))  # lungs taper at both ends
        for side in (-1, 1):
            lung = ((xx - side * 0.48 * half_width) / (0.32 * half_width * shrink + 1e-6)) ** 2 + (
                yy / (0.65 * half_depth * shrink + 1e-6)
            ) ** 2 <= 1.0
            image[lung] = LUNG_HU
        for vx, vy in vessels:
            image[(xx - vx) ** 2 + (yy - vy) ** 2 <= 2.0**2] = TISSUE_HU
        trachea_x = 0.0 if t > 0.6 else None
        if trachea_x is not None:
            image[xx**2 + (yy + 0.2 * half_depth) ** 2 <= 8.0**2] = -1000.0
        elif t > 0.55:  # the main bronchi leave the trachea's end sideways
            for side in (-1, 1):
                centre = side * (1.0 - (t - 0.55) / 0.05) * 0.3 * half_width
                image[(xx - centre) ** 2 + (yy + 0.2 * half_depth) ** 2 <= 6.0**2] = -1000.0
        for lesion in lesions:
            cx, cy, cz = lesion.centre
            r2 = (lesion.diameter / 2) ** 2 - (z[k] - cz) ** 2
            if r2 > 0:
                image[((xx - cx) ** 2 + (yy - cy) ** 2 <= r2) & body] = LESION_HU
        hu[k] = image + rng.normal(0.0, NOISE_HU, size=image.shape).astype(np.float32)
    origin = np.array([x[0], y[0], z[0]])
    volume = Volume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=np.eye(3),
        datasets=_headers(slices, size, spacing, origin),
    )
    return volume, lesions


def _headers(
    slices: int, size: int, spacing: tuple[float, float, float], origin: np.ndarray
) -> tuple[Dataset, ...]:
    """CT Image headers (no pixel data) of one synthetic study, one per slice."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for k in range(slices):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "PHANTOM^CHEST",
            "PH",
            "",
            "O",
        )
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "PH1", "1", ""
        ds.Modality, ds.Manufacturer = "CT", "dicom_node phantom"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImagePositionPatient = [
            float(origin[0]),
            float(origin[1]),
            float(origin[2] + k * spacing[0]),
        ]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP, ds.PositionReferenceIndicator = 120, ""
        headers.append(ds)
    return tuple(headers)
