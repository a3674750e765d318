"""Weights for the example model package, made locally: nothing is downloaded or committed.

``python -m dicom_node.analysis.examples models/example-hu-threshold`` writes
``model.pt`` next to the package's ``model.yaml``. The network is a TorchScript
module that scores Hounsfield-unit ranges (a demonstration of the package
format and of the node's handling of a network, not a clinical model).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from dicom_node.analysis.inference import TORCHSCRIPT_DEPRECATION

#: HU ranges of the example's classes 1 (aerated lung) and 2 (bone); 0 is background.
EXAMPLE_RANGES: tuple[tuple[float, float], ...] = ((-950.0, -500.0), (300.0, 3000.0))


class HuRanges(torch.nn.Module):
    """Class logits from HU ranges: (N, 1, *spatial) -> (N, 1 + ranges, *spatial).

    Channel c > 0 is positive inside range c (scaled by ``sharpness``), channel 0
    is positive where no range applies, so softmax/argmax gives a label map.
    """

    def __init__(self, ranges: Sequence[tuple[float, float]], sharpness: float = 0.1) -> None:
        super().__init__()
        bounds = torch.tensor(ranges, dtype=torch.float32).reshape(-1, 2)
        self.low = torch.nn.Parameter(bounds[:, 0].clone(), requires_grad=False)
        self.high = torch.nn.Parameter(bounds[:, 1].clone(), requires_grad=False)
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        low = self.low.view(shape)
        high = self.high.view(shape)
        inside = torch.minimum(x - low, high - x) * self.sharpness
        background = -inside.max(dim=1, keepdim=True).values
        return torch.cat([background, inside], dim=1)


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    """Script ``module`` and save it where a package's ``network.file`` points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATION, DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def build_example(folder: Path) -> Path:
    """Write the example package's weights (``model.pt``) into ``folder``."""
    return save_torchscript(HuRanges(EXAMPLE_RANGES), folder / "model.pt")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m dicom_node.analysis.examples PACKAGE_FOLDER", file=sys.stderr)
        return 2
    print(f"wrote {build_example(Path(args[0]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
