"""load_series on real scanner data: geometry, HU, decoding and bad input."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import SHARED_REAL
from traced import peak_of

from dicom_node.analysis.volume import load_series

REAL = SHARED_REAL
PHILIPS_HFS = REAL / "lung-pet-ct-dx-A0001" / "series2_5mm_kernelL"
GE_FFS = REAL / "dcmqi-ct-3slice" / "dicom"
SIEMENS_J2K = REAL / "totalseg-example-ct-dicom" / "dicom"
PATIENT_DATA = ("JANCT000", "99000")  # GE PatientName / PatientID: never in a message


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".txt"))


@pytest.fixture(scope="module")
def philips():
    return load_series(_files(PHILIPS_HFS))


def test_head_first_geometry(philips):
    assert philips.hu.shape == (64, 512, 512)
    assert philips.hu.dtype == np.float32
    assert philips.spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
    np.testing.assert_allclose(philips.direction, np.eye(3), atol=1e-9)
    z = [float(ds.ImagePositionPatient[2]) for ds in philips.datasets]
    assert z == sorted(z) and z[0] == pytest.approx(-439.0) and z[-1] == pytest.approx(-124.0)
    np.testing.assert_allclose(
        philips.origin, [float(v) for v in philips.datasets[0].ImagePositionPatient]
    )


def test_voxel_to_patient_matches_every_slice_position(philips):
    index = np.array([[k, 0, 0] for k in range(len(philips.datasets))])
    expected = [[float(v) for v in ds.ImagePositionPatient] for ds in philips.datasets]
    np.testing.assert_allclose(philips.voxel_to_patient(index), expected, atol=1e-6)
    # one step along the column index moves along the row cosine (+x here)
    step = philips.voxel_to_patient(np.array([[0, 0, 1], [0, 1, 0]])) - philips.origin
    np.testing.assert_allclose(step, [[0.841796875, 0, 0], [0, 0.841796875, 0]], atol=1e-9)


def test_hounsfield_units_are_plausible(philips):
    corner = philips.hu[:, :40, :40]  # air outside the patient
    assert -1100 < float(np.median(corner)) < -900
    assert philips.hu.min() >= -1024
    assert 1000 < philips.hu.max() < 4000  # bone / contrast, not raw stored values


def test_headers_keep_uids_but_drop_pixel_data(philips):
    sop_uids = {ds.SOPInstanceUID for ds in philips.datasets}
    assert len(sop_uids) == 64
    assert all("PixelData" not in ds for ds in philips.datasets)


def test_only_a_slice_of_stored_pixels_is_held_at_a_time():
    """The pixel data is read slice by slice as it is converted (deferred reads), so
    loading takes the volume's memory, not the volume's and the series' stored pixels."""
    files = _files(PHILIPS_HFS)
    stored = sum(path.stat().st_size for path in files)  # 64 x 513 KiB, uncompressed
    volume, peak = peak_of(lambda: load_series(files))
    assert peak - volume.hu.nbytes < stored / 4, f"{(peak - volume.hu.nbytes) / 2**20:.0f} MiB"


def test_feet_first_signed_series_is_order_independent():
    files = _files(GE_FFS)
    shuffled = files[:]
    random.Random(7).shuffle(shuffled)
    if shuffled == files:
        shuffled.reverse()
    reference, other = load_series(files), load_series(shuffled)
    assert reference.datasets[0].PatientPosition == "FFS"
    np.testing.assert_array_equal(reference.hu, other.hu)
    np.testing.assert_allclose(reference.origin, other.origin)
    assert [ds.SOPInstanceUID for ds in reference.datasets] == [
        ds.SOPInstanceUID for ds in other.datasets
    ]
    assert reference.spacing == pytest.approx((1.0, 0.810547, 0.810547), abs=1e-6)
    z = [float(ds.ImagePositionPatient[2]) for ds in reference.datasets]
    assert z == sorted(z)
    assert reference.hu.min() == -3024  # signed padding value survives the rescale


def test_jpeg2000_series_without_uids_decodes():
    volume = load_series(_files(SIEMENS_J2K))
    assert volume.datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert volume.datasets[0].SOPInstanceUID == ""  # the dataset's quirk: blank UIDs
    assert volume.hu.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    centre = volume.hu[:, 200:312, 200:312]  # abdomen: soft tissue around 0..100 HU
    assert -100 < float(np.median(centre)) < 150
    assert -1100 < float(np.median(volume.hu[:, :30, :30])) < -900


def _write_variant(tmp_path: Path, change) -> list[Path]:
    """Copies of the GE series with ``change(index, dataset)`` applied."""
    paths = []
    for index, source in enumerate(_files(GE_FFS)):
        ds = pydicom.dcmread(source)
        change(index, ds)
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def _set_first(keyword, value):
    def change(index, ds):
        if index == 0:
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set_first("ImagePositionPatient", None), "ImagePositionPatient missing"),
        (_set_first("ImageOrientationPatient", None), "ImageOrientationPatient missing"),
        (_set_first("ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), "mixed orientations"),
        (_set_first("Rows", 256), "inconsistent Rows/Columns"),
        (_set_first("ImagePositionPatient", [-235.199997, -226.800003, -127.690002]), "duplicate"),
        (_set_first("PixelSpacing", None), "PixelSpacing"),
    ],
    ids=["no-ipp", "no-iop", "mixed-iop", "rows", "duplicate", "no-spacing"],
)
def test_bad_series_raise_clear_errors(tmp_path, change, message):
    paths = _write_variant(tmp_path, change)
    with pytest.raises(ValueError, match=message) as caught:
        load_series(paths)
    assert not any(secret in str(caught.value) for secret in PATIENT_DATA)


def test_fewer_than_two_slices(tmp_path):
    with pytest.raises(ValueError, match="at least 2 slices, got 1"):
        load_series(_files(GE_FFS)[:1])
