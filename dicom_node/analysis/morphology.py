"""Binary morphology shared by the built-in pipelines.

Dilation and erosion run in torch (box structuring elements, one axis at a time, by
doubling shifts), so they run on whatever device the mask lives on; connected
components and hole filling use SimpleITK on the CPU.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F


def dilate(mask: torch.Tensor, radius: tuple[int, int, int]) -> torch.Tensor:
    """Binary dilation with a box of half-widths ``radius``, one axis at a time."""
    for axis, r in enumerate(radius):
        if r > 0:
            mask = _dilate_axis(mask, axis, r)
    return mask


def _dilate_axis(mask: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """OR over a window of 2 * radius + 1 along ``axis`` by doubling shifts (log steps)."""
    pad = [0] * (2 * mask.dim())
    pad[2 * (mask.dim() - 1 - axis)] = pad[2 * (mask.dim() - 1 - axis) + 1] = radius
    result = F.pad(mask.to(torch.uint8), pad).bool()
    window, target = 1, 2 * radius + 1
    while window < target:
        shift = min(window, target - window)
        length = result.shape[axis] - shift
        result = result.narrow(axis, 0, length) | result.narrow(axis, shift, length)
        window += shift
    return result


def erode(mask: torch.Tensor, radius: tuple[int, int, int]) -> torch.Tensor:
    """Binary erosion; outside the array counts as foreground (no erosion from the edges)."""
    return ~dilate(~mask, radius)


def image(mask: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(mask.astype(np.uint8))


MANY_LABELS = 2**16  # above this, counting in numpy beats per-label statistics


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected components: (labels, voxel count per label; label 0 = background).

    The label image comes back in the smallest unsigned type that holds its labels, and
    the counts from SimpleITK's label statistics: ``np.bincount`` over a 300 x 512 x 512
    uint32 label array (cast to int64 first) took about 2 s per call here, the whole
    call now about 0.4 s.
    """
    labeller = sitk.ConnectedComponentImageFilter()
    labelled = labeller.Execute(image(mask))
    count = int(labeller.GetObjectCount())
    if count >= MANY_LABELS:
        labels = sitk.GetArrayFromImage(labelled)
        return labels, np.bincount(labels.ravel(), minlength=count + 1)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()
    stats.ComputeFeretDiameterOff()
    stats.ComputeOrientedBoundingBoxOff()
    stats.Execute(labelled)
    sizes = np.zeros(count + 1, dtype=np.int64)
    for label in stats.GetLabels():
        sizes[label] = stats.GetNumberOfPixels(label)
    sizes[0] = mask.size - int(sizes[1:].sum())
    pixel = sitk.sitkUInt8 if count < 2**8 - 1 else sitk.sitkUInt16  # max + 1 still fits
    return sitk.GetArrayFromImage(sitk.Cast(labelled, pixel)), sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, sizes = components(mask)
    if sizes.size < 2:
        return np.zeros_like(mask, dtype=bool)
    return labels == int(np.argmax(sizes[1:])) + 1


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    filled = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        filled[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(image(mask[k]))) > 0
    return filled
