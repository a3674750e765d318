"""MONAI bundle folders as model packages, read without the monai package.

A bundle (MONAI Bundle Specification) holds ``configs/metadata.json``, the
TorchScript network ``models/model.ts`` and usually ``configs/inference.json``.
From the metadata's ``network_data_format`` we take the patch size (for patch
data), the number of input channels and the output channel names; from the
inference config the literal values of ``Orientationd``, ``Spacingd``,
``ScaleIntensityRanged`` and the ``SlidingWindowInferer``. What ``model.yaml``
declares wins; the bundle fills what it leaves out. MONAI arrays are
channel-first with spatial axes x, y, z, hence ``axes: xyz``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.analysis.packages import ModelSpec, PackageError

METADATA = Path("configs") / "metadata.json"
INFERENCE = Path("configs") / "inference.json"
NETWORK = Path("models") / "model.ts"


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle says about running its network."""

    network: Path
    version: str | None
    channel_names: dict[int, str] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)  # InputSpec fields
    inferer: dict[str, Any] = field(default_factory=dict)  # NetworkSpec fields


def read_bundle(folder: Path) -> BundleInfo:
    """Read ``folder``'s metadata (required) and inference config (optional)."""
    metadata = _json(folder / METADATA, required=True)
    network = folder / NETWORK
    if not network.is_file():
        raise PackageError(str(folder), [f"bundle has no {NETWORK}"])
    formats = metadata.get("network_data_format")
    if not isinstance(formats, dict):
        raise PackageError(str(folder / METADATA), ["network_data_format missing"])
    image = _first(formats.get("inputs"))
    pred = _first(formats.get("outputs"))
    if int(image.get("num_channels", 1)) != 1:
        raise PackageError(
            str(folder / METADATA), [f"inputs: {image.get('num_channels')} channels; 1 supported"]
        )
    inferer: dict[str, Any] = {}
    shape = image.get("spatial_shape")
    if image.get("is_patch_data") and isinstance(shape, list) and _ints(shape):
        inferer["patch_size"] = list(reversed(shape))  # x, y, z -> slice, row, column
    channels = {int(k): str(v) for k, v in (pred.get("channel_def") or {}).items()}
    config = _json(folder / INFERENCE, required=False)
    spec_input = _transforms(config)
    inferer.update(_inferer(config))
    return BundleInfo(network, metadata.get("version"), channels, spec_input, inferer)


def apply_bundle(spec: ModelSpec, info: BundleInfo) -> ModelSpec:
    """``spec`` with what it leaves unset taken from the bundle."""
    data = spec.model_dump(exclude_unset=True)
    data["input"] = {**info.input, **data.get("input", {})}
    data["network"] = {**info.inferer, **data["network"]}
    data["network"].setdefault("axes", "xyz")
    if spec.segmentation is not None:
        for label in data["segmentation"]["labels"]:
            if "label" not in label and label["value"] in info.channel_names:
                label["label"] = info.channel_names[label["value"]].replace("_", " ").capitalize()
    try:
        return ModelSpec.model_validate(data)
    except ValueError as exc:
        folder = str(info.network.parent.parent)
        raise PackageError(folder, [f"with the bundle's values: {exc}"]) from None


def _json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise PackageError(str(path.parent.parent), [f"bundle has no {METADATA}"])
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PackageError(str(path), [f"not readable JSON: {exc}"]) from None
    return data if isinstance(data, dict) else {}


def _first(entries: object) -> dict[str, Any]:
    if isinstance(entries, dict) and entries:
        first = next(iter(entries.values()))
        if isinstance(first, dict):
            return first
    return {}


def _ints(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _numbers(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) in (int, float) for v in value)


def _transforms(config: dict[str, Any]) -> dict[str, Any]:
    """InputSpec fields from the literal arguments of known preprocessing transforms."""
    found: dict[str, Any] = {}
    preprocessing = config.get("preprocessing")
    transforms = preprocessing.get("transforms") if isinstance(preprocessing, dict) else None
    for item in transforms if isinstance(transforms, list) else []:
        if not isinstance(item, dict):
            continue
        target = str(item.get("_target_", "")).rsplit(".", 1)[-1]
        if target == "Orientationd" and isinstance(item.get("axcodes"), str):
            found["orientation"] = item["axcodes"]
        elif target == "Spacingd" and _numbers(item.get("pixdim")) and len(item["pixdim"]) == 3:
            found["spacing"] = list(reversed(item["pixdim"]))
        elif target == "ScaleIntensityRanged":
            window = [item.get("a_min"), item.get("a_max")]
            if _numbers(window) and (item.get("b_min"), item.get("b_max")) == (0.0, 1.0):
                found["window"] = window
                found["normalise"] = "window"
    return found


def _inferer(config: dict[str, Any]) -> dict[str, Any]:
    """NetworkSpec fields from a literal ``SlidingWindowInferer``."""
    inferer = config.get("inferer")
    if not isinstance(inferer, dict) or not str(inferer.get("_target_", "")).endswith(
        "SlidingWindowInferer"
    ):
        return {}
    found: dict[str, Any] = {}
    if _ints(inferer.get("roi_size")):
        found["patch_size"] = list(reversed(inferer["roi_size"]))
    if type(inferer.get("sw_batch_size")) is int:
        found["batch_size"] = inferer["sw_batch_size"]
    if type(inferer.get("overlap")) in (int, float):
        found["overlap"] = float(inferer["overlap"])
    if inferer.get("mode") in ("gaussian", "constant"):
        found["blending"] = inferer["mode"]
    return found
