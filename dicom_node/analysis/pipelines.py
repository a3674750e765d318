"""Pipeline names -> pipeline objects (the built-in ones; model packages come later)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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


def build_pipeline(name: str, device: torch.device) -> Pipeline:
    """Return the pipeline called ``name``, running on ``device``."""
    factories = _factories()
    if name not in factories:
        raise ValueError(f"unknown pipeline {name!r}; known pipelines: {', '.join(PIPELINE_NAMES)}")
    return factories[name](device)
