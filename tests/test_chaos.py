"""Chaos: SIGKILL the node at random moments while it receives, analyses and sends.

A sender keeps (re)sending whatever was not acknowledged. Afterwards every
acknowledged instance is on disk and in the journal, and for every study Orthanc
holds exactly one current SEG and SR (earlier versions are named as the SR's
predecessors) with the SEG referencing every instance sent.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from nodes import NodeProcess, chest_route, node_settings, pacs_destination
from peers import GE_3SLICE, LOCALHOST, PHILIPS_L, Orthanc, require_tools, wait_until
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.journal import Journal

pytestmark = pytest.mark.slow

KILLS = 15
SEED = 20261122


def studies() -> list[list[pydicom.Dataset]]:
    philips = [pydicom.dcmread(p) for p in sorted(PHILIPS_L.glob("*.dcm"))[:40]]
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    ge_copy = copy.deepcopy(ge)
    study, series = generate_uid(), generate_uid()
    for ds in ge_copy:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return [philips, ge, ge_copy]


class Sender(threading.Thread):
    """Sends every dataset until acknowledged, reconnecting after each crash."""

    def __init__(self, port: int, datasets: list[pydicom.Dataset], pause: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.pending = list(datasets)
        self.acked: set[str] = set()
        self.pause = pause
        self.reconnects = 0  # associations refused or not answered: the node was down
        self.broken = 0  # associations that ended under a request: a kill hit one

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while self.pending and time.monotonic() < deadline:
            ae = AE(ae_title="SCANNER")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2"])
            assoc = ae.associate(LOCALHOST, self.port, ae_title="AINODE")
            if not assoc.is_established:
                self.reconnects += 1
                time.sleep(0.2)  # the node is restarting: a client's retry pause
                continue
            self._send_pending(assoc)
            if assoc.is_established:
                assoc.release()

    def _send_pending(self, assoc: object) -> None:
        while self.pending and assoc.is_established:  # type: ignore[attr-defined]
            ds = self.pending[0]
            try:
                status = assoc.send_c_store(ds)  # type: ignore[attr-defined]
            except RuntimeError:  # the association died between two requests
                self.broken += 1
                return
            if not status or status.Status != 0:
                self.broken += 1
                return  # connection lost: reconnect and resend this one
            self.acked.add(str(ds.SOPInstanceUID))
            self.pending.pop(0)
            time.sleep(self.pause)


def current_results(pacs: Orthanc, study_uid: str) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """The one SR no other SR names as predecessor, and the SEG it references."""

    def load(modality: str) -> list[pydicom.Dataset]:
        found = pacs.find_instances_by_modality(study_uid, modality)
        return [pydicom.dcmread(BytesIO(pacs.get_instance_file(i["ID"]))) for i in found]

    srs, segs = load("SR"), load("SEG")
    superseded = {
        str(ref.ReferencedSOPInstanceUID)
        for sr in srs
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    current = [sr for sr in srs if str(sr.SOPInstanceUID) not in superseded]
    assert len(current) == 1, (study_uid, len(srs), len(current))
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for study in current[0].CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    (seg,) = [s for s in segs if str(s.SOPInstanceUID) in evidence]
    return current[0], seg


def seg_references(seg: pydicom.Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    require_tools("Orthanc")
    rng = random.Random(SEED)
    all_studies = studies()
    with Orthanc(tmp_path / "orthanc") as pacs:
        settings = node_settings(
            tmp_path / "var",
            destinations=pacs_destination(pacs),
            routes=[chest_route(["pacs"])],
            sending={
                "max_attempts": 50,
                "backoff_initial_seconds": 0.2,
                "backoff_max_seconds": 1.0,
            },
        )
        node = NodeProcess(settings, tmp_path / "node").start()
        try:
            sender, kill_times = _send_while_killing(node, all_studies, rng)
            for study in all_studies:
                uid = str(study[0].StudyInstanceUID)
                wanted = {str(ds.SOPInstanceUID) for ds in study}
                wait_until(
                    lambda uid=uid, wanted=wanted: _complete(pacs, uid, wanted),
                    240,
                    1.0,
                    f"current SEG + SR covering study {uid}; node log:\n{node.log()[-3000:]}",
                )
                _, seg = current_results(pacs, uid)  # exactly one current version
                assert seg_references(seg) == wanted
            journal = Journal(tmp_path / "var" / "journal.sqlite")
            stored = {
                str(pydicom.dcmread(tmp_path / "var" / rel, stop_before_pixels=True).SOPInstanceUID)
                for rel in journal.all_instance_relpaths()
            }
            journal.close()
        finally:
            node.stop()  # also when an assertion failed: no node process is left behind
    assert sender.acked <= stored and len(stored) == sum(len(s) for s in all_studies)
    log = node.log()
    print(
        f"{KILLS} kills at {kill_times} s; sender reconnected {sender.reconnects} times;"
        f" restarts resuming an analysis: {log.count('interrupted during analysis')},"
        f" open studies: {log.count('open stud')}; results sent: {log.count('results sent to')}"
    )
    assert sender.reconnects >= 1  # some kills hit the receive phase


def _send_while_killing(
    node: NodeProcess, all_studies: list[list[pydicom.Dataset]], rng: random.Random
) -> tuple[Sender, list[float]]:
    """Send every instance while SIGKILLing and restarting the node KILLS times."""
    # paced so that receiving spans several kills (the first comes after 2.4 s)
    sender = Sender(node.port, [ds for study in all_studies for ds in study], pause=0.1)
    sender.start()
    kill_times = []
    started = time.monotonic()
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.3, 2.5))  # a random moment: receiving, analysing or sending
        kill_times.append(round(time.monotonic() - started, 1))
        node.kill()
        node.start()
    sender.join(300)
    assert not sender.pending, f"{len(sender.pending)} never acknowledged"
    return sender, kill_times


def _complete(pacs: Orthanc, study_uid: str, wanted: set[str]) -> bool:
    if not pacs.find_instances_by_modality(study_uid, "SR"):
        return False
    try:
        _, seg = current_results(pacs, study_uid)
    except (AssertionError, ValueError):
        return False  # a newer version is still on its way
    return seg_references(seg) == wanted
