"""Zero-filled arrays that take memory only where they are written.

A segment's mask on the whole source grid (300 x 512 x 512 is 75 MiB as bool) of which
only a box is set, or the SEG encoder's stack of such masks, relies on this: the pages
never written stay unmapped. ``np.zeros`` does it too (calloc), except that numpy marks
its arrays of 4 MiB and more for transparent huge pages (``madvise(MADV_HUGEPAGE)``), as
a kernel with THP set to ``always`` does for every mapping: writing one byte then takes
2 MiB, i.e. eight slices of 512 x 512, and a mask with a few rows set in every slice takes
its whole size. Measured on the 300-slice phantom: ct-chest's postprocess step peaked
217 MiB higher with huge pages than without, the SEG stack 163 MiB.
"""

from __future__ import annotations

import mmap

import numpy as np
from numpy.typing import DTypeLike

HUGE_PAGE = 2 * 1024 * 1024  # below this, there is nothing to save


def sparse_zeros(shape: tuple[int, ...], dtype: DTypeLike = bool) -> np.ndarray:
    """A writable array of zeros whose memory is taken 4 KiB page by page, as written.

    An anonymous mapping marked ``MADV_NOHUGEPAGE``; small arrays (and systems without
    that advice) get ``np.zeros``. The mapping is released with the last array using it.
    """
    kind = np.dtype(dtype)
    count = int(np.prod(shape))
    size = count * kind.itemsize
    if size < HUGE_PAGE or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype=kind)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # shared: reads would take pages
    memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=kind, count=count).reshape(shape)
