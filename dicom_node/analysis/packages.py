"""Model packages: ``models/<name>/model.yaml`` plus weights, validated without torch.

A package says what it is (name, version, a Device UID per version, maker), which
images it accepts, how to prepare them (:mod:`dicom_node.analysis.preprocess`), how
to run the network (:mod:`dicom_node.analysis.inference`) and what its output means:
labels with SNOMED CT codes and colours, or classes. The configuration check uses
:func:`package_names` and :func:`package_problems`, which read YAML only, so that
``check-config`` stays fast; :mod:`dicom_node.analysis.model_pipeline` runs a package.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.analysis.types import Code

MODEL_YAML = "model.yaml"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# UI VR (PS3.5 9.1): digits and dots, no leading zero in a component, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
# CID 7162: what a model package is.
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

Key = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_]{0,47}$")]
Label = Annotated[str, Field(min_length=1, max_length=64)]
Positive = Annotated[float, Field(gt=0)]
Size = Annotated[int, Field(ge=1, le=4096)]


class PackageError(ValueError):
    """A package cannot be used; ``problems`` lists each as 'key.path: message'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept: ``{value: "39607008", scheme: SCT, meaning: Lung}``."""

    value: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class Accepts(_Strict):
    """What the model is for; a series outside it fails with a reason, not a wrong result."""

    modalities: list[str] = Field(default_factory=list)  # empty: any
    body_parts: list[str] = Field(default_factory=list)  # BodyPartExamined; absent: accepted
    min_slices: Annotated[int, Field(ge=1)] = 1
    max_slices: Annotated[int, Field(ge=1)] | None = None

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        # DICOM code strings are upper case; "ct" or "Chest" in a yaml mean CT, CHEST
        return [value.strip().upper() for value in values]


class CurvatureFlow(_Strict):
    filter: Literal["CurvatureFlow"]
    time_step: Positive = 0.0625
    iterations: Annotated[int, Field(ge=1, le=100)] = 5


class Median(_Strict):
    filter: Literal["Median"]
    radius: Annotated[int, Field(ge=1, le=10)] = 1  # voxels, in plane (and across slices in 3-D)


class DiscreteGaussian(_Strict):
    filter: Literal["DiscreteGaussian"]
    variance_mm2: Positive = 1.0


Denoise = Annotated[CurvatureFlow | Median | DiscreteGaussian, Field(discriminator="filter")]


class InputSpec(_Strict):
    """How a volume becomes the network's input; applied in this order by ``preprocess``.

    reorient -> resample (``spacing`` or ``size``) -> denoise -> window -> normalise.
    Lists of sizes and spacings are in (slice, row, column) order, or (row, column)
    for a 2-D network.
    """

    dimensions: Literal[2, 3] = 3  # a 2-D network runs slice by slice on a series
    orientation: Annotated[str, Field(pattern=r"^[LR][PA][SI]$|^[PA][LR][SI]$")] | None = None
    spacing: list[Positive] | None = None  # mm
    size: list[Size] | None = None  # resample to this matrix (classifiers)
    window: tuple[float, float] | None = None  # clip to [low, high]
    normalise: Literal["none", "zscore", "window"] = "none"  # window: [low, high] -> [0, 1]
    denoise: list[Denoise] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        for name in ("spacing", "size"):
            value = getattr(self, name)
            if value is not None and len(value) != self.dimensions:
                raise ValueError(f"{name}: {self.dimensions} values expected, got {len(value)}")
        if self.spacing is not None and self.size is not None:
            raise ValueError("give spacing or size, not both")
        if self.orientation is not None and self.dimensions == 2:
            raise ValueError("orientation applies to 3-D input only")
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"window: low {self.window[0]} not below high {self.window[1]}")
        if self.normalise == "window" and self.window is None:
            raise ValueError("normalise 'window' needs a window")
        return self


class NetworkSpec(_Strict):
    """The weights and how to run them."""

    format: Literal["torchscript", "onnx", "monai-bundle"]
    file: Annotated[str, Field(min_length=1)]  # inside the package; a folder for monai-bundle
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    axes: Literal["zyx", "xyz"] | None = None  # spatial axis order; None: zyx, xyz for bundles
    patch_size: list[Size] | None = None  # sliding window when the image is larger
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    blending: Literal["gaussian", "constant"] = "gaussian"
    mixed_precision: bool = False  # float16 autocast, on CUDA only

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{value!r} must be a relative path inside the package")
        return value


class ClassSpec(_Strict):
    index: Annotated[int, Field(ge=0)]  # output channel
    code: CodeSpec  # the evaluation's value when this class is found
    probability: CodeSpec | None = None  # concept name of a probability NUM, if reported


class ClassificationSpec(_Strict):
    """Class scores -> qualitative evaluation (and probability measurements)."""

    activation: Literal["softmax", "sigmoid"] = "softmax"
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5  # sigmoid: a class is found above it
    concept: CodeSpec  # the evaluation's concept name, e.g. Finding
    classes: Annotated[list[ClassSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> ClassificationSpec:
        indexes = [c.index for c in self.classes]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"classes: duplicate index in {indexes}")
        return self


class StudyClassificationSpec(ClassificationSpec):
    """A per-study classifier: reported as one TID 1501 group."""

    finding: CodeSpec  # finding type and site of the group, e.g. Chest
    label: Label = "Classification"  # Tracking Identifier


class FindingClassifierSpec(_Strict):
    """A second network run on a crop around each finding (e.g. malignancy of a nodule)."""

    network: NetworkSpec
    crop_size: list[Size]  # voxels of the prepared image, centred on the finding
    classification: ClassificationSpec


Measure = Literal["volume", "mean", "area"]
DEFAULT_MEASURES: tuple[Measure, ...] = ("volume", "mean")


class LabelSpec(_Strict):
    value: Annotated[int, Field(ge=0)]  # softmax/labels: label value; sigmoid: channel
    key: Key
    label: Label | None = None  # None: the bundle's channel name, else the key
    category: CodeSpec  # CID 7150
    type: CodeSpec  # e.g. CID 7151
    laterality: CodeSpec | None = None
    color: tuple[int, int, int] | None = None  # sRGB, 0-255: Recommended Display CIELab Value
    measurements: list[Measure] = Field(default_factory=lambda: list(DEFAULT_MEASURES))
    split: bool = False  # each connected component is its own finding
    min_voxels: Annotated[int, Field(ge=0)] = 1  # smaller masks/components are dropped
    classifier: FindingClassifierSpec | None = None

    @field_validator("color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and not all(0 <= c <= 255 for c in value):
            raise ValueError(f"{list(value)} is not sRGB (three values 0-255)")
        return value


class SegmentationSpec(_Strict):
    # softmax: argmax channel == value; sigmoid: channel value > threshold;
    # labels: the network already outputs a label map (one channel)
    activation: Literal["softmax", "sigmoid", "labels"] = "softmax"
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    labels: Annotated[list[LabelSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> SegmentationSpec:
        for name in ("key", "value"):
            values = [getattr(label, name) for label in self.labels]
            if len(set(values)) != len(values):
                raise ValueError(f"labels: duplicate {name} in {values}")
        return self


class ModelSpec(_Strict):
    """The contents of one ``model.yaml``."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    # no backslash: in SoftwareVersions (LO) it would split the value in two
    version: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\\]+$")]
    device_uids: dict[str, str]  # version -> Device UID (IHE AIR); a new version, a new UID
    manufacturer: Annotated[str, Field(min_length=1, max_length=64)]
    algorithm_name: Label | None = None  # None: the name
    family: CodeSpec = CodeSpec(
        value=ARTIFICIAL_INTELLIGENCE.value,
        scheme=ARTIFICIAL_INTELLIGENCE.scheme,
        meaning=ARTIFICIAL_INTELLIGENCE.meaning,
    )
    description: str | None = None
    procedure: CodeSpec | None = None  # CID 100 for the SR; None: CT of chest
    accepts: Accepts = Accepts()
    input: InputSpec = InputSpec()
    network: NetworkSpec
    segmentation: SegmentationSpec | None = None
    classification: StudyClassificationSpec | None = None

    @field_validator("device_uids")
    @classmethod
    def _uids(cls, value: dict[str, str]) -> dict[str, str]:
        for version, uid in value.items():
            if len(uid) > 64 or not _UID.match(uid):
                raise ValueError(f"{version}: {uid!r} is not a UID (digits and dots, <= 64)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ModelSpec:
        if self.version not in self.device_uids:
            raise ValueError(f"device_uids: no Device UID for version {self.version!r}")
        uids = list(self.device_uids.values())
        if len(set(uids)) != len(uids):
            raise ValueError("device_uids: each version needs its own Device UID")
        if (self.segmentation is None) == (self.classification is None):
            raise ValueError("give exactly one of segmentation and classification")
        if self.network.patch_size and len(self.network.patch_size) != self.input.dimensions:
            raise ValueError(f"network.patch_size: {self.input.dimensions} values expected")
        return self

    @property
    def device_uid(self) -> str:
        return self.device_uids[self.version]


def package_names(models_path: Path) -> tuple[str, ...]:
    """Names of the packages under ``models_path``: folders holding a ``model.yaml``."""
    if not models_path.is_dir():
        return ()
    return tuple(
        sorted(p.name for p in models_path.iterdir() if p.is_dir() and (p / MODEL_YAML).is_file())
    )


def load_spec(folder: Path) -> ModelSpec:
    """Read and validate ``folder/model.yaml``; raise :class:`PackageError` listing problems."""
    source = str(folder / MODEL_YAML)
    from dicom_node.config import YAMLFileError, read_yaml

    try:
        data = read_yaml(folder / MODEL_YAML)  # as the config: UTF-8, no key twice
    except YAMLFileError as exc:
        raise PackageError(source, exc.problems) from None
    if not isinstance(data, dict):
        raise PackageError(source, ["(top level): expected a mapping"])
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise PackageError(source, [_problem(error) for error in exc.errors()]) from None
    if spec.name != folder.name:
        raise PackageError(source, [f"name: {spec.name!r} differs from the folder {folder.name!r}"])
    return spec


def package_problems(models_path: Path, name: str) -> list[str]:
    """What is wrong with package ``name`` (missing, invalid model.yaml, missing weights)."""
    folder = models_path / name
    if not (folder / MODEL_YAML).is_file():
        return [f"no {MODEL_YAML} in {folder}"]
    try:
        spec = load_spec(folder)
    except PackageError as exc:
        return [f"{MODEL_YAML}: {problem}" for problem in exc.problems]
    networks = [spec.network] + [
        label.classifier.network
        for label in (spec.segmentation.labels if spec.segmentation else [])
        if label.classifier is not None
    ]
    return [
        f"{MODEL_YAML}: weights {network.file!r} not found in {folder}"
        for network in networks
        if not (folder / network.file).exists()
    ]


def _problem(error: Any) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{path}: {message.removeprefix('Value error, ')}"
