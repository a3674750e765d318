"""Recovery at start: instance files on disk that the journal does not know.

A crash right after an instance was made durable (and perhaps acknowledged) can lose
its journal row: the row is committed without a WAL sync (docs/performance.md, item 6).
:func:`reindex_orphans` finds such files in this process's instance folder and
records them again from their own bytes.
"""

from __future__ import annotations

import logging

from dicom_node.header import Rejected, parse_header
from dicom_node.intake import InstanceJournal, UIDConflict
from dicom_node.part10 import read_file_meta
from dicom_node.store import NameInUse, Spool

log = logging.getLogger(__name__)


def reindex_orphans(spool: Spool, journal: InstanceJournal) -> int:
    """Record instance files that are on disk but not in the journal; returns how many.

    Their rows were lost (a crash or power failure right after the file was made
    durable), so they may have been acknowledged: they are indexed again from their
    own bytes, with the sender's AE title from (0002,0016). A file that cannot be read
    as DICOM is moved to ``quarantine/``, never deleted.
    """
    indexed = 0
    for relpath in spool.orphans(journal.all_instance_relpaths(spool.instances_prefix)):
        try:
            indexed += _reindex(spool, journal, relpath)
        except Exception as exc:  # one bad file must not keep the node from starting
            log.error(
                "instance file %s could not be indexed or quarantined (%s)",
                relpath,
                type(exc).__name__,
            )
    if indexed:
        log.warning("indexed %d instance file(s) that the journal had lost", indexed)
    return indexed


def reindex_receiving_folders(spool: Spool, journal: InstanceJournal) -> int:
    """:func:`reindex_orphans` for the folders of receiving processes (``instances/receiver-K/``,
    node.receive_processes), whatever the setting is now: it may have been lowered.

    A folder whose process still runs is left to it: the old receiving process of a
    node killed a moment ago may still be draining there, and indexing a file it has
    renamed into place but not yet recorded would make its own record a duplicate.
    """
    indexed = 0
    for folder in sorted(spool.instances.glob("receiver-*")):
        if not folder.is_dir():
            continue
        other = Spool(spool.root, spool.min_free_bytes, folder.name)
        try:
            other.lock_name()
        except NameInUse:
            log.warning(
                "%s is still used by a process of an earlier run; its files without a"
                " journal row are indexed when that name starts again, or at the next start",
                folder.name,
            )
            continue
        try:
            if other.tmp.is_dir():
                other.clear_tmp()
            indexed += reindex_orphans(other, journal)
        finally:
            other.release()
    return indexed


def _reindex(spool: Spool, journal: InstanceJournal, relpath: str) -> int:
    """Index one orphan file (1), or quarantine it (0)."""
    path = spool.path(relpath)
    try:
        data = path.read_bytes()
        meta = read_file_meta(data)
        header = parse_header(data, meta.sop_class_uid, meta.sop_instance_uid)
        received_at = path.stat().st_mtime
    except Exception as exc:  # whatever a damaged file makes the parser raise
        reason = exc.reason if isinstance(exc, Rejected) else type(exc).__name__
        target = spool.quarantine(relpath)
        log.error("instance file %s cannot be indexed (%s); moved to %s", relpath, reason, target)
        return 0
    received = header.instance(
        relpath, meta.transfer_syntax, len(data), meta.source_aet, received_at
    )
    spool.share(relpath)  # its upload may be what the crash interrupted
    try:
        recorded = journal.record_instance(received)
    except UIDConflict as exc:
        target = spool.quarantine(relpath)
        log.error(
            "instance file %s conflicts with the journal (%s); moved to %s", relpath, exc, target
        )
        return 0
    if recorded.duplicate:  # the same SOP instance is stored under another file
        spool.remove(relpath)
        return 0
    return 1
