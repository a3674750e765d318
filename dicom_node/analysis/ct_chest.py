"""The built-in ``ct-chest`` pipeline: body, lungs, airways and nodule/mass candidates from HU.

The airways (trachea and main bronchi) are grown from the trachea, found near
the body's centre line in the top slices, with a threshold that is raised in
steps until the grown volume "explodes" into the lungs (the last step before
the leak is kept); that and the left/right split are in
``dicom_node.analysis.chest_regions``. Each lung gets the densitometry measures of emphysema
quantification: mean lung density, %LAA-950 (percentage of lung voxels below
-950 HU) and Perc15 (15th percentile of the lung histogram); both lungs
together are reported as a group.

Nodule and mass candidates (``dicom_node.analysis.nodules``) are solid, compact
components inside or against the lungs; each becomes a segment of its own with its
volume, longest axial diameter, mean HU, lung and approximate lobe.

The work is cropped to the body's rows and columns after the body is found (the body
itself is found on the tissue's rows and columns), and the airways are grown by flood
fills from the trachea: the 0.2 pipeline labelled the whole volume at every threshold
step. Whole-volume temporaries are avoided where a box or a slab will do: on a shared
2-core machine their page faults cost more than the arithmetic.

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
import torch

from dicom_node.analysis.chest_regions import (
    airways,
    body_centres,
    inplane_radius,
    remove_airways,
    split_left_right,
)
from dicom_node.analysis.densitometry import HuSummary
from dicom_node.analysis.grid import bounding_box, slabs
from dicom_node.analysis.morphology import (
    dilate,
    erode,
    fill_holes_per_slice,
    label,
    largest_component,
)
from dicom_node.analysis.nodules import (  # laterality codes: one definition for both
    LEFT,
    RIGHT,
    Candidate,
    candidate_segment,
    find_candidates,
)
from dicom_node.analysis.sparse import sparse_zeros
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
MIN_AXIAL_COSINE = 0.8  # slice normal must be close to the patient's z axis
MIN_SEGMENT_ML = 1.0  # a smaller segment is noise, reported as not found
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
class Located:
    """The tissue's rows and columns, widened by the body opening's radius, cut out of a
    series: all of its voxels that the later steps read (:meth:`CtChestPipeline.locate`)."""

    volume: Volume  # the whole series' geometry and headers, without its voxels
    hu: np.ndarray  # compact_hu of the rows and columns
    rows: slice  # in ``volume``
    columns: slice


@dataclass(frozen=True)
class Prepared:
    """The volume on the device, its body outline, and the in-plane crop to the body."""

    volume: Volume  # the whole series' geometry and headers, without its voxels
    # rows and columns cut to the body's bounding box, all slices; its HU in int16 where
    # that is exact (compact_hu): the steps compare and average them, never compute on them
    cropped: Volume
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
        located = self.locate(volume)
        del volume  # the caller's was the only other reference, if it passed the volume on
        prepared = self.crop(located)
        del located
        return self.postprocess(prepared, self.infer(prepared))

    def preprocess(self, volume: Volume) -> Prepared:
        """Check the geometry, find the body, and crop rows and columns to it:
        ``crop(locate(volume))``."""
        return self.crop(self.locate(volume))

    def locate(self, volume: Volume) -> Located:
        """Check the geometry and cut out the tissue's rows and columns, widened by the
        body opening's radius (so that the erosion still sees the background around it).

        The rows and columns are found slab by slab, and the cut is a copy
        (:func:`compact_hu`: int16 where that is exact), so that besides ``volume`` only
        the cut is held: once the caller lets ``volume`` go, the whole float32 series is
        freed before the body is labelled (300 MiB for 300 slices of 512 x 512).
        """
        _check_axial(volume)
        radius = inplane_radius(BODY_OPENING_MM, volume.spacing)
        rows_present, columns_present = _tissue_rows_and_columns(volume.hu)
        rows = _extent(rows_present, radius[1])
        columns = _extent(columns_present, radius[2])
        if rows is None or columns is None:
            raise AnalysisError(f"no body found: no voxel above {BODY_MIN_HU} HU")
        return Located(
            volume=volume.without_voxels(),
            hu=compact_hu(volume.hu[:, rows, columns]),
            rows=rows,
            columns=columns,
        )

    def crop(self, located: Located) -> Prepared:
        """Find the body in ``located`` and crop its rows and columns to the body's."""
        volume = located.volume
        # the same voxels as hu > BODY_MIN_HU of the float32 series: the cut holds them exactly
        tissue = torch.from_numpy(located.hu).to(self.device) > BODY_MIN_HU
        body, inner = self._body(tissue, volume.spacing)
        del tissue
        box = (
            slice(located.rows.start + inner[0].start, located.rows.start + inner[0].stop),
            slice(located.columns.start + inner[1].start, located.columns.start + inner[1].stop),
        )
        corner = volume.voxel_to_patient(np.array([[0, box[0].start, box[1].start]]))[0]
        cropped = Volume(
            hu=np.ascontiguousarray(located.hu[:, inner[0], inner[1]]),
            spacing=volume.spacing,
            origin=corner,
            direction=volume.direction,
            datasets=volume.datasets,
        )
        return Prepared(volume=volume, cropped=cropped, box=box, body=body)

    def infer(self, prepared: Prepared) -> ChestMasks:
        """Internal air, airways, both lungs and the lesion candidates (cropped grid)."""
        volume, body = prepared.cropped, prepared.body
        # the cropped HU as they are (int16 or float32; on the CPU no copy): thresholded once
        hu = torch.from_numpy(np.asarray(volume.hu)).to(self.device)
        internal = self._internal_air(hu, body)
        del hu  # each mask the size of the cropped grid is let go once it has been used
        centres = body_centres(body, volume)
        airway_mask = airways(internal, centres, volume, self.device)
        lungs = remove_airways(internal & ~airway_mask, centres, volume)
        del internal
        left, right = split_left_right(lungs, centres, volume)
        del lungs  # the candidates' search has the peak of this stage: it needs none of them
        found = find_candidates(volume, left, right, airway_mask) if self.nodules else []
        return ChestMasks(body, left, right, airway_mask, tuple(found))

    def postprocess(self, prepared: Prepared, masks: ChestMasks) -> AnalysisResult:
        """Masks back on the source grid, segments with their measurements, the lungs group.

        The HU under each mask are summarised first (:class:`HuSummary`: no copy of the
        voxels), then each mask is placed on the source grid and its cropped copy let go
        before the next is placed (the body is ``prepared.body`` too, and stays). ``run``
        passes the only reference to ``masks``; a caller that keeps its own keeps the
        cropped masks alive until it lets them go.
        """
        volume, hu = prepared.volume, prepared.cropped.hu
        rows, columns = prepared.box

        def full(mask: np.ndarray, box: tuple[slice, ...] | None = None) -> np.ndarray:
            """``mask`` (cropped grid) on the source grid; only ``box`` of it, if given."""
            z, r, c = box or (slice(None), slice(None), slice(None))
            shift = (rows.start or 0, columns.start or 0)
            whole = sparse_zeros(volume.hu.shape)  # pages outside the box stay unmapped
            r0, r1, _ = r.indices(mask.shape[1])
            c0, c1, _ = c.indices(mask.shape[2])
            whole[z, r0 + shift[0] : r1 + shift[0], c0 + shift[1] : c1 + shift[1]] = mask[z, r, c]
            return whole

        named = {"body": masks.body, "lung_left": masks.lung_left, "lung_right": masks.lung_right}
        if self.airways_segment and masks.airways.any():
            named["airways"] = masks.airways
        candidates = masks.candidates
        del masks  # from here on ``named`` holds the cropped masks, and lets each go once placed
        summaries = {  # the lungs' distributions for %LAA-950 and Perc15; of others the mean
            key: HuSummary.of(hu, mask, distribution=key in ("lung_left", "lung_right"))
            for key, mask in named.items()
        }
        for key, summary in summaries.items():
            _check_found(key, summary.count, volume.spacing)
        group = _lungs_group(summaries["lung_left"].merged(summaries["lung_right"]), volume.spacing)
        segments = []
        for key in list(named):
            cropped = named.pop(key)
            # only the mask's own box is written: the pages outside it stay unmapped (the
            # lungs' and the airways' boxes are a fraction of the body's)
            box = bounding_box(cropped) or (slice(0, 0),) * 3
            segments.append(_segment(key, summaries.pop(key), full(cropped, box), volume.spacing))
            del cropped
        voxel_mm3 = float(np.prod(volume.spacing))
        for number, candidate in enumerate(candidates, start=1):
            placed = dataclasses.replace(candidate, mask=full(candidate.mask, candidate.box))
            segments.append(candidate_segment(number, placed, voxel_mm3))
        log.info(
            "ct-chest: %s; %d nodule/mass candidates",
            ", ".join(
                f"{s.key} {s.volume_ml:.0f} ml" for s in segments[: len(segments) - len(candidates)]
            ),
            len(candidates),
        )
        return AnalysisResult(
            pipeline=self.name,
            algorithm_name="dicom_node ct-chest",
            algorithm_version=self.version,
            volume=volume,
            segments=tuple(segments),
            groups=(group,),
        )

    def _body(
        self, tissue: torch.Tensor, spacing: tuple[float, float, float]
    ) -> tuple[np.ndarray, tuple[slice, slice]]:
        """Largest tissue component after an in-plane opening, holes filled per slice.

        ``tissue``: the tissue's rows and columns plus the opening radius (:meth:`locate`),
        never the whole slices. Returns the body cropped to its rows and columns, and
        those rows and columns within ``tissue``.
        """
        radius = inplane_radius(BODY_OPENING_MM, spacing)
        core = largest_component(erode(tissue, radius).cpu().numpy())
        if not core.any():
            raise AnalysisError(f"no body found: no voxel above {BODY_MIN_HU} HU after opening")
        core_t = torch.from_numpy(core).to(self.device)
        body = (dilate(core_t, radius) & tissue).cpu().numpy()
        inner = _box(body)
        return fill_holes_per_slice(body[:, inner[0], inner[1]]), inner

    def _internal_air(self, hu: torch.Tensor, body: np.ndarray) -> np.ndarray:
        """Low-HU voxels in the body not connected to the air around the patient."""
        air = (hu < LUNG_MAX_HU).cpu().numpy()
        labels, count = label(air)
        touches_outside = np.zeros(count + 1, dtype=bool)
        touches_outside[labels[~body]] = True
        return air & ~touches_outside[labels]


def compact_hu(hu: np.ndarray) -> np.ndarray:
    """A contiguous copy of ``hu``: int16 when that holds every value exactly, else float32.

    CT stores integers, and with the usual Rescale Slope of 1 and an integer intercept
    the HU are integers within int16: half the memory of float32, the same values. The
    copy and its check go slab by slab, so that no temporary of the whole is made.
    """
    small = np.empty(hu.shape, dtype=np.int16)
    for part in slabs(hu.shape[0], hu.shape[1] * hu.shape[2]):
        with np.errstate(invalid="ignore"):  # NaN or out of range: caught by the comparison
            np.copyto(small[part], hu[part], casting="unsafe")
        if not np.array_equal(small[part], hu[part]):  # a fraction, beyond int16, or NaN
            del small
            return np.ascontiguousarray(hu, dtype=np.float32)
    return small


def _tissue_rows_and_columns(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which rows and which columns of the (slices, rows, columns) ``hu`` hold a voxel
    above :data:`BODY_MIN_HU` in any slice; slab by slab, with one slab's mask at a time."""
    rows = np.zeros(hu.shape[1], dtype=bool)
    columns = np.zeros(hu.shape[2], dtype=bool)
    for part in slabs(hu.shape[0], hu.shape[1] * hu.shape[2]):
        tissue = hu[part] > BODY_MIN_HU
        rows |= tissue.any(axis=(0, 2))
        columns |= tissue.any(axis=(0, 1))
    return rows, columns


def _extent(present: np.ndarray, margin: int) -> slice | None:
    """The range of the true entries of a 1-D ``present``, widened by ``margin`` (clamped)."""
    where = np.flatnonzero(present)
    if not len(where):
        return None
    return slice(max(0, int(where[0]) - margin), min(len(present), int(where[-1]) + margin + 1))


def _box(mask: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of ``mask`` (slices, rows, columns) that hold a true voxel."""
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    columns = np.flatnonzero(mask.any(axis=(0, 1)))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


def _check_axial(volume: Volume) -> None:
    normal_z = abs(float(volume.direction[2, 2]))
    if normal_z < MIN_AXIAL_COSINE:
        raise AnalysisError(
            f"ct-chest needs axial slices; slice normal {volume.direction[:, 2].tolist()} "
            f"is {normal_z:.2f} along the patient's z axis"
        )
    if volume.hu.shape[0] < 2:
        raise AnalysisError(f"ct-chest needs at least 2 slices, got {volume.hu.shape[0]}")


def _lung_measurements(summary: HuSummary) -> tuple[Measurement, ...]:
    """%LAA-950 and Perc15 of the HU of a lung (or of both)."""
    return (
        Measurement(name=LAA_950, value=summary.percent_below(LAA_HU), unit=PERCENT),
        Measurement(
            name=ATTENUATION,
            value=summary.percentile(PERCENTILE),
            unit=HOUNSFIELD_UNIT,
            derivation=PERCENTILE_15,
        ),
    )


def _lungs_group(lungs: HuSummary, spacing: tuple[float, float, float]) -> SegmentGroup:
    """Both lungs together: volume, mean lung density, %LAA-950 and Perc15."""
    mean = lungs.mean()  # before a float summary's values are reordered for the percentile
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return SegmentGroup(
        key="lungs",
        label="Lungs",
        type=LUNG,
        segment_keys=("lung_left", "lung_right"),
        measurements=(
            Measurement(name=VOLUME, value=lungs.count * voxel_ml, unit=MILLILITER),
            Measurement(name=ATTENUATION, value=mean, unit=HOUNSFIELD_UNIT, derivation=MEAN),
            *_lung_measurements(lungs),
        ),
    )


def _check_found(key: str, count: int, spacing: tuple[float, float, float]) -> None:
    """Raise :class:`AnalysisError` if segment ``key`` has too few voxels to be reported."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if count * voxel_ml < MIN_SEGMENT_ML:
        raise AnalysisError(
            f"ct-chest found no {key!r}: {count} voxels ({count * voxel_ml:.2f} ml), "
            f"less than {MIN_SEGMENT_ML} ml"
        )


def _segment(
    key: str, summary: HuSummary, mask: np.ndarray, spacing: tuple[float, float, float]
) -> Segment:
    """Segment ``key`` with the source-grid ``mask``, measured from the ``summary`` of the
    HU under it."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    label, segment_type, laterality = {
        "body": ("Body", ENTIRE_BODY, None),
        "lung_left": ("Left lung", LUNG, LEFT),
        "lung_right": ("Right lung", LUNG, RIGHT),
        "airways": ("Airways", TRACHEA_AND_BRONCHUS, None),
    }[key]
    mean_hu = summary.mean()  # before a float summary's values are reordered for Perc15
    return Segment(
        key=key,
        label=label,
        category=ANATOMICAL_STRUCTURE,
        type=segment_type,
        laterality=laterality,
        mask=mask,
        volume_ml=summary.count * voxel_ml,
        mean_hu=mean_hu,
        measurements=_lung_measurements(summary) if segment_type == LUNG else (),
    )
