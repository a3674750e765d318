"""A sample run at start-up, so that a worker's first study is as fast as the next ones.

Loading a pipeline is not all of its first-run cost: the first study through a fresh
process also pays for lazily imported modules, the first calls into torch, SimpleITK and
highdicom, and the allocator's first large arrays. With the Philips chest CT that was
about 1 s on top of 1.5 s, once per worker process. ``dicom-node worker`` therefore runs
each of its pipelines once on a synthetic chest CT of a usual size
(:func:`~dicom_node.analysis.phantom.chest_phantom`) and encodes the result, before it
takes its first job; the results are discarded. A pipeline that refuses that volume
(a model package for radiographs, say) is only loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from dicom_node.analysis.phantom import chest_phantom
from dicom_node.analysis.types import AnalysisError, AnalysisResult, Pipeline, Volume

log = logging.getLogger(__name__)

SAMPLE_SLICES = 64
SAMPLE_SIZE = 512
SAMPLE_SPACING = (5.0, 0.7, 0.7)  # mm: slices, rows, columns


def sample_volume() -> Volume:
    """The synthetic chest CT of the sample run (64 slices of 512 x 512)."""
    volume, _ = chest_phantom(slices=SAMPLE_SLICES, size=SAMPLE_SIZE, spacing=SAMPLE_SPACING)
    return volume


def warm_with_sample(
    pipeline: Pipeline,
    volume: Volume,
    device: torch.device,
    encode: Callable[[AnalysisResult], object],
) -> None:
    """Run ``pipeline`` on ``volume`` and ``encode`` the result, keeping neither, and log it.

    A pipeline that refuses the volume (an :class:`~dicom_node.analysis.types.AnalysisError`)
    is left loaded, not run; any other failure only means that the first job runs cold.
    """
    started = time.monotonic()
    try:
        encode(pipeline.run(volume))
    except AnalysisError as exc:
        log.info(
            "warm-up: %s does not take the synthetic chest CT (%s): loaded, not run",
            pipeline.name,
            exc,
        )
        return
    except Exception as exc:  # the message of a library may quote values: its type only
        log.warning(
            "pipeline %s on %s: its sample run failed (%s); the first job runs it cold",
            pipeline.name,
            device,
            type(exc).__name__,
        )
        log.debug("sample run traceback", exc_info=True)
        return
    log.info(
        "pipeline %s warmed up on %s: a synthetic chest CT in %.1f s",
        pipeline.name,
        device,
        time.monotonic() - started,
    )
