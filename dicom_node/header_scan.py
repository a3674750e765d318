"""The header fields routing needs, read straight from a received dataset's bytes.

Every C-STORE needs 13 values from the start of the dataset: the four UIDs, the
modality and the few details the dashboard shows (:data:`KEYWORDS`). ``pydicom.dcmread``
with ``specific_tags`` still builds a file object, a dataset and a data element for
every element up to the pixel data: about half a millisecond per CT slice, a sixth of
the receive path. :func:`scan` walks the elements with ``struct`` instead, up to the
pixel data as pydicom does (so a dataset whose structure is broken before the pixel data
still goes to pydicom, which refuses it), and converts only the wanted values.

It answers only what it is sure of and returns ``None`` otherwise, and the caller asks
pydicom: big endian or deflated transfer syntaxes, a character set other than the
default, Latin-1 or UTF-8, a multi-valued or malformed wanted element, a VR that PS3.5
does not define, an undefined length other than a sequence's, nesting deeper than
:data:`MAX_DEPTH`, or bytes that end before the walk does. The values are what
``str(dataset.Keyword)`` gives for the same bytes (tested against pydicom on real scans).
"""

from __future__ import annotations

import struct

Buffer = bytes | bytearray | memoryview

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_NOT_LITTLE_ENDIAN_EXPLICIT = frozenset(
    {
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
    }
)

# tag -> keyword of the values wanted
WANTED: dict[int, str] = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00081030: "StudyDescription",
    0x0008103E: "SeriesDescription",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00180015: "BodyPartExamined",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
}
KEYWORDS = tuple(WANTED.values())
_PIXELS = 0x7FE00008  # Float Pixel Data, Double Float Pixel Data, Pixel Data: the walk ends
_CHARSET = 0x00080005
_KEPT = frozenset({*WANTED, _CHARSET})  # raw values taken from the top level
_ENCODINGS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_UIDS = frozenset({0x00080016, 0x00080018, 0x0020000D, 0x0020000E})
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# Every VR of PS3.5 6.2. Any other is pydicom's to judge (it refuses one), and its length
# field could be either size: the walk would not know where the next element starts.
_VRS = _LONG_VRS | frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT"}
    | {b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 16  # sequences within sequences; deeper ones are pydicom's to judge

_TAG = struct.Struct("<HH")
_TAG_LENGTH = struct.Struct("<HHL")
_SHORT = struct.Struct("<H")
_LONG = struct.Struct("<L")


class _Unsure(Exception):
    """Something this scanner does not handle: pydicom reads the dataset instead."""


def scan(dataset: Buffer, transfer_syntax: str, complete: bool = True) -> dict[str, str] | None:
    """The wanted values (keyword -> text; absent or empty ones left out), or ``None``
    when pydicom must read the dataset (see the module's doc).

    ``dataset`` may be the first part of the dataset only (``complete`` False): the
    answer is then ``None`` unless the pixel data begins within it.

    All four UIDs must be found, or it is ``None``: refusing an instance is always
    pydicom's decision, never this scanner's.
    """
    if transfer_syntax in _NOT_LITTLE_ENDIAN_EXPLICIT:
        return None
    try:
        raw = _Walk(memoryview(dataset), transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN).top(complete)
        found = _decode(raw)
    except (_Unsure, struct.error, UnicodeDecodeError):
        return None
    if not all(WANTED[tag] in found for tag in _UIDS):
        return None
    return found


def encoding_mismatch(dataset: Buffer, transfer_syntax: str) -> str | None:
    """Why the first element of ``dataset`` is not encoded as ``transfer_syntax`` says
    (explicit VR data on an Implicit VR context, or the reverse), or ``None``.

    pydicom guesses such a dataset's encoding from the same two bytes and reads it
    anyway (with a warning); stored behind File Meta Information that names the
    negotiated syntax, the file would contradict itself.
    """
    if transfer_syntax in _NOT_LITTLE_ENDIAN_EXPLICIT or len(dataset) < 6:
        return None
    looks_explicit = bytes(dataset[4:6]) in _VRS
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN and looks_explicit:
        return "the dataset is encoded in explicit VR, not in the negotiated implicit VR"
    if transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN and not looks_explicit:
        return "the dataset is not encoded in explicit VR, as its negotiated transfer syntax is"
    return None


def meta_elements_length(dataset: Buffer) -> int:
    """How many bytes of File Meta Information elements (group 0002) lead ``dataset``: 0
    when there are none, or when they do not end within it as whole elements.

    Such elements belong in a Part 10 file's File Meta Information, never in a dataset
    (PS3.5 7.1; a sender that sends a file as read, minus its preamble, puts them
    there). Each may be in explicit VR, as in a file, or in the dataset's implicit VR.
    """
    data = memoryview(dataset)
    size = len(data)
    pos = 0
    while pos + 8 <= size:
        (group,) = _SHORT.unpack_from(data, pos)
        if group != 0x0002:
            return pos
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > size:
                return 0
            (length,) = _LONG.unpack_from(data, pos + 8)
            start = pos + 12
        elif vr in _VRS:
            (length,) = _SHORT.unpack_from(data, pos + 6)
            start = pos + 8
        else:  # implicit VR
            (length,) = _LONG.unpack_from(data, pos + 4)
            start = pos + 8
        if length == UNDEFINED:
            return 0
        pos = start + length
    return 0


def _decode(raw: dict[int, bytes]) -> dict[str, str]:
    charset = raw.pop(_CHARSET, b"").decode("ascii").strip(" \0")
    encoding = _ENCODINGS.get(charset)
    if encoding is None:
        raise _Unsure
    found = {}
    for tag, value in raw.items():
        text = value.decode("ascii" if tag in _UIDS else encoding)
        if "\\" in text:
            raise _Unsure  # multi-valued: pydicom's MultiValue text
        text = text.strip(" \0")
        if text:
            found[WANTED[tag]] = text
    return found


class _Walk:
    def __init__(self, data: memoryview, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.size = len(data)

    def top(self, complete: bool) -> dict[int, bytes]:
        """The wanted elements' raw values, from the top level only, walking every
        element up to the pixel data; ``complete``: the buffer holds the whole dataset."""
        raw: dict[int, bytes] = {}
        pos = 0
        while pos < self.size:
            group, element = _TAG.unpack_from(self.data, pos)
            tag = group << 16 | element
            if tag >= _PIXELS:
                return raw
            vr, length, start = self._element(pos)
            if length == UNDEFINED:
                if tag in _KEPT:
                    raise _Unsure
                pos = self._sequence(start, vr, 1)
                continue
            pos = start + length
            if pos > self.size:
                raise _Unsure  # ends inside the element
            if tag in _KEPT:
                raw[tag] = bytes(self.data[start:pos])
        if not complete:
            raise _Unsure  # the rest of the dataset is not here
        return raw  # a dataset without pixel data

    def _element(self, pos: int) -> tuple[bytes, int, int]:
        """(VR or b"", value length, value offset) of the element at ``pos``."""
        if self.implicit:
            (length,) = _LONG.unpack_from(self.data, pos + 4)
            return b"", length, pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr not in _VRS:
            raise _Unsure
        if vr in _LONG_VRS:
            (length,) = _LONG.unpack_from(self.data, pos + 8)
            return vr, length, pos + 12
        (length,) = _SHORT.unpack_from(self.data, pos + 6)
        return vr, length, pos + 8

    def _sequence(self, pos: int, vr: bytes, depth: int) -> int:
        """Skip the items of an undefined-length sequence from ``pos``; the offset after it."""
        if depth > MAX_DEPTH or vr not in (b"", b"SQ"):
            raise _Unsure  # UN or encapsulated data of undefined length: not here
        while True:
            tag_group, tag_element, length = _TAG_LENGTH.unpack_from(self.data, pos)
            tag = tag_group << 16 | tag_element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise _Unsure
            if length == UNDEFINED:
                pos = self._item(pos, depth)
            else:
                pos += length
            if pos > self.size:
                raise _Unsure

    def _item(self, pos: int, depth: int) -> int:
        """Skip the elements of an undefined-length item from ``pos``; the offset after it."""
        while True:
            group, element = _TAG.unpack_from(self.data, pos)
            if group << 16 | element == _ITEM_END:
                return pos + 8
            vr, length, start = self._element(pos)
            if length == UNDEFINED:
                pos = self._sequence(start, vr, depth + 1)
            else:
                pos = start + length
            if pos > self.size:
                raise _Unsure
