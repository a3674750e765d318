"""Choose the torch device the analysis runs on."""

from __future__ import annotations

import torch

DEVICE_PREFERENCES = ("auto", "cpu", "cuda")


def select_device(preference: str = "auto") -> torch.device:
    """Return the device for ``preference``: "auto", "cpu" or "cuda".

    "auto" picks CUDA when it is available and the CPU otherwise; "cuda" raises
    :class:`RuntimeError` when no CUDA device can be used.
    """
    if preference not in DEVICE_PREFERENCES:
        raise ValueError(
            f"unknown device preference {preference!r}; expected one of {DEVICE_PREFERENCES}"
        )
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError(
            "device 'cuda' was requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})"
        )
    return torch.device("cpu")
