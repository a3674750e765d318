"""Choose the torch device the analysis runs on, and the GPU's process-wide rules.

One job at a time runs on a CUDA device (:func:`device_gate`): two volumes'
intermediates side by side are what runs a GPU out of memory, and serialising
costs little because a GPU job keeps the device busy anyway. Free memory is
read through a :data:`MemoryProbe` so that the admission logic can be tested
on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import cast

import torch

from dicom_node.analysis.types import DeviceUnavailable

DEVICE_PREFERENCES = ("auto", "cpu", "cuda", "cuda:N")
_CUDA_INDEX = re.compile(r"^cuda(?::(\d+))?$")

CPU = torch.device("cpu")

# (free, total) bytes of a device, as torch.cuda.mem_get_info returns them.
MemoryProbe = Callable[[torch.device], tuple[int, int]]


def select_device(preference: str = "auto") -> torch.device:
    """Return the device for ``preference``: "auto", "cpu", "cuda" or "cuda:N".

    "auto" picks cuda:0 when CUDA is available and the CPU otherwise; "cuda"
    means cuda:0. An explicit CUDA device that cannot be used raises
    :class:`DeviceUnavailable` at start rather than failing every job later.
    """
    if preference in ("cpu", "auto"):
        if preference == "auto" and torch.cuda.is_available():
            return torch.device("cuda", 0)
        return CPU
    match = _CUDA_INDEX.match(preference)
    if match is None:
        raise ValueError(
            f"unknown device preference {preference!r}; expected one of "
            f"{', '.join(DEVICE_PREFERENCES)} (N: a CUDA device index)"
        )
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {preference!r} was requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); check"
            " analysis.device (auto runs on the CPU where no GPU is visible)"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        visible = ", ".join(f"cuda:{i}" for i in range(count))
        raise DeviceUnavailable(
            f"device {preference!r} was requested but only {count} CUDA device(s) are "
            f"visible ({visible}); check analysis.device and CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)


def cuda_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes on a CUDA device, counting other processes' use too."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def release_cached(device: torch.device) -> None:
    """Give the caching allocator's unused blocks back, so free memory is real free memory."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def release_freed_host_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``); False
    where there is no such call (another C library).

    A job's masks and label images are mostly under glibc's mmap threshold (which rises
    up to 32 MiB as large blocks are freed), so they come from the heap and, once freed,
    stay resident there. Measured in the node with three 300-slice studies: between jobs
    the process stayed at 740-890 MiB without this and 510-620 MiB with it.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], function)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised because of, torch running out of device memory.

    The chain is followed (``raise ... from``, or raised while handling) because
    code that already tried smaller tiles reports the final out-of-memory as
    its own error; the CPU may still manage the job.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError) and "out of memory" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


_gates: dict[str, threading.Lock] = {}
_gates_lock = threading.Lock()


def device_gate(device: torch.device) -> AbstractContextManager[object]:
    """The process-wide lock of a CUDA device (one job on it at a time); none for the CPU.

    Process-wide rather than per worker, so that two workers of one process
    (or a test building a second one) still share the device one job at a time.
    """
    if device.type != "cuda":
        return nullcontext()
    key = f"cuda:{device.index if device.index is not None else 0}"
    with _gates_lock:
        return _gates.setdefault(key, threading.Lock())
