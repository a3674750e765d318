"""Routing rules and the skip logic, on plain datasets."""

from __future__ import annotations

from pydicom import Dataset

from dicom_node.config import parse_config
from dicom_node.route import PreviousJob, SeriesInfo, plan_jobs, rule_matches, skip_reason

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
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
