"""The pipeline that runs a model package: volume -> prepared input -> network -> result.

One generic :class:`ModelPackagePipeline` serves every package, so adding a model
needs no Python: ``model.yaml`` declares the checks, the preprocessing, the network
and the meaning of its output. Segmentation outputs become one
:class:`~dicom_node.analysis.types.Segment` per label (or per connected component,
each a finding that a second network may classify); classifier outputs become a
per-study TID 1501 group with a qualitative evaluation and probabilities.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dicom_node.analysis.bundle import apply_bundle, read_bundle
from dicom_node.analysis.inference import (
    Network,
    check_sha256,
    load_onnx,
    load_torchscript,
    predict_dense,
    predict_vector,
)
from dicom_node.analysis.packages import (
    Accepts,
    ClassificationSpec,
    LabelSpec,
    ModelSpec,
    NetworkSpec,
    SegmentationSpec,
    load_spec,
)
from dicom_node.analysis.preprocess import Prepared, preprocess
from dicom_node.analysis.types import (
    AnalysisError,
    AnalysisResult,
    Code,
    Evaluation,
    Measurement,
    Segment,
    SegmentGroup,
    Volume,
)

log = logging.getLogger(__name__)

AREA = Code("42798000", "SCT", "Area")
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")
NO_UNITS = Code("1", "UCUM", "no units")


def load_network(folder: Path, spec: NetworkSpec, device: torch.device) -> Network:
    """Load weights declared in ``model.yaml``; checksums are verified before loading."""
    path = folder / spec.file
    if spec.format == "monai-bundle":
        path = read_bundle(path).network
    if not path.is_file():
        raise ValueError(f"weights {path} not found")
    check_sha256(path, spec.sha256)
    if spec.format == "onnx":
        return load_onnx(path, device)
    return load_torchscript(path, device)


class ModelPackagePipeline:
    """A :class:`~dicom_node.analysis.types.Pipeline` for the package in ``folder``."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        spec = load_spec(folder)
        if spec.network.format == "monai-bundle":
            spec = apply_bundle(spec, read_bundle(folder / spec.network.file))
        self.spec: ModelSpec = spec
        self.name = spec.name
        self.version = spec.version
        self.device = device
        self._network = load_network(folder, spec.network, device)
        labels = spec.segmentation.labels if spec.segmentation else []
        self._classifiers = {
            label.key: load_network(folder, label.classifier.network, device)
            for label in labels
            if label.classifier is not None
        }

    def run(self, volume: Volume) -> AnalysisResult:
        check_accepts(self.spec.accepts, volume)
        prepared = preprocess(volume, self.spec.input)
        segments: tuple[Segment, ...] = ()
        groups: tuple[SegmentGroup, ...] = ()
        if self.spec.segmentation is not None:
            segments = tuple(self._segments(self.spec.segmentation, volume, prepared))
            if not segments:
                raise AnalysisError(f"{self.name} found none of its labels in this series")
        else:
            groups = (self._study_group(prepared),)
        return AnalysisResult(
            pipeline=self.name,
            algorithm_name=self.spec.algorithm_name or self.name,
            algorithm_version=self.version,
            volume=volume,
            segments=segments,
            groups=groups,
            algorithm_family=self.spec.family.code(),
            procedure=self.spec.procedure.code() if self.spec.procedure else None,
            manufacturer=self.spec.manufacturer,
            device_uid=self.spec.device_uid,
        )

    # -- segmentation ----------------------------------------------------------------------

    def _segments(
        self, spec: SegmentationSpec, volume: Volume, prepared: Prepared
    ) -> list[Segment]:
        """A segment for every label found (one per component with ``split``, largest first)."""
        scores = self._dense(prepared.array)
        segments: list[Segment] = []
        for label in spec.labels:
            mask = label_mask(spec, label, scores)
            if label.split:
                components = sitk.RelabelComponent(
                    sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))),
                    sortByObjectSize=True,
                )
                ids = sitk.GetArrayFromImage(components).astype(np.int32)
            else:
                ids = mask.astype(np.int32)
            on_source = prepared.to_source(ids)
            count = int(ids.max())
            # Sizes on the source grid in one pass: a noisy output with thousands of
            # specks must not cost a full-volume comparison per speck.
            sizes = np.bincount(on_source.ravel(), minlength=count + 1)
            for number in range(1, count + 1):
                if int(sizes[number]) < max(1, label.min_voxels):
                    continue
                source_mask = on_source == number
                suffix = number if label.split else None
                segment = self._segment(label, volume, source_mask, suffix)
                if label.classifier is not None:
                    segment = self._classify_finding(label, segment, prepared, ids == number)
                segments.append(segment)
        return segments

    def _dense(self, array: np.ndarray) -> np.ndarray:
        """(K, slices, rows, columns) scores; a 2-D network runs slice by slice."""
        net = self.spec.network
        if self.spec.input.dimensions == 2:
            slices = [self._predict(a, net) for a in array]
            return np.stack(slices, axis=1)
        return self._predict(array, net)

    def _predict(self, array: np.ndarray, net: NetworkSpec) -> np.ndarray:
        xyz = net.axes == "xyz"
        patch = net.patch_size[::-1] if (xyz and net.patch_size) else net.patch_size
        data = array.transpose() if xyz else array
        scores = predict_dense(
            self._network,
            data,
            self.device,
            patch,
            net.overlap,
            net.batch_size,
            net.blending,
            net.mixed_precision,
        )
        if xyz:  # (K, x, y, z) -> (K, z, y, x)
            scores = scores.transpose(0, *range(scores.ndim - 1, 0, -1))
        return scores

    def _segment(
        self, label: LabelSpec, volume: Volume, mask: np.ndarray, number: int | None
    ) -> Segment:
        text = label.label or label.key.replace("_", " ").capitalize()
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        count = int(mask.sum())
        single = volume.hu.shape[0] == 1
        is_ct = str(volume.datasets[0].get("Modality", "")) == "CT"
        measurements: tuple[Measurement, ...] = ()
        if "area" in label.measurements and single:
            area = count * volume.spacing[1] * volume.spacing[2]
            measurements = (Measurement(AREA, area, SQUARE_MILLIMETER),)
        # None: not reported (a single image has no volume, only CT has Hounsfield units)
        volume_ml = count * voxel_ml if "volume" in label.measurements and not single else None
        wants_mean = "mean" in label.measurements and is_ct
        mean = float(volume.hu[mask].mean(dtype=np.float64)) if wants_mean else None
        return Segment(
            key=label.key if number is None else f"{label.key}_{number}",
            label=text if number is None else f"{text} {number}",
            category=label.category.code(),
            type=label.type.code(),
            laterality=label.laterality.code() if label.laterality else None,
            mask=mask,
            volume_ml=volume_ml,
            mean_hu=mean,
            measurements=measurements,
            color=label.color,
        )

    def _classify_finding(
        self, label: LabelSpec, segment: Segment, prepared: Prepared, mask: np.ndarray
    ) -> Segment:
        """Run the label's classifier on a crop centred on the finding (prepared grid)."""
        assert label.classifier is not None
        spec = label.classifier
        crop = centred_crop(prepared.array, mask, spec.crop_size, self.spec.input.dimensions)
        scores = predict_vector(
            self._classifiers[label.key], crop, self.device, spec.network.mixed_precision
        )
        evaluations, measurements = classify(spec.classification, scores)
        return dataclasses.replace(
            segment,
            evaluations=segment.evaluations + evaluations,
            measurements=segment.measurements + measurements,
        )

    # -- classification --------------------------------------------------------------------

    def _study_group(self, prepared: Prepared) -> SegmentGroup:
        spec = self.spec.classification
        assert spec is not None
        array = prepared.array[0] if self.spec.input.dimensions == 2 else prepared.array
        if self.spec.input.dimensions == 2 and prepared.array.shape[0] != 1:
            raise AnalysisError(
                f"{self.name} classifies single images; this series has "
                f"{prepared.array.shape[0]} slices"
            )
        precision = self.spec.network.mixed_precision
        scores = predict_vector(self._network, array, self.device, precision)
        evaluations, measurements = classify(spec, scores)
        return SegmentGroup(
            key="study_classification",
            label=spec.label,
            type=spec.finding.code(),
            segment_keys=(),
            measurements=measurements,
            evaluations=evaluations,
        )


def check_accepts(accepts: Accepts, volume: Volume) -> None:
    """Refuse a series the package is not made for, naming the offending value."""
    header = volume.datasets[0]
    modality = str(header.get("Modality", ""))
    if accepts.modalities and modality not in accepts.modalities:
        raise AnalysisError(f"modality {modality!r} is not one of {accepts.modalities}")
    body_part = str(header.get("BodyPartExamined", "") or "").upper()
    if accepts.body_parts and body_part and body_part not in accepts.body_parts:
        raise AnalysisError(f"BodyPartExamined {body_part!r} is not one of {accepts.body_parts}")
    slices = volume.hu.shape[0]
    if slices < accepts.min_slices or (accepts.max_slices and slices > accepts.max_slices):
        limits = f"{accepts.min_slices}..{accepts.max_slices or 'any'}"
        raise AnalysisError(f"{slices} slice(s), the model accepts {limits}")


def label_mask(spec: SegmentationSpec, label: LabelSpec, scores: np.ndarray) -> np.ndarray:
    """The label's boolean mask on the prepared grid from the network's scores."""
    channels = scores.shape[0]
    if spec.activation == "labels":
        return np.rint(scores[0]).astype(np.int64) == label.value
    if label.value >= channels:
        raise AnalysisError(f"label {label.key!r}: channel {label.value} of {channels}")
    if spec.activation == "softmax":
        return np.argmax(scores, axis=0) == label.value
    return 1.0 / (1.0 + np.exp(-scores[label.value])) > spec.threshold


def probabilities(activation: str, scores: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-scores))
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


def classify(
    spec: ClassificationSpec, scores: np.ndarray
) -> tuple[tuple[Evaluation, ...], tuple[Measurement, ...]]:
    """Evaluations (the most likely class, or each class above threshold) and probabilities."""
    probs = probabilities(spec.activation, scores)
    for item in spec.classes:
        if item.index >= probs.shape[0]:
            raise AnalysisError(f"class index {item.index} but the network gives {probs.shape[0]}")
    if spec.activation == "softmax":
        best = max(spec.classes, key=lambda c: probs[c.index])
        found = [best]
    else:
        found = [c for c in spec.classes if probs[c.index] > spec.threshold]
    evaluations = tuple(Evaluation(spec.concept.code(), c.code.code()) for c in found)
    measurements = tuple(
        Measurement(c.probability.code(), float(probs[c.index]), NO_UNITS)
        for c in spec.classes
        if c.probability is not None
    )
    return evaluations, measurements


def centred_crop(
    array: np.ndarray, mask: np.ndarray, size: list[int], dimensions: int
) -> np.ndarray:
    """A crop of ``size`` centred on the mask's centroid, padded with the image minimum."""
    centre = np.rint(np.argwhere(mask).mean(axis=0)).astype(int)
    if dimensions == 2:
        array, centre = array[int(centre[0])], centre[1:]
    if len(size) != array.ndim:
        raise AnalysisError(f"crop_size {size} does not fit a {array.ndim}-D image")
    out = np.full(size, float(array.min()), dtype=np.float32)
    src, dst = [], []
    for c, s, n in zip(centre, size, array.shape, strict=True):
        start = int(c) - s // 2
        lo, hi = max(0, start), min(n, start + s)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    return out
