"""HuSummary: the measurements of the HU under a mask, without a copy of the voxels."""

from __future__ import annotations

import numpy as np
import pytest
from traced import peak_of

from dicom_node.analysis.densitometry import HuSummary


def _cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for number in range(count):
        shape = tuple(int(n) for n in rng.integers(1, 14, 3))
        low, high = (-32768, 32767) if number % 4 == 0 else (-1100, 500)
        hu = rng.integers(low, high, shape, endpoint=True).astype(np.int16)
        mask = rng.random(shape) < rng.random()
        if mask.any():
            yield hu, mask, float(rng.choice([15.0, 0.0, 100.0, 50.0, rng.random() * 100]))


def test_integer_hu_give_numpys_figures_exactly():
    """Mean, %below and numpy's linear percentile from the histogram are the numbers numpy
    computes from the values, to the last bit."""
    checked = 0
    for hu, mask, q in _cases(seed=5, count=400):
        values = hu[mask]
        summary = HuSummary.of(hu, mask)
        assert summary.histogram is not None and summary.values is None
        assert summary.count == values.size
        assert summary.mean() == float(values.mean(dtype=np.float64))
        assert summary.percent_below(-950.0) == 100.0 * np.count_nonzero(values < -950.0) / (
            values.size
        )
        if np.ptp(values.astype(np.int32)) < 2**15:  # numpy's own int16 subtraction overflows
            assert summary.percentile(q) == float(np.percentile(values, q))
            checked += 1
    assert checked > 250


def test_other_hu_are_kept_as_values_and_give_numpys_figures():
    for hu, mask, q in _cases(seed=6, count=100):
        real = hu.astype(np.float32) + np.float32(0.5)
        values = real[mask]
        summary = HuSummary.of(real, mask)
        assert summary.histogram is None and summary.values is not None
        assert summary.mean() == float(values.mean(dtype=np.float64))
        assert summary.percent_below(-950.0) == 100.0 * np.count_nonzero(values < -950.0) / (
            values.size
        )
        assert summary.percentile(q) == float(np.percentile(values, q))


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_two_masks_merge_into_the_summary_of_their_union(dtype):
    rng = np.random.default_rng(7)
    hu = rng.integers(-1024, 400, (40, 30, 20)).astype(dtype)
    left = np.zeros(hu.shape, dtype=bool)
    left[:, :, :9] = rng.random((40, 30, 9)) < 0.6
    right = np.zeros(hu.shape, dtype=bool)
    right[:, :, 11:] = rng.random((40, 30, 9)) < 0.6
    both = HuSummary.of(hu, left).merged(HuSummary.of(hu, right))
    values = hu[left | right]
    assert both.count == values.size
    assert both.mean() == pytest.approx(float(values.mean(dtype=np.float64)), abs=1e-9)
    assert both.percent_below(-950.0) == 100.0 * np.count_nonzero(values < -950.0) / values.size
    assert both.percentile(15.0) == float(np.percentile(values, 15.0))


def test_summaries_of_different_kinds_do_not_merge():
    mask = np.ones((2, 2, 2), dtype=bool)
    whole = HuSummary.of(np.zeros(mask.shape, np.int16), mask)
    real = HuSummary.of(np.zeros(mask.shape, np.float32), mask)
    summed = HuSummary.of(np.zeros(mask.shape, np.float32), mask, distribution=False)
    for one, other in ((whole, real), (real, summed), (summed, whole)):
        with pytest.raises(ValueError, match="do not merge"):
            one.merged(other)


def test_other_hu_without_their_distribution_keep_only_a_sum():
    """The body needs its mean only: its float32 values (200 MiB for 300 slices) are
    summed slab by slab, not kept."""
    rng = np.random.default_rng(8)
    real = (rng.integers(-1024, 400, (40, 30, 20)) + 0.25).astype(np.float32)
    mask = rng.random(real.shape) < 0.7
    summary = HuSummary.of(real, mask, distribution=False)
    assert summary.values is None and summary.histogram is None
    assert summary.count == np.count_nonzero(mask)
    assert summary.mean() == pytest.approx(float(real[mask].mean(dtype=np.float64)), rel=1e-12)
    both = summary.merged(HuSummary.of(real, ~mask, distribution=False))
    assert both.mean() == pytest.approx(float(real.mean(dtype=np.float64)), rel=1e-12)
    with pytest.raises(ValueError, match="without the distribution"):
        summary.percentile(15.0)
    with pytest.raises(ValueError, match="without the distribution"):
        summary.percent_below(-950.0)


def test_no_voxels():
    mask = np.zeros((3, 4, 5), dtype=bool)
    summary = HuSummary.of(np.zeros(mask.shape, np.int16), mask)
    assert summary.count == 0 and np.isnan(summary.mean())
    with pytest.raises(ValueError, match="no voxels"):
        summary.percentile(15.0)


def test_a_mask_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="shape"):
        HuSummary.of(np.zeros((3, 4, 5), np.int16), np.ones((3, 4, 4), dtype=bool))


def test_integer_hu_are_summarised_without_a_copy_of_the_selected_voxels():
    """64 slices of 512 x 512, all selected: ``hu[mask]`` alone is 32 MiB of int16. The
    summary reads a slab at a time and counts in chunks, so its temporaries stay well
    below that (and the result is the same as from the copy)."""
    hu = np.full((64, 512, 512), -870, dtype=np.int16)
    hu[::2, ::3] = 40
    mask = np.ones(hu.shape, dtype=bool)
    summary, peak = peak_of(lambda: HuSummary.of(hu, mask))
    assert peak < hu.nbytes // 2, f"{peak / 2**20:.1f} MiB for {hu.nbytes / 2**20:.0f} MiB of HU"
    assert summary.count == hu.size
    assert summary.mean() == float(hu.mean(dtype=np.float64))
