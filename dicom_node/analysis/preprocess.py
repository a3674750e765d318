"""Declared preprocessing, implemented once: ``model.yaml`` ``input`` -> network input.

The volume becomes a SimpleITK image with its patient geometry (LPS), so that
reorientation and resampling are physical operations; whatever the network
outputs on that prepared grid is resampled back onto the source grid with
nearest-neighbour interpolation (:meth:`Prepared.to_source`), so a SEG built
from it still derives frame by frame from the source images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from dicom_node.analysis.packages import (
    CurvatureFlow,
    DiscreteGaussian,
    InputSpec,
    Median,
)
from dicom_node.analysis.types import Volume


@dataclass(frozen=True)
class Prepared:
    """The network's input and the grids needed to map its output back."""

    array: np.ndarray  # float32 (slices, rows, columns) on the prepared grid
    grid: sitk.Image  # geometry of ``array``
    source: sitk.Image  # geometry of the volume

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Prepared voxel spacing (mm) in (slice, row, column) order."""
        x, y, z = self.grid.GetSpacing()
        return (z, y, x)

    def to_source(self, labels: np.ndarray) -> np.ndarray:
        """Map an integer array on the prepared grid onto the source grid (nearest neighbour)."""
        if labels.shape != self.array.shape:
            raise ValueError(f"labels shape {labels.shape} differs from {self.array.shape}")
        image = sitk.GetImageFromArray(labels.astype(np.int32))
        image.CopyInformation(self.grid)
        back = sitk.Resample(image, self.source, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        return sitk.GetArrayFromImage(back)


def to_sitk(volume: Volume) -> sitk.Image:
    """The volume as a SimpleITK image in LPS; array axes (slice, row, column) = ITK (z, y, x)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(volume.direction).ravel()))
    return image


def preprocess(volume: Volume, spec: InputSpec) -> Prepared:
    """Reorient, resample, denoise, window and normalise ``volume`` as ``spec`` declares."""
    source = to_sitk(volume)
    image = source
    if spec.orientation is not None:
        image = sitk.DICOMOrient(image, spec.orientation)
    image = _resample(image, spec)
    for step in spec.denoise:
        image = _denoise(image, step, spec.dimensions)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array = normalise(array, spec)
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return Prepared(array=array, grid=grid, source=source)


def normalise(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Clip to the window, then z-score or map the window onto [0, 1]."""
    if spec.window is not None:
        array = np.clip(array, spec.window[0], spec.window[1])
    if spec.normalise == "window" and spec.window is not None:
        low, high = spec.window
        array = (array - low) / (high - low)
    elif spec.normalise == "zscore":
        std = float(array.std())
        array = (array - float(array.mean())) / (std if std > 0 else 1.0)
    return np.ascontiguousarray(array, dtype=np.float32)


def _resample(image: sitk.Image, spec: InputSpec) -> sitk.Image:
    """Resample to ``spec.spacing`` or ``spec.size`` (linear), keeping the imaged extent."""
    if spec.spacing is None and spec.size is None:
        return image
    old_spacing = np.array(image.GetSpacing())
    old_size = np.array(image.GetSize())
    new_spacing = old_spacing.copy()
    new_size = old_size.copy()
    axes = 3 if spec.dimensions == 3 else 2  # a 2-D spec leaves the slice axis alone
    if spec.spacing is not None:
        new_spacing[:axes] = spec.spacing[::-1]
        extent = old_spacing[:axes] * old_size[:axes]
        new_size[:axes] = np.maximum(1, np.round(extent / new_spacing[:axes])).astype(int)
    elif spec.size is not None:
        new_size[:axes] = spec.size[::-1]
        new_spacing[:axes] = old_spacing[:axes] * old_size[:axes] / new_size[:axes]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # keep the outer edge of the first voxel where it was
    shift = direction @ ((new_spacing - old_spacing) / 2.0)
    reference = sitk.Image([int(n) for n in new_size], sitk.sitkFloat32)
    reference.SetSpacing(tuple(float(s) for s in new_spacing))
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(float(v) for v in np.array(image.GetOrigin()) + shift))
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, background)


def _denoise(
    image: sitk.Image, step: CurvatureFlow | Median | DiscreteGaussian, dimensions: int
) -> sitk.Image:
    """One SimpleITK denoising filter; a 2-D spec filters within slices only."""
    if isinstance(step, CurvatureFlow):
        if dimensions == 2 or image.GetSize()[2] == 1:
            slices = [
                sitk.CurvatureFlow(image[:, :, k], step.time_step, step.iterations)
                for k in range(image.GetSize()[2])
            ]
            joined = sitk.JoinSeries(slices)
            joined.CopyInformation(image)
            return joined
        return sitk.CurvatureFlow(image, step.time_step, step.iterations)
    if isinstance(step, Median):
        across = step.radius if dimensions == 3 else 0
        return sitk.Median(image, [step.radius, step.radius, across])
    across_variance = step.variance_mm2 if dimensions == 3 else 0.0
    return sitk.DiscreteGaussian(
        image, [step.variance_mm2, step.variance_mm2, across_variance], 32, 0.01, True
    )
