"""The receive path's header scanner (dicom_node.header_scan) against pydicom.

Wherever the scanner answers, its answer must be pydicom's; wherever it is unsure, it
must say so (None) so that pydicom reads the dataset instead.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pdus
import pydicom
import pytest
from nodes import partial_files
from peers import PHILIPS_L, SHARED_REAL
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.header import (
    CANNOT_DECODE,
    CANNOT_UNDERSTAND,
    Rejected,
    _pydicom_values,
    parse_header,
    pynetdicom_uid_check,
    received_header,
)
from dicom_node.header_scan import MAX_DEPTH, meta_elements_length, scan
from dicom_node.store import Spool


def _split(raw: bytes) -> tuple[bytes, bytes, str]:
    """(file meta part, dataset part, transfer syntax) of a Part 10 stream."""
    stream = DicomBytesIO(raw)
    pydicom.filereader.read_preamble(stream, False)
    meta = pydicom.filereader._read_file_meta_info(stream)
    offset = stream.tell()
    return raw[:offset], raw[offset:], str(meta.TransferSyntaxUID)


def _real_files() -> list[Path]:
    found = []
    for path in sorted(SHARED_REAL.rglob("*")):
        if path.is_file() and path.suffix in ("", ".dcm"):
            with path.open("rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


def test_every_real_object_reads_as_pydicom_reads_it() -> None:
    files = _real_files()
    assert len(files) > 100  # Philips, Siemens (JPEG 2000), GE, SEG and SR objects
    for path in files:
        raw = path.read_bytes()
        _, dataset, syntax = _split(raw)
        values = scan(dataset, syntax)
        assert values is not None, path.name
        assert values == _pydicom_values(raw), path.name


def _part10(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dataset(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P 1"
    ds.SeriesNumber = " 3"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _nested() -> Sequence:
    inner = Dataset()
    inner.CodeValue = "113691"
    inner.ContentSequence = Sequence([Dataset()])  # an empty nested item
    outer = Dataset()
    outer.ReferencedSOPInstanceUID = generate_uid()
    outer.PurposeOfReferenceCodeSequence = Sequence([inner])
    return Sequence([outer, Dataset()])


def _undefined_lengths(ds: Dataset) -> None:
    """Have pydicom write every sequence and item of ``ds`` with undefined lengths."""
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_undefined_length_sequences_before_the_wanted_tags_are_skipped(syntax: str) -> None:
    ds = _dataset(ReferencedImageSequence=_nested(), SourceImageSequence=_nested())
    _undefined_lengths(ds)
    raw = _part10(ds, syntax)
    _, dataset, _ = _split(raw)
    assert b"\xfe\xff\xdd\xe0" in dataset  # pydicom wrote sequence delimiters
    values = scan(dataset, syntax)
    assert values is not None
    assert values == _pydicom_values(raw)
    assert values["SeriesNumber"] == "3" and values["PatientID"] == "P 1"


@pytest.mark.parametrize(
    "change",
    [
        {"SpecificCharacterSet": "ISO_IR 144"},  # Cyrillic: pydicom decodes it
        {"StudyDescription": ["one", "two"]},  # multi-valued
        {"SeriesInstanceUID": None},  # a UID missing: pydicom's refusal, not ours
    ],
)
def test_unsure_cases_are_left_to_pydicom(change: dict[str, object]) -> None:
    ds = _dataset()
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    _, dataset, syntax = _split(_part10(ds, ExplicitVRLittleEndian))
    assert scan(dataset, syntax) is None


def test_big_endian_truncated_and_garbage_bytes_are_left_to_pydicom() -> None:
    raw = _part10(_dataset(), ExplicitVRLittleEndian)
    _, dataset, syntax = _split(raw)
    assert scan(dataset, syntax) is not None
    assert scan(dataset, ExplicitVRBigEndian) is None
    cut = dataset.index(b"\x20\x00\x0e\x00") + 10  # inside SeriesInstanceUID
    assert scan(dataset[:cut], syntax) is None
    assert scan(os.urandom(4096), syntax) is None
    assert scan(b"\x08\x00\x16\x00ab\x04\x001234", syntax) is None  # VR "ab"
    # a VR PS3.5 does not define ("QQ") on a wanted element: pydicom refuses the dataset
    unknown = dataset.replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00QQ", 1)
    assert unknown != dataset and scan(unknown, syntax) is None


def test_a_prefix_counts_only_when_the_pixel_data_begins_in_it() -> None:
    ds = _dataset(Rows=2, Columns=2, BitsAllocated=16, PixelData=bytes(8))
    _, dataset, syntax = _split(_part10(ds, ExplicitVRLittleEndian))
    before_pixels = dataset.index(b"\xe0\x7f\x10\x00")
    assert scan(dataset[: before_pixels + 8], syntax, complete=False) is not None
    assert scan(dataset[:before_pixels], syntax, complete=False) is None  # may go on
    assert scan(dataset[:before_pixels], syntax, complete=True) is not None


def test_structure_after_the_wanted_tags_is_walked_too() -> None:
    deep = pdus.nested_dataset(MAX_DEPTH + 1, generate_uid())
    assert scan(deep, ImplicitVRLittleEndian) is None  # pydicom judges it
    shallow = pdus.nested_dataset(MAX_DEPTH - 1, generate_uid())
    assert scan(shallow, ImplicitVRLittleEndian) is not None
    assert scan(shallow[:-8], ImplicitVRLittleEndian) is None  # a sequence left open


def test_received_header_reads_a_dataset_in_small_pieces_as_one() -> None:
    raw = (PHILIPS_L / sorted(os.listdir(PHILIPS_L))[0]).read_bytes()
    meta, dataset, syntax = _split(raw)
    values = _pydicom_values(raw)
    pieces = [dataset[start : start + 7] for start in range(0, len(dataset), 7)]
    header = received_header(meta, pieces, syntax, values["SOPClassUID"], values["SOPInstanceUID"])
    assert header == parse_header(raw, values["SOPClassUID"], values["SOPInstanceUID"])
    assert header.series_uid == values["SeriesInstanceUID"]


def test_received_header_falls_back_to_pydicom_and_keeps_its_checks() -> None:
    ds = _dataset(SpecificCharacterSet="ISO_IR 144", PatientName="Иванов^Иван")
    raw = _part10(ds, ExplicitVRLittleEndian)
    meta, dataset, syntax = _split(raw)
    header = received_header(meta, [dataset], syntax, ds.SOPClassUID, ds.SOPInstanceUID)
    assert header.study_details["PatientName"] == "Иванов^Иван"
    del ds.StudyInstanceUID
    raw = _part10(ds, ExplicitVRLittleEndian)
    meta, dataset, syntax = _split(raw)
    with pytest.raises(Rejected) as refused:
        received_header(meta, [dataset], syntax, ds.SOPClassUID, ds.SOPInstanceUID)
    assert refused.value.status == CANNOT_UNDERSTAND


def test_a_dataset_in_another_encoding_than_its_transfer_syntax_is_refused() -> None:
    """Explicit VR data on an Implicit VR context (or the reverse): pydicom guesses and
    reads it, and the file would name one encoding and hold the other."""
    ds = _dataset()
    for written, negotiated in (
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        (ImplicitVRLittleEndian, ExplicitVRLittleEndian),
    ):
        meta, dataset, _ = _split(_part10(ds, written))
        with pytest.raises(Rejected) as refused:
            received_header(meta, [dataset], negotiated, ds.SOPClassUID, ds.SOPInstanceUID)
        assert refused.value.status == CANNOT_DECODE, (written, negotiated)
        assert "encoded in explicit VR" in refused.value.reason
        assert received_header(meta, [dataset], written, ds.SOPClassUID, ds.SOPInstanceUID)


def test_write_atomic_writes_many_pieces_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.create()
    data = os.urandom(3000 * 37)
    pieces = [memoryview(data)[start : start + 37] for start in range(0, len(data), 37)]
    assert len(pieces) > 1024  # more than one writev
    relpath = spool.new_instance_relpath()
    try:
        assert spool.write_atomic(relpath, [b"", *pieces]).read_bytes() == data
        assert partial_files(spool.tmp) == []
    finally:
        spool.release()


def test_write_atomic_with_a_writer_leaves_nothing_when_it_fails(tmp_path: Path) -> None:
    """A function that writes to the file (the SEG, written as it is encoded): its bytes
    are the file's; if it raises, no file and no partial file is left."""
    spool = Spool(tmp_path / "spool")
    spool.create()
    relpath = "results/1/seg.dcm"
    try:
        written = spool.write_atomic(relpath, lambda stream: stream.write(b"DICM" * 5000))
        assert written.read_bytes() == b"DICM" * 5000

        def failing(stream: object) -> None:
            assert hasattr(stream, "write")
            stream.write(b"half")  # type: ignore[attr-defined]
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            spool.write_atomic("results/2/seg.dcm", failing)
        assert not (spool.root / "results/2/seg.dcm").exists()
        assert partial_files(spool.tmp) == []
    finally:
        spool.release()


def test_the_file_meta_elements_leading_a_dataset_are_measured_only_when_whole() -> None:
    explicit = pdus.element(0x0002, 0x0010, b"1.2.840.10008.1.2\0")  # implicit-VR bytes
    explicit_ui = b"\x02\x00\x10\x00UI\x12\x00" + b"1.2.840.10008.1.2\0"
    explicit_ob = b"\x02\x00\x01\x00OB\0\0" + (2).to_bytes(4, "little") + b"\0\1"
    rest = pdus.element(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.2\0")
    for lead in (explicit, explicit_ui, explicit_ob + explicit_ui, explicit_ui + explicit):
        assert meta_elements_length(lead + rest) == len(lead)
    assert meta_elements_length(rest) == 0  # none
    assert meta_elements_length(explicit_ui) == 0  # nothing after them: not sure they end
    assert meta_elements_length((explicit_ui + rest)[:10]) == 0  # cut inside
    undefined = b"\x02\x00\x01\x00OB\0\0" + b"\xff" * 4
    assert meta_elements_length(undefined + rest) == 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, for the invalid ones
def test_the_quick_uid_check_answers_as_pynetdicoms_own() -> None:
    from pydicom.uid import UID
    from pynetdicom._validators import validate_ui

    values: list[object] = ["", " ", "1.2", "1" * 64, "1" * 65, "1" * 64 + " ", "abc"]
    values += [" 1.2.3 ", UID("1.2.840.10008.1.2"), 5, b"1.2", None]
    for value in values:
        assert pynetdicom_uid_check(value) == validate_ui(value), repr(value)  # type: ignore[arg-type]


def test_an_error_comment_is_a_short_lo_value() -> None:
    from dicom_node.header import error_comment

    assert error_comment("dataset SOP Class 1.2 != request 1.3") == (
        "dataset SOP Class 1.2 != request 1.3"
    )
    long = error_comment(
        "an instance of 528000 bytes would leave 0 of the 372736 bytes free, below"
        " storage.min_free_bytes (0)"
    )
    assert long == "an instance of 528000 bytes would leave 0 of the 372736..."
    assert len(long) <= 64
    assert error_comment("a\\b\nc \u00e9") == "a?b?c ?"  # LO: no backslash, control, non-ASCII
