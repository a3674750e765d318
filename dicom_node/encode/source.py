"""The patient and study of a SEG or SR: the source's own, as received.

highdicom copies the Patient and General Study attributes of the first source image (of
an SR: of its first evidence item) into what it builds, and converts some of them on the
way. A Patient's Birth Date, Study Date or Study Time that is not a valid DA or TM
(``00000000``, ``19790230``, ``1979-02-28``), a Patient's Sex other than M, F or O
(``U``, ``male``), or one of these Type 2 attributes missing altogether made it raise,
and the study got no results. Real archives hold such values.

:func:`readable_source` gives highdicom a copy of that dataset with those attributes
empty (absent ones added empty), and :meth:`Readable.restore` then puts the source's own
elements into the result: a SEG or SR carries the patient and the study exactly as its
source does, which is what a PACS matches it by. The log names the attributes, never
their values.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

log = logging.getLogger(__name__)

#: What highdicom reads from the source as an attribute (absent: AttributeError).
READ = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_CONVERTED: dict[str, Callable[[str], object]] = {
    "PatientBirthDate": DA,
    "StudyDate": DA,
    "StudyTime": TM,
}
_SEXES = frozenset({"M", "F", "O"})  # highdicom's PatientSexValues


@dataclass(frozen=True)
class Readable:
    """``dataset``: what to hand highdicom; ``kept``: the source's elements it could not
    read, for :meth:`restore`; ``absent``: the attributes the source lacks."""

    dataset: Dataset
    kept: tuple[DataElement, ...] = ()
    absent: tuple[str, ...] = ()

    def restore(self, built: Dataset, what: str) -> None:
        """Put the source's own elements into ``built`` (a ``what``: "SEG" or "SR")."""
        for element in self.kept:
            built[element.tag] = copy.deepcopy(element)
        if self.kept:
            names = ", ".join(element.keyword for element in self.kept)
            log.info(
                "the source's %s: not valid DICOM values; the %s has them as received", names, what
            )
        if self.absent:
            log.info("the source has no %s: the %s has it empty", ", ".join(self.absent), what)


def readable_source(source: Dataset) -> Readable:
    """``source`` as highdicom can read it (see the module's doc)."""
    kept: list[DataElement] = []
    absent: list[str] = []
    for keyword in READ:
        if keyword not in source:
            absent.append(keyword)
            continue
        element = source[keyword]
        if not _readable(keyword, element.value):
            kept.append(element)
    if not kept and not absent:
        return Readable(source)
    # A shallow copy with an element dict of its own (copy.copy alone shares the source's
    # dict), whose emptied attributes are new elements: setting a value on an element
    # it shares with the source would change the source's.
    readable = copy.copy(source)
    readable._dict = dict(source._dict)
    for keyword in absent:
        setattr(readable, keyword, "")
    for element in kept:
        readable[element.tag] = DataElement(element.tag, element.VR, "")
    return Readable(readable, tuple(kept), tuple(absent))


def _readable(keyword: str, value: object) -> bool:
    if value is None or value == "":
        return True
    if keyword == "PatientSex":
        return value in _SEXES
    convert = _CONVERTED.get(keyword)
    if convert is None:
        return True
    try:
        convert(value)  # type: ignore[arg-type]
    except (ValueError, TypeError, OverflowError):
        return False
    return True
