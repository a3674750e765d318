"""Identifiers and equipment description shared by the SEG and SR encoders."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from dicom_node import __version__


@dataclass(frozen=True)
class ResultUIDs:
    """UIDs of the result objects, fixed when a job is created so resends never duplicate."""

    seg_series_uid: str
    seg_sop_uid: str
    sr_series_uid: str
    sr_sop_uid: str


@dataclass(frozen=True)
class Equipment:
    """General Equipment Module values (PS3.3 C.7.5.1) and the SR device observer (TID 1004)."""

    device_serial_number: str
    device_observer_uid: str
    manufacturer: str = "dicom_node"
    model_name: str = "dicom_node"
    software_version: str = __version__
    seg_series_number: int = 9901
    sr_series_number: int = 9902
    institution_name: str | None = None


@dataclass(frozen=True)
class AlgorithmEquipment:
    """The algorithm as Contributing Equipment (IHE AI Results): who made which version.

    ``device_uid`` (0018,1002) identifies this version of the algorithm: it changes
    whenever the model version does.
    """

    manufacturer: str
    model_name: str
    software_version: str
    device_uid: str


def derived_device_uid(name: str, version: str) -> str:
    """A stable Device UID for a built-in algorithm version (2.25 UUID form, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'dicom_node algorithm {name} {version}').int}"
