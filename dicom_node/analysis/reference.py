"""Reference segmentations resampled onto the grid of a CT :class:`Volume`.

A reference is a DICOM Segmentation (PS3.3 A.51; BINARY or FRACTIONAL) or a
label-map image (NIfTI, NRRD, MetaImage). SEG frames are placed on the CT slice
whose SOP Instance UID they were derived from, or else by their
PlanePositionSequence (0020,9113); label maps by physical position. Everything is
in LPS: SimpleITK turns NIfTI's RAS into LPS when it reads the file. Resampling is
nearest neighbour, so labels are never blended.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from dicom_node.analysis.types import Volume

log = logging.getLogger(__name__)

LABEL_MAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


class InvalidReference(Exception):
    """The reference cannot be read or does not lie on the CT."""


@dataclass(frozen=True)
class Reference:
    """A reference segmentation on the grid of one CT volume."""

    path: Path
    coverage: float  # fraction of CT voxels inside the reference's field of view
    labelmap: np.ndarray | None = None  # label-map images: integer labels on the CT grid
    segments: dict[int, np.ndarray] = field(default_factory=dict)  # SEG number -> mask
    segment_labels: dict[int, str] = field(default_factory=dict)  # SEG number -> SegmentLabel

    def present(self) -> tuple[int, ...]:
        """Labels (label values or segment numbers) with at least one voxel."""
        if self.labelmap is not None:
            return tuple(int(v) for v in np.unique(self.labelmap) if v != 0)
        return tuple(n for n, mask in self.segments.items() if mask.any())

    def mask(self, values: Iterable[int]) -> np.ndarray:
        """Union of the voxels of ``values`` (label values or segment numbers)."""
        if self.labelmap is not None:
            return np.isin(self.labelmap, list(values))
        shape = next(iter(self.segments.values())).shape
        out = np.zeros(shape, dtype=bool)
        for value in values:
            out |= self.segments[value]
        return out


def is_label_map(path: Path) -> bool:
    return path.name.lower().endswith(LABEL_MAP_SUFFIXES)


def label_map_stem(path: Path) -> str:
    """The file name without its label-map suffix (``x.nii.gz`` -> ``x``)."""
    suffix = next(s for s in LABEL_MAP_SUFFIXES if path.name.lower().endswith(s))
    return path.name[: -len(suffix)]


def read_reference(path: Path, volume: Volume) -> Reference:
    """Read a SEG or label-map image and resample it onto ``volume``'s grid."""
    if is_label_map(path):
        reference = _read_label_image(path, volume)
    else:
        reference = _read_seg(path, volume)
    if reference.coverage == 0.0:
        raise InvalidReference(
            f"{path.name}: the reference grid does not overlap the CT "
            f"(reference spans {_extent(path)}; CT spans {_span(ct_grid(volume))})"
        )
    return reference


def ct_affine(volume: Volume) -> np.ndarray:
    """4x4 matrix: (slice, row, column) index -> LPS mm."""
    affine = np.eye(4)
    for axis, (column, step) in enumerate(zip((2, 1, 0), volume.spacing, strict=True)):
        affine[:3, axis] = volume.direction[:, column] * step
    affine[:3, 3] = volume.origin
    return affine


def image_from_array(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of ``array`` (axes 0, 1, 2 -> ITK k, j, i) placed by ``affine``."""
    image = sitk.GetImageFromArray(array)
    steps = affine[:3, 2::-1]  # columns for ITK axes i, j, k
    spacing = np.linalg.norm(steps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((steps / spacing).flatten().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return image


def ct_grid(volume: Volume) -> sitk.Image:
    """An empty SimpleITK image with the CT's geometry."""
    return image_from_array(np.zeros(volume.hu.shape, dtype=np.uint8), ct_affine(volume))


def _on_grid(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)


def _coverage(image: sitk.Image, grid: sitk.Image) -> float:
    inside = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(image)
    return float(_on_grid(inside, grid).mean())


def _span(image: sitk.Image) -> str:
    last = np.array(image.GetSize()) - 1
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint((last * np.array(c)).tolist())
            for c in np.ndindex(2, 2, 2)
        ]
    )
    low, high = corners.min(axis=0), corners.max(axis=0)
    x, y, z = (f"{a:.0f}..{b:.0f}" for a, b in zip(low, high, strict=True))
    return f"x {x}, y {y}, z {z} mm (LPS)"


def _extent(path: Path) -> str:
    if is_label_map(path):
        return _span(sitk.ReadImage(str(path)))
    geometry = hd.seg.segread(path).get_volume_geometry()
    if geometry is None:
        return "no regular volume"
    return _span(image_from_array(np.zeros(geometry.spatial_shape, np.uint8), geometry.affine))


def _read_label_image(path: Path, volume: Volume) -> Reference:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InvalidReference(f"{path}: cannot read label map: {exc}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidReference(
            f"{path.name}: expected a 3D single-component label map, got "
            f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} components"
        )
    grid = ct_grid(volume)
    labels = _on_grid(sitk.Cast(image, sitk.sitkInt32), grid)
    return Reference(path=path, coverage=_coverage(image, grid), labelmap=labels)


def _read_seg(path: Path, volume: Volume) -> Reference:
    try:
        seg = hd.seg.segread(path)
    except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
        raise InvalidReference(f"{path}: not a DICOM Segmentation: {exc}") from None
    numbers = [int(n) for n in seg.segment_numbers]
    labels = {n: str(seg.get_segment_description(n).SegmentLabel) for n in numbers}
    masks, coverage = seg_by_source_uid(seg, volume, numbers) or seg_by_position(
        seg, volume, numbers
    )
    return Reference(path=path, coverage=coverage, segments=masks, segment_labels=labels)


def seg_by_source_uid(
    seg: hd.seg.Segmentation, volume: Volume, numbers: list[int]
) -> tuple[dict[int, np.ndarray], float] | None:
    """Frames on the CT slices they were derived from; None where that is not possible."""
    ct_uids = [str(ds.get("SOPInstanceUID", "")) for ds in volume.datasets]
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    shared = [k for k, uid in enumerate(ct_uids) if uid and uid in referenced]
    if not shared or (int(seg.Rows), int(seg.Columns)) != volume.hu.shape[1:]:
        return None
    try:
        pixels = seg.get_pixels_by_source_instance(
            [ct_uids[k] for k in shared], segment_numbers=numbers, skip_overlap_checks=True
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        log.info("SEG frames not placed by source instance (%s); using positions", exc)
        return None
    masks = {}
    for channel, number in enumerate(numbers):
        mask = np.zeros(volume.hu.shape, dtype=bool)
        mask[shared] = pixels[..., channel] >= 0.5
        masks[number] = mask
    return masks, len(shared) / volume.hu.shape[0]


def seg_by_position(
    seg: hd.seg.Segmentation, volume: Volume, numbers: list[int]
) -> tuple[dict[int, np.ndarray], float]:
    """Frames placed by PlanePositionSequence, resampled onto the CT grid."""
    try:
        seg_volume = seg.get_volume(segment_numbers=numbers, skip_overlap_checks=True)
    except (ValueError, RuntimeError) as exc:
        raise InvalidReference(
            f"SEG {seg.SOPInstanceUID}: its frames reference none of the CT's images and "
            f"their positions do not form a volume: {exc}"
        ) from None
    grid = ct_grid(volume)
    masks = {}
    for channel, number in enumerate(numbers):
        frames = (seg_volume.array[..., channel] >= 0.5).astype(np.uint8)
        masks[number] = _on_grid(image_from_array(frames, seg_volume.affine), grid) > 0
    outline = image_from_array(np.zeros(seg_volume.spatial_shape, np.uint8), seg_volume.affine)
    return masks, _coverage(outline, grid)
