"""DICOM File Format (PS3.10) framing of a received dataset, written from bytes.

The C-STORE handler stores the dataset exactly as it arrived, behind a preamble and a
File Meta Information group. Building that group with pydicom (``Dataset`` +
``write_file_meta_info``) validated every UID again and cost about a third of a
millisecond per instance; here it is a handful of ``struct.pack`` calls on values
the handler has already checked (:func:`dicom_node.header.received_header`).

The calling AE title goes into Source Application Entity Title (0002,0016), so that a
file can be indexed again from its own bytes (see :func:`read_file_meta`) after a
journal write was lost to a power failure.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

PREAMBLE = b"\0" * 128 + b"DICM"
IMPLEMENTATION_VERSION = b"DICOM_NODE_1"  # (0002,0013) SH, at most 16 characters
assert len(IMPLEMENTATION_VERSION) <= 16


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (UI, SH, AE, UL)."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_aet: str = ""
) -> bytes:
    """Preamble, "DICM" and the File Meta Information group for one instance.

    UIDs must already be valid (ASCII digits and dots); ``source_aet`` is an AE title
    as negotiated (ASCII, at most 16 characters), left out when empty.
    """
    body = b"".join(
        (
            # (0002,0001) OB: 2 reserved bytes, 4-byte length
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _element(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\0")),
            _element(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
            _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax, b"\0")),
            _element(0x0002, 0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _element(0x0002, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION.decode(), b" ")),
            _element(0x0002, 0x0016, b"AE", _padded(source_aet.strip(), b" "))
            if source_aet.strip()
            else b"",
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return PREAMBLE + group_length + body


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    source_aet: str


def read_file_meta(data: bytes) -> FileMeta:
    """The File Meta Information of a Part 10 stream (raises if there is none)."""
    stream = BytesIO(data)
    pydicom.filereader.read_preamble(stream, False)  # raises when there is no "DICM"
    parsed = pydicom.filereader._read_file_meta_info(stream)
    return FileMeta(
        str(parsed.get("MediaStorageSOPClassUID", "")),
        str(parsed.get("MediaStorageSOPInstanceUID", "")),
        str(parsed.get("TransferSyntaxUID", "")),
        str(parsed.get("SourceApplicationEntityTitle", "") or "").strip(),
    )
