"""Load one series of single-frame CT/MR images into a :class:`Volume` in HU.

:func:`load_images` is what the worker calls: a series of slices goes to
:func:`load_series`, a single file (a DX/CR radiograph without Image Plane
geometry, or one slice) to :func:`load_image_2d`.

Geometry follows the Image Plane Module (PS3.3 C.7.6.2): slices are ordered
by the projection of ImagePositionPatient (0020,0032) on the slice normal,
the cross product of the row and column direction cosines of
ImageOrientationPatient (0020,0037). Error messages name the offending value
and the file, never patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.analysis.types import Volume

log = logging.getLogger(__name__)

#: Largest difference between direction cosines still counted as one orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Slices closer than this (mm) along the normal are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-3
#: Relative deviation from the median slice gap above which we log a warning.
IRREGULAR_SPACING_RATIO = 0.01
#: Elements at least this long (in practice the pixel data) are read from the file
#: only when used (pydicom's ``defer_size``).
DEFER_BYTES = 256 * 1024


def load_series(paths: Sequence[Path]) -> Volume:
    """Read the image files of one series and return its volume in HU.

    Raises :class:`ValueError` for fewer than two slices, missing or mixed
    geometry attributes, inconsistent matrix sizes and duplicate positions.
    """
    if len(paths) < 2:
        raise ValueError(f"a volume needs at least 2 slices, got {len(paths)}")
    # The pixel data is read when a slice is converted and dropped right after, so that
    # only one slice's stored pixels are in memory beside the volume, not the series'.
    datasets = [pydicom.dcmread(Path(path), defer_size=DEFER_BYTES) for path in paths]
    names = [Path(path).name for path in paths]
    row_cos, col_cos = _common_orientation(datasets, names)
    normal = np.cross(row_cos, col_cos)
    rows, columns = _common_matrix(datasets, names)
    positions = np.array([_position(ds, name) for ds, name in zip(datasets, names, strict=True)])
    order = np.argsort(positions @ normal, kind="stable")
    sorted_positions = positions[order]
    slice_spacing = _slice_spacing(sorted_positions @ normal, [names[i] for i in order])
    pixel_spacing = _common_pixel_spacing(datasets, names)
    hu = np.empty((len(datasets), rows, columns), dtype=np.float32)
    headers = []
    for k, index in enumerate(order):
        hu[k] = _slice_hu(datasets[index], names[index])
        headers.append(_header_only(datasets[index]))
    return Volume(
        hu=hu,
        spacing=(slice_spacing, pixel_spacing[0], pixel_spacing[1]),
        origin=sorted_positions[0].copy(),
        direction=np.column_stack([row_cos, col_cos, normal]),
        datasets=tuple(headers),
    )


def _common_orientation(
    datasets: Sequence[Dataset], names: Sequence[str]
) -> tuple[np.ndarray, ...]:
    """Return the unit row and column cosines shared by every slice."""
    reference = None
    for ds, name in zip(datasets, names, strict=True):
        value = ds.get("ImageOrientationPatient")
        if value is None or len(value) != 6:
            raise ValueError(f"{name}: ImageOrientationPatient missing or not 6 values: {value!r}")
        iop = np.array([float(v) for v in value], dtype=np.float64)
        if reference is None:
            reference = iop
        elif np.max(np.abs(iop - reference)) > ORIENTATION_TOLERANCE:
            raise ValueError(
                f"{name}: mixed orientations in one series: "
                f"{iop.tolist()} differs from {reference.tolist()}"
            )
    assert reference is not None
    row_cos, col_cos = reference[:3], reference[3:]
    norms = (np.linalg.norm(row_cos), np.linalg.norm(col_cos))
    if min(norms) < 1e-6 or abs(float(row_cos @ col_cos)) > 1e-3 * norms[0] * norms[1]:
        raise ValueError(
            f"ImageOrientationPatient is not two orthogonal vectors: {reference.tolist()}"
        )
    return row_cos / norms[0], col_cos / norms[1]


def _common_matrix(datasets: Sequence[Dataset], names: Sequence[str]) -> tuple[int, int]:
    """Return (rows, columns) shared by every slice."""
    shapes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(shapes) != 1:
        raise ValueError(f"inconsistent Rows/Columns in one series: {sorted(shapes)}")
    rows, columns = shapes.pop()
    if rows < 1 or columns < 1:
        raise ValueError(f"{names[0]}: invalid Rows/Columns {rows}x{columns}")
    return rows, columns


def _position(ds: Dataset, name: str) -> np.ndarray:
    value = ds.get("ImagePositionPatient")
    if value is None or len(value) != 3:
        raise ValueError(f"{name}: ImagePositionPatient missing or not 3 values: {value!r}")
    return np.array([float(v) for v in value], dtype=np.float64)


def _slice_spacing(distances: np.ndarray, names: Sequence[str]) -> float:
    """Median gap between sorted slice positions along the normal (mm)."""
    gaps = np.diff(distances)
    duplicate = np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise ValueError(
            f"duplicate slice position {distances[i]:.3f} mm along the normal "
            f"({names[i]} and {names[i + 1]})"
        )
    spacing = float(np.median(gaps))
    deviation = float(np.max(np.abs(gaps - spacing))) / spacing
    if deviation > IRREGULAR_SPACING_RATIO:
        log.warning(
            "irregular slice spacing: gaps %.3f..%.3f mm, using median %.3f mm",
            gaps.min(),
            gaps.max(),
            spacing,
        )
    return spacing


def _common_pixel_spacing(datasets: Sequence[Dataset], names: Sequence[str]) -> tuple[float, float]:
    """(row spacing, column spacing) in mm, the same for every slice."""
    spacings = {_pixel_spacing(ds, name) for ds, name in zip(datasets, names, strict=True)}
    if len(spacings) != 1:
        raise ValueError(f"inconsistent PixelSpacing in one series: {sorted(spacings)}")
    return spacings.pop()


def _pixel_spacing(ds: Dataset, name: str) -> tuple[float, float]:
    """(row spacing, column spacing) in mm from PixelSpacing (0028,0030)."""
    value = ds.get("PixelSpacing")
    if value is None or len(value) != 2 or min(float(v) for v in value) <= 0:
        raise ValueError(f"{name}: PixelSpacing missing or invalid: {value!r}")
    return float(value[0]), float(value[1])


def _slice_hu(ds: Dataset, name: str) -> np.ndarray:
    """Decode one slice and apply its own Rescale Slope/Intercept."""
    if "PixelData" not in ds:
        raise ValueError(f"{name}: no PixelData")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(
            f"{name}: expected a single-frame grayscale image, got "
            f"SamplesPerPixel={ds.get('SamplesPerPixel')} NumberOfFrames={ds.get('NumberOfFrames')}"
        )
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels * np.float32(slope) + np.float32(intercept)


def _header_only(ds: Dataset) -> Dataset:
    """Drop the pixel data (the encoders need the headers only).

    An empty SpecificCharacterSet means the default repertoire, as if absent;
    it is removed because highdicom rejects the empty value.
    """
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet
    return ds


def load_images(paths: Sequence[Path]) -> Volume:
    """A series of slices (:func:`load_series`) or, for one file, a single image."""
    if len(paths) == 1:
        return load_image_2d(paths[0])
    return load_series(paths)


def load_image_2d(path: Path) -> Volume:
    """Read one single-frame image (a DX/CR radiograph, or one slice) as a one-slice volume.

    Projection radiographs have no ImagePositionPatient/ImageOrientationPatient:
    the volume then lies at the origin with identity direction, which only serves
    to map results back onto the same pixels. Spacing is PixelSpacing, else
    ImagerPixelSpacing (0018,1164). MONOCHROME1 images are inverted so that higher
    values are brighter, as in MONOCHROME2; values are the rescaled pixel values.
    """
    ds = pydicom.dcmread(Path(path))
    name = Path(path).name
    if ds.get("PixelSpacing") is None and ds.get("ImagerPixelSpacing") is not None:
        spacing = _imager_pixel_spacing(ds, name)
    else:
        spacing = _pixel_spacing(ds, name)
    pixels = _slice_hu(ds, name)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    origin = np.zeros(3)
    direction = np.eye(3)
    if ds.get("ImageOrientationPatient") is not None and ds.get("ImagePositionPatient") is not None:
        row_cos, col_cos = _common_orientation([ds], [name])
        direction = np.column_stack([row_cos, col_cos, np.cross(row_cos, col_cos)])
        origin = _position(ds, name)
    thickness = float(ds.get("SliceThickness") or 1.0)
    return Volume(
        hu=pixels[None].astype(np.float32),
        spacing=(thickness if thickness > 0 else 1.0, spacing[0], spacing[1]),
        origin=origin,
        direction=direction,
        datasets=(_header_only(ds),),
    )


def _imager_pixel_spacing(ds: Dataset, name: str) -> tuple[float, float]:
    value = ds.get("ImagerPixelSpacing")
    if value is None or len(value) != 2 or min(float(v) for v in value) <= 0:
        raise ValueError(f"{name}: ImagerPixelSpacing invalid: {value!r}")
    return float(value[0]), float(value[1])
