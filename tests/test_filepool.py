"""The spool's ready files (dicom_node.filepool) and how write_atomic uses them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from nodes import partial_files
from peers import wait_until

from dicom_node.filepool import READY_SUFFIX, FilePool
from dicom_node.store import Spool


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "var")
    spool.create()
    return spool


def _ready(folder: Path) -> set[Path]:
    return {path for path in folder.iterdir() if path.name.endswith(READY_SUFFIX)}


def test_instances_are_written_into_ready_files_made_ahead(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    try:
        first = spool.write_atomic(spool.new_instance_relpath(), [b"DICM", b"-one"])
        # the first write had none ready; it started the pool, which fills up meanwhile
        wait_until(lambda: len(_ready(spool.tmp)) == 32, 10, 0.01, "32 ready files")
        ready = _ready(spool.tmp)
        assert all(path.stat().st_size == 0 for path in ready)
        inodes = {path.stat().st_ino for path in ready}
        second = spool.write_atomic(spool.new_instance_relpath(), [b"DICM", b"-two"])
        assert first.read_bytes() == b"DICM-one" and second.read_bytes() == b"DICM-two"
        assert second.stat().st_ino in inodes  # one of the ready files, renamed into place
        assert second.stat().st_ino not in {path.stat().st_ino for path in _ready(spool.tmp)}
        assert partial_files(spool.tmp) == []
    finally:
        spool.release()
    assert list(spool.tmp.iterdir()) == []  # a clean stop removes the ready files


def test_a_ready_file_removed_behind_the_pools_back_is_replaced(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    try:
        spool.write_atomic(spool.new_instance_relpath(), b"start the pool")
        wait_until(lambda: len(_ready(spool.tmp)) == 32, 10, 0.01, "32 ready files")
        for path in _ready(spool.tmp):
            path.unlink()
        written = [spool.write_atomic(spool.new_instance_relpath(), b"x" * n) for n in range(40)]
        assert [path.read_bytes() for path in written] == [b"x" * n for n in range(40)]
        assert partial_files(spool.tmp) == []
    finally:
        spool.release()


def test_start_up_removes_ready_files_without_calling_them_partial(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    (spool.tmp / f"left-by-a-stop{READY_SUFFIX}").touch()
    (spool.tmp / f"written-when-killed{READY_SUFFIX}").write_bytes(b"half an instance")
    (spool.tmp / "older.part").write_bytes(b"half of another")
    assert spool.clear_tmp() == 2  # the two with bytes in them: never acknowledged
    assert list(spool.tmp.iterdir()) == []


def test_a_forked_child_never_takes_the_parents_files(tmp_path: Path) -> None:
    folder = tmp_path / "tmp"
    folder.mkdir()
    pool = FilePool(folder, size=8)
    pool.take()
    wait_until(lambda: len(pool) == 8, 10, 0.01, "8 ready files")
    parents = set(pool._ready)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        taken = [pool.take() for _ in range(10)]
        os.write(write, json.dumps(taken).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        taken_by_child = json.loads(pipe.read())
    os.waitpid(child, 0)
    assert not parents & {path for path in taken_by_child if path}
    assert set(pool._ready) == parents  # the parent still has all of its own
    pool.close()
    assert not parents & set(map(str, folder.iterdir()))  # the parent removed its own
    assert partial_files(folder) == []  # what is left is the child's, empty


def test_when_no_file_can_be_made_the_writer_reports_it(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    try:
        spool.tmp.rmdir()  # neither the pool nor the writer can make a file now
        for _ in range(3):
            with pytest.raises(FileNotFoundError):
                spool.write_atomic(spool.new_instance_relpath(), b"lost?")
        assert len(spool._pool) == 0
        assert list(spool.instances.glob("*/*")) == []
        spool.tmp.mkdir()  # back: the next write succeeds
        assert spool.write_atomic(spool.new_instance_relpath(), b"kept").read_bytes() == b"kept"
    finally:
        spool.release()


class _Alongside:
    """dicom_node.store.Alongside that records when it is called, counted in file fsyncs
    (``synced``, which the test's fsync raises), and may refuse."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.synced = 0
        self.calls: list[tuple[str, int]] = []

    def start(self) -> None:
        self.calls.append(("start", self.synced))

    def finish(self) -> object:
        self.calls.append(("finish", self.synced))
        if self.refuse:
            raise ValueError("refused")
        return None


@pytest.mark.parametrize("refuse", [False, True])
def test_work_alongside_a_write_starts_before_the_fsync_and_can_stop_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: bool
) -> None:
    real_fsync = os.fsync
    alongside = _Alongside(refuse)

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not a folder (the pool's own fsyncs)
            alongside.synced += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = _spool(tmp_path)
    relpath = spool.new_instance_relpath()
    try:
        if refuse:
            with pytest.raises(ValueError, match="refused"):
                spool.write_atomic(relpath, [b"DICM", b"-x"], alongside=alongside)
            assert not spool.path(relpath).exists()
        else:
            assert spool.write_atomic(relpath, [b"DICM", b"-x"], alongside=alongside).exists()
        # started before the file's fsync, finished after it (and before the folder's)
        assert alongside.calls == [("start", 0), ("finish", 1)]
        assert partial_files(spool.tmp) == []
    finally:
        spool.release()


def test_low_space_is_logged_once_and_each_refusal_says_what_did_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A mixed stream on a nearly full disk logged an ERROR / WARNING pair per image, and
    "372736 bytes free, below storage.min_free_bytes (0)"."""
    from collections import namedtuple

    from dicom_node import store
    from dicom_node.store import LowSpace

    usage = namedtuple("usage", "total used free")
    free = [372_736]
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _path: usage(0, 0, free[0]))
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    caplog.set_level("WARNING", logger="dicom_node.store")
    with pytest.raises(LowSpace) as refused:
        spool.ensure_space(528_000)
    assert str(refused.value) == (
        "an instance of 528000 bytes would leave 0 of the 372736 bytes free, below"
        " storage.min_free_bytes (0)"
    )
    spool.ensure_space(1_000)  # a small one still fits: no "accepting again" yet
    with pytest.raises(LowSpace):
        spool.ensure_space(528_000)
    free[0] = 2_000_000
    spool.ensure_space(1_000)
    spool.ensure_space(528_000)
    assert [(r.levelname, r.getMessage()[:40]) for r in caplog.records] == [
        ("ERROR", "free space 0 MiB: an instance of 515 KiB"),
        ("WARNING", "free space back above storage.min_free_b"),
    ]
