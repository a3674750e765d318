"""The built-in ``ct-chest`` pipeline: body, lungs, airways and nodule/mass candidates from HU.

The airways (trachea and main bronchi) are grown from the trachea, found near
the body's centre line in the top slices, with a threshold that is raised in
steps until the grown volume "explodes" into the lungs (the last step before
the leak is kept). Each lung gets the densitometry measures of emphysema
quantification: mean lung density, %LAA-950 (percentage of lung voxels below
-950 HU) and Perc15 (15th percentile of the lung histogram); both lungs
together are reported as a group.

Nodule and mass candidates (``dicom_node.analysis.nodules``) are solid, compact
components inside or against the lungs; each becomes a segment of its own with its
volume, longest axial diameter, mean HU, lung and approximate lobe.

The work is cropped to the body's rows and columns after the body is found, and the
airways are grown by flood fills from the trachea: the 0.2 pipeline labelled the whole
volume at every threshold step.

Thresholding and morphology run in torch on the pipeline's device (the same
code on CPU and CUDA); connected components and hole filling use SimpleITK.
Laterality is decided in patient coordinates (LPS: +x is the patient's left),
never from the image's left and right, so head-first, feet-first and mirrored
acquisitions give the same labels.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from dicom_node.analysis.morphology import (
    components,
    dilate,
    erode,
    fill_holes_per_slice,
    image,
    largest_component,
)
from dicom_node.analysis.nodules import (  # laterality codes: one definition for both
    LEFT,
    RIGHT,
    Candidate,
    candidate_segment,
    find_candidates,
)
from dicom_node.analysis.types import (
    AnalysisError,
    AnalysisResult,
    Code,
    Measurement,
    Segment,
    SegmentGroup,
    Volume,
)

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
LAA_HU = -950.0  # %LAA-950: emphysema index threshold
PERCENTILE = 15.0  # Perc15

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
ENTIRE_BODY = Code("38266002", "SCT", "Entire body")
LUNG = Code("39607008", "SCT", "Lung")
TRACHEA_AND_BRONCHUS = Code("110726009", "SCT", "Trachea and bronchus")  # CID 7151

VOLUME = Code("118565006", "SCT", "Volume")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
MILLILITER = Code("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT = Code("%", "UCUM", "Percent")
#: No standard code exists for these (DICOM PS3.16, SNOMED CT): private scheme,
#: declared in the SR's CodingSchemeIdentificationSequence.
PRIVATE_SCHEME = "99DICOMNODE"
LAA_950 = Code("LAA950", PRIVATE_SCHEME, "Lung volume percentage below -950 HU")
PERCENTILE_15 = Code("PERC15", PRIVATE_SCHEME, "15th percentile")


@dataclass(frozen=True)
class Prepared:
    """The volume on the device, its body outline, and the in-plane crop to the body."""

    volume: Volume  # the whole series
    cropped: Volume  # rows and columns cut to the body's bounding box; all slices
    box: tuple[slice, slice]  # the crop's rows and columns in ``volume``
    body: np.ndarray  # bool, cropped shape


@dataclass(frozen=True)
class ChestMasks:
    """What :meth:`CtChestPipeline.infer` found, on the cropped grid of :class:`Prepared`."""

    body: np.ndarray
    lung_left: np.ndarray
    lung_right: np.ndarray
    airways: np.ndarray
    candidates: tuple[Candidate, ...]


class CtChestPipeline:
    """Threshold-and-morphology segmentation of body, lungs, airways and lesion candidates.

    ``run`` is ``postprocess(infer(preprocess(volume)))``; the stages are public so that
    ``bench/analysis.py`` can time them.
    """

    name = "ct-chest"
    version = "0.3.0"

    def __init__(
        self, device: torch.device, *, airways_segment: bool = False, nodules: bool = True
    ) -> None:
        """``airways_segment``: report the airways as a segment of their own.

        The airways are always taken out of the lungs; the segment is opt-in
        until the consumers of the SEG expect a fourth segment. ``nodules``: look
        for nodule and mass candidates (``dicom_node.analysis.nodules``).
        """
        self.device = device
        self.airways_segment = airways_segment
        self.nodules = nodules

    def run(self, volume: Volume) -> AnalysisResult:
        prepared = self.preprocess(volume)
        return self.postprocess(prepared, self.infer(prepared))

    def preprocess(self, volume: Volume) -> Prepared:
        """Check the geometry, find the body, and crop rows and columns to it."""
        _check_axial(volume)
        hu = torch.from_numpy(np.ascontiguousarray(volume.hu, dtype=np.float32)).to(self.device)
        body = self._body(hu, volume.spacing)
        rows = np.flatnonzero(body.any(axis=(0, 2)))
        columns = np.flatnonzero(body.any(axis=(0, 1)))
        box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
        corner = volume.voxel_to_patient(np.array([[0, rows[0], columns[0]]]))[0]
        cropped = Volume(
            hu=volume.hu[:, box[0], box[1]],
            spacing=volume.spacing,
            origin=corner,
            direction=volume.direction,
            datasets=volume.datasets,
        )
        return Prepared(volume=volume, cropped=cropped, box=box, body=body[:, box[0], box[1]])

    def infer(self, prepared: Prepared) -> ChestMasks:
        """Internal air, airways, both lungs and the lesion candidates (cropped grid)."""
        volume, body = prepared.cropped, prepared.body
        hu = torch.from_numpy(np.ascontiguousarray(volume.hu, dtype=np.float32)).to(self.device)
        internal = self._internal_air(hu, body)
        airways = self._airways(internal, body, volume)
        lungs = _remove_airways(internal & ~airways, body, volume)
        left, right = _split_left_right(lungs, body, volume)
        found = find_candidates(volume, left, right, airways) if self.nodules else []
        return ChestMasks(body, left, right, airways, tuple(found))

    def postprocess(self, prepared: Prepared, masks: ChestMasks) -> AnalysisResult:
        """Masks back on the source grid, segments with their measurements, the lungs group."""
        volume = prepared.volume

        def full(mask: np.ndarray) -> np.ndarray:
            whole = np.zeros(volume.hu.shape, dtype=bool)
            whole[:, prepared.box[0], prepared.box[1]] = mask
            return whole

        named = {"body": masks.body, "lung_left": masks.lung_left, "lung_right": masks.lung_right}
        if self.airways_segment and masks.airways.any():
            named["airways"] = masks.airways
        segments = [_segment(key, full(mask), volume) for key, mask in named.items()]
        voxel_mm3 = float(np.prod(volume.spacing))
        for number, candidate in enumerate(masks.candidates, start=1):
            placed = dataclasses.replace(candidate, mask=full(candidate.mask))
            segments.append(candidate_segment(number, placed, voxel_mm3))
        log.info(
            "ct-chest: %s; %d nodule/mass candidates",
            ", ".join(f"{s.key} {s.volume_ml:.0f} ml" for s in segments[: len(named)]),
            len(masks.candidates),
        )
        return AnalysisResult(
            pipeline=self.name,
            algorithm_name="dicom_node ct-chest",
            algorithm_version=self.version,
            volume=volume,
            segments=tuple(segments),
            groups=(_lungs_group(masks.lung_left | masks.lung_right, prepared.cropped),),
        )

    def _body(self, hu: torch.Tensor, spacing: tuple[float, float, float]) -> np.ndarray:
        """Largest tissue component after an in-plane opening, holes filled per slice."""
        tissue = hu > BODY_MIN_HU
        radius = _inplane_radius(BODY_OPENING_MM, spacing)
        core = largest_component(erode(tissue, radius).cpu().numpy())
        if not core.any():
            raise AnalysisError(f"no body found: no voxel above {BODY_MIN_HU} HU after opening")
        core_t = torch.from_numpy(core).to(self.device)
        body = (dilate(core_t, radius) & tissue).cpu().numpy()
        return fill_holes_per_slice(body)

    def _internal_air(self, hu: torch.Tensor, body: np.ndarray) -> np.ndarray:
        """Low-HU voxels in the body not connected to the air around the patient."""
        air = (hu < LUNG_MAX_HU).cpu().numpy()
        labels, _ = components(air)
        touches_outside = np.bincount(labels[~body].ravel(), minlength=int(labels.max()) + 1) > 0
        return air & ~touches_outside[labels]

    def _airways(self, internal: np.ndarray, body: np.ndarray, volume: Volume) -> np.ndarray:
        """Trachea and main bronchi with their partial-volume rim; empty if not in view."""
        empty = np.zeros_like(internal)
        seed = _trachea_seed(internal, body, volume)
        if seed is None:
            log.info("ct-chest: no trachea in the top %.0f mm", AIRWAY_SEARCH_MM)
            return empty
        lumen = _grow_airways(volume.hu, internal, seed, volume)
        if lumen is None:
            return empty
        slices = np.flatnonzero(lumen.any(axis=(1, 2)))
        length = (slices[-1] - slices[0] + 1) * volume.spacing[0]
        if length < AIRWAY_MIN_LENGTH_MM:
            log.info("ct-chest: airway candidate only %.0f mm long, ignored", length)
            return empty
        radius = _inplane_radius(AIRWAY_RIM_MM, volume.spacing)
        rim = dilate(torch.from_numpy(lumen).to(self.device), radius).cpu().numpy()
        return rim & internal


def _check_axial(volume: Volume) -> None:
    normal_z = abs(float(volume.direction[2, 2]))
    if normal_z < MIN_AXIAL_COSINE:
        raise AnalysisError(
            f"ct-chest needs axial slices; slice normal {volume.direction[:, 2].tolist()} "
            f"is {normal_z:.2f} along the patient's z axis"
        )
    if volume.hu.shape[0] < 2:
        raise AnalysisError(f"ct-chest needs at least 2 slices, got {volume.hu.shape[0]}")


def _trachea_seed(internal: np.ndarray, body: np.ndarray, volume: Volume) -> np.ndarray | None:
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
        x = _patient_x(volume, k)
        centre = float(x[body[k]].mean())
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image(internal[k])))
        pixels = np.bincount(labels.ravel())
        area = pixels * pixel_area
        mean_x = np.bincount(labels.ravel(), weights=x.ravel()) / np.maximum(pixels, 1)
        has_air = np.bincount(labels.ravel(), weights=volume.hu[k].ravel() < AIRWAY_SEED_MAX_HU)
        fits = (
            (area >= AIRWAY_MIN_AREA_MM2)
            & (area <= AIRWAY_MAX_AREA_MM2)
            & (np.abs(mean_x - centre) <= AIRWAY_MAX_OFFSET_MM)
            & (has_air > 0)
        )
        fits[0] = False
        if fits.any():
            seed = np.zeros_like(internal)
            seed[k] = labels == int(np.argmax(np.where(fits, area, -1.0)))
            return seed
    return None


def _grow_airways(
    hu: np.ndarray, internal: np.ndarray, seed: np.ndarray, volume: Volume
) -> np.ndarray | None:
    """Air connected to ``seed`` at the highest threshold before the growth explodes.

    Each step is a flood fill from the seed (SimpleITK ConnectedThreshold, face
    connectivity) over the internal air below the threshold: it visits only what it
    grows, not the whole volume.
    """
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    outside = np.float32(np.finfo(np.float32).max)  # never below a threshold
    image = sitk.GetImageFromArray(np.where(internal, hu, outside).astype(np.float32))
    best: np.ndarray | None = None
    best_ml = 0.0
    # The seed voxels once; each threshold keeps those below it (no full-volume pass).
    seeds = np.argwhere(seed & internal)
    seed_hu = hu[tuple(seeds.T)]
    for threshold in AIRWAY_THRESHOLDS_HU:
        starts = seeds[seed_hu < threshold]
        if not len(starts):
            continue
        region = sitk.ConnectedThreshold(
            image,
            seedList=[(int(x), int(y), int(z)) for z, y, x in starts],
            lower=-1.0e30,
            upper=float(np.nextafter(np.float32(threshold), np.float32(-np.inf))),
        )
        view = sitk.GetArrayViewFromImage(region)  # counted in place; copied only if kept
        grown_ml = float(np.count_nonzero(view)) * voxel_ml
        growth = grown_ml - best_ml
        leaks = best is not None and growth > max(
            AIRWAY_LEAK_MIN_ML, (AIRWAY_LEAK_RATIO - 1.0) * best_ml
        )
        if grown_ml > AIRWAY_MAX_ML or leaks:
            log.info("ct-chest: airways leak at %.0f HU (%.0f ml)", threshold, grown_ml)
            break
        if grown_ml > 0:
            best, best_ml = view.astype(bool), grown_ml
    return best


def _lung_measurements(values: np.ndarray) -> tuple[Measurement, ...]:
    """%LAA-950 and Perc15 of the HU ``values`` of a lung (or of both)."""
    laa = 100.0 * float(np.count_nonzero(values < LAA_HU)) / values.size
    perc15 = float(np.percentile(values, PERCENTILE))
    return (
        Measurement(name=LAA_950, value=laa, unit=PERCENT),
        Measurement(name=ATTENUATION, value=perc15, unit=HOUNSFIELD_UNIT, derivation=PERCENTILE_15),
    )


def _lungs_group(lungs: np.ndarray, volume: Volume) -> SegmentGroup:
    """Both lungs together: volume, mean lung density, %LAA-950 and Perc15."""
    values = volume.hu[lungs].astype(np.float64)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    return SegmentGroup(
        key="lungs",
        label="Lungs",
        type=LUNG,
        segment_keys=("lung_left", "lung_right"),
        measurements=(
            Measurement(name=VOLUME, value=values.size * voxel_ml, unit=MILLILITER),
            Measurement(
                name=ATTENUATION, value=float(values.mean()), unit=HOUNSFIELD_UNIT, derivation=MEAN
            ),
            *_lung_measurements(values),
        ),
    )


def _remove_airways(lungs: np.ndarray, body: np.ndarray, volume: Volume) -> np.ndarray:
    """Drop small air sections near the centre line left over from the airways."""
    pixel_area = volume.spacing[1] * volume.spacing[2]
    cleaned = lungs.copy()
    for k in range(lungs.shape[0]):
        if not lungs[k].any():
            continue
        x = _patient_x(volume, k)
        centre = float(x[body[k]].mean())
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image(lungs[k])))
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
    return largest_component(left), largest_component(right)


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
        "airways": ("Airways", TRACHEA_AND_BRONCHUS, None),
    }[key]
    values = volume.hu[mask]
    return Segment(
        key=key,
        label=label,
        category=ANATOMICAL_STRUCTURE,
        type=segment_type,
        laterality=laterality,
        mask=mask,
        volume_ml=count * voxel_ml,
        mean_hu=float(values.mean(dtype=np.float64)),
        measurements=_lung_measurements(values) if segment_type == LUNG else (),
    )


def _inplane_radius(mm: float, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    return (0, max(1, round(mm / spacing[1])), max(1, round(mm / spacing[2])))
