"""Routing rules and the skip logic (what each pipeline accepts), on plain datasets."""

from __future__ import annotations

from pathlib import Path

from model_packages import base_spec, bright_region_spec, write_package
from pydicom import Dataset

from dicom_node.config import parse_config
from dicom_node.route import (
    ANY_IMAGE,
    VOLUME,
    PreviousJob,
    SeriesInfo,
    explain,
    pipeline_needs,
    plan_jobs,
    rule_matches,
    skip_reason,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def header(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.SOPClassUID = CT_IMAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SeriesDescription = "Chest 5mm"
    ds.SliceThickness = "5.0"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def routes(*rules: dict) -> list:
    config = parse_config(
        {
            "node": {"ae_title": "N"},
            "destinations": {"pacs": {"ae_title": "P", "host": "h", "port": 104}},
            "routes": [
                {"name": f"r{i}", "pipeline": "ct-chest", "send_to": ["pacs"], **rule}
                for i, rule in enumerate(rules)
            ],
        }
    )
    return config.routes


def test_equals_list_and_operators() -> None:
    (r,) = routes({"when": {"Modality": "CT", "SliceThickness": 5}})
    assert rule_matches(r.when, header())
    assert not rule_matches(r.when, header(Modality="MR"))
    (r,) = routes({"when": {"Modality": ["MR", "CT"]}})
    assert rule_matches(r.when, header())
    (r,) = routes({"when": {"ImageType": "AXIAL"}})  # multi-valued: any value
    assert rule_matches(r.when, header())
    (r,) = routes({"when": {"SeriesDescription": {"contains": "CHEST"}}})
    assert rule_matches(r.when, header())
    assert not rule_matches(r.when, header(SeriesDescription="Abdomen"))
    (r,) = routes({"when": {"SeriesDescription": {"regex": r"^Chest \d+mm$"}}})
    assert rule_matches(r.when, header())
    (r,) = routes({"when": {"Modality": {"not": ["MR", "PT"]}}})
    assert rule_matches(r.when, header())
    assert not rule_matches(r.when, header(Modality="PT"))
    (r,) = routes({"when": {"BodyPartExamined": {"present": False}}})
    assert rule_matches(r.when, header())
    assert not rule_matches(r.when, header(BodyPartExamined="CHEST"))


def test_missing_attribute_does_not_match_equals() -> None:
    (r,) = routes({"when": {"BodyPartExamined": "CHEST"}})
    assert not rule_matches(r.when, header())


def test_skip_reasons() -> None:
    assert skip_reason(header(), 64) is None
    assert "localizer" in skip_reason(header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), 2)
    assert "secondary capture" in skip_reason(header(SOPClassUID=SECONDARY_CAPTURE), 1)
    assert "not an image series" in skip_reason(header(Modality="SR"), 1)
    assert "dose" in skip_reason(header(SeriesDescription="Dose Report"), 1)
    sagittal = header(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    assert "not axial" in skip_reason(sagittal, 64)
    assert "too few slices" in skip_reason(header(), 2)
    assert "multi-frame" in skip_reason(header(NumberOfFrames=100), 1)


def test_plan_skips_unanalysable_and_unchanged_series() -> None:
    rules = routes(
        {"when": {"Modality": "CT"}}, {"when": {"SeriesDescription": {"contains": "lung"}}}
    )
    series = [
        SeriesInfo(1, header(), 64),
        SeriesInfo(2, header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), 2),
        SeriesInfo(3, header(Modality="MR"), 30),
        SeriesInfo(4, header(SeriesDescription="lung 1mm"), 300),
    ]
    planned = plan_jobs(rules, series, previous=[PreviousJob(4, "r0", 300)])
    assert [(p.series_id, p.route) for p in planned] == [(1, "r0"), (4, "r1")]
    assert planned[0].send_to == ("pacs",)
    assert planned[0].instance_count == 64
    # a series that grew since its last job is planned again
    again = plan_jobs(rules[:1], [SeriesInfo(1, header(), 65)], [PreviousJob(1, "r0", 64)])
    assert [(p.series_id, p.instance_count) for p in again] == [(1, 65)]


# -- what each pipeline accepts -------------------------------------------------------------


def radiograph(**attrs: object) -> Dataset:
    """A DX header: no Image Plane geometry, as projection radiographs have none."""
    ds = header(**{"Modality": "DX", "SOPClassUID": DX_IMAGE, "ImageType": ["ORIGINAL"], **attrs})
    del ds.ImageOrientationPatient
    return ds


def package_routes(models: Path) -> list:
    """Routes to ct-chest and to three packages, all matching every series; weights are
    stand-ins (routing reads model.yaml only)."""
    volume_3d = base_spec("lungs-3d", accepts={"modalities": ["CT"], "min_slices": 1})
    reoriented = base_spec("any-plane", input={"orientation": "LPS"})
    for spec in (bright_region_spec("dx-2d"), volume_3d, reoriented):
        (write_package(models, spec) / "model.pt").write_bytes(b"stand-in")
    config = parse_config(
        {
            "node": {"ae_title": "N"},
            "destinations": {"pacs": {"ae_title": "P", "host": "h", "port": 104}},
            "routes": [
                {"name": name, "pipeline": name, "send_to": ["pacs"]}
                for name in ("ct-chest", "dx-2d", "lungs-3d", "any-plane")
            ],
            "analysis": {"models_path": str(models)},
        }
    )
    return config.routes


def planned_routes(routes: list, ds: Dataset, count: int, models: Path | None) -> list[str]:
    return [job.route for job in plan_jobs(routes, [SeriesInfo(1, ds, count)], [], models)]


def test_each_pipeline_gets_the_series_it_accepts(tmp_path: Path) -> None:
    models = tmp_path / "models"
    rules = package_routes(models)
    # a single radiograph: only the 2-D package (ct-chest needs geometry, the others CT)
    assert planned_routes(rules, radiograph(), 1, models) == ["dx-2d"]
    assert "no ImageOrientationPatient" in skip_reason(radiograph(), 1, VOLUME)
    # the 2-D package declares max_slices 1 and modalities [DX]
    assert planned_routes(rules, radiograph(), 2, models) == []
    assert planned_routes(rules, header(), 64, models) == ["ct-chest", "lungs-3d", "any-plane"]
    # two axial CT slices: too few for ct-chest, enough for a 3-D package (two at least)
    assert planned_routes(rules, header(), 2, models) == ["lungs-3d", "any-plane"]
    assert planned_routes(rules, header(), 1, models) == []
    # sagittal: only the package that reorients its input
    sagittal = header(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    assert planned_routes(rules, sagittal, 64, models) == ["any-plane"]
    # shared checks hold for every pipeline
    localizer = radiograph(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert planned_routes(rules, localizer, 1, models) == []


def test_needs_come_from_model_yaml(tmp_path: Path) -> None:
    models = tmp_path / "models"
    package_routes(models)
    assert pipeline_needs("ct-chest", models) == VOLUME
    dx = pipeline_needs("dx-2d", models)
    assert (dx.geometry, dx.axial, dx.min_slices, dx.max_slices) == (False, False, 1, 1)
    assert dx.modalities == ("DX",)
    assert "not one the pipeline accepts" in skip_reason(header(), 1, dx)
    assert "too many images" in skip_reason(radiograph(), 3, dx)
    assert pipeline_needs("lungs-3d", models).min_slices == 2  # a volume has two at least
    # without models_path (or for a package that is not there) only the shared checks
    assert pipeline_needs("dx-2d", None) == ANY_IMAGE
    assert pipeline_needs("missing", models) == ANY_IMAGE
    assert skip_reason(radiograph(), 1, ANY_IMAGE) is None


def test_explain_names_the_route_whose_pipeline_refuses(tmp_path: Path) -> None:
    models = tmp_path / "models"
    rules = package_routes(models)
    result = explain(rules, header(), 2, models)
    assert result.jobs == ("lungs-3d", "any-plane")
    assert result.skip == "route ct-chest: too few slices for a volume (2 < 3); " + (
        "route dx-2d: Modality CT is not one the pipeline accepts ['DX']"
    )
    localizer = explain(rules, header(ImageType=["LOCALIZER"]), 64, models)
    assert localizer.jobs == () and localizer.skip == "localizer/scout image"


def test_ct_chest_does_not_measure_lossy_compressed_images_but_packages_may() -> None:
    """%LAA-950 of a lung: 1.66 % lossless, 1.91 % off 12-bit and 4.62 % off 8-bit JPEG,
    sent on with nothing to say so."""
    from pydicom.dataset import FileMetaDataset

    marked = header(LossyImageCompression="01")
    assert skip_reason(marked, 64) == (
        "lossy-compressed images (Lossy Image Compression 01; the pipeline measures densities)"
    )
    baseline = header()
    baseline.file_meta = FileMetaDataset()
    baseline.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    assert "JPEG Baseline (Process 1)" in str(skip_reason(baseline, 64))
    for lossless in ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"):
        baseline.file_meta.TransferSyntaxUID = lossless
        assert skip_reason(baseline, 64) is None
    assert skip_reason(header(LossyImageCompression="00"), 64) is None
    assert skip_reason(marked, 64, ANY_IMAGE) is None  # a package's own call
