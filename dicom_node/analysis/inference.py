"""Running a network: TorchScript or ONNX weights, whole image or sliding window.

A :data:`Network` maps a batch (N, C, *spatial) to (N, K, *spatial) for dense
outputs or (N, K) for classifiers, on the device it was loaded for. Sliding-window
inference tiles images larger than the patch with overlap, blends the tiles
(Gaussian or constant weights), runs the tiles in batches and halves the batch
when the device runs out of memory. Mixed precision (float16 autocast) is used on
CUDA only, and only when the package allows it. Nothing here is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from dicom_node.analysis.types import AnalysisError

log = logging.getLogger(__name__)

Network = Callable[[torch.Tensor], torch.Tensor]
TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def check_sha256(path: Path, expected: str | None) -> None:
    """Refuse weights whose checksum differs from the one ``model.yaml`` declares."""
    if expected is None or path.is_dir():
        return
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path.name}: sha256 {digest.hexdigest()} differs from {expected}")


def load_torchscript(path: Path, device: torch.device) -> Network:
    """TorchScript weights (also MONAI bundles' ``model.ts``).

    torch 2.9+ marks ``torch.jit`` deprecated; that notice is silenced here only, as
    TorchScript is still how bundles and most exported medical models ship.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATION, DeprecationWarning)
        module = torch.jit.load(str(path), map_location=device)
    module.eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        return _first_tensor(module(batch))

    return run


def load_onnx(path: Path, device: torch.device) -> Network:
    """An ONNX Runtime session on the CUDA provider for a CUDA device, else the CPU."""
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    available = onnxruntime.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    elif device.type == "cuda":
        log.warning("%s: onnxruntime has no CUDA provider; running on the CPU", path.name)
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).numpy()
        output = session.run(None, {input_name: array})[0]
        return torch.from_numpy(np.asarray(output, dtype=np.float32)).to(batch.device)

    return run


def _first_tensor(output: object) -> torch.Tensor:
    """Networks may return a tensor, a tuple/list (first item) or a dict (first value)."""
    if isinstance(output, dict):
        output = next(iter(output.values()))
    if isinstance(output, list | tuple):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise AnalysisError(f"the network returned {type(output).__name__}, not a tensor")
    return output


def autocast(device: torch.device, allowed: bool) -> contextlib.AbstractContextManager[object]:
    """float16 autocast on CUDA when allowed, otherwise full precision."""
    if allowed and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def run_batch(network: Network, batch: torch.Tensor, mixed_precision: bool) -> torch.Tensor:
    """One forward pass without autograd; the output in float32."""
    with torch.inference_mode(), autocast(batch.device, mixed_precision):
        return network(batch).float()


def importance_map(patch: Sequence[int], blending: str, device: torch.device) -> torch.Tensor:
    """Tile weights: a Gaussian (sigma = patch / 8) so tile centres count most, or ones."""
    if blending == "constant":
        return torch.ones(tuple(patch), device=device)
    weights = torch.ones((), device=device)
    for size in patch:
        centre = (size - 1) / 2.0
        sigma = max(size / 8.0, 1e-3)
        axis = torch.exp(-0.5 * ((torch.arange(size, device=device) - centre) / sigma) ** 2)
        weights = weights[..., None] * axis
    return torch.clamp(weights / weights.max(), min=1e-3)


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start positions covering ``size`` with windows of ``patch``; the last one flush."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def sliding_window(
    network: Network,
    image: torch.Tensor,
    patch: Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 4,
    blending: str = "gaussian",
    mixed_precision: bool = False,
) -> torch.Tensor:
    """Dense prediction (K, *spatial) for ``image`` (C, *spatial) tile by tile.

    The image is padded (with its minimum) up to the patch where smaller, so the
    network always sees tiles of exactly ``patch``. Out of memory: the batch is
    halved and the tiles retried; at batch 1 the failure is an :class:`AnalysisError`.
    """
    spatial = tuple(image.shape[1:])
    if len(patch) != len(spatial):
        raise ValueError(f"patch {list(patch)} does not fit an image of shape {list(spatial)}")
    padded = _pad_to(image, patch)
    grid = [tile_starts(s, p, overlap) for s, p in zip(padded.shape[1:], patch, strict=True)]
    starts = list(itertools.product(*grid))
    weights = importance_map(patch, blending, image.device)
    total: torch.Tensor | None = None
    norm = torch.zeros(padded.shape[1:], device=image.device)
    for first, output in _batches(network, padded, starts, patch, batch_size, mixed_precision):
        if total is None:
            total = torch.zeros((output.shape[1], *padded.shape[1:]), device=image.device)
        for offset, tile in enumerate(output):
            region = _region(starts[first + offset], patch)
            total[(slice(None), *region)] += tile * weights
            norm[region] += weights
    assert total is not None
    result = total / norm
    return result[(slice(None), *(slice(0, s) for s in spatial))]


def _batches(
    network: Network,
    image: torch.Tensor,
    starts: list[tuple[int, ...]],
    patch: Sequence[int],
    batch_size: int,
    mixed_precision: bool,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first tile, outputs) per batch; halve the batch on out-of-memory."""
    first = 0
    while first < len(starts):
        chosen = starts[first : first + batch_size]
        batch = torch.stack([image[(slice(None), *_region(s, patch))] for s in chosen])
        try:
            output = run_batch(network, batch, mixed_precision)
        except torch.cuda.OutOfMemoryError as exc:
            del batch
            if image.device.type == "cuda":
                torch.cuda.empty_cache()
            if batch_size == 1:
                message = "out of memory on the analysis device even one tile at a time"
                raise AnalysisError(message) from exc
            batch_size = max(1, batch_size // 2)
            log.warning("out of memory; retrying with %d tile(s) per batch", batch_size)
            continue
        if output.shape[0] != len(chosen) or tuple(output.shape[2:]) != tuple(patch):
            raise AnalysisError(
                f"the network mapped tiles {list(batch.shape)} to {list(output.shape)}; "
                "a dense output of the tile's size was expected"
            )
        yield first, output
        first += len(chosen)


def _region(start: tuple[int, ...], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))


def _pad_to(image: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    spatial = image.shape[1:]
    missing = [max(0, p - s) for s, p in zip(spatial, patch, strict=True)]
    if not any(missing):
        return image
    pads: list[int] = []
    for amount in reversed(missing):  # F.pad wants the last axis first
        pads += [0, amount]
    value = float(image.min())
    return torch.nn.functional.pad(image, pads, mode="constant", value=value)


def predict_dense(
    network: Network,
    array: np.ndarray,
    device: torch.device,
    patch: Sequence[int] | None,
    overlap: float,
    batch_size: int,
    blending: str,
    mixed_precision: bool,
) -> np.ndarray:
    """(K, *spatial) float32 for a single-channel ``array``; the whole image when no patch."""
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)[None]
    if patch is None:
        output = run_batch(network, image[None], mixed_precision)[0]
        if tuple(output.shape[1:]) != tuple(array.shape):
            raise AnalysisError(
                f"the network mapped {list(array.shape)} to {list(output.shape)}; "
                "declare network.patch_size if it needs tiles of a fixed size"
            )
    else:
        output = sliding_window(
            network, image, patch, overlap, batch_size, blending, mixed_precision
        )
    return output.cpu().numpy()


def predict_vector(
    network: Network, array: np.ndarray, device: torch.device, mixed_precision: bool
) -> np.ndarray:
    """(K,) class scores for a single-channel ``array`` (one forward pass)."""
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
    output = run_batch(network, image[None, None], mixed_precision)
    if output.ndim != 2 or output.shape[0] != 1:
        raise AnalysisError(f"a classifier should return (1, classes), got {list(output.shape)}")
    return output[0].cpu().numpy()
