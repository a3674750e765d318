"""The built-in ``ct-chest`` pipeline: body, left lung and right lung from HU.

Thresholding and morphology run in torch on the pipeline's device (the same
code on CPU and CUDA); connected components and hole filling use SimpleITK.
Laterality is decided in patient coordinates (LPS: +x is the patient's left),
never from the image's left and right, so head-first, feet-first and mirrored
acquisitions give the same labels.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dicom_node.analysis.types import AnalysisError, AnalysisResult, Code, Segment, Volume

log = logging.getLogger(__name__)

BODY_MIN_HU = -500.0  # tissue threshold for the body outline
LUNG_MAX_HU = -400.0  # air / lung parenchyma threshold
BODY_OPENING_MM = 3.0  # in-plane opening radius that detaches table and cables
AIRWAY_MAX_AREA_MM2 = 800.0  # a trachea / main bronchus cross-section is smaller
AIRWAY_MAX_OFFSET_MM = 30.0  # ... and lies this close to the body's centre line
MIDLINE_WINDOW_MM = 50.0  # where the left/right split is searched, around the centre
MIDLINE_BIN_MM = 2.0
MIN_AXIAL_COSINE = 0.8  # slice normal must be close to the patient's z axis
MIN_SEGMENT_ML = 1.0  # a smaller segment is noise, reported as not found

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
ENTIRE_BODY = Code("38266002", "SCT", "Entire body")
LUNG = Code("39607008", "SCT", "Lung")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")


class CtChestPipeline:
    """Threshold-and-morphology segmentation of the body and both lungs (TID 1500 ready)."""

    name = "ct-chest"
    version = "0.1.0"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def run(self, volume: Volume) -> AnalysisResult:
        _check_axial(volume)
        hu = torch.from_numpy(np.ascontiguousarray(volume.hu, dtype=np.float32)).to(self.device)
        body = self._body(hu, volume.spacing)
        lungs = self._lungs(hu, body, volume)
        left, right = _split_left_right(lungs, body, volume)
        masks = {"body": body, "lung_left": left, "lung_right": right}
        segments = tuple(_segment(key, masks[key], volume) for key in masks)
        log.info(
            "ct-chest: body %.0f ml, left lung %.0f ml, right lung %.0f ml",
            *(s.volume_ml for s in segments),
        )
        return AnalysisResult(
            pipeline=self.name,
            algorithm_name="dicom_node ct-chest",
            algorithm_version=self.version,
            volume=volume,
            segments=segments,
        )

    def _body(self, hu: torch.Tensor, spacing: tuple[float, float, float]) -> np.ndarray:
        """Largest tissue component after an in-plane opening, holes filled per slice."""
        tissue = hu > BODY_MIN_HU
        radius = _inplane_radius(BODY_OPENING_MM, spacing)
        core = _largest_component(_erode(tissue, radius).cpu().numpy())
        if not core.any():
            raise AnalysisError(f"no body found: no voxel above {BODY_MIN_HU} HU after opening")
        core_t = torch.from_numpy(core).to(self.device)
        body = (_dilate(core_t, radius) & tissue).cpu().numpy()
        return _fill_holes_per_slice(body)

    def _lungs(self, hu: torch.Tensor, body: np.ndarray, volume: Volume) -> np.ndarray:
        """Low-HU voxels in the body not connected to the air around the patient."""
        air = (hu < LUNG_MAX_HU).cpu().numpy()
        labels, _ = _components(air)
        touches_outside = np.bincount(labels[~body].ravel(), minlength=labels.max() + 1) > 0
        internal = air & ~touches_outside[labels]
        return _remove_airways(internal, body, volume)


def _check_axial(volume: Volume) -> None:
    normal_z = abs(float(volume.direction[2, 2]))
    if normal_z < MIN_AXIAL_COSINE:
        raise AnalysisError(
            f"ct-chest needs axial slices; slice normal {volume.direction[:, 2].tolist()} "
            f"is {normal_z:.2f} along the patient's z axis"
        )
    if volume.hu.shape[0] < 2:
        raise AnalysisError(f"ct-chest needs at least 2 slices, got {volume.hu.shape[0]}")


def _remove_airways(lungs: np.ndarray, body: np.ndarray, volume: Volume) -> np.ndarray:
    """Drop small air sections near the centre line: trachea and main bronchi."""
    pixel_area = volume.spacing[1] * volume.spacing[2]
    cleaned = lungs.copy()
    for k in range(lungs.shape[0]):
        if not lungs[k].any():
            continue
        x = _patient_x(volume, k)
        centre = float(x[body[k]].mean())
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(_image(lungs[k])))
        area = np.bincount(labels.ravel()) * pixel_area
        mean_x = np.bincount(labels.ravel(), weights=x.ravel()) / np.maximum(area / pixel_area, 1)
        airway = (area <= AIRWAY_MAX_AREA_MM2) & (np.abs(mean_x - centre) <= AIRWAY_MAX_OFFSET_MM)
        airway[0] = False
        cleaned[k][airway[labels]] = False
    return cleaned


def _split_left_right(
    lungs: np.ndarray, body: np.ndarray, volume: Volume
) -> tuple[np.ndarray, ...]:
    """Split at the emptiest sagittal line near the body centre; +x (LPS) is left."""
    left = np.zeros_like(lungs)
    for k in range(lungs.shape[0]):
        if not lungs[k].any():
            continue
        x = _patient_x(volume, k)
        split = _midline(x[lungs[k]], float(x[body[k]].mean()))
        left[k] = lungs[k] & (x > split)
    right = lungs & ~left
    return _largest_component(left), _largest_component(right)


def _midline(lung_x: np.ndarray, centre: float) -> float:
    """The x of least lung near ``centre``; among ties the one closest to it."""
    edges = centre + np.arange(
        -MIDLINE_WINDOW_MM, MIDLINE_WINDOW_MM + MIDLINE_BIN_MM, MIDLINE_BIN_MM
    )
    counts, _ = np.histogram(lung_x, bins=edges)
    middles = (edges[:-1] + edges[1:]) / 2
    candidates = np.flatnonzero(counts == counts.min())
    return float(middles[candidates[np.argmin(np.abs(middles[candidates] - centre))]])


def _patient_x(volume: Volume, k: int) -> np.ndarray:
    """Patient x (LPS, mm) of every pixel of slice ``k``, shape (rows, columns)."""
    rows, columns = volume.hu.shape[1:]
    d = volume.direction
    dz, dy, dx = volume.spacing
    col_term = np.arange(columns) * dx * d[0, 0]
    row_term = np.arange(rows) * dy * d[0, 1]
    return volume.origin[0] + k * dz * d[0, 2] + row_term[:, None] + col_term[None, :]


def _segment(key: str, mask: np.ndarray, volume: Volume) -> Segment:
    count = int(mask.sum())
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    if count * voxel_ml < MIN_SEGMENT_ML:
        raise AnalysisError(
            f"ct-chest found no {key!r}: {count} voxels ({count * voxel_ml:.2f} ml), "
            f"less than {MIN_SEGMENT_ML} ml"
        )
    label, segment_type, laterality = {
        "body": ("Body", ENTIRE_BODY, None),
        "lung_left": ("Left lung", LUNG, LEFT),
        "lung_right": ("Right lung", LUNG, RIGHT),
    }[key]
    return Segment(
        key=key,
        label=label,
        category=ANATOMICAL_STRUCTURE,
        type=segment_type,
        laterality=laterality,
        mask=mask,
        volume_ml=count * voxel_ml,
        mean_hu=float(volume.hu[mask].mean(dtype=np.float64)),
    )


def _inplane_radius(mm: float, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    return (0, max(1, round(mm / spacing[1])), max(1, round(mm / spacing[2])))


def _dilate(mask: torch.Tensor, radius: tuple[int, int, int]) -> torch.Tensor:
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


def _erode(mask: torch.Tensor, radius: tuple[int, int, int]) -> torch.Tensor:
    return ~_dilate(~mask, radius)


def _image(mask: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(mask.astype(np.uint8))


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected components: (labels, voxel count per label; label 0 = background)."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(_image(mask)))
    return labels, np.bincount(labels.ravel())


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, sizes = _components(mask)
    if sizes.size < 2:
        return np.zeros_like(mask, dtype=bool)
    return labels == int(np.argmax(sizes[1:])) + 1


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    filled = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        filled[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(_image(mask[k]))) > 0
    return filled
