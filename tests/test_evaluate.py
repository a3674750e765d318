"""``dicom-node evaluate``: references on the CT grid, Dice and volumes, the command.

NIfTI references are built here from our own masks and written by SimpleITK (RAS on
disk) with the voxel order reversed along every axis, so that only a resampling in
physical space can bring them back onto the CT; the real TotalSegmentator label map
of the Siemens series checks the same against a file written by another tool.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from peers import GE_3SLICE, PHILIPS_L, SHARED_REAL, dicom_files, patch_siemens_copy
from pydicom.uid import generate_uid

from dicom_node.analysis.device import select_device
from dicom_node.analysis.pipelines import build_pipeline
from dicom_node.analysis.reference import (
    InvalidReference,
    read_reference,
    seg_by_position,
)
from dicom_node.analysis.types import AnalysisResult, Volume
from dicom_node.analysis.volume import load_series
from dicom_node.encode.seg import build_seg
from dicom_node.encode.types import Equipment, ResultUIDs
from dicom_node.evaluate import (
    EvaluationError,
    evaluate_result,
    find_references,
    find_series,
    parse_label_spec,
    resolve_labels,
)
from dicom_node.evaluate_report import CSV_COLUMNS

TOTALSEG = SHARED_REAL / "totalseg-example-ct-dicom" / "reference" / "example_seg_dicom.nii.gz"
DCMQI_SEG = SHARED_REAL / "dcmqi-ct-3slice" / "seg"
CODES = {"body": 1, "lung_left": 2, "lung_right": 3}
OWN_LABELS = "body=1,2,3,lung_left=2,lung_right=3"  # the lungs lie inside the body


@pytest.fixture(scope="module")
def ge_result() -> AnalysisResult:
    volume = load_series(dicom_files(GE_3SLICE))
    return build_pipeline("ct-chest", select_device("cpu")).run(volume)


def _masks(result: AnalysisResult) -> dict[str, np.ndarray]:
    return {segment.key: segment.mask for segment in result.segments}


def write_reversed_nifti(volume: Volume, labels: np.ndarray, path: Path) -> Path:
    """``labels`` (CT voxel order) as a NIfTI whose i, j and k run the other way."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels[::-1, ::-1, ::-1]))
    shape = np.array(labels.shape[::-1]) - 1  # ITK order: columns, rows, slices
    steps = volume.direction * np.array(volume.spacing[::-1])  # column per ITK axis
    image.SetOrigin((volume.origin + steps @ shape).tolist())
    image.SetSpacing(volume.spacing[::-1])
    image.SetDirection((-volume.direction).flatten().tolist())
    sitk.WriteImage(image, str(path))
    return path


def _label_image(result: AnalysisResult) -> np.ndarray:
    labels = np.zeros(result.volume.hu.shape, dtype=np.uint8)
    for key, mask in _masks(result).items():
        labels[mask] = CODES[key]
    return labels


def _scores(result, reference, labels: str | None = OWN_LABELS):
    spec = parse_label_spec(labels) if labels else None
    return {s.key: s for s in evaluate_result(result, reference, spec).scores}


# -- (1) NIfTI built from our own output ------------------------------------------------------


def test_nifti_from_own_masks_gives_dice_one(ge_result, tmp_path):
    path = write_reversed_nifti(ge_result.volume, _label_image(ge_result), tmp_path / "ref.nii.gz")
    assert np.allclose(np.diag(np.reshape(sitk.ReadImage(str(path)).GetDirection(), (3, 3))), -1)
    reference = read_reference(path, ge_result.volume)
    assert reference.coverage == 1.0
    scores = _scores(ge_result, reference)
    assert set(scores) == {"body", "lung_left", "lung_right"}
    for key, score in scores.items():
        assert score.dice == pytest.approx(1.0), key
        assert score.ours_voxels == score.reference_voxels > 0
        assert score.difference_ml == pytest.approx(0.0)
        assert score.ours_ml == pytest.approx(_masks(ge_result)[key].sum() * 0.810547**2 / 1000)


def test_eroded_reference_lowers_dice_and_volume(ge_result, tmp_path):
    labels = _label_image(ge_result)
    left = sitk.GetImageFromArray((labels == CODES["lung_left"]).astype(np.uint8))
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(left, [2, 2, 0])) > 0
    labels[(labels == CODES["lung_left"]) & ~eroded] = CODES["body"]
    path = write_reversed_nifti(ge_result.volume, labels, tmp_path / "eroded.nii.gz")
    scores = _scores(ge_result, read_reference(path, ge_result.volume))
    left_score = scores["lung_left"]
    assert 0.5 < left_score.dice < 0.99
    assert left_score.reference_voxels < left_score.ours_voxels
    assert left_score.difference_ml > 0 and left_score.difference_percent > 0  # ours - ref
    assert scores["lung_right"].dice == pytest.approx(1.0)
    assert scores["body"].dice == pytest.approx(1.0)


def test_reference_off_the_ct_is_refused(ge_result, tmp_path):
    far = Volume(
        hu=ge_result.volume.hu,
        spacing=ge_result.volume.spacing,
        origin=ge_result.volume.origin + np.array([0.0, 0.0, 5000.0]),
        direction=ge_result.volume.direction,
        datasets=ge_result.volume.datasets,
    )
    path = write_reversed_nifti(far, _label_image(ge_result), tmp_path / "far.nii.gz")
    with pytest.raises(InvalidReference, match="does not overlap the CT"):
        read_reference(path, ge_result.volume)


# -- (2) DICOM SEG ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_seg(ge_result, tmp_path_factory) -> Path:
    uids = ResultUIDs(generate_uid(), generate_uid(), generate_uid(), generate_uid())
    equipment = Equipment(device_serial_number="TEST-0001", device_observer_uid=generate_uid())
    path = tmp_path_factory.mktemp("seg") / "own.dcm"
    build_seg(ge_result, uids, equipment).save_as(path)
    return path


def test_seg_from_own_masks_gives_dice_one(ge_result, own_seg):
    reference = read_reference(own_seg, ge_result.volume)  # placed by source SOP instance
    assert reference.segment_labels == {1: "Body", 2: "Left lung", 3: "Right lung"}
    scores = _scores(ge_result, reference, labels=None)  # default map: by SegmentLabel
    assert [scores[k].reference_labels for k in CODES] == [(1,), (2,), (3,)]
    for key, score in scores.items():
        assert score.dice == pytest.approx(1.0), key


def test_seg_by_position_matches_by_source_instance(ge_result, own_seg):
    seg = hd.seg.segread(own_seg)
    by_position, coverage = seg_by_position(seg, ge_result.volume, [1, 2, 3])
    assert coverage == 1.0
    for number, key in enumerate(CODES, start=1):
        assert np.array_equal(by_position[number], _masks(ge_result)[key]), key


@pytest.mark.parametrize("name", ["liver.dcm", "partial_overlaps.dcm"])
def test_dcmqi_seg_is_placed_by_position(name):
    """dcmqi does not declare SpatialLocationsPreserved: frames are placed by position."""
    volume = load_series(dicom_files(GE_3SLICE))
    reference = read_reference(DCMQI_SEG / name, volume)
    seg = hd.seg.segread(DCMQI_SEG / name)
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    numbers = list(reference.segment_labels)
    frames = seg.get_pixels_by_source_instance(
        uids, segment_numbers=numbers, ignore_spatial_locations=True, skip_overlap_checks=True
    )
    for channel, number in enumerate(numbers):
        assert reference.segments[number].any()
        assert np.array_equal(reference.segments[number], frames[..., channel] > 0), number


# -- (3) the real TotalSegmentator reference --------------------------------------------------


@pytest.fixture(scope="module")
def siemens_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("siemens")
    patch_siemens_copy(folder)
    return folder


def test_totalsegmentator_label_map_lands_on_the_siemens_grid(siemens_dir):
    volume = load_series(dicom_files(siemens_dir))
    reference = read_reference(TOTALSEG, volume)
    assert reference.coverage == 1.0
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(TOTALSEG)))
    values, counts = np.unique(raw, return_counts=True)
    assert reference.labelmap is not None
    on_grid = dict(zip(*np.unique(reference.labelmap, return_counts=True), strict=True))
    assert on_grid == dict(zip(values, counts, strict=True))  # same grid: nothing lost
    assert 1 in on_grid and 5 in on_grid  # spleen, liver

    def patient_x(label: int) -> float:
        index = np.argwhere(reference.labelmap == label).mean(axis=0, keepdims=True)
        return float(volume.voxel_to_patient(index)[0, 0])

    assert patient_x(1) > 0 > patient_x(5)  # LPS: spleen on the patient's left, liver right
    mapping = resolve_labels(None, reference)  # TotalSegmentator default: lobes, trachea
    assert mapping == {"lung_left": (10, 11), "lung_right": (12, 13, 14), "airways": (16,)}
    assert not reference.mask([10, 11, 12, 13, 14]).any()  # no lung in this reference


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def test_totalsegmentator_reference_with_ct_chest(siemens_dir, tmp_path):
    """Upper abdomen, lung bases only: ct-chest may refuse; if it runs, lungs are scored."""
    out = tmp_path / "siemens.csv"
    run = cli("--pipeline", "ct-chest", siemens_dir, TOTALSEG.parent, "--csv", out)
    if run.returncode == 1:
        assert "ct-chest could not analyse it:" in run.stderr
        assert "series " in run.stderr and not out.exists()
        return
    assert run.returncode == 0, run.stderr
    rows = {row["label"]: row for row in _csv(out)}
    assert rows["lung_left"]["reference_labels"] == "10,11"
    assert rows["lung_left"]["note"] == "absent in reference"
    assert rows["lung_left"]["dice"] in ("", "0.0000")


NIFTI_PAIR = SHARED_REAL / "totalseg-example-ct-dicom" / "nifti_pair"


def nifti_ct_as_dicom(nifti: Path, folder: Path) -> Path:
    """A CT NIfTI as a DICOM series (one slice per file, geometry from the NIfTI's)."""
    ct = sitk.ReadImage(str(nifti))  # ITK: LPS origin and direction
    hu = sitk.GetArrayFromImage(ct).astype(np.int16)
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    spacing, origin = ct.GetSpacing(), np.array(ct.GetOrigin())
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(hu.shape[0]):
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "TS-EXAMPLE", "Example^CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [float(v) for v in origin + direction[:, 2] * spacing[2] * k]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = hu[k].tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def test_lung_bases_against_totalsegmentator(tmp_path):
    """TotalSegmentator's own example CT (lung bases, colon and stomach gas beside them)
    and its "total" labels: both lungs found where TotalSegmentator has them."""
    dicom_dir = nifti_ct_as_dicom(NIFTI_PAIR / "example_ct_sm.nii.gz", tmp_path / "ct")
    out = tmp_path / "lungs.csv"
    run = cli("--pipeline", "ct-chest", dicom_dir, NIFTI_PAIR / "example_seg.nii.gz", "--csv", out)
    assert run.returncode == 0, run.stderr
    rows = {row["label"]: row for row in _csv(out)}
    for key, labels in (("lung_left", "10,11"), ("lung_right", "12,13,14")):
        assert rows[key]["reference_labels"] == labels
        assert float(rows[key]["dice"]) >= 0.93, rows[key]  # 0.959 and 0.968 when written
        assert abs(float(rows[key]["difference_percent"])) <= 5.0, rows[key]
    assert "passed over 1 larger air region" in run.stderr  # the colon gas, on the left


# -- (4) the command --------------------------------------------------------------------------


def test_cli_writes_csv_and_table(ge_result, tmp_path):
    nifti = write_reversed_nifti(ge_result.volume, _label_image(ge_result), tmp_path / "r.nii")
    out = tmp_path / "out.csv"
    run = cli("--pipeline", "ct-chest", GE_3SLICE, nifti, "--csv", out, "--labels", OWN_LABELS)
    assert run.returncode == 0, run.stderr
    assert "lung_left" in run.stdout and "reference covers 100.0% of the CT grid" in run.stdout
    rows = _csv(out)
    assert [row["label"] for row in rows] == ["body", "lung_left", "lung_right"]
    series_uid = str(ge_result.volume.datasets[0].SeriesInstanceUID)
    for row in rows:
        assert row["dice"] == "1.0000"
        assert row["series_instance_uid"] == series_uid
        assert (row["pipeline"], row["pipeline_version"]) == (
            "ct-chest",
            ge_result.algorithm_version,
        )
        assert row["difference_ml"] == "+0.00"


def test_cli_bad_input_exits_2_with_a_message(ge_result, own_seg, tmp_path):
    missing = cli("--pipeline", "ct-chest", GE_3SLICE, tmp_path / "nowhere")
    assert missing.returncode == 2
    assert "nowhere: no such file or folder" in missing.stderr
    (tmp_path / "notes.txt").write_text("not a reference")
    none = cli("--pipeline", "ct-chest", GE_3SLICE, tmp_path)
    assert none.returncode == 2 and "no DICOM SEG or label map" in none.stderr
    bad_map = cli("--pipeline", "ct-chest", GE_3SLICE, own_seg, "--labels", "lung_left=Liver")
    assert bad_map.returncode == 2
    assert "no segment 'Liver'" in bad_map.stderr and "'Left lung'" in bad_map.stderr
    device = cli("--pipeline", "ct-chest", GE_3SLICE, own_seg, "--device", "tpu")
    assert device.returncode == 2 and "unknown device preference 'tpu'" in device.stderr
    # dcmqi's SEGs of the same CT hold a liver and other organs, none of ct-chest's
    liver = cli("--pipeline", "ct-chest", GE_3SLICE, DCMQI_SEG / "liver.dcm", "--device", "cpu")
    assert liver.returncode == 2, liver.stdout + liver.stderr  # was 0, every row n/a
    assert "nothing was compared: none of ct-chest's segments is in the reference" in (liver.stderr)
    assert "not in the reference" in liver.stdout


# -- label maps and discovery -----------------------------------------------------------------


def test_parse_label_spec_inline_and_file(tmp_path):
    assert parse_label_spec("lung_left=10,11,lung_right=12, 13;airways=Trachea") == {
        "lung_left": (10, 11),
        "lung_right": (12, 13),
        "airways": ("Trachea",),
    }
    path = tmp_path / "map.yaml"
    path.write_text('{"lung_left": [10, 11], "body": "Body"}')
    assert parse_label_spec(str(path)) == {"lung_left": (10, 11), "body": ("Body",)}
    with pytest.raises(EvaluationError, match="expected key=value"):
        parse_label_spec("10,11")


def test_default_seg_map_by_segment_label(own_seg, ge_result):
    reference = read_reference(own_seg, ge_result.volume)
    renamed = type(reference)(
        path=reference.path,
        coverage=1.0,
        segments=reference.segments,
        segment_labels={1: "Vertebral body", 2: "LEFT LUNG upper lobe", 3: "Trachea"},
    )
    assert resolve_labels(None, renamed) == {"lung_left": (2,), "airways": (3,)}


def test_series_grouping_and_reference_matching(tmp_path):
    series = find_series(PHILIPS_L.parent)
    assert len(series) == 2 and sorted(map(len, series.values())) == [64, 64]
    uid_l = str(
        pydicom.dcmread(dicom_files(PHILIPS_L)[0], stop_before_pixels=True).SeriesInstanceUID
    )
    (tmp_path / f"{uid_l}.nii.gz").write_bytes(b"")
    (tmp_path / "other.nii.gz").write_bytes(b"")  # not named by a series: ambiguous
    assert find_references(tmp_path, list(series)) == {uid_l: [tmp_path / f"{uid_l}.nii.gz"]}
