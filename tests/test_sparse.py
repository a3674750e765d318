"""sparse_zeros: whole-grid masks that take memory only where they are written."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.analysis.sparse import HUGE_PAGE, sparse_zeros

SHAPE = (300, 512, 512)  # 75 MiB as bool: a 300-slice CT's grid
MiB = 1024 * 1024


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_plain_writable_array_of_zeros():
    mask = sparse_zeros((4, 1024, 1024))
    assert type(mask) is np.ndarray  # the SEG encoder's fast check wants exactly this
    assert mask.dtype == bool and mask.shape == (4, 1024, 1024) and mask.flags.writeable
    assert mask.flags.c_contiguous and not mask.any()
    counts = sparse_zeros((3, 1024, 1024), np.uint16)
    counts[1, 2, 3] = 7
    assert counts.dtype == np.uint16 and int(counts.sum()) == 7


def test_small_arrays_are_ordinary_zeros():
    small = sparse_zeros((2, 8, 8), np.int32)
    assert small.nbytes < HUGE_PAGE and small.base is None and not small.any()


def test_writing_a_few_rows_of_every_slice_takes_a_few_pages():
    before = _rss()
    mask = sparse_zeros(SHAPE)
    mask[:, 200:208, 100:400] = True  # 8 rows of 512 bytes: one 4 KiB page per slice
    assert not mask[:, :200].any() and mask[:, 200:208, 100:400].all()  # reads take nothing
    grown = _rss() - before
    # 300 pages = 1.2 MiB; with 2 MiB pages every slice would bring its neighbours in
    assert grown < 16 * MiB, f"{grown / MiB:.0f} MiB for 300 pages"
    assert int(np.count_nonzero(mask)) == 300 * 8 * 300


def test_the_memory_goes_with_the_last_array():
    mask = sparse_zeros(SHAPE)
    view = mask[10:20]
    mask[:] = True
    del mask
    before = _rss()
    assert view.all()
    del view
    assert before - _rss() > 60 * MiB  # the whole 75 MiB mapping was released


@pytest.mark.parametrize("shape", [(0, 512, 512), (1,)])
def test_empty_and_tiny_shapes(shape):
    assert sparse_zeros(shape).shape == shape
