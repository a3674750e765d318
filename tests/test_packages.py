"""Model packages on CT: model.yaml validation, preprocessing, sliding window, TorchScript,
ONNX and MONAI-bundle weights, and the SEG + SR they give (dciodvfy on every object)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dciodvfy import dciodvfy_errors
from model_packages import (
    ANATOMY,
    LUNG,
    aerated,
    aerated_network,
    base_spec,
    example_spec,
    write_package,
)
from peers import GE_3SLICE, PHILIPS_L
from pydicom.uid import generate_uid

from dicom_node.analysis.examples import EXAMPLE_RANGES, HuRanges, build_example
from dicom_node.analysis.inference import predict_dense, sliding_window
from dicom_node.analysis.packages import InputSpec, PackageError, load_spec
from dicom_node.analysis.pipelines import build_pipeline, known_pipelines
from dicom_node.analysis.preprocess import preprocess
from dicom_node.analysis.types import AnalysisError, Volume
from dicom_node.analysis.volume import load_series
from dicom_node.config import ConfigError, parse_config
from dicom_node.encode.seg import build_seg
from dicom_node.encode.sr import build_sr
from dicom_node.encode.types import Equipment, ResultUIDs

CPU = torch.device("cpu")
EQUIPMENT = Equipment(device_serial_number="TEST-0002", device_observer_uid=generate_uid())


def _uids() -> ResultUIDs:
    return ResultUIDs(generate_uid(), generate_uid(), generate_uid(), generate_uid())


def _encode(result, folder: Path) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """SEG and SR written, dciodvfy-checked (zero errors) and read back."""
    uids = _uids()
    seg = build_seg(result, uids, EQUIPMENT)
    seg.save_as(folder / "seg.dcm")
    build_sr(result, seg, uids, EQUIPMENT).save_as(folder / "sr.dcm")
    assert dciodvfy_errors(folder / "seg.dcm") == []
    assert dciodvfy_errors(folder / "sr.dcm") == []
    return pydicom.dcmread(folder / "seg.dcm"), pydicom.dcmread(folder / "sr.dcm")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def ge_volume() -> Volume:
    return load_series(sorted(GE_3SLICE.glob("*.dcm")))


# -- model.yaml -----------------------------------------------------------------------------


def test_model_yaml_problems_name_their_key_paths(tmp_path: Path) -> None:
    spec = base_spec("broken", version="3.0.0", extra=1)
    spec["segmentation"]["labels"][0]["color"] = [300, 0, 0]
    spec["input"] = {"dimensions": 2, "spacing": [1.0, 1.0, 1.0]}
    folder = write_package(tmp_path, spec)
    with pytest.raises(PackageError) as caught:
        load_spec(folder)
    problems = caught.value.problems
    assert "extra: unknown key" in problems
    assert any(p.startswith("segmentation.labels.0.color:") and "sRGB" in p for p in problems)
    assert any(p.startswith("input:") and "spacing: 2 values expected" in p for p in problems)
    spec = base_spec("no-uid", version="3.0.0")
    with pytest.raises(PackageError, match="no Device UID for version '3.0.0'"):
        load_spec(write_package(tmp_path, spec))
    folder = write_package(tmp_path, base_spec("renamed"))
    text = (folder / "model.yaml").read_text().replace("name: renamed", "name: other-name")
    (folder / "model.yaml").write_text(text)
    with pytest.raises(PackageError, match="'other-name' differs from the folder 'renamed'"):
        load_spec(folder)
    # read as the config is: a key given twice or a file not in UTF-8 is refused
    text = (folder / "model.yaml").read_text().replace("name: other-name", "name: renamed")
    (folder / "model.yaml").write_text(f"{text}name: renamed\n")
    with pytest.raises(PackageError, match="key 'name' appears twice"):
        load_spec(folder)
    (folder / "model.yaml").write_bytes(b"# f\xfcr\n" + text.encode())
    with pytest.raises(PackageError, match="not UTF-8 text: byte 0xfc on line 1"):
        load_spec(folder)


def test_config_accepts_installed_packages_and_reports_broken_ones(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_package(models, base_spec("lungs-ok"), aerated_network())
    write_package(models, base_spec("no-weights"))
    assert known_pipelines(models) == ("ct-chest", "lungs-ok", "no-weights")

    def config(pipeline: str) -> dict:
        return {
            "node": {"ae_title": "AINODE"},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
            "routes": [{"name": "r", "pipeline": pipeline, "send_to": ["pacs"]}],
            "analysis": {"models_path": str(models)},
        }

    assert parse_config(config("lungs-ok")).routes[0].pipeline == "lungs-ok"
    with pytest.raises(ConfigError) as caught:
        parse_config(config("no-weights"))
    assert caught.value.problems == [
        f"routes.0.pipeline: package 'no-weights': model.yaml: weights 'model.pt' not found in "
        f"{models / 'no-weights'}"
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(config("nowhere"))
    assert "known: ct-chest, lungs-ok, no-weights" in caught.value.problems[0]


# -- preprocessing --------------------------------------------------------------------------


def _cube_volume() -> Volume:
    """A feet-first, mirrored grid with a bright off-centre box: flips show as misplacement."""
    hu = np.full((12, 40, 30), -1000.0, dtype=np.float32)
    hu[2:6, 5:15, 20:28] = -700.0
    direction = np.column_stack([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
    header = pydicom.Dataset()
    header.Modality = "CT"
    return Volume(hu, (2.5, 0.8, 0.7), np.array([10.0, -5.0, 30.0]), direction, (header,))


def test_preprocessing_reorients_resamples_and_maps_back_aligned() -> None:
    volume = _cube_volume()
    spec = InputSpec(orientation="RAS", spacing=[2.0, 1.6, 1.4], window=(-1000, 0))
    prepared = preprocess(volume, spec)
    assert prepared.spacing == pytest.approx((2.0, 1.6, 1.4))
    assert prepared.array.shape == (15, 20, 15)
    back = prepared.to_source((prepared.array > -850).astype(np.int32))
    assert back.shape == volume.hu.shape
    truth = volume.hu > -850
    dice = 2 * (back.astype(bool) & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.85  # resampled twice; a flip or shift would give ~0


def test_intensity_steps_follow_the_yaml() -> None:
    volume = _cube_volume()
    rng = np.random.default_rng(0)
    noisy = dataclasses.replace(volume, hu=volume.hu + rng.normal(0, 30, volume.hu.shape))
    windowed = preprocess(noisy, InputSpec(window=(-1000, -500), normalise="window")).array
    assert windowed.min() >= 0.0 and windowed.max() <= 1.0
    zscore = preprocess(noisy, InputSpec(normalise="zscore")).array
    assert abs(float(zscore.mean())) < 1e-4 and float(zscore.std()) == pytest.approx(1.0, 1e-3)
    for step in ({"filter": "Median"}, {"filter": "CurvatureFlow"}, {"filter": "DiscreteGaussian"}):
        smooth = preprocess(noisy, InputSpec.model_validate({"denoise": [step]})).array
        background = (volume.hu == -1000)[1:-1, 1:-1, 1:-1]
        assert smooth[1:-1, 1:-1, 1:-1][background].std() < 0.8 * 30, step


# -- inference ------------------------------------------------------------------------------


def test_sliding_window_equals_whole_volume_and_survives_out_of_memory() -> None:
    rng = np.random.default_rng(1)
    array = rng.uniform(-1100, 400, (9, 37, 29)).astype(np.float32)
    network = HuRanges(EXAMPLE_RANGES).eval()
    whole = predict_dense(network, array, CPU, None, 0.25, 4, "gaussian", False)
    tiled = predict_dense(network, array, CPU, [4, 16, 16], 0.5, 3, "gaussian", False)
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-3)
    calls: list[int] = []

    def small_memory(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        if batch.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return network(batch)

    image = torch.from_numpy(array)[None]
    retried = sliding_window(small_memory, image, [4, 16, 16], 0.5, 4, "constant")
    np.testing.assert_allclose(retried.numpy(), whole, rtol=1e-5, atol=1e-3)
    assert calls[:3] == [4, 2, 1] and set(calls[3:]) == {1}

    def no_memory(batch: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("simulated")

    with pytest.raises(AnalysisError, match="out of memory"):
        sliding_window(no_memory, image, [4, 16, 16], 0.5, 2)


# -- TorchScript on real CT -----------------------------------------------------------------


def test_shipped_example_package_on_real_ct_gives_valid_seg_and_sr(tmp_path: Path) -> None:
    """models/example-hu-threshold: reorient, resample, tiles, map back; SEG + SR checked."""
    spec = example_spec()
    folder = write_package(tmp_path / "models", spec)
    build_example(folder)
    pipeline = build_pipeline(spec["name"], CPU, tmp_path / "models")
    volume = load_series(sorted(PHILIPS_L.glob("*.dcm")))
    result = pipeline.run(volume)
    assert [s.key for s in result.segments] == ["aerated_lung", "bone"]
    lung = result.segments[0]
    truth = aerated(volume.hu)
    dice = _dice(lung.mask, truth)
    assert dice > 0.7  # noisy parenchyma resampled to 5 x 1.5 x 1.5 mm and back
    for axis in range(3):  # mapped back without a shift: any one-voxel shift fits worse
        for shift in (-1, 1):
            assert _dice(np.roll(lung.mask, shift, axis=axis), truth) < dice - 0.03
    assert -950 < lung.mean_hu < -500
    seg, sr = _encode(result, tmp_path)
    item = next(i for i in seg.ContributingEquipmentSequence if "DeviceUID" in i)
    assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions) == (
        "dicom_node example",
        "Example HU ranges",
        "1.0.0",
    )
    assert item.DeviceUID == spec["device_uids"]["1.0.0"]
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert [i.DeviceUID for i in sr.ContributingEquipmentSequence if "DeviceUID" in i] == [
        item.DeviceUID
    ]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI
    assert len(seg.SegmentSequence[0].RecommendedDisplayCIELabValue) == 3


def test_package_without_preprocessing_labels_exactly_the_hu_range(
    tmp_path: Path, ge_volume: Volume
) -> None:
    folder = write_package(tmp_path, base_spec("exact"), aerated_network())
    result = build_pipeline("exact", CPU, folder.parent).run(ge_volume)
    (segment,) = result.segments
    np.testing.assert_array_equal(segment.mask, aerated(ge_volume.hu))
    seg, sr = _encode(result, tmp_path)
    ids = [i.DeviceUID for i in seg.ContributingEquipmentSequence if "DeviceUID" in i]
    assert ids == ["2.25.1002"]  # version 2.0.0's UID, not 1.0.0's


def test_package_refuses_series_it_does_not_accept(tmp_path: Path, ge_volume: Volume) -> None:
    spec = base_spec("mr-only", accepts={"modalities": ["MR"]})
    write_package(tmp_path, spec, aerated_network())
    with pytest.raises(AnalysisError, match="modality 'CT' is not one of"):
        build_pipeline("mr-only", CPU, tmp_path).run(ge_volume)


def test_accepted_modalities_and_body_parts_are_not_case_sensitive(
    tmp_path: Path, ge_volume: Volume
) -> None:
    """ "ct" in a model.yaml means CT: DICOM code strings are upper case."""
    spec = base_spec("lower-case", accepts={"modalities": ["ct "], "body_parts": ["Chest"]})
    folder = write_package(tmp_path, spec, aerated_network())
    accepts = load_spec(folder).accepts
    assert (accepts.modalities, accepts.body_parts) == (["CT"], ["CHEST"])
    assert build_pipeline("lower-case", CPU, tmp_path).run(ge_volume).segments


def test_a_version_with_a_backslash_is_refused(tmp_path: Path) -> None:
    """It would become two values of SoftwareVersions in the SEG and SR."""
    spec = base_spec("slash", version="1.0\\2", device_uids={"1.0\\2": "2.25.1003"})
    folder = write_package(tmp_path, spec, aerated_network())
    with pytest.raises(PackageError, match="version"):
        load_spec(folder)


# -- ONNX and MONAI bundles -----------------------------------------------------------------


def test_onnx_package(tmp_path: Path, ge_volume: Volume) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    spec = base_spec("onnx-lungs", network={"format": "onnx", "file": "model.onnx"})
    folder = write_package(tmp_path, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that this exporter is the legacy one
        torch.onnx.export(
            aerated_network().eval(),
            (torch.zeros(1, 1, 2, 8, 8),),
            str(folder / "model.onnx"),
            dynamo=False,
            input_names=["image"],
            dynamic_axes={"image": {0: "n", 2: "z", 3: "y", 4: "x"}},
        )
    result = build_pipeline("onnx-lungs", CPU, tmp_path).run(ge_volume)
    np.testing.assert_array_equal(result.segments[0].mask, aerated(ge_volume.hu))


def _bundle(folder: Path) -> None:
    """A MONAI bundle whose network expects window-normalised (x, y, z) patches."""
    (folder / "configs").mkdir(parents=True)
    metadata = {
        "version": "0.3.1",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "num_channels": 1,
                    "spatial_shape": [96, 96, 4],
                    "is_patch_data": True,
                }
            },
            "outputs": {
                "pred": {"format": "segmentation", "channel_def": {"0": "bg", "1": "air_space"}}
            },
        },
    }
    inference = {
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1000,
                    "a_max": 1000,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 4], "overlap": 0.5},
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    # -950.5..-500.5 HU after (hu + 1000) / 2000; half-HU bounds avoid ties on integer HU
    normalised = HuRanges([(0.02475, 0.24975)], sharpness=1000.0)
    from dicom_node.analysis.examples import save_torchscript

    save_torchscript(normalised, folder / "models" / "model.ts")


def test_monai_bundle_folder(tmp_path: Path, ge_volume: Volume) -> None:
    spec = base_spec("bundle-lungs", network={"format": "monai-bundle", "file": "bundle"})
    del spec["segmentation"]["labels"][0]["label"]
    folder = write_package(tmp_path, spec)
    _bundle(folder / "bundle")
    pipeline = build_pipeline("bundle-lungs", CPU, tmp_path)
    assert pipeline.spec.network.patch_size == [4, 96, 96]
    assert pipeline.spec.network.axes == "xyz"
    assert pipeline.spec.input.orientation == "RAS"
    result = pipeline.run(ge_volume)
    (segment,) = result.segments
    assert segment.label == "Air space"  # from the bundle's channel_def
    hu = ge_volume.hu
    np.testing.assert_array_equal(segment.mask, (hu > -950.5) & (hu < -500.5))


def test_missing_bundle_metadata_is_a_clear_error(tmp_path: Path) -> None:
    spec = base_spec("empty-bundle", network={"format": "monai-bundle", "file": "bundle"})
    folder = write_package(tmp_path, spec)
    (folder / "bundle").mkdir()
    with pytest.raises(PackageError, match="bundle has no configs/metadata.json"):
        build_pipeline("empty-bundle", CPU, tmp_path)


def test_codes_of_the_spec_reach_the_segments(tmp_path: Path, ge_volume: Volume) -> None:
    folder = write_package(tmp_path, base_spec("codes"), aerated_network())
    (segment,) = build_pipeline("codes", CPU, folder.parent).run(ge_volume).segments
    assert (segment.category.value, segment.type.value) == (ANATOMY["value"], LUNG["value"])


def test_evaluate_command_runs_a_package(tmp_path: Path) -> None:
    """``dicom-node evaluate --pipeline <package> --models DIR`` (site acceptance testing)."""
    from peers import SHARED_REAL

    from dicom_node.cli import main

    write_package(tmp_path / "models", base_spec("lungs-eval"), aerated_network())
    out = tmp_path / "scores.csv"
    code = main(
        [
            "evaluate",
            "--pipeline",
            "lungs-eval",
            "--models",
            str(tmp_path / "models"),
            "--device",
            "cpu",
            "--labels",
            "aerated=1",
            "--csv",
            str(out),
            str(GE_3SLICE),
            str(SHARED_REAL / "dcmqi-ct-3slice" / "seg"),
        ]
    )
    assert code == 0
    rows = out.read_text().splitlines()
    assert rows[1].split(",")[1:3] == ["lungs-eval", "2.0.0"]
    assert rows[1].split(",")[4] == "aerated"
    reference = str(SHARED_REAL / "dcmqi-ct-3slice" / "seg")
    models = str(tmp_path / "models")
    assert (
        main(["evaluate", "--pipeline", "nope", "--models", models, str(GE_3SLICE), reference]) == 2
    )
