"""The ct-chest pipeline on real chest CT, and on re-oriented copies of it.

The re-oriented copies show the same anatomy at the same patient coordinates
through different image orientations and slice orders, so the patient's left
lung must stay the left lung.
"""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from peers import SHARED_REAL
from traced import peak_of

from dicom_node.analysis import ct_chest, grid, morphology
from dicom_node.analysis.chest_regions import AIRWAY_MAX_OFFSET_MM, largest_lung
from dicom_node.analysis.ct_chest import LAA_950, PERCENTILE_15, CtChestPipeline, compact_hu
from dicom_node.analysis.device import select_device
from dicom_node.analysis.pipelines import PIPELINE_NAMES, build_pipeline
from dicom_node.analysis.types import AnalysisError, Volume
from dicom_node.analysis.volume import load_series

REAL = SHARED_REAL
PHILIPS_HFS = REAL / "lung-pet-ct-dx-A0001" / "series2_5mm_kernelL"
GE_FFS = REAL / "dcmqi-ct-3slice" / "dicom"
CPU = torch.device("cpu")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def _by_key(result):
    return {s.key: s for s in result.segments}


def _centroid(volume: Volume, mask: np.ndarray) -> np.ndarray:
    return volume.voxel_to_patient(np.argwhere(mask).mean(axis=0, keepdims=True))[0]


@pytest.fixture(scope="module")
def philips_volume():
    return load_series(_files(PHILIPS_HFS))


@pytest.fixture(scope="module")
def philips_result(philips_volume):
    return CtChestPipeline(CPU, airways_segment=True).run(philips_volume)


def test_segments_and_codes(philips_result):
    segments = _by_key(philips_result)
    assert list(segments)[:4] == ["body", "lung_left", "lung_right", "airways"]
    candidates = list(segments)[4:]
    assert candidates == [f"candidate_{n}" for n in range(1, len(candidates) + 1)]
    assert segments["lung_left"].laterality.meaning == "Left"
    assert segments["lung_right"].laterality.meaning == "Right"
    assert segments["body"].laterality is None and segments["airways"].laterality is None
    anatomy = [segments[k] for k in ("body", "lung_left", "lung_right", "airways")]
    assert {s.type.value for s in anatomy} == {"38266002", "39607008", "110726009"}
    assert {segments[k].type.meaning for k in candidates} <= {"Nodule", "Mass"}
    assert segments["airways"].type.meaning == "Trachea and bronchus"
    assert philips_result.pipeline == "ct-chest"
    for segment in segments.values():
        assert segment.mask.shape == philips_result.volume.hu.shape
        assert segment.mask.dtype == bool


def test_lung_volumes_and_density_are_plausible(philips_result):
    segments = _by_key(philips_result)
    for key in ("lung_left", "lung_right"):
        assert 1000 < segments[key].volume_ml < 4500, key
        assert -920 < segments[key].mean_hu < -700, key
    # the tumour sits in the left lung: it should not come out larger than the right
    assert segments["lung_left"].volume_ml < segments["lung_right"].volume_ml
    body = segments["body"]
    assert 10_000 < body.volume_ml < 40_000
    assert -400 < body.mean_hu < 0  # soft tissue and bone, with the lungs inside


def test_masks_are_disjoint_and_lungs_inside_body(philips_result):
    segments = _by_key(philips_result)
    left, right, body = (segments[k].mask for k in ("lung_left", "lung_right", "body"))
    airways = segments["airways"].mask
    assert not (left & right).any()
    assert not (left & ~body).any() and not (right & ~body).any()
    assert not (airways & (left | right)).any() and not (airways & ~body).any()


def test_airways_run_from_the_top_between_the_lungs(philips_result):
    """Trachea and bronchi: 48 ml here (42 ml on the kernel B series of the same scan).

    An adult trachea (about 2 cm wide, 10 to 12 cm long) holds some 30 to 40 ml,
    the main bronchi a few ml more; a partial trachea gives less, a leak into
    the lungs hundreds of ml: hence 20 to 150 ml.
    """
    segments = _by_key(philips_result)
    volume = philips_result.volume
    airways = segments["airways"]
    assert 20 < airways.volume_ml < 150
    assert airways.mean_hu < -850  # air with its partial-volume rim
    assert volume.direction[2, 2] > 0  # slices run feet to head: the last is the top
    assert airways.mask[-1].any()  # the trachea is cut by the top of the volume
    centre = _centroid(volume, airways.mask)
    body = _centroid(volume, segments["body"].mask)
    lungs = _centroid(volume, segments["lung_left"].mask | segments["lung_right"].mask)
    assert abs(centre[0] - body[0]) < AIRWAY_MAX_OFFSET_MM  # on the centre line
    assert centre[2] > lungs[2] + 30  # above the lungs' centre


def test_lung_densitometry(philips_result, philips_volume):
    """Kernel L (sharp), 5 mm slices: %LAA-950 about 14 %, Perc15 about -946 HU.

    The sharp kernel's noise spreads the histogram: the kernel B series of the
    same scan gives %LAA-950 0.2 % and Perc15 -888 HU.
    """
    segments = _by_key(philips_result)
    for key in ("lung_left", "lung_right"):
        segment = segments[key]
        values = philips_volume.hu[segment.mask]
        (laa, perc15) = segment.measurements
        assert (laa.name, laa.unit.value, laa.derivation) == (LAA_950, "%", None)
        assert (perc15.name.value, perc15.unit.value, perc15.derivation) == (
            "112031",
            "[hnsf'U]",
            PERCENTILE_15,
        )
        assert laa.value == pytest.approx(100 * np.mean(values < -950))
        assert 5 < laa.value < 25, key
        assert perc15.value == pytest.approx(np.percentile(values, 15))
        assert -1000 < perc15.value < -800, key
    assert segments["airways"].measurements == () and segments["body"].measurements == ()


def test_lungs_group_totals(philips_result):
    segments = _by_key(philips_result)
    (group,) = philips_result.groups
    assert (group.key, group.type.meaning, group.segment_keys) == (
        "lungs",
        "Lung",
        ("lung_left", "lung_right"),
    )
    volume, mean, laa, perc15 = (m.value for m in group.measurements)
    left, right = segments["lung_left"], segments["lung_right"]
    assert volume == pytest.approx(left.volume_ml + right.volume_ml)
    weights = (left.volume_ml / volume, right.volume_ml / volume)
    assert mean == pytest.approx(weights[0] * left.mean_hu + weights[1] * right.mean_hu)
    laa_each = [s.measurements[0].value for s in (left, right)]
    assert laa == pytest.approx(weights[0] * laa_each[0] + weights[1] * laa_each[1])
    perc15_each = sorted(s.measurements[1].value for s in (left, right))
    assert perc15_each[0] <= perc15 <= perc15_each[1]


def test_left_lung_is_the_patients_left(philips_result):
    segments = _by_key(philips_result)
    volume = philips_result.volume
    left_x = _centroid(volume, segments["lung_left"].mask)[0]
    right_x = _centroid(volume, segments["lung_right"].mask)[0]
    assert left_x > right_x + 100  # LPS: +x is the patient's left; lungs ~15 cm apart


def _reoriented_copy(tmp_path: Path, flip_rows: bool, flip_columns: bool, position: str):
    """The Philips series with its pixels flipped and IOP/IPP changed to match.

    Every voxel keeps its patient coordinates; the slices are numbered in reverse.
    """
    paths = []
    for index, source in enumerate(_files(PHILIPS_HFS)):
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        row_cos = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_cos = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        if flip_columns:
            pixels = pixels[:, ::-1]
            ipp = ipp + (ds.Columns - 1) * dx * row_cos
            row_cos = -row_cos
        if flip_rows:
            pixels = pixels[::-1, :]
            ipp = ipp + (ds.Rows - 1) * dy * col_cos
            col_cos = -col_cos
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:g}" for v in (*row_cos, *col_cos)]
        ds.PatientPosition = position
        ds.InstanceNumber = 1000 - int(ds.InstanceNumber)
        path = tmp_path / f"{index:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("flip_rows", "flip_columns", "position"),
    [(False, True, "FFS"), (True, False, "HFP")],
    ids=["feet-first-mirrored", "upside-down"],
)
def test_reoriented_series_keep_patient_laterality(
    tmp_path, philips_result, flip_rows, flip_columns, position
):
    volume = load_series(_reoriented_copy(tmp_path, flip_rows, flip_columns, position))
    assert volume.direction[2, 2] == pytest.approx(-1.0)  # slices now run head to feet
    result = CtChestPipeline(CPU, airways_segment=True).run(volume)
    original, flipped = _by_key(philips_result), _by_key(result)
    for key in ("body", "lung_left", "lung_right", "airways"):
        assert flipped[key].volume_ml == pytest.approx(original[key].volume_ml, rel=0.01), key
        assert flipped[key].mean_hu == pytest.approx(original[key].mean_hu, abs=5), key
        before = _centroid(philips_result.volume, original[key].mask)
        after = _centroid(volume, flipped[key].mask)
        np.testing.assert_allclose(after, before, atol=2.0, err_msg=key)


def test_feet_first_ge_lung_bases():
    volume = load_series(_files(GE_FFS))
    result = CtChestPipeline(CPU, airways_segment=True).run(volume)
    segments = _by_key(result)
    assert list(segments) == ["body", "lung_left", "lung_right"]  # no trachea in view
    assert [g.key for g in result.groups] == ["lungs"]
    left_x = _centroid(volume, segments["lung_left"].mask)[0]
    right_x = _centroid(volume, segments["lung_right"].mask)[0]
    assert left_x > right_x + 100
    for key in ("lung_left", "lung_right"):
        assert 5 < segments[key].volume_ml < 100, key  # 3 mm of lung bases
        assert -900 < segments[key].mean_hu < -600, key


def _synthetic_volume(hu: np.ndarray, direction: np.ndarray | None = None) -> Volume:
    return Volume(
        hu=hu.astype(np.float32),
        spacing=(5.0, 1.0, 1.0),
        origin=np.zeros(3),
        direction=np.eye(3) if direction is None else direction,
        datasets=(),
    )


def _synthetic_chest(right_lung_hu: float = -850.0) -> Volume:
    """A box body, two block lungs and a 2 x 2 cm trachea over the top 70 mm.

    A bronchus joins the trachea's lower end to the right lung; the upper fifth
    of the left lung is emphysema-like (-980 HU).
    """
    hu = np.full((24, 96, 128), -1000.0)
    hu[:, 8:88, 8:120] = 40.0
    hu[2:18, 20:76, 16:56] = right_lung_hu  # columns run to the patient's left
    hu[2:18, 20:76, 72:112] = -850.0
    hu[2:18, 20:31, 72:112] = -980.0
    hu[10:24, 40:50, 59:69] = -1000.0  # trachea
    hu[10, 40:50, 40:64] = -1000.0  # right main bronchus
    return _synthetic_volume(hu)


def _synthetic_airways(volume: Volume) -> np.ndarray:
    """The trachea and bronchus of :func:`_synthetic_chest`, with the bronchus's
    2 mm rim where it runs inside the lung (elsewhere the rim is tissue)."""
    airways = np.zeros(volume.hu.shape, dtype=bool)
    airways[10:24, 40:50, 59:69] = True
    airways[10, 38:52, 38:66] = True
    return airways & (volume.hu < -400)


def test_airways_are_opt_in_and_grown_from_the_top():
    volume = _synthetic_chest()
    default = _by_key(CtChestPipeline(CPU).run(volume))
    segments = _by_key(CtChestPipeline(CPU, airways_segment=True).run(volume))
    assert list(default) == ["body", "lung_left", "lung_right"]
    np.testing.assert_array_equal(segments["airways"].mask, _synthetic_airways(volume))
    for key in ("lung_left", "lung_right"):
        np.testing.assert_array_equal(segments[key].mask, default[key].mask)
        assert not (segments[key].mask & segments["airways"].mask).any()


def test_airway_growth_stops_before_leaking_into_dark_lung():
    """A right lung at -930 HU joins the airways at the -920 HU step: that step is refused."""
    volume = _synthetic_chest(right_lung_hu=-930.0)
    segments = _by_key(CtChestPipeline(CPU, airways_segment=True).run(volume))
    np.testing.assert_array_equal(segments["airways"].mask, _synthetic_airways(volume))
    assert segments["lung_right"].volume_ml == pytest.approx((16 * 56 * 40 - 14 * 18) * 0.005)


def test_the_whole_volume_is_let_go_before_the_body_is_labelled(monkeypatch):
    """Given the only reference (as the worker passes it), ct-chest cuts out the tissue's
    rows and columns and frees the whole array before it labels the body."""
    volumes = [_synthetic_chest()]
    whole = weakref.ref(volumes[0].hu)
    pipeline = CtChestPipeline(CPU)
    crop, infer = pipeline.crop, pipeline.infer
    seen = []

    def cropping(located):
        gc.collect()
        seen.append(("crop", whole() is None, located.hu.base is None))
        return crop(located)

    def watching(prepared):
        hu = prepared.cropped.hu
        seen.append(("infer", hu.dtype == np.int16, hu.base is None))
        return infer(prepared)

    monkeypatch.setattr(pipeline, "crop", cropping)
    monkeypatch.setattr(pipeline, "infer", watching)
    result = pipeline.run(volumes.pop())
    assert seen == [("crop", True, True), ("infer", True, True)]
    assert result.volume.hu.strides == (0, 0, 0)  # geometry and headers only
    assert _by_key(result)["lung_left"].volume_ml > 0


def test_integer_hu_are_kept_as_int16_and_others_as_float32():
    integers = np.array([[[-1024.0, 0.0], [40.0, 3071.0]]], dtype=np.float32)
    kept = compact_hu(integers[:, :, ::-1])  # a view, as the crop is
    assert kept.dtype == np.int16 and kept.flags.c_contiguous
    np.testing.assert_array_equal(kept, integers[:, :, ::-1])
    for values in ([[[-1024.0, 0.5]]], [[[40000.0, 0.0]]], [[[np.nan, 0.0]]]):
        other = compact_hu(np.array(values, dtype=np.float32))
        assert other.dtype == np.float32
        np.testing.assert_array_equal(other, np.array(values, dtype=np.float32))


def test_half_integer_hu_give_the_same_result_as_before():
    """A series whose HU have fractions (Rescale Slope 0.5) is analysed on float32 values."""
    volume = _synthetic_chest()
    halves = dataclasses.replace(volume, hu=volume.hu + np.float32(0.5))
    prepared = CtChestPipeline(CPU).preprocess(halves)
    assert prepared.cropped.hu.dtype == np.float32
    lungs = _by_key(CtChestPipeline(CPU).run(halves))
    assert lungs["lung_left"].mean_hu == pytest.approx(
        _by_key(CtChestPipeline(CPU).run(volume))["lung_left"].mean_hu + 0.5
    )


def test_densitometry_of_synthetic_lungs():
    result = CtChestPipeline(CPU).run(_synthetic_chest())
    left = _by_key(result)["lung_left"]
    laa, perc15 = (m.value for m in left.measurements)
    assert laa == pytest.approx(100 * 11 / 56)
    assert perc15 == -980.0  # 19.6 % of the voxels at -980 HU
    assert left.mean_hu == pytest.approx((11 * -980 + 45 * -850) / 56)
    volume, mean, laa_total, perc15_total = (m.value for m in result.groups[0].measurements)
    left_and_right = 2 * 16 * 56 * 40 - 14 * 18  # less bronchus and rim in the right lung
    assert volume == pytest.approx(left_and_right * 0.005)
    assert laa_total == pytest.approx(100 * 16 * 11 * 40 / left_and_right)
    assert perc15_total == -850.0


def test_gas_is_passed_over_for_a_smaller_lung_like_region():
    """Bowel gas (air, about -1000 HU) beside a smaller lung base (about -850 HU)."""
    hu = np.full((12, 40, 40), 40.0)
    gas = np.zeros(hu.shape, dtype=bool)
    gas[:, 2:20, 2:20] = True  # 3888 voxels
    lung = np.zeros(hu.shape, dtype=bool)
    lung[4:, 25:38, 25:38] = True  # 1352 voxels
    hu[gas] = -1000.0
    hu[lung] = -850.0
    hu[4:6, 25:30, 25:30] = -960.0  # some emphysema: still lung
    picked = largest_lung(gas | lung, hu, "left")
    assert np.array_equal(picked, lung)
    hu[lung] = -990.0  # nothing lung-like: the largest region, as before
    assert np.array_equal(largest_lung(gas | lung, hu, "left"), gas)
    assert not largest_lung(np.zeros(hu.shape, dtype=bool), hu, "left").any()


def test_air_only_volume_has_no_body():
    with pytest.raises(AnalysisError, match="no body found"):
        CtChestPipeline(CPU).run(_synthetic_volume(np.full((4, 64, 64), -1000.0)))


def test_body_without_lungs_is_an_error():
    hu = np.full((4, 64, 64), -1000.0)
    hu[:, 10:54, 10:54] = 40.0  # a water phantom: no lung
    with pytest.raises(AnalysisError, match="lung_left"):
        CtChestPipeline(CPU).run(_synthetic_volume(hu))


def test_sagittal_slices_are_refused():
    sagittal = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])
    with pytest.raises(AnalysisError, match="axial"):
        CtChestPipeline(CPU).run(_synthetic_volume(np.zeros((4, 8, 8)), sagittal))


def test_build_pipeline():
    pipeline = build_pipeline("ct-chest", CPU)
    assert isinstance(pipeline, CtChestPipeline)
    assert pipeline.device == CPU
    assert PIPELINE_NAMES == ("ct-chest",)
    with pytest.raises(ValueError, match="unknown pipeline 'mr-brain'; known pipelines: ct-chest"):
        build_pipeline("mr-brain", CPU)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="cuda"):
            select_device("cuda")
    with pytest.raises(ValueError, match="'tpu'"):
        select_device("tpu")


# The helpers below work slab by slab or in bounding boxes for speed; each must give
# exactly what the plain whole-volume (or slice-by-slice) computation gives.


def _box_dilate_reference(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    """Box dilation by brute force: OR of every shift (outside the array is background)."""
    padded = np.pad(mask, [(r, r) for r in radius])
    out = np.zeros_like(mask)
    n0, n1, n2 = mask.shape
    for a in range(2 * radius[0] + 1):
        for b in range(2 * radius[1] + 1):
            for c in range(2 * radius[2] + 1):
                out |= padded[a : a + n0, b : b + n1, c : c + n2]
    return out


@pytest.mark.parametrize("radius", [(0, 1, 1), (2, 1, 0), (3, 2, 2), (1, 0, 3)])
def test_slabbed_morphology_equals_whole_volume(monkeypatch, radius):
    monkeypatch.setattr(grid, "SLAB_VOXELS", 200)  # many thin slabs: halos matter
    mask = np.random.default_rng(7).random((23, 11, 13)) > 0.6
    tensor = torch.from_numpy(mask)
    dilated = _box_dilate_reference(mask, radius)
    eroded = ~_box_dilate_reference(~mask, radius)
    assert np.array_equal(morphology.dilate(tensor, radius).numpy(), dilated)
    assert np.array_equal(morphology.erode(tensor, radius).numpy(), eroded)
    opened = morphology.opening(tensor, radius).numpy()
    assert np.array_equal(opened, _box_dilate_reference(eroded, radius) & mask)


def test_fill_holes_and_slice_labels_equal_slice_by_slice(monkeypatch):
    monkeypatch.setattr(grid, "SLAB_VOXELS", 300)
    rng = np.random.default_rng(3)
    mask = rng.random((9, 20, 17)) > 0.45
    mask[:, 4:15, 3:14] |= True
    mask[:, 7:11, 6:10] = rng.random((9, 4, 4)) > 0.7  # holes, some of them open
    mask[2] = False
    expected = np.stack(
        [sitk.GetArrayFromImage(sitk.BinaryFillhole(morphology.image(m))) > 0 for m in mask]
    )
    assert np.array_equal(morphology.fill_holes_per_slice(mask), expected)
    for slab, labels, sizes in morphology.label_slices(mask):
        for k in range(slab.start, slab.stop):
            per_slice = sitk.GetArrayFromImage(sitk.ConnectedComponent(morphology.image(mask[k])))
            got = labels[k - slab.start]
            assert np.array_equal(got > 0, mask[k])
            pairs = np.unique(np.stack([got[mask[k]], per_slice[mask[k]]]), axis=1)
            assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
        assert list(sizes) == sorted(sizes, reverse=True)
        assert np.array_equal(np.bincount(labels.ravel())[1:], sizes)


def test_parts_and_largest_component_equal_whole_volume_labelling():
    rng = np.random.default_rng(5)
    mask = np.zeros((30, 40, 50), dtype=bool)
    mask[3:27, 5:35, 4:46] = rng.random((24, 30, 42)) > 0.55
    labels, sizes = morphology.components(mask)
    expected = [np.argwhere(labels == n) for n in range(1, len(sizes)) if sizes[n] >= 5]
    found = morphology.parts(mask, 5)
    assert len(found) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(found, expected, strict=True))
    largest = labels == int(np.argmax(sizes[1:])) + 1
    assert np.array_equal(morphology.largest_component(mask), largest)
    assert not morphology.largest_component(np.zeros((3, 4, 5), dtype=bool)).any()


def test_component_sizes_label_the_whole_after_many_fills(monkeypatch):
    """Past MAX_FILLS separate components, the seeds left are counted from one labelling."""
    rng = np.random.default_rng(9)
    mask = rng.random((12, 20, 24)) > 0.7  # many small components
    labels, sizes = morphology.components(mask)
    seeds = [tuple(int(v) for v in point) for point in np.argwhere(mask)[::7]]
    expected = [int(sizes[labels[seed]]) for seed in seeds]
    labelled = []
    monkeypatch.setattr(morphology, "MAX_FILLS", 3)
    monkeypatch.setattr(
        morphology, "components", lambda m: labelled.append(m.shape) or (labels, sizes)
    )
    assert morphology.component_sizes(mask, seeds) == expected
    assert labelled == [mask.shape]


def test_component_sizes_equal_whole_volume_labelling():
    rng = np.random.default_rng(8)
    mask = rng.random((20, 30, 40)) > 0.6
    labels, sizes = morphology.components(mask)
    seeds = [tuple(int(v) for v in rng.integers(0, mask.shape)) for _ in range(300)]
    expected = [int(sizes[labels[seed]]) if mask[seed] else 0 for seed in seeds]
    assert morphology.component_sizes(mask, seeds) == expected
    assert len(set(expected)) > 5  # several components met, and seeds outside the mask
    assert morphology.component_sizes(mask.astype(np.uint8) * 2, seeds) == expected
    assert morphology.component_sizes(mask, []) == []
    assert morphology.component_sizes(np.zeros((3, 4, 5), dtype=bool), [(0, 0, 0)]) == [0]


PEAK_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from dicom_node.analysis import morphology

def status(key):
    text = Path("/proc/self/status").read_text()
    return int(text.split(key + ":")[1].split()[0]) * 1024

mask = np.zeros((100, 512, 512), dtype=bool)  # 25 MiB
mask[10:90, 20:490, 30:480] = True
mask[:, 256] = False  # two components
seeds = [(50, 60, 60), (50, 400, 60), (50, 61, 60)]
call = {"fill": lambda: morphology.component_sizes(mask, seeds),
        "label": lambda: morphology.components(mask)}[sys.argv[1]]
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
result = call()
print(result if sys.argv[1] == "fill" else "-", (status("VmHWM") - before) / mask.nbytes)
"""


@pytest.mark.parametrize("how", ["fill", "label"])
def test_component_sizes_need_less_memory_than_labelling(how):
    """The solid tissue's components in the nodule search: labelling the whole of it
    held about 6 bytes per voxel at its peak, a flood fill holds 3.5 (SimpleITK's own
    memory, which tracemalloc does not see: the peak RSS of a fresh process)."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, how], capture_output=True, text=True, check=True
    )
    printed, per_voxel = done.stdout.rsplit(maxsplit=1)
    print(f"{how}: {float(per_voxel):.2f} bytes per voxel at the peak")
    if how == "label":
        assert float(per_voxel) > 5, "the labelling that this replaced"
        return
    top, bottom = 80 * 236 * 450, 80 * 233 * 450  # rows 20-255 and 257-489
    assert printed == str([top, bottom, top])
    assert float(per_voxel) < 4  # the image, the fill and ITK's flags of visited voxels


@pytest.mark.parametrize("kernel", [(2, 2, 2), (1, 2, 2), (3, 2, 1)])
def test_pool_equals_torch_max_pool_with_ceil_mode(kernel):
    mask = np.random.default_rng(11).random((7, 9, 10)) > 0.8
    as_float = torch.from_numpy(mask).to(torch.float32)[None]
    expected = torch.nn.functional.max_pool3d(as_float, kernel, ceil_mode=True)[0] > 0
    assert np.array_equal(morphology.pool(mask, kernel), expected.numpy())


def test_postprocess_lets_each_cropped_mask_go_once_it_is_placed(monkeypatch):
    """Given the only reference to the masks (as ``run`` passes them), postprocess places
    them on the source grid one at a time and frees each cropped lung mask before the
    next mask is placed: the cropped and the placed copies of every mask were all held at
    once. (The cropped body is ``prepared.body`` as well, so it stays.)"""
    pipeline = CtChestPipeline(CPU)
    prepared = pipeline.preprocess(_synthetic_chest())
    holder = [pipeline.infer(prepared)]
    keys = ("lung_left", "lung_right")
    alive = {key: weakref.ref(getattr(holder[0], key)) for key in keys}
    place = ct_chest.sparse_zeros
    seen = []

    def placing(shape):
        gc.collect()
        seen.append(tuple(key for key in keys if alive[key]() is not None))
        return place(shape)

    monkeypatch.setattr(ct_chest, "sparse_zeros", placing)
    result = pipeline.postprocess(prepared, holder.pop())
    assert seen == [keys, keys, keys[1:]]  # placing the body, the left lung, the right lung
    expected = _by_key(CtChestPipeline(CPU).run(_synthetic_chest()))
    for key, segment in _by_key(result).items():
        assert segment.volume_ml == expected[key].volume_ml
        assert segment.mean_hu == expected[key].mean_hu
        np.testing.assert_array_equal(segment.mask, expected[key].mask)


def test_postprocess_writes_each_mask_only_within_its_own_box(monkeypatch):
    """A placed mask takes memory only where it is written (sparse_zeros): the lungs and
    the airways are written within their own bounding boxes, not the body's crop. Here
    the source grids start all True, so every voxel written shows as False."""
    pipeline = CtChestPipeline(CPU, airways_segment=True)
    expected = _by_key(CtChestPipeline(CPU, airways_segment=True).run(_synthetic_chest()))
    monkeypatch.setattr(ct_chest, "sparse_zeros", lambda shape: np.ones(shape, dtype=bool))
    result = pipeline.run(_synthetic_chest())
    for key in ("body", "lung_left", "lung_right", "airways"):
        placed, mask = _by_key(result)[key].mask, expected[key].mask
        box = grid.bounding_box(mask)
        assert box is not None
        written = np.zeros(mask.shape, dtype=bool)
        written[box] = True
        np.testing.assert_array_equal(placed[box], mask[box])
        assert placed[~written].all(), f"{key}: written outside its box"
    assert grid.bounding_box(expected["lung_left"].mask) != grid.bounding_box(expected["body"].mask)


def test_compact_hu_copies_slab_by_slab_without_a_temporary_of_the_whole():
    """64 slices of 512 x 512: the int16 copy is 32 MiB. Converting and comparing the
    whole at once added a 16 MiB comparison mask (and more) on top of it."""
    hu = np.full((64, 512, 512), -1000.0, dtype=np.float32)
    hu[:, 100:400, 120:380] = 40.0
    kept, peak = peak_of(lambda: compact_hu(hu))
    assert kept.dtype == np.int16
    np.testing.assert_array_equal(kept, hu)
    assert peak - kept.nbytes < 8 * 2**20, f"{(peak - kept.nbytes) / 2**20:.1f} MiB on top"


def test_the_tissue_rows_and_columns_are_the_same_slab_by_slab(monkeypatch):
    monkeypatch.setattr(grid, "SLAB_VOXELS", 50)  # a slab of one slice
    rng = np.random.default_rng(11)
    hu = np.full((7, 9, 12), -1000.0, dtype=np.float32)
    hu[
        tuple(rng.integers(0, 7, 3)), tuple(rng.integers(2, 8, 3)), tuple(rng.integers(0, 12, 3))
    ] = 40.0
    rows, columns = ct_chest._tissue_rows_and_columns(hu)
    np.testing.assert_array_equal(rows, (hu > ct_chest.BODY_MIN_HU).any(axis=(0, 2)))
    np.testing.assert_array_equal(columns, (hu > ct_chest.BODY_MIN_HU).any(axis=(0, 1)))
    assert rows.any() and not rows.all()
