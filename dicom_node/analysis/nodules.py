"""Nodule and mass candidates in and next to the lungs, by thresholds, morphology and shape.

No trained model: a candidate is solid tissue (above ``SOLID_MIN_HU``) inside the
*lung envelope* that is compact rather than tube-like.

- **Envelope**: each lung mask (parenchyma below -400 HU) closed in 3-D with a ball of
  ``ENVELOPE_CLOSING_MM``, on a grid coarsened by ``ENVELOPE_STEP`` in-plane (slices
  thinner than ``ENVELOPE_MIN_SLICE_MM`` pooled too). The closing
  fills what the lung wraps around: vessels, nodules, and masses that bulge into the lung
  from the pleura or the mediastinum (juxtapleural) up to about twice that radius across;
  it does not fill the flat or convex mediastinum and chest wall.
- **Two scales**: an in-plane opening of ``FINE_OPENING_MM`` removes thin vessels, one of
  ``COARSE_OPENING_MM`` (and about as much through the slices) cuts the thin links between
  a large mass and the hilar vessels. Coarse components are the large candidates; fine
  components that touch no coarse one are the small candidates.
- **Shape**: a candidate must be at least a ``MIN_DIAMETER_MM`` sphere in volume, not
  elongated (ratio of the largest to the smallest standard deviation of its voxel
  positions in mm, ``MAX_ELONGATION``) and fill its moment ellipsoid (``MIN_FILL``): the
  hilum and vessel trees branch and fail that. A small blob whose footprint goes on as
  solid tissue in the slices just above *and* below is a vessel crossing the slices.
- **Vessel pieces**: a large candidate keeps the fine voxels next to its coarse core,
  but may not grow past ``MAX_MARGIN_GROWTH`` times the core (a vessel core gains its
  branches); a small one must hold ``MIN_ISOLATION`` of the solid component it lies in
  (not a stub cut off a vessel tree) and a solid core (``SOFT_TISSUE_MIN_HU``) of the
  smallest size. At most ``MAX_CANDIDATES``, the largest, are reported.

Known limits: juxtavascular nodules that the fine opening leaves joined to a vessel tree,
and masses larger than the envelope can reach, are missed or cut; vessel cross-sections
of nodule size are the typical false candidates.

**Lobe**: there is no fissure segmentation. The lobe is a geometric approximation from the
candidate's centre within its lung's bounding box (patient coordinates): above an oblique
plane that runs from 70 % of the lung's height at the back to 15 % at the front it is the
upper lobe, below it the lower lobe; on the right, the part above that plane, below half
the height and in the front half is the middle lobe. It is a guess about typical anatomy,
reported as the finding site, and can be wrong near a fissure.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from dicom_node.analysis.grid import bounding_box
from dicom_node.analysis.morphology import (
    component_sizes,
    dilate,
    erode,
    opening,
    parts,
    pool,
)
from dicom_node.analysis.sparse import sparse_zeros
from dicom_node.analysis.types import Code, Measurement, Segment, Volume

log = logging.getLogger(__name__)

SOLID_MIN_HU = -300.0  # candidate voxels: soft tissue and its partial-volume edge
SOFT_TISSUE_MIN_HU = -100.0  # the solid core of a small candidate
ENVELOPE_CLOSING_MM = 25.0
ENVELOPE_STEP = 2  # in-plane subsampling for the envelope's distance maps
ENVELOPE_MIN_SLICE_MM = 2.5  # ... and thinner slices are pooled to about this
FINE_OPENING_MM = 2.0  # removes vessels thinner than about 4 mm
COARSE_OPENING_MM = 5.0  # separates masses from the hilum
MIN_DIAMETER_MM = 4.0  # smallest candidate (volume of a sphere this wide)
LARGE_MIN_DIAMETER_MM = 15.0  # a coarse component smaller than this is left to the fine scale
MAX_ELONGATION = 3.0
MAX_MARGIN_GROWTH = 2.0  # a large candidate with its fine margins, over its coarse core
MIN_FILL = 0.4
VESSEL_CONTINUATION = 0.5  # footprint fraction that goes on solid above and below
MIN_ISOLATION = 0.3  # a small candidate holds at least this fraction of its solid component
MAX_CANDIDATES = 20  # the largest are kept: every candidate is a full-size SEG segment
MASS_DIAMETER_MM = 30.0  # a lesion of 3 cm or more is a mass, smaller a nodule

NODULE = Code("27925004", "SCT", "Nodule")
MASS = Code("4147007", "SCT", "Mass")
ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
VOLUME = Code("118565006", "SCT", "Volume")
LONG_AXIS = Code("103339001", "SCT", "Long Axis")  # longest in-plane (axial) diameter
CUBIC_MILLIMETER = Code("mm3", "UCUM", "cubic millimeter")
MILLIMETER = Code("mm", "UCUM", "millimeter")
LUNG_LOBES = {
    ("left", "upper"): Code("44714003", "SCT", "Upper lobe of left lung"),
    ("left", "lower"): Code("41224006", "SCT", "Lower lobe of left lung"),
    ("right", "upper"): Code("42400003", "SCT", "Upper lobe of right lung"),
    ("right", "middle"): Code("72481006", "SCT", "Middle lobe of right lung"),
    ("right", "lower"): Code("266005", "SCT", "Lower lobe of right lung"),
}
FISSURE_BACK = 0.70  # oblique fissure height (fraction of the lung's height) at the back
FISSURE_FRONT = 0.15  # ... and at the front
MIDDLE_LOBE_TOP = 0.5  # the right middle lobe lies below this height, in the front half


@dataclass(frozen=True)
class Candidate:
    """One nodule or mass candidate, measured on the source grid."""

    mask: np.ndarray  # bool, shape of the volume
    volume_mm3: float
    diameter_mm: float  # longest in-plane diameter over the slices
    mean_hu: float
    side: str  # "left" or "right": the lung it lies in or against
    lobe: Code  # approximate, see the module docstring
    box: tuple[slice, ...]  # the mask's bounding box: nothing lies outside it

    @property
    def is_mass(self) -> bool:
        return self.diameter_mm >= MASS_DIAMETER_MM


def find_candidates(
    volume: Volume, left: np.ndarray, right: np.ndarray, airways: np.ndarray
) -> list[Candidate]:
    """Candidates, largest first; ``left``/``right``/``airways`` are the pipeline's masks."""
    lungs = left | right
    if not lungs.any():
        return []
    crop = _bounding_box(lungs, volume.spacing, ENVELOPE_CLOSING_MM)
    hu = volume.hu[crop]
    envelope = _envelope((left[crop], right[crop]), volume.spacing)
    solid = envelope & ~lungs[crop] & ~airways[crop] & (hu > SOLID_MIN_HU)
    del envelope, lungs  # a mask of the lungs' box less at the labelling of ``solid``
    fine = _opening(solid, _radius(FINE_OPENING_MM, volume.spacing, through=False))
    coarse = _opening(solid, _radius(COARSE_OPENING_MM, volume.spacing, through=True))
    found = _large(coarse, fine, volume.spacing) + _small(hu, solid, coarse, fine, volume.spacing)
    found.sort(key=len, reverse=True)
    if len(found) > MAX_CANDIDATES:
        log.info("nodules: %d candidates, the %d largest kept", len(found), MAX_CANDIDATES)
    offset = np.array([s.start for s in crop])
    candidates = [_measure(p + offset, volume, left, right) for p in found[:MAX_CANDIDATES]]
    candidates.sort(key=lambda c: (-c.volume_mm3, -c.diameter_mm))
    return candidates


def _bounding_box(
    mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float
) -> tuple[slice, ...]:
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        margin = math.ceil(margin_mm / spacing[axis]) + 1
        box.append(slice(max(0, present[0] - margin), present[-1] + margin + 1))
    return tuple(box)


def _envelope(lungs: tuple[np.ndarray, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    """Union of the 3-D closings of each of ``lungs`` with a ball, by distance maps.

    Each closing is computed on a coarser grid, within its lung's box padded by the
    radius: a distance map does not see past the array's edge, so without padding the
    closing would add a cap where the lung leaves the field of view, and farther out
    nothing is within the radius (the same result as on the padded whole grid). The
    union is brought back to the full grid once.
    """
    step = ENVELOPE_STEP
    zstep = max(1, int(ENVELOPE_MIN_SLICE_MM // spacing[0]))  # thin slices: pool them too
    kernel = (zstep, step, step)
    grid = (spacing[2] * step, spacing[1] * step, spacing[0] * zstep)  # SimpleITK: x, y, z
    pad = [math.ceil(ENVELOPE_CLOSING_MM / g) + 1 for g in grid[::-1]]
    closed_all: np.ndarray | None = None
    for lung in lungs:
        coarse = pool(lung, kernel)
        if closed_all is None:
            closed_all = np.zeros(coarse.shape, dtype=bool)
        box = bounding_box(coarse)
        if box is None:
            continue
        # the lung's box, padded by ``pad``, in coarse voxels (may reach past the grid)
        low = [s.start - p for s, p in zip(box, pad, strict=True)]
        high = [s.stop + p for s, p in zip(box, pad, strict=True)]
        padded = np.zeros([h - lo for lo, h in zip(low, high, strict=True)], dtype=bool)
        inside = tuple(slice(p, p + s.stop - s.start) for s, p in zip(box, pad, strict=True))
        padded[inside] = coarse[box]
        grown = _within(padded, grid, ENVELOPE_CLOSING_MM)
        closed = ~_within(~grown, grid, ENVELOPE_CLOSING_MM)
        # back onto the coarse grid: the part of the padded box that lies on it
        target = tuple(
            slice(max(0, lo), min(n, h)) for lo, h, n in zip(low, high, coarse.shape, strict=True)
        )
        source = tuple(slice(t.start - lo, t.stop - lo) for t, lo in zip(target, low, strict=True))
        closed_all[target] |= closed[source]
    assert closed_all is not None
    full = np.broadcast_to(
        closed_all[:, None, :, None, :, None],
        (closed_all.shape[0], zstep, closed_all.shape[1], step, closed_all.shape[2], step),
    ).reshape(closed_all.shape[0] * zstep, closed_all.shape[1] * step, -1)
    shape = lungs[0].shape
    return full[: shape[0], : shape[1], : shape[2]]


def _within(mask: np.ndarray, grid: tuple[float, float, float], mm: float) -> np.ndarray:
    """Voxels within ``mm`` (Euclidean, on ``grid``) of ``mask``; none if it is empty."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(grid)
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return sitk.GetArrayViewFromImage(distance) <= mm  # inside: negative


def _opening(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    return opening(torch.from_numpy(mask), radius).numpy()


def _radius(mm: float, spacing: tuple[float, float, float], through: bool) -> tuple[int, int, int]:
    z = round(mm / spacing[0]) if through else 0
    return (z, max(1, round(mm / spacing[1])), max(1, round(mm / spacing[2])))


def _large(
    coarse: np.ndarray, fine: np.ndarray, spacing: tuple[float, float, float]
) -> list[np.ndarray]:
    """Voxel indices of compact coarse components, with their fine margins."""
    radius = _radius(COARSE_OPENING_MM, spacing, through=True)
    minimum = _sphere_mm3(LARGE_MIN_DIAMETER_MM) / float(np.prod(spacing))
    margin = (radius[0] + 1, radius[1] + 1, radius[2] + 1)
    found = []
    for points in parts(coarse, minimum):
        if _compact(points, spacing):
            box = _box(points, margin, coarse.shape)
            part = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
            part[tuple((points - [s.start for s in box]).T)] = True
            part |= dilate(torch.from_numpy(part), margin).numpy() & fine[box]
            grown = np.argwhere(part) + [s.start for s in box]
            # a lesion gains a rim; a vessel core gains the branches around it
            if len(grown) <= MAX_MARGIN_GROWTH * len(points) and _compact(grown, spacing):
                found.append(grown)
    return found


def _small(
    hu: np.ndarray,
    solid: np.ndarray,
    coarse: np.ndarray,
    fine: np.ndarray,
    spacing: tuple[float, float, float],
) -> list[np.ndarray]:
    """Voxel indices of compact, isolated fine components clear of every coarse structure.

    A fine component lies inside one component of ``solid`` (the opening keeps it inside
    ``solid``, and both are face-connected), whose size any of its voxels gives.
    """
    minimum = _sphere_mm3(MIN_DIAMETER_MM) / float(np.prod(spacing))
    kept = []
    for points in parts(fine, minimum):
        where = tuple(points.T)
        if np.count_nonzero(hu[where] >= SOFT_TISSUE_MIN_HU) < minimum:
            continue  # no solid core of the smallest size: partial volume or ground glass
        if coarse[where].any():
            continue  # part of a large structure: a mass's margin or the hilum
        kept.append(points)
    trees = component_sizes(solid, [tuple(points[0]) for points in kept])
    found = []
    for points, tree in zip(kept, trees, strict=True):
        if len(points) < MIN_ISOLATION * tree:
            continue  # a piece of a vessel tree that the opening cut off
        if _compact(points, spacing) and not _crosses_slices(points, solid):
            found.append(points)
    return found


def _box(points: np.ndarray, margin: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    low, high = points.min(axis=0), points.max(axis=0)
    return tuple(
        slice(max(0, int(lo) - m), min(n, int(hi) + m + 1))
        for lo, hi, m, n in zip(low, high, margin, shape, strict=True)
    )


def _compact(points: np.ndarray, spacing: tuple[float, float, float]) -> bool:
    """Not elongated and filling its moment ellipsoid (a sphere or ellipsoid fills it)."""
    mm = points * np.asarray(spacing)
    cov = np.cov(mm.T) if len(mm) > 1 else np.zeros((3, 3))
    cov = cov + np.diag(np.asarray(spacing) ** 2 / 12.0)  # each voxel's own extent
    sigma = np.sqrt(np.maximum(np.linalg.eigvalsh(cov), 1e-9))
    ellipsoid = 4.0 / 3.0 * math.pi * 5.0**1.5 * float(np.prod(sigma))
    fill = len(mm) * float(np.prod(spacing)) / ellipsoid
    return bool(sigma[-1] / sigma[0] <= MAX_ELONGATION and fill >= MIN_FILL)


def _crosses_slices(points: np.ndarray, solid: np.ndarray) -> bool:
    """Solid tissue under most of the footprint both just above and just below: a vessel."""
    start, stop = int(points[:, 0].min()), int(points[:, 0].max()) + 1
    if start == 0 or stop >= solid.shape[0]:
        return False
    footprint = np.unique(points[:, 1:], axis=0)
    rows, columns = footprint[:, 0], footprint[:, 1]
    below = float(solid[start - 1, rows, columns].mean())
    above = float(solid[stop, rows, columns].mean())
    return min(below, above) >= VESSEL_CONTINUATION


def _sphere_mm3(diameter: float) -> float:
    return math.pi / 6.0 * diameter**3


def _measure(points: np.ndarray, volume: Volume, left: np.ndarray, right: np.ndarray) -> Candidate:
    """Measures of the candidate at voxel indices ``points`` (source grid)."""
    box = _box(points, (1, 1, 1), volume.hu.shape)
    part = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    part[tuple((points - [s.start for s in box]).T)] = True
    shell = dilate(torch.from_numpy(part), (1, 1, 1)).numpy() & ~part
    side = "left" if (shell & left[box]).sum() >= (shell & right[box]).sum() else "right"
    mask = sparse_zeros(volume.hu.shape)  # the whole grid, set in a small box
    mask[box] = part
    return Candidate(
        mask=mask,
        volume_mm3=len(points) * float(np.prod(volume.spacing)),
        diameter_mm=longest_axial_diameter(part, volume.spacing),
        mean_hu=float(volume.hu[box][part].mean(dtype=np.float64)),
        side=side,
        lobe=_lobe(points, left if side == "left" else right, side, volume),
        box=box,
    )


def longest_axial_diameter(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Largest distance (mm) between two pixel centres of one slice, over the slices.

    The farthest pair of a slice lies on its convex hull, so only boundary pixels
    are compared; a single pixel has diameter 0.
    """
    best = 0.0
    scale = np.array([spacing[1], spacing[2]])
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        section = mask[k]
        inner = erode(torch.from_numpy(section[None]), (0, 1, 1)).numpy()[0]
        points = np.argwhere(section & ~inner) * scale
        if len(points) > 2000:  # a huge section: the hull of a subsample is close enough
            points = points[:: len(points) // 2000 + 1]
        diff = points[:, None, :] - points[None, :, :]
        best = max(best, float(np.sqrt((diff**2).sum(axis=-1).max())))
    return best


def _lobe(points: np.ndarray, lung: np.ndarray, side: str, volume: Volume) -> Code:
    """Approximate lobe from the candidate's centre in its lung's box (see module docstring)."""
    lung_points = _box_corners(lung, volume)
    centre = volume.voxel_to_patient(points.mean(axis=0, keepdims=True))[0]
    low, high = lung_points.min(axis=0), lung_points.max(axis=0)
    extent = np.maximum(high - low, 1e-6)
    height = float(np.clip((centre[2] - low[2]) / extent[2], 0.0, 1.0))  # 0: base, 1: apex
    back = float(np.clip((centre[1] - low[1]) / extent[1], 0.0, 1.0))  # LPS +y: posterior
    fissure = FISSURE_FRONT + (FISSURE_BACK - FISSURE_FRONT) * back
    if height < fissure:
        return LUNG_LOBES[(side, "lower")]
    if side == "right" and height < MIDDLE_LOBE_TOP and back < 0.5:
        return LUNG_LOBES[(side, "middle")]
    return LUNG_LOBES[(side, "upper")]


def _box_corners(mask: np.ndarray, volume: Volume) -> np.ndarray:
    """The 8 corners of ``mask``'s voxel bounding box in patient coordinates (LPS mm).

    Their min and max are the mask's extent along each patient axis (exactly for axial
    slices; a little more for oblique ones), from three projections instead of a list
    of every voxel.
    """
    ranges = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(hit):
            return np.zeros((1, 3))
        ranges.append((hit[0], hit[-1]))
    corners = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T
    return volume.voxel_to_patient(corners)


def candidate_segment(number: int, candidate: Candidate, voxel_mm3: float) -> Segment:
    """The SEG segment / TID 1411 group of candidate ``number`` (1 = the largest).

    Finding type Nodule or Mass (3 cm or more across), category morphologically
    abnormal structure, site the approximate lobe with the lung's laterality.
    """
    kind = MASS if candidate.is_mass else NODULE
    return Segment(
        key=f"candidate_{number}",
        label=f"{kind.meaning} {number}",
        category=ABNORMAL_STRUCTURE,
        type=kind,
        laterality=LEFT if candidate.side == "left" else RIGHT,
        mask=candidate.mask,
        volume_ml=candidate.volume_mm3 / 1000.0,
        mean_hu=candidate.mean_hu,
        measurements=(
            Measurement(name=VOLUME, value=candidate.volume_mm3, unit=CUBIC_MILLIMETER),
            Measurement(name=LONG_AXIS, value=candidate.diameter_mm, unit=MILLIMETER),
        ),
        finding_site=candidate.lobe,
    )
