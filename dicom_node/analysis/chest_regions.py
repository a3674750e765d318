"""The airway and per-slice steps of ``ct-chest`` (``dicom_node.analysis.ct_chest``).

The airways (trachea and main bronchi) are grown from the trachea, found near the
body's centre line in the top slices, with a threshold that is raised in steps until
the grown volume "explodes" into the lungs (the last step before the leak is kept).
Small air sections near the centre line left over from the airways are taken out of
the lungs, and the lungs are split into left and right at the emptiest sagittal line
near the body's centre. Laterality is decided in patient coordinates (LPS: +x is the
patient's left), never from the image's left and right.

Every step works on the cropped grid of the pipeline and touches only what it needs:
the flood fills run on a uint8 image of threshold levels cut to the largest region the
airways can reach, and the per-slice components are labelled slab by slab
(``dicom_node.analysis.morphology.label_slices``).
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch

from dicom_node.analysis.morphology import (
    boxed_components,
    dilate,
    image,
    label_slices,
)
from dicom_node.analysis.sparse import sparse_zeros
from dicom_node.analysis.types import Volume

log = logging.getLogger(__name__)

AIRWAY_MAX_AREA_MM2 = 800.0  # a trachea / main bronchus cross-section is smaller
AIRWAY_MAX_OFFSET_MM = 30.0  # ... and lies this close to the body's centre line
MIDLINE_WINDOW_MM = 50.0  # where the left/right split is searched, around the centre
MIDLINE_BIN_MM = 2.0
# Airway lumen is air (-1000 HU; -980..-950 after a smooth kernel); partial volume
# with the wall raises its edge. The threshold rises from -990 in 10 HU steps, at
# most to -900 (parenchyma, about -850 HU, lies above); a step that grows the
# airways by more than AIRWAY_LEAK_RATIO and AIRWAY_LEAK_MIN_ML leaks into the lungs.
AIRWAY_THRESHOLDS_HU = tuple(float(t) for t in range(-990, -890, 10))
AIRWAY_LEAK_RATIO = 1.5
AIRWAY_LEAK_MIN_ML = 10.0  # ... and by more than this (small volumes grow fast legitimately)
AIRWAY_SEED_MAX_HU = -900.0  # the trachea's section must hold air this dark
AIRWAY_MAX_ML = 250.0  # trachea + main bronchi of a large adult stay well below
AIRWAY_MIN_AREA_MM2 = 50.0  # trachea cross-section: 8 mm diameter at least
AIRWAY_SEARCH_MM = 50.0  # the trachea is sought in the top slices of the volume
AIRWAY_MIN_LENGTH_MM = 30.0  # shorter: no trachea in the field of view
AIRWAY_RIM_MM = 2.0  # partial-volume rim of the lumen, given to the airways
NEVER = 255  # threshold level of a voxel that no airway step includes
# Lung parenchyma is about -850 HU; %LAA-950 stays well below half even in severe
# emphysema. Gas in the stomach and bowel under the diaphragm is air, about -1000 HU: an
# air region with more than this share of its voxels below GAS_HU is not taken as a lung.
GAS_HU = -950.0
GAS_MAX_SHARE = 0.5


def airways(
    internal: np.ndarray, centres: np.ndarray, volume: Volume, device: torch.device
) -> np.ndarray:
    """Trachea and main bronchi with their partial-volume rim; empty if not in view.

    ``internal``: the air inside the body; ``centres``: :func:`body_centres`.
    """
    empty = sparse_zeros(internal.shape)  # the airways' box is written, if any
    seed = trachea_seed(internal, centres, volume)
    if seed is None:
        log.info("ct-chest: no trachea in the top %.0f mm", AIRWAY_SEARCH_MM)
        return empty
    lumen = grow_airways(volume.hu, internal, seed, volume)
    if lumen is None:
        return empty
    slices = np.flatnonzero(lumen.any(axis=(1, 2)))
    length = (slices[-1] - slices[0] + 1) * volume.spacing[0]
    if length < AIRWAY_MIN_LENGTH_MM:
        log.info("ct-chest: airway candidate only %.0f mm long, ignored", length)
        return empty
    radius = inplane_radius(AIRWAY_RIM_MM, volume.spacing)
    box = _bounding_box(lumen, radius)  # the rim reaches no farther than the radius
    rim = dilate(torch.from_numpy(np.ascontiguousarray(lumen[box])).to(device), radius)
    empty[box] = rim.cpu().numpy() & internal[box]
    return empty


def inplane_radius(mm: float, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    return (0, max(1, round(mm / spacing[1])), max(1, round(mm / spacing[2])))


def body_centres(body: np.ndarray, volume: Volume) -> np.ndarray:
    """Mean patient x (LPS, mm) of the body in every slice; NaN where a slice has none."""
    centres = np.full(body.shape[0], np.nan)
    for k in np.flatnonzero(body.any(axis=(1, 2))):
        centres[k] = float(patient_x(volume, int(k))[body[k]].mean())
    return centres


def trachea_seed(internal: np.ndarray, centres: np.ndarray, volume: Volume) -> np.ndarray | None:
    """The trachea's cross-section in the highest slice that shows one, as a 3-D mask.

    A trachea is an air section of 50 to 800 mm2 close to the body's centre line
    with air (< -900 HU) in it; the largest such section of the slice is taken.
    """
    pixel_area = volume.spacing[1] * volume.spacing[2]
    count = min(volume.hu.shape[0], int(AIRWAY_SEARCH_MM / volume.spacing[0]) + 1)
    top_first = (
        range(volume.hu.shape[0] - 1, -1, -1)
        if volume.direction[2, 2] > 0
        else range(volume.hu.shape[0])
    )
    for k in list(top_first)[:count]:
        if not internal[k].any():
            continue
        x = patient_x(volume, k)
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image(internal[k])))
        pixels = np.bincount(labels.ravel())
        area = pixels * pixel_area
        mean_x = np.bincount(labels.ravel(), weights=x.ravel()) / np.maximum(pixels, 1)
        has_air = np.bincount(labels.ravel(), weights=volume.hu[k].ravel() < AIRWAY_SEED_MAX_HU)
        fits = (
            (area >= AIRWAY_MIN_AREA_MM2)
            & (area <= AIRWAY_MAX_AREA_MM2)
            & (np.abs(mean_x - centres[k]) <= AIRWAY_MAX_OFFSET_MM)
            & (has_air > 0)
        )
        fits[0] = False
        if fits.any():
            seed = sparse_zeros(internal.shape)  # one slice is written
            seed[k] = labels == int(np.argmax(np.where(fits, area, -1.0)))
            return seed
    return None


def grow_airways(
    hu: np.ndarray, internal: np.ndarray, seed: np.ndarray, volume: Volume
) -> np.ndarray | None:
    """Air connected to ``seed`` at the highest threshold before the growth explodes.

    Each step is a flood fill from the seed (SimpleITK ConnectedThreshold, face
    connectivity) over the internal air below the threshold. The fills run on the
    voxels' threshold levels (uint8: how many thresholds lie at or below the voxel's
    HU, in float32 as before), so step ``i`` keeps the levels up to ``i``; and on the
    box of the last step's region, which holds every smaller one.
    """
    thresholds = np.asarray(AIRWAY_THRESHOLDS_HU, dtype=np.float32)
    levels = np.full(hu.shape, NEVER, dtype=np.uint8)
    dark = internal & (hu < AIRWAY_THRESHOLDS_HU[-1] + 1.0)  # a superset, levels decide
    levels[dark] = np.searchsorted(thresholds, hu[dark].astype(np.float32), side="right")
    seeds = np.argwhere(seed & internal)
    seed_levels = levels[tuple(seeds.T)]
    seed_hu = hu[tuple(seeds.T)]
    last = len(thresholds) - 1
    reach = _flood(levels, seeds[seed_levels <= last], last)
    if reach is None:
        return None
    box = _bounding_box(reach, (0, 0, 0))
    corner = np.array([s.start for s in box])
    levels = np.ascontiguousarray(levels[box])
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    best: np.ndarray | None = None
    best_ml = 0.0
    for step, threshold in enumerate(AIRWAY_THRESHOLDS_HU):
        starts = seeds[(seed_hu < threshold) & (seed_levels <= step)]
        if not len(starts):
            continue
        region = _flood(levels, starts - corner, step)
        grown_ml = (0.0 if region is None else float(np.count_nonzero(region))) * voxel_ml
        growth = grown_ml - best_ml
        leaks = best is not None and growth > max(
            AIRWAY_LEAK_MIN_ML, (AIRWAY_LEAK_RATIO - 1.0) * best_ml
        )
        if grown_ml > AIRWAY_MAX_ML or leaks:
            log.info("ct-chest: airways leak at %.0f HU (%.0f ml)", threshold, grown_ml)
            break
        if region is not None and grown_ml > 0:
            best, best_ml = region, grown_ml
    if best is None:
        return None
    lumen = sparse_zeros(hu.shape)
    lumen[box] = best
    return lumen


def _flood(levels: np.ndarray, starts: np.ndarray, upper: int) -> np.ndarray | None:
    """Voxels face-connected to ``starts`` with a level of at most ``upper``; None if none."""
    if not len(starts):
        return None
    region = sitk.ConnectedThreshold(
        sitk.GetImageFromArray(levels),
        seedList=[(int(x), int(y), int(z)) for z, y, x in starts],
        lower=0,
        upper=upper,
    )
    grown = sitk.GetArrayViewFromImage(region).astype(bool)
    return grown if grown.any() else None


def _bounding_box(mask: np.ndarray, margin: tuple[int, int, int]) -> tuple[slice, ...]:
    """The box of the true voxels of ``mask``, widened by ``margin`` (clamped)."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        low, high = int(hit[0]) - margin[axis], int(hit[-1]) + margin[axis] + 1
        box.append(slice(max(0, low), min(mask.shape[axis], high)))
    return tuple(box)


def remove_airways(lungs: np.ndarray, centres: np.ndarray, volume: Volume) -> np.ndarray:
    """Drop small air sections near the centre line left over from the airways.

    The sections of every slice are labelled slab by slab, largest first. Only the
    sections small enough to be airways are located; their mean patient x is summed
    with ``np.bincount`` over their voxels in raster order, as slice by slice.
    """
    pixel_area = volume.spacing[1] * volume.spacing[2]
    cleaned = lungs.copy()
    for slab, labels, sizes in label_slices(lungs):
        area = np.concatenate([[0], sizes]) * pixel_area  # label 0: background, not counted
        small = np.flatnonzero(area <= AIRWAY_MAX_AREA_MM2)[1:]  # a suffix: sorted by size
        if not len(small):
            continue
        k, row, column = np.nonzero(labels >= small[0])
        owner = labels[k, row, column]
        x = _x_terms(volume, slab)
        sums = np.bincount(owner, weights=(x[0][k] + x[1][row]) + x[2][column], minlength=len(area))
        mean_x = sums / np.maximum(area / pixel_area, 1)
        section_slice = np.zeros(len(area), dtype=np.intp)
        section_slice[owner] = k + slab.start  # a section lies in one slice
        airway = np.abs(mean_x - centres[section_slice]) <= AIRWAY_MAX_OFFSET_MM
        airway[: small[0]] = False
        drop = airway[owner]
        cleaned[slab][k[drop], row[drop], column[drop]] = False
    return cleaned


def split_left_right(
    lungs: np.ndarray, centres: np.ndarray, volume: Volume
) -> tuple[np.ndarray, np.ndarray]:
    """Split at the emptiest sagittal line near the body centre; +x (LPS) is left.

    When patient x does not change along the rows (axial slices without in-plane
    rotation) the lung's x histogram of a slice is its column counts weighted by the
    columns' x (the same x values, so the same bins), and all slices are split at once.
    """
    left = np.zeros_like(lungs)
    present = np.flatnonzero(lungs.any(axis=(1, 2)))
    slice_term, row_term, col_term = _x_terms(volume, slice(0, lungs.shape[0]))
    if len(present) and not row_term.any():
        columns = lungs.sum(axis=1)  # (slices, columns): lung pixels per column
        x = (slice_term[:, None] + row_term[0]) + col_term[None, :]
        splits = np.full(lungs.shape[0], np.inf)
        for k in present:
            splits[k] = midline(x[k], float(centres[k]), columns[k])
        np.logical_and(lungs, (x > splits[:, None])[:, None, :], out=left)
    else:
        for k in present:
            xk = patient_x(volume, int(k))
            split = midline(xk[lungs[k]], float(centres[k]))
            left[k] = lungs[k] & (xk > split)
    right = lungs & ~left
    return largest_lung(left, volume.hu, "left"), largest_lung(right, volume.hu, "right")


def largest_lung(mask: np.ndarray, hu: np.ndarray, side: str) -> np.ndarray:
    """The largest component of ``mask`` that looks like lung parenchyma, not gas.

    At the lung bases the stomach or the colon can hold more air than the lung beside
    them (seen on TotalSegmentator's example CT: 138 mL of colon gas against 43 mL of
    left lung base). A component with more than :data:`GAS_MAX_SHARE` of its voxels
    below :data:`GAS_HU` is passed over; if every component is like that, the largest
    is kept, as before.
    """
    largest = np.zeros(mask.shape, dtype=bool)
    found = boxed_components(mask)
    if found is None:
        return largest
    box, labels, sizes = found
    gas = np.bincount(labels[hu[box] < GAS_HU].ravel(), minlength=sizes.size)
    lung_like = gas[1:] <= GAS_MAX_SHARE * sizes[1:]
    pick = int(np.argmax(np.where(lung_like, sizes[1:], -1) if lung_like.any() else sizes[1:]))
    skipped = sizes[1:] > sizes[1 + pick]
    if skipped.any():
        biggest = int(np.argmax(sizes[1:]))
        log.info(
            "ct-chest: %s lung: passed over %d larger air region(s), the largest with %.0f%%"
            " of its voxels below %.0f HU (gas, not lung)",
            side,
            int(skipped.sum()),
            100.0 * gas[1 + biggest] / sizes[1 + biggest],
            GAS_HU,
        )
    largest[box] = labels == pick + 1
    return largest


def midline(lung_x: np.ndarray, centre: float, weights: np.ndarray | None = None) -> float:
    """The x of least lung near ``centre``; among ties the one closest to it.

    ``weights``: how many lung pixels each of ``lung_x`` stands for (default one each).
    """
    edges = centre + np.arange(
        -MIDLINE_WINDOW_MM, MIDLINE_WINDOW_MM + MIDLINE_BIN_MM, MIDLINE_BIN_MM
    )
    counts, _ = np.histogram(lung_x, bins=edges, weights=weights)
    middles = (edges[:-1] + edges[1:]) / 2
    candidates = np.flatnonzero(counts == counts.min())
    return float(middles[candidates[np.argmin(np.abs(middles[candidates] - centre))]])


def patient_x(volume: Volume, k: int) -> np.ndarray:
    """Patient x (LPS, mm) of every pixel of slice ``k``, shape (rows, columns)."""
    return slab_x(volume, slice(k, k + 1))[0]


def slab_x(volume: Volume, slab: slice) -> np.ndarray:
    """Patient x (LPS, mm) of every voxel of the slices in ``slab``: (slices, rows, columns).

    Summed in the same order for every voxel: slice term, then row, then column.
    """
    slice_term, row_term, col_term = _x_terms(volume, slab)
    return slice_term[:, None, None] + row_term[None, :, None] + col_term[None, None, :]


def _x_terms(volume: Volume, slab: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts of patient x that depend on the slice (of ``slab``), row and column."""
    rows, columns = volume.hu.shape[1:]
    d = volume.direction
    dz, dy, dx = volume.spacing
    col_term = np.arange(columns) * dx * d[0, 0]
    row_term = np.arange(rows) * dy * d[0, 1]
    slice_term = volume.origin[0] + np.arange(slab.start, slab.stop) * dz * d[0, 2]
    return slice_term, row_term, col_term
