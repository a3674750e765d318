"""Slabs and boxes of 3-D arrays: numpy only.

Kept apart from :mod:`dicom_node.analysis.morphology` (torch and SimpleITK) so that the
encoders can use them without loading either: a receive-only node does not need them,
and torch with SimpleITK is about 90 MiB of its resident memory.
"""

from __future__ import annotations

import numpy as np

SLAB_VOXELS = 2**22  # about 4 MiB of bool per slab


def slabs(count: int, slice_voxels: int, halo: int = 0) -> list[slice]:
    """Consecutive ranges of ``count`` slices of about ``SLAB_VOXELS`` voxels each.

    With a ``halo`` (slices read on each side of a slab), slabs are at least four
    halos thick, so that the halos are not most of the work.
    """
    step = max(1, SLAB_VOXELS // max(1, slice_voxels), 4 * halo)
    return [slice(start, min(count, start + step)) for start in range(0, count, step)]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box that holds every true voxel of a 3-D ``mask``; None if it has none."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(hit):
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)
