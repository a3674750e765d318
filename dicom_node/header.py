"""What routing and the journal need from a received dataset, read and checked.

:func:`received_header` serves the receive path (the dataset in pieces, as it came off
the wire; :mod:`dicom_node.header_scan` first, pydicom where that is unsure) and
:func:`parse_header` a whole Part 10 file (start-up re-indexing). Both check the
dataset's UIDs against the request's and raise :class:`Rejected` with the C-STORE
status to answer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.uid import UID

from dicom_node import header_scan
from dicom_node.header_scan import Buffer
from dicom_node.intake import ReceivedInstance

# C-STORE response statuses (PS3.4 B.2.3 and pynetdicom's service-specific codes)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
CANNOT_DECODE = 0xC210
UNEXPECTED_ERROR = 0xC211
PROCESSING_FAILURE = 0x0110  # N-EVENT-REPORT (PS3.7 10.1.1.1.8)


class Rejected(Exception):
    """An instance we refuse, with the status to answer and a PHI-free reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What routing and the journal need from a received dataset."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    study_details: dict[str, str] = field(default_factory=dict)
    series_details: dict[str, str] = field(default_factory=dict)

    def instance(
        self, relpath: str, transfer_syntax: str, size: int, calling_aet: str, received_at: float
    ) -> ReceivedInstance:
        """The journal's record of this instance, stored at ``relpath``."""
        return ReceivedInstance(
            sop_uid=self.sop_uid,
            sop_class_uid=self.sop_class_uid,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            modality=self.modality,
            relpath=relpath,
            transfer_syntax=transfer_syntax,
            size=size,
            calling_aet=calling_aet,
            received_at=received_at,
            study_details=self.study_details,
            series_details=self.series_details,
        )


# Shown on the dashboard and the REST API (never logged): untrusted text, kept short.
STUDY_DETAILS = ("PatientName", "PatientID", "AccessionNumber", "StudyDescription", "StudyDate")
SERIES_DETAILS = ("SeriesNumber", "SeriesDescription", "BodyPartExamined")
DETAIL_MAX_CHARS = 128
HEADER_PREFIX_BYTES = 64 * 1024  # where header_scan looks for the header fields


def parse_header(data: bytes, request_class: str, request_instance: str) -> Header:
    """The header fields of a Part 10 stream, read by pydicom, checked against a request."""
    return _checked(_pydicom_values(data), request_class, request_instance)


def received_header(
    meta: bytes,
    dataset: Sequence[Buffer],
    transfer_syntax: str,
    request_class: str,
    request_instance: str,
) -> Header:
    """The header fields of a received dataset (in pieces, behind its file ``meta``).

    Read from the dataset's first 64 KiB by :func:`dicom_node.header_scan.scan` where
    that can; otherwise, and for anything it is unsure of, by pydicom (never the pixel
    data). Checked against the request either way.
    """
    values = None
    if dataset:
        prefix = _prefix(dataset, HEADER_PREFIX_BYTES)
        complete = len(prefix) == sum(len(piece) for piece in dataset)
        values = header_scan.scan(prefix, transfer_syntax, complete)
        if values is None:  # the scan is unsure: pydicom would guess an encoding
            mismatch = header_scan.encoding_mismatch(prefix, transfer_syntax)
            if mismatch is not None:
                raise Rejected(CANNOT_DECODE, mismatch)
    if values is None:
        values = _pydicom_values(b"".join((meta, *dataset)))
    return _checked(values, request_class, request_instance)


def _checked(values: dict[str, str], request_class: str, request_instance: str) -> Header:
    for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not values.get(key):
            raise Rejected(CANNOT_UNDERSTAND, f"{key} is missing or empty")
        if not valid_uid(values[key]):
            raise Rejected(CANNOT_UNDERSTAND, f"{key} is not a valid UID")
    if values["SOPClassUID"] != request_class:
        raise Rejected(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOP Class {values['SOPClassUID']} != request {request_class}",
        )
    if values["SOPInstanceUID"] != request_instance:
        raise Rejected(DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset SOP Instance UID != request")
    return Header(
        values["SOPClassUID"],
        values["SOPInstanceUID"],
        values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
        values.get("Modality") or "OT",
        _details(values, STUDY_DETAILS),
        _details(values, SERIES_DETAILS),
    )


def _pydicom_values(data: bytes) -> dict[str, str]:
    """The wanted fields as pydicom reads them (keyword -> text, empty ones left out)."""
    try:
        ds = pydicom.dcmread(
            BytesIO(data), stop_before_pixels=True, specific_tags=list(header_scan.KEYWORDS)
        )
        values = {key: str(ds.get(key, "") or "").strip() for key in header_scan.KEYWORDS}
    except Exception as exc:
        raise Rejected(CANNOT_DECODE, f"dataset cannot be decoded ({type(exc).__name__})") from exc
    return {key: value for key, value in values.items() if value}


def error_comment(reason: str) -> str:
    """A refusal's reason as an Error Comment (0000,0902) of the response: LO, so at most
    64 characters of the default repertoire, cut at a word with "..." where longer. The
    reasons name settings, UIDs' roles and sizes, never patient data."""
    text = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in reason).strip()
    if len(text) <= 64:
        return text
    cut = text[:61].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + "..."


def pynetdicom_uid_check(value: object) -> tuple[bool, str]:
    """pynetdicom's own check of a UID it decodes or is given (``_config.VALIDATORS``),
    as it makes it without ``ENFORCE_UID_CONFORMANCE`` (the node leaves that off): not
    empty, at most 64 characters; without making a pydicom ``UID`` of it again first,
    which with some 700 UIDs for an association that proposes 128 contexts was a tenth
    of the CPU time its set-up took. Whether the UID is conformant is looked at by
    pynetdicom after this (it warns), and by the node where it uses one (:func:`valid_uid`).
    """
    if not isinstance(value, str):
        return False, "must be pydicom.uid.UID"
    value = value.strip()  # as UID() strips it
    if not value:
        return False, "must not be an empty str"
    if len(value) > 64:
        return False, "must not exceed 64 characters"
    return True, ""


def check_uids_quickly() -> None:
    """Make :func:`pynetdicom_uid_check` pynetdicom's UID validator (its documented hook)
    unless UID conformance is enforced there. Call before creating an AE."""
    from pynetdicom import _config

    if not _config.ENFORCE_UID_CONFORMANCE:
        _config.VALIDATORS["UI"] = pynetdicom_uid_check


@functools.lru_cache(maxsize=4096)
def valid_uid(text: str) -> bool:
    """pydicom's UID check, remembered: a series' study, series and class UIDs repeat."""
    return UID(text).is_valid


def _details(values: dict[str, str], keywords: tuple[str, ...]) -> dict[str, str]:
    return {key: values[key][:DETAIL_MAX_CHARS] for key in keywords if values.get(key)}


def _prefix(pieces: Sequence[Buffer], size: int) -> Buffer:
    """The first ``size`` bytes (or all) of ``pieces``, copied only if they span several."""
    if len(pieces[0]) >= size or len(pieces) == 1:
        return pieces[0]
    taken: list[Buffer] = []
    total = 0
    for piece in pieces:
        taken.append(piece)
        total += len(piece)
        if total >= size:
            break
    return b"".join(taken)
