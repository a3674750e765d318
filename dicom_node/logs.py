"""Logging set-up for the entry point, and ids that follow the work through the log.

:func:`configure_logging` is the only place logging is configured (called by the CLI).
:func:`log_context` sets ``study_id`` / ``job_id`` / ``calling_aet`` for every record
emitted inside it, in this thread or task only (``contextvars``)::

    with log_context(study_id=study.id, job_id=job.id):
        log.info("analysing series %d", series_id)   # ... [study=3 job=12]

A filter on the handler copies the ids onto each record; the text format appends
`` [study=.. job=.. aet=..]``, the JSON format (one object per line) adds them as keys.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from collections.abc import Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV_VAR = "DICOM_NODE_LOG_FORMAT"
CONTEXT_KEYS = ("study_id", "job_id", "calling_aet")
_KNOWN_KEYS = frozenset(CONTEXT_KEYS)
# pynetdicom logs every PDU, APScheduler every timer, Celery every task and Alembic its
# context at INFO: their warnings and errors are kept.
QUIET_LOGGERS = ("pynetdicom", "apscheduler", "celery", "kombu", "alembic")
# pydicom and highdicom quote element values (a patient's name, birth date or sex) in
# their warnings and WARNING records ("Invalid value for VR DA: '...'", "The string ...
# is unlikely to represent the intended person name"): only their errors are logged, and
# their Python warnings are not shown. The node says what it needs to without the values
# (e.g. dicom_node.encode.source).
VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom")
_VALUE_QUOTING_MODULES = r"(pydicom|highdicom)(\.|$)"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_TEXT_LABELS = {"study_id": "study", "job_id": "job", "calling_aet": "aet", "process": "process"}
_EMPTY: Mapping[str, object] = MappingProxyType({})
# A ContextVar holds a separate, immutable value per thread/task; it is not shared state.
_ids: ContextVar[Mapping[str, object]] = ContextVar("dicom_node_log_ids", default=_EMPTY)


class log_context:  # noqa: N801 - used like a function: ``with log_context(...):``
    """Add ids (``study_id``, ``job_id``, ``calling_aet``) to records logged inside.

    Nested contexts add to (and may override) the outer ids; leaving one restores the
    outer ids. ``None`` values are ignored. A class, not a ``@contextmanager`` generator:
    every received instance enters two.
    """

    __slots__ = ("_ids", "_token")

    def __init__(self, **ids: object) -> None:
        if not ids.keys() <= _KNOWN_KEYS:
            unknown = sorted(set(ids) - _KNOWN_KEYS)
            raise ValueError(f"log_context: unknown id(s) {unknown}; known: {list(CONTEXT_KEYS)}")
        self._ids = ids
        self._token: Token[Mapping[str, object]] | None = None

    def __enter__(self) -> None:
        merged = dict(_ids.get())
        for key, value in self._ids.items():
            if value is not None:
                merged[key] = value
        self._token = _ids.set(MappingProxyType(merged))

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _ids.reset(self._token)
            self._token = None


def current_ids() -> Mapping[str, object]:
    """The ids set by the enclosing :func:`log_context` blocks (read-only)."""
    return _ids.get()


class ContextFilter(logging.Filter):
    """Copies the context ids onto each record (an id given via ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _ids.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class ProcessFilter(logging.Filter):
    """Names the receiving process (node.receive_processes) on each of its records."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_process = self.process
        return True


def _record_ids(record: logging.LogRecord) -> dict[str, object]:
    ids = {
        key: getattr(record, key) for key in CONTEXT_KEYS if getattr(record, key, None) is not None
    }
    process = getattr(record, "node_process", None)
    if process is not None:
        ids["process"] = process
    return ids


class TextFormatter(logging.Formatter):
    """The classic one-line format with `` [study=.. job=..]`` appended when set."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (stdlib name)
        line = super().formatMessage(record)
        ids = _record_ids(record)
        if ids:
            labels = " ".join(f"{_TEXT_LABELS[key]}={value}" for key, value in ids.items())
            line = f"{line} [{labels}]"
        # One record, one line: a peer's AE title or a library's message could otherwise
        # start a line of its own that reads like a record (a traceback, added after
        # this, keeps its lines).
        return _CONTROL.sub(_escape, line)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the ids when set, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_record_ids(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the format and the context filter."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {list(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(level: str, fmt: str = "text", process: str | None = None) -> None:
    """Configure the root logger once, from the entry point; replaces earlier handlers.

    ``process``: the name of a receiving process, added to each of its records.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    handler = make_handler(fmt)
    if process is not None:
        handler.addFilter(ProcessFilter(process))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))
    for name in VALUE_QUOTING_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.ERROR, numeric))
    warnings.filterwarnings("ignore", category=UserWarning, module=_VALUE_QUOTING_MODULES)
    quiet_pydicom_validation()


def quiet_pynetdicom_events() -> None:
    """Bind none of pynetdicom's standard event handlers to associations made from now on,
    where its logger would drop what they log (at INFO and DEBUG only; the node keeps
    pynetdicom at WARNING, :data:`QUIET_LOGGERS`). They format every PDU and DIMSE
    message anyway: for an association that proposes 128 contexts, 3.7 of the 21.7 ms
    of CPU its set-up took (docs/performance.md, item 32). Call before creating an AE.
    """
    from pynetdicom import _config

    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"


def quiet_pydicom_validation() -> None:
    """pydicom checks every value it reads against its VR only to warn (its default
    reading mode), and those warnings are not shown here. The check is not free: each UID
    pynetdicom decodes is matched against a regular expression, some 1750 for an
    association that proposes 128 presentation contexts, a quarter of the CPU time its
    set-up took (docs/performance.md, item 32). Nothing else changes: a value is read
    the same either way, and the node checks the UIDs it uses itself
    (:func:`dicom_node.header.valid_uid`). Writing (highdicom's SEG and SR) keeps its
    own mode.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def current_logging() -> tuple[str, str]:
    """The root logger's level name and format ("text" or "json"), for a child process."""
    root = logging.getLogger()
    fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
    return logging.getLevelName(root.getEffectiveLevel()), fmt
