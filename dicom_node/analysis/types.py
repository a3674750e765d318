"""Data passed between volume loading, pipelines and the encoders.

These types are plain data: no DICOM encoding and no torch. A pipeline turns a
:class:`Volume` into an :class:`AnalysisResult`; ``dicom_node.encode`` turns that
into a Segmentation and a TID 1500 Structured Report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pydicom


class DeviceUnavailable(RuntimeError):
    """The configured analysis device cannot be used on this machine (raised at start by
    :func:`dicom_node.analysis.device.select_device`; here, so that catching it needs no
    torch)."""


@dataclass(frozen=True)
class Code:
    """A coded concept, e.g. ``Code("10200004", "SCT", "Liver")``."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Volume:
    """One image series as a 3D volume in Hounsfield units.

    ``hu`` has shape (slices, rows, columns); slice k is ``datasets[k]``, and
    slices are ordered so that the slice position increases along the slice
    normal (row cosine x column cosine).
    """

    hu: np.ndarray  # float32 (slices, rows, columns)
    spacing: tuple[float, float, float]  # mm between (slices, rows, columns)
    origin: np.ndarray  # LPS position (mm) of the centre of voxel [0, 0, 0]
    direction: np.ndarray  # 3x3, columns: LPS unit vectors along column, row and slice index
    datasets: tuple[pydicom.Dataset, ...]  # source headers (no pixel data needed), slice order

    def without_voxels(self) -> Volume:
        """This volume with ``hu`` replaced by zeros of the same shape that take no memory
        (a read-only broadcast view): the geometry and headers the encoders use, once the
        analysis is done and the voxels (4 bytes each) can be freed."""
        return dataclasses.replace(self, hu=np.broadcast_to(np.float32(0), self.hu.shape))

    def voxel_to_patient(self, index: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel indices ordered (slice, row, column) to (N, 3) LPS mm."""
        kji = np.asarray(index, dtype=np.float64)
        ijk = kji[:, ::-1] * np.array(self.spacing[::-1])
        return self.origin + ijk @ self.direction.T


@dataclass(frozen=True)
class Measurement:
    """One numeric measurement (TID 300): a coded name, a value and its UCUM unit.

    ``derivation`` (CID 7464 style) says how the value was derived from the
    voxels, e.g. Mean or a percentile.
    """

    name: Code
    value: float
    unit: Code  # UCUM, e.g. Code("%", "UCUM", "Percent")
    derivation: Code | None = None


@dataclass(frozen=True)
class Evaluation:
    """One qualitative evaluation (TID 1500 "qualitative evaluations"): coded name, coded value.

    E.g. ``Evaluation(Code("RID50", "RADLEX", "Solid"), ...)`` or a classifier's
    decision such as "Malignancy: likely". A classifier's likelihood as a number is a
    :class:`Measurement` (unit ``Code("1", "UCUM", "no units")`` or percent).
    """

    name: Code
    value: Code


@dataclass(frozen=True)
class Segment:
    """One segmented structure with its measurements."""

    key: str  # stable identifier within a pipeline, e.g. "lung_left"
    label: str  # human-readable SegmentLabel, e.g. "Left lung"
    category: Code  # CID 7150, e.g. Anatomical Structure
    type: Code  # CID 7151..., e.g. Lung
    laterality: Code | None  # Left / Right, or None
    mask: np.ndarray  # bool, same shape as Volume.hu
    # None: not reported (e.g. a radiograph has no volume, a non-CT image no HU); the SR
    # then leaves the measurement out.
    volume_ml: float | None
    mean_hu: float | None
    measurements: tuple[Measurement, ...] = ()  # beyond volume and mean HU
    evaluations: tuple[Evaluation, ...] = ()  # qualitative findings about this segment
    # Where the finding lies when that is not the segmented structure itself (e.g. a
    # nodule's site is "Upper lobe of left lung"); None: the site is ``type``.
    finding_site: Code | None = None
    # sRGB (0-255) display colour: the SEG's Recommended Display CIELab Value; None: none.
    color: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class SegmentGroup:
    """Measurements of several segments taken together, e.g. both lungs.

    The SR reports it as a TID 1501 group with ``type`` as finding type and
    site: a TID 1411 group can reference only one segment.
    """

    key: str  # stable identifier within a pipeline, e.g. "lungs"
    label: str  # TrackingIdentifier, e.g. "Lungs"
    type: Code  # e.g. Lung
    segment_keys: tuple[str, ...]  # the segments measured together; () for the whole study
    measurements: tuple[Measurement, ...]
    evaluations: tuple[Evaluation, ...] = ()  # e.g. a per-study classification


@dataclass(frozen=True)
class AnalysisResult:
    """What a pipeline found in one series."""

    pipeline: str  # pipeline name, e.g. "ct-chest"
    algorithm_name: str  # SegmentAlgorithmName
    algorithm_version: str
    # The analysed volume's geometry and headers, which the encoders use. A pipeline may
    # hand it back without its voxels (Volume.without_voxels), having let them go early.
    volume: Volume
    segments: tuple[Segment, ...]
    groups: tuple[SegmentGroup, ...] = ()
    # CID 7162 family of the algorithm; None: morphological operations (the built-ins).
    algorithm_family: Code | None = None
    # CID 100 procedure reported in the SR; None: CT of chest.
    procedure: Code | None = None
    # The algorithm as Contributing Equipment (IHE AI Results): its maker (None: the
    # node's manufacturer) and the Device UID (0018,1002) of this algorithm version
    # (None: derived from algorithm name and version, so it changes with the version).
    manufacturer: str | None = None
    device_uid: str | None = None


class Pipeline(Protocol):
    """An analysis pipeline: a named, versioned function of a volume."""

    name: str
    version: str

    def run(self, volume: Volume) -> AnalysisResult:
        """Analyse ``volume``. A caller that passes its only reference on lets the
        pipeline free the voxels once it no longer needs them (the worker does)."""
        ...


class AnalysisError(Exception):
    """A pipeline cannot produce a meaningful result for this volume."""
