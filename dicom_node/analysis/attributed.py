"""An :class:`AnalysisResult` that also says who made the algorithm and how to show it.

IHE AI Results wants each algorithm named as Contributing Equipment with its own
Device UID, which changes with the model version; a model package declares both,
and the colour of each label. The encoders read these when present and derive
defaults otherwise (built-in pipelines).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.analysis.types import AnalysisResult


@dataclass(frozen=True)
class AttributedResult(AnalysisResult):
    manufacturer: str | None = None  # the algorithm's maker
    device_uid: str | None = None  # Device UID (0018,1002) of this algorithm version
    # (segment key, sRGB colour) pairs: Recommended Display CIELab Value in the SEG
    colors: tuple[tuple[str, tuple[int, int, int]], ...] = ()

    def color_of(self, key: str) -> tuple[int, int, int] | None:
        return dict(self.colors).get(key)
