"""highdicom's table of module attributes, read one module at a time.

highdicom answers "is this attribute in that IOD?" (every SEG and SR asks it for Content
Date and Time, and its SR code for the source images) and copies the Patient and Study
modules from a source image by looking up the module's attributes in
``_standard/module_attribute_map.json``: 22.6 MB of JSON, all 436 modules, parsed in full
on the first use and cached for the life of the process (``lru_cache``). In a node that
was about 100 MiB of RSS (62 MiB of Python objects, measured with tracemalloc after its
first study), kept after the first SEG, for the handful of modules a SEG and an SR need.

:class:`ModuleAttributes` is the same mapping, read lazily: one pass over the file finds
where each module's list begins and ends (0.16 s, a few MiB while it runs), and a module
is parsed when it is first asked for. :func:`install` puts it behind highdicom's
``get_module_attribute_map`` (in every highdicom module that holds that function). If the
file is not what the pass expects, highdicom's own function answers, as before.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from importlib.abc import Traversable
from typing import Any

import highdicom._standard_utils as standard_utils

log = logging.getLogger(__name__)

TABLE = ("_standard", "module_attribute_map.json")

_WHITESPACE = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]


class ModuleAttributes(Mapping[str, list[dict[str, Any]]]):
    """Module key -> its attributes (``keyword``, ``path``, ``type``), parsed on demand."""

    def __init__(
        self,
        table: Traversable,
        whole: Callable[[], Mapping[str, list[Any]]] | None = None,
    ) -> None:
        """``whole``: the table parsed in full, for a module that cannot be read from
        where it was (the file changed since, e.g. highdicom upgraded in place)."""
        self._table = table
        self._whole = whole
        self._where = _module_offsets(table.read_bytes())
        self._parsed: dict[str, list[dict[str, Any]]] = {}

    def __getitem__(self, module: str) -> list[dict[str, Any]]:
        parsed = self._parsed.get(module)
        if parsed is None:
            start, stop = self._where[module]  # KeyError, as for highdicom's dict
            try:
                with self._table.open("rb") as file:
                    file.seek(start)
                    parsed = json.loads(file.read(stop - start))
                if not isinstance(parsed, list):
                    raise ValueError(f"module {module!r} is not a list")
            except (OSError, ValueError) as exc:
                if self._whole is None:
                    raise
                log.warning("highdicom's module table changed (%s): read in full", exc)
                parsed = self._whole()[module]
            self._parsed[module] = parsed
        return parsed

    def __contains__(self, module: object) -> bool:
        return module in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _module_offsets(raw: bytes) -> dict[str, tuple[int, int]]:
    """Where each module's value lies in the JSON object ``raw``: (start, stop) bytes.

    Each value is decoded once to find its end and let go at once. ASCII only, so that
    the offsets in the text are the offsets in the file.
    """
    text = raw.decode("ascii")
    decoder = json.JSONDecoder()
    offsets: dict[str, tuple[int, int]] = {}
    at = _WHITESPACE(text, 0).end()
    if text[at : at + 1] != "{":
        raise ValueError("not a JSON object")
    at = _WHITESPACE(text, at + 1).end()
    while text[at : at + 1] != "}":
        key, at = decoder.raw_decode(text, at)
        at = _WHITESPACE(text, at).end()
        if not isinstance(key, str) or text[at : at + 1] != ":":
            raise ValueError(f"no module key at offset {at}")
        start = _WHITESPACE(text, at + 1).end()
        value, at = decoder.raw_decode(text, start)
        if not isinstance(value, list):
            raise ValueError(f"module {key!r} is not a list")
        offsets[key] = (start, at)
        at = _WHITESPACE(text, at).end()
        if text[at : at + 1] == ",":
            at = _WHITESPACE(text, at + 1).end()
        elif text[at : at + 1] != "}":
            raise ValueError(f"unexpected {text[at : at + 1]!r} at offset {at}")
    return offsets


class _Lookup:
    """Stands in for highdicom's ``get_module_attribute_map``: the lazy table, built on
    the first call; highdicom's own function if that fails."""

    def __init__(self, original: Callable[[], dict[str, list[Any]]]) -> None:
        self.original = original
        self._table: Mapping[str, list[Any]] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Mapping[str, list[Any]]:
        table = self._table
        if table is None:
            with self._lock:
                if self._table is None:
                    self._table = self._build()
                table = self._table
        return table

    def _build(self) -> Mapping[str, list[Any]]:
        try:
            return ModuleAttributes(resources.files("highdicom").joinpath(*TABLE), self.original)
        except Exception as exc:  # an other highdicom's file: its own parse, in full
            log.warning("highdicom's module table read in full (%s)", exc)
            return self.original()


def install() -> bool:
    """Put :class:`ModuleAttributes` behind highdicom's ``get_module_attribute_map``;
    False if that function is not there (another highdicom): nothing is changed."""
    current = getattr(standard_utils, "get_module_attribute_map", None)
    if isinstance(current, _Lookup):
        return True
    if current is None or not callable(current):
        return False
    lookup = _Lookup(current)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "highdicom" and (
            getattr(module, "get_module_attribute_map", None) is current
        ):
            module.get_module_attribute_map = lookup  # type: ignore[attr-defined]
    return True
