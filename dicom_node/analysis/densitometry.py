"""The HU of a mask's voxels, summarised without copying them out of the volume.

ct-chest reports each segment's voxel count and mean HU, and for the lungs %LAA-950 and
the 15th percentile. ``hu[mask]`` made a copy of every selected voxel for that: for the
body of a 300-slice CT about 100 MiB of int16, at the moment the masks were also being
placed on the source grid. :class:`HuSummary` reads the mask slab by slab instead:

- integer HU (the int16 crop of :func:`dicom_node.analysis.ct_chest.compact_hu`) go into
  a histogram of the 65536 int16 values (512 KiB). Count, mean, the fraction below a
  threshold and numpy's linear percentile come out of it exactly as numpy computes them
  from the values (a sum of integers in float64 is exact below 2**53; the percentile's
  two order statistics are read from the cumulative counts);
- other HU (float32) are gathered as before where a percentile is asked for (the
  lungs), since a percentile of real numbers needs the numbers; elsewhere only their sum
  is kept. Means of these may differ from before in the last bits (another order of
  summation).

Two summaries merge (both lungs together) without a mask of their union.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dicom_node.analysis.grid import slabs

_INT16_OFFSET = 2**15  # histogram bin of HU v: v + 32768
_CHUNK = 2**19  # values per np.bincount call: 4 MiB of its int64 copy


@dataclass(frozen=True)
class HuSummary:
    """What the measurements need of the HU under one mask: a histogram of integer HU
    (``histogram``), the values themselves (``values``), or for other HU whose
    distribution is not asked for only their sum (``total``)."""

    count: int
    histogram: np.ndarray | None = None  # int64, 65536 bins: HU -32768 .. 32767
    values: np.ndarray | None = None  # as ``hu`` (float32 from compact_hu), in any order
    total: float | None = None  # the sum of other HU, when their values are not kept

    @classmethod
    def of(cls, hu: np.ndarray, mask: np.ndarray, *, distribution: bool = True) -> HuSummary:
        """The HU of ``hu`` where the same-shaped 3-D ``mask`` is set, read slab by slab.

        ``distribution=False``: only the count and the mean will be asked for. Integer HU
        get their histogram anyway (512 KiB); other HU are then summed, not kept (a body's
        float32 values are 200 MiB for 300 slices).
        """
        if hu.shape != mask.shape:
            raise ValueError(f"HU of shape {hu.shape} and mask of shape {mask.shape}")
        # slabs of a quarter of morphology's size: about 2**20 voxels each
        thin = slabs(hu.shape[0], 4 * hu.shape[1] * hu.shape[2])
        parts = (hu[part][mask[part]] for part in thin)
        if hu.dtype == np.int16:
            histogram = np.zeros(2**16, dtype=np.int64)
            for values in parts:
                bins = values.view(np.uint16)  # the slab's own copy: made into bins in place
                np.bitwise_xor(bins, np.uint16(_INT16_OFFSET), out=bins)  # HU v: bin v + 32768
                for start in range(0, bins.size, _CHUNK):  # bincount copies its input to int64
                    histogram += np.bincount(bins[start : start + _CHUNK], minlength=2**16)
            return cls(count=int(histogram.sum()), histogram=histogram)
        if not distribution:
            count, total = 0, 0.0
            for values in parts:
                count += values.size
                total += float(values.sum(dtype=np.float64))
            return cls(count=count, total=total)
        values = np.concatenate([np.empty(0, hu.dtype), *parts])
        return cls(count=int(values.size), values=values)

    def merged(self, other: HuSummary) -> HuSummary:
        """The summary of both masks' voxels (masks of one volume that do not overlap)."""
        count = self.count + other.count
        if self.histogram is not None and other.histogram is not None:
            return HuSummary(count=count, histogram=self.histogram + other.histogram)
        if self.values is not None and other.values is not None:
            return HuSummary(count=count, values=np.concatenate([self.values, other.values]))
        if self.total is not None and other.total is not None:
            return HuSummary(count=count, total=self.total + other.total)
        raise ValueError("summaries of different kinds do not merge")

    def mean(self) -> float:
        """The mean HU (NaN for no voxels), as ``values.mean(dtype=np.float64)``."""
        if self.count == 0:
            return math.nan
        if self.histogram is not None:
            return float(np.dot(self.histogram, _HU_OF_BIN)) / self.count
        if self.values is None:
            assert self.total is not None
            return self.total / self.count  # summed slab by slab: equal up to rounding
        return float(self.values.mean(dtype=np.float64))

    def percent_below(self, threshold: float) -> float:
        """The percentage of voxels with HU below ``threshold``."""
        if self.histogram is not None:
            below = int(self.histogram[_HU_OF_BIN < threshold].sum())
        else:
            below = int(np.count_nonzero(self._values() < threshold))
        return 100.0 * below / self.count

    def percentile(self, q: float) -> float:
        """``np.percentile(values, q)`` (linear interpolation) of the voxels' HU.

        The values of a float summary are reordered in place (partitioned, not copied).
        """
        if self.count == 0:
            raise ValueError("percentile of no voxels")
        if self.histogram is None:
            return float(np.percentile(self._values(), q, overwrite_input=True))
        # numpy's linear method: the virtual index (n - 1) * q / 100, the two order
        # statistics around it, and numpy's _lerp (which interpolates from the upper one
        # when the weight is 0.5 or more)
        index = (self.count - 1) * (q / 100)
        below = math.floor(index)
        weight = index - below
        ranks = np.cumsum(self.histogram)
        low, high = (
            int(np.searchsorted(ranks, rank, side="right")) - _INT16_OFFSET
            for rank in (below, min(below + 1, self.count - 1))
        )
        step = high - low
        return float(high - step * (1 - weight) if weight >= 0.5 else low + step * weight)

    def _values(self) -> np.ndarray:
        if self.values is None:
            raise ValueError("summarised without the distribution (distribution=False)")
        return self.values


_HU_OF_BIN = np.arange(2**16, dtype=np.int64) - _INT16_OFFSET
