"""Pipeline names -> pipeline objects: the built-in ones and the installed model packages.

A model package is a folder ``<models_path>/<name>/`` with a ``model.yaml``
(:mod:`dicom_node.analysis.packages`); built-in names win over package names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.analysis.packages import package_names
from dicom_node.analysis.types import Pipeline

if TYPE_CHECKING:
    import torch

# Known without importing torch, so that validating a config stays fast.
PIPELINE_NAMES: tuple[str, ...] = ("ct-chest",)


def _factories() -> dict[str, Callable[[torch.device], Pipeline]]:
    from dicom_node.analysis.ct_chest import CtChestPipeline

    def ct_chest(device: torch.device) -> Pipeline:
        return CtChestPipeline(device, airways_segment=True)

    return {CtChestPipeline.name: ct_chest}


def known_pipelines(models_path: Path | None = None) -> tuple[str, ...]:
    """Built-in names, then the packages installed under ``models_path`` (no torch import)."""
    packages = package_names(models_path) if models_path is not None else ()
    return PIPELINE_NAMES + tuple(name for name in packages if name not in PIPELINE_NAMES)


def build_pipeline(name: str, device: torch.device, models_path: Path | None = None) -> Pipeline:
    """Return the pipeline called ``name``, running on ``device``.

    Raises :class:`ValueError` for an unknown name and
    :class:`~dicom_node.analysis.packages.PackageError` for an invalid package.
    """
    factories = _factories()
    if name in factories:
        return factories[name](device)
    if models_path is not None and name in package_names(models_path):
        from dicom_node.analysis.model_pipeline import ModelPackagePipeline

        return ModelPackagePipeline(models_path / name, device)
    known = ", ".join(known_pipelines(models_path))
    raise ValueError(f"unknown pipeline {name!r}; known pipelines: {known}")
