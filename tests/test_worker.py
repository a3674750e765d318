"""The whole node in-process with dcmtk storescp as the destination: analysis, re-opened
studies whose new SR names its predecessor, failures that end in FAILED with a reason."""

from __future__ import annotations

import copy
import gc
import platform
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dciodvfy import dciodvfy_errors
from nodes import node_settings, running_node, send
from peers import GE_3SLICE, LOCALHOST, Storescp, patch_siemens_copy, require_tools, wait_until
from pydicom.uid import generate_uid
from test_assemble import Clock, Harness

from dicom_node import worker as worker_module
from dicom_node.analysis.device import release_freed_host_memory
from dicom_node.analysis.types import (
    AnalysisError,
    AnalysisResult,
    Code,
    Evaluation,
    SegmentGroup,
    Volume,
)
from dicom_node.config import Destination
from dicom_node.domain import JobState
from dicom_node.encode.types import Equipment
from dicom_node.web.metrics import Metrics
from dicom_node.worker import Worker

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def settings_to(tmp_path: Path, scp: Storescp, send_to: list[str]) -> dict:
    return node_settings(
        tmp_path / "var",
        destinations={
            "archive": {"ae_title": scp.aet, "host": LOCALHOST, "port": scp.port},
            "scanner": {"ae_title": "SCANNER", "host": LOCALHOST, "port": scp.port},
        },
        routes=[
            {
                "name": "chest",
                "when": {"Modality": "CT"},
                "pipeline": "ct-chest",
                "send_to": send_to,
            }
        ],
    )


def by_class(files: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_late_instance_gives_new_results_naming_their_predecessor(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu")
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    with (
        Storescp(tmp_path / "scp") as scp,
        running_node(settings_to(tmp_path, scp, ["source"])) as node,
    ):
        assert send(node, ge) == [0, 0, 0]
        first = by_class(scp.wait_for_files(2, timeout=120))
        (seg1,), (sr1,) = first[SEG_STORAGE], first[COMPREHENSIVE_3D_SR]
        assert "PredecessorDocumentsSequence" not in sr1
        # one more slice of the same series, 1 mm below the others
        extra = copy.deepcopy(ge[-1])
        extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        position = [
            float(v) for v in min((ds.ImagePositionPatient for ds in ge), key=lambda p: p[2])
        ]
        extra.ImagePositionPatient = [position[0], position[1], position[2] - 1.0]
        assert send(node, [extra]) == [0]
        second = by_class(scp.wait_for_files(4, timeout=120))
    sr2 = next(ds for ds in second[COMPREHENSIVE_3D_SR] if ds.SOPInstanceUID != sr1.SOPInstanceUID)
    seg2 = next(ds for ds in second[SEG_STORAGE] if ds.SOPInstanceUID != seg1.SOPInstanceUID)
    (predecessor,) = sr2.PredecessorDocumentsSequence
    refs = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [sr1.SOPInstanceUID]
    referenced = {
        r.ReferencedSOPInstanceUID
        for s in seg2.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert extra.SOPInstanceUID in referenced and len(referenced) == 4
    jobs = node.journal.recent_jobs()
    assert sorted(j.state for j in jobs) == [JobState.DONE, JobState.DONE]
    assert max(jobs, key=lambda j: j.id).predecessor_id == min(j.id for j in jobs)


def test_unanalysable_series_fails_with_a_reason(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu")
    # upper abdomen only: no usable lungs, so ct-chest must refuse it
    siemens = [pydicom.dcmread(p) for p in patch_siemens_copy(tmp_path / "j2k")]
    with (
        Storescp(tmp_path / "scp") as scp,
        running_node(settings_to(tmp_path, scp, ["archive"])) as node,
    ):
        assert set(send(node, siemens)) == {0}
        (job,) = wait_until(
            lambda: [j for j in node.journal.recent_jobs() if j.state == JobState.FAILED],
            120,
            0.2,
            "the job to fail",
        )
    assert job.error.startswith("AnalysisError")
    assert scp.received_files() == []


def test_source_without_a_destination_is_dead_lettered(tmp_path: Path) -> None:
    require_tools("storescp", "echoscu")
    ge = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    with (
        Storescp(tmp_path / "scp") as scp,
        running_node(settings_to(tmp_path, scp, ["source"])) as node,
    ):
        assert send(node, ge, calling="UNKNOWN") == [0, 0, 0]
        (job,) = wait_until(
            lambda: [j for j in node.journal.recent_jobs() if j.state == JobState.DEAD_LETTER],
            120,
            0.2,
            "the dead letter",
        )
        (delivery,) = node.journal.job_deliveries(job.id)
    assert "no destination is configured with the sending AE title 'UNKNOWN'" in delivery.last_error


def test_failure_reasons_keep_third_party_messages_out() -> None:
    import json

    from dicom_node.analysis.volume import load_series
    from dicom_node.worker import describe_failure

    try:
        json.loads("{'PatientName': 'Doe^Jane'}")
    except ValueError as exc:
        foreign = describe_failure(exc)
    assert foreign == "JSONDecodeError raised in json (details in the DEBUG log)"
    assert "Doe" not in foreign
    try:
        load_series([])  # our own code: its message is written without patient data
    except ValueError as exc:
        ours = describe_failure(exc)
    assert ours.startswith("ValueError: ") and "(details in the DEBUG log)" not in ours


class StudyClassifier:
    """A pipeline without segments (as a classifier package is): one TID 1501 group."""

    name = "classifier"
    version = "1.0"

    def run(self, volume: Volume) -> AnalysisResult:
        thorax = Code("51185008", "SCT", "Thorax")
        finding = Evaluation(Code("121071", "DCM", "Finding"), Code("17621005", "SCT", "Normal"))
        group = SegmentGroup("study", "Study", thorax, (), (), evaluations=(finding,))
        return AnalysisResult(self.name, "Classifier", self.version, volume, (), (group,))


def in_process_worker(harness: Harness, pipeline: StudyClassifier) -> Worker:
    """A worker on the harness's journal and spool that runs ``pipeline`` for every job."""
    equipment = Equipment(device_serial_number="TEST", device_observer_uid=generate_uid())
    return Worker(
        harness.journal,
        harness.spool,
        Metrics(),
        {"pacs": Destination(ae_title="P", host=LOCALHOST, port=104)},
        equipment,
        lambda name, device: pipeline,
        harness.clock,
        on_results=lambda: None,
    )


def test_a_start_that_failed_partway_starts_only_the_missing_threads_when_called_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's idle thread calls start() again after it raised (app.Analysis): the
    threads started the first time are not started a second time."""
    harness = Harness(tmp_path / "var", Clock())
    pipeline = StudyClassifier()
    worker = Worker(
        harness.journal,
        harness.spool,
        Metrics(),
        {},
        Equipment(device_serial_number="TEST", device_observer_uid=generate_uid()),
        lambda name, device: pipeline,
        harness.clock,
        on_results=lambda: None,
        threads=3,
        warm_up=["classifier"],
    )
    started: list[str] = []
    failed: list[str] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:  # the second analysis thread fails once
        if thread.name == "analysis-1" and not failed:
            failed.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)
        started.append(thread.name)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        worker.start()
    assert started == ["analysis-warm-up", "analysis-0"]
    worker.start()
    worker.stop(10.0)
    assert started == ["analysis-warm-up", "analysis-0", "analysis-1", "analysis-2"]


def test_a_result_without_segments_is_written_as_an_sr_alone(tmp_path: Path) -> None:
    """No SEG is built; a SEG left by an earlier run of the job is removed, so the
    sender (which sends the files that exist) sends the SR alone."""
    harness = Harness(tmp_path / "var", Clock())
    job = harness.claimed_job()
    stale = harness.spool.write_atomic(harness.spool.result_relpath(job.id, "seg"), b"old")
    in_process_worker(harness, StudyClassifier()).run_job(job)
    assert harness.journal.job(job.id).state == JobState.SENDING, harness.journal.job(job.id).error
    assert not stale.exists()
    sr_path = harness.spool.path(harness.spool.result_relpath(job.id, "sr"))
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPInstanceUID == job.sr_sop_uid
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert len(evidence) == 1  # the CT series only: no SEG
    (delivery,) = harness.journal.job_deliveries(job.id)
    assert delivery.destination == "pacs"


class WatchedClassifier(StudyClassifier):
    """Keeps a weak reference to the voxels it was given."""

    voxels: weakref.ref[np.ndarray] | None = None

    def run(self, volume: Volume) -> AnalysisResult:
        WatchedClassifier.voxels = weakref.ref(volume.hu)
        return super().run(volume)


class Failing(StudyClassifier):
    def run(self, volume: Volume) -> AnalysisResult:
        raise AnalysisError("no lungs found")


@pytest.mark.parametrize("pipeline", [StudyClassifier(), Failing()], ids=["done", "failed"])
def test_the_heap_is_trimmed_after_every_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipeline: StudyClassifier
) -> None:
    harness = Harness(tmp_path / "var", Clock())
    job = harness.claimed_job()
    trims: list[JobState] = []

    def trim() -> bool:  # after the job's outcome is in the journal
        trims.append(harness.journal.job(job.id).state)
        return True

    monkeypatch.setattr(worker_module, "release_freed_host_memory", trim)
    in_process_worker(harness, pipeline).run_job(job)
    expected = JobState.FAILED if isinstance(pipeline, Failing) else JobState.SENDING
    assert trims == [expected]


def test_freed_host_memory_is_handed_back_where_glibc_runs_the_heap() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert release_freed_host_memory() is True


class LettingGo(StudyClassifier):
    """Lets go of the volume inside ``run``, as ct-chest does after cropping, and notes
    whether that freed its voxels: then nobody else, worker or runner, holds them."""

    freed: bool | None = None

    def run(self, volume: Volume) -> AnalysisResult:
        voxels = weakref.ref(volume.hu)
        kept = volume.without_voxels()
        del volume
        gc.collect()
        LettingGo.freed = voxels() is None
        return super().run(kept)


def test_the_pipeline_holds_the_only_reference_to_the_volume(tmp_path: Path) -> None:
    """A pipeline that is done with the voxels early can free them (ct-chest: 150 MiB of
    300 on a 300-slice phantom): the worker passes the volume on and keeps none."""
    harness = Harness(tmp_path / "var", Clock())
    job = harness.claimed_job()
    LettingGo.freed = None
    in_process_worker(harness, LettingGo()).run_job(job)
    assert harness.journal.job(job.id).state == JobState.SENDING, harness.journal.job(job.id).error
    assert LettingGo.freed is True


def test_the_voxels_are_freed_before_the_results_are_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoders get the geometry and headers; the voxels (4 bytes each) are gone."""
    harness = Harness(tmp_path / "var", Clock())
    job = harness.claimed_job()
    seen: list[tuple[tuple[int, ...], tuple[int, ...], bool]] = []
    build_sr = worker_module.build_sr

    def watching(result: AnalysisResult, *args: Any, **kwargs: Any) -> pydicom.Dataset:
        gc.collect()
        voxels = WatchedClassifier.voxels
        freed = voxels is not None and voxels() is None
        seen.append((result.volume.hu.shape, result.volume.hu.strides, freed))
        return build_sr(result, *args, **kwargs)

    monkeypatch.setattr(worker_module, "build_sr", watching)
    in_process_worker(harness, WatchedClassifier()).run_job(job)

    assert harness.journal.job(job.id).state == JobState.SENDING, harness.journal.job(job.id).error
    ((shape, strides, freed),) = seen
    assert len(shape) == 3 and shape[0] >= 1 and strides == (0, 0, 0)
    assert freed, "the analysed voxels were still referenced while encoding"
    sr = pydicom.dcmread(harness.spool.path(harness.spool.result_relpath(job.id, "sr")))
    assert sr.SOPInstanceUID == job.sr_sop_uid
