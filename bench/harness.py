"""The harness that `make bench` and `make drills` share: a registry of named items run in
registration order and picked by ``--only``, a results file that keeps the latest result of every
item (merged by item name), and plain-text tables of aligned columns.

``bench.common`` makes the bench's registry and results file from these, ``bench.drills`` the
drills'. Where the two differ (the results file's format name, its key of items, canonical or
insertion-ordered JSON, whether a foreign file is an error) it is a parameter here.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable, Sequence

from pipeline import uri as U

# --------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Item:
    """One registered item. ``run`` is called by its runner (a benchmark: ``run(ctx) -> result``;
    a drill: ``run(ctx, record)``); ``category`` groups items in reports (None: no group)."""

    name: str
    run: Callable
    summary: str
    category: str | None = None


class Registry(Mapping):
    """Items by name, in registration order (the order they run in). ``kind`` names one item in
    messages ("benchmark", "drill")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Item] = {}

    def __getitem__(self, name: str) -> Item:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def register(self, name: str, summary: str, category: str | None = None) -> Callable:
        """Decorator adding the decorated function under ``name`` (a name is registered once)."""

        def add(fn: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = Item(name, fn, summary, category)
            return fn

        return add

    def select(self, only: str | None) -> list[str]:
        """Names to run: all in registration order, or those of the comma-separated ``only`` list
        (every one checked), still in registration order."""
        if not only:
            return list(self._items)
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in self._items]
        if unknown:
            raise ValueError(f"unknown {self.kind}(s) {unknown}; valid names: {', '.join(self._items)}")
        return [n for n in self._items if n in names]


# --------------------------------------------------------------------------------------------
# the results file


@dataclass(frozen=True)
class ResultsFile:
    """A results file: ``{"format": format, "version": version, <facts>, items_key: {name: result}}``.

    what: the file's kind in messages ("bench", "drills"). canonical: written as canonical JSON
    (keys sorted at every level, so items by name; no NaN), else with keys in insertion order (the
    facts, then the items in the order they were first merged). strict: a file that is not JSON, or
    not of this format and version, is an error (the user moves it away); else the next merge
    replaces it.
    """

    format: str
    version: int
    items_key: str
    what: str
    canonical: bool
    strict: bool

    def empty(self) -> dict:
        return {"format": self.format, "version": self.version, self.items_key: {}}

    def load(self, path: str) -> dict:
        """The file's content; :meth:`empty` when there is none (and, not ``strict``, when the file
        is not a results file of this format and version)."""
        try:
            doc = U.read_json(path)
        except FileNotFoundError:
            return self.empty()
        except ValueError as e:  # not JSON (or not UTF-8)
            if not self.strict:
                return self.empty()
            raise ValueError(f"results file {path} is not valid JSON ({e}); move it away to start a new one") from None
        if (isinstance(doc, dict) and doc.get("format") == self.format and doc.get("version") == self.version
                and isinstance(doc.get(self.items_key), dict)):
            return doc
        if not self.strict:
            return self.empty()
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path} is not a {self.what} results file (format {found!r})")

    def merge(self, path: str, items: dict[str, dict], facts: dict | None = None) -> dict:
        """Write the file with ``items`` replacing those of the same name (the others are kept).
        ``facts``: top-level facts of this invocation, replacing the file's (None: keep the file's).
        Written atomically; returns what was written."""
        old = self.load(path)
        merged = {**old[self.items_key], **items}
        if self.canonical:
            merged = dict(sorted(merged.items()))
        reserved = ("format", "version", self.items_key)
        top = {k: v for k, v in (old if facts is None else facts).items() if k not in reserved}
        doc = {"format": self.format, "version": self.version, **top, self.items_key: merged}
        data = U.canonical_json(doc) if self.canonical else (json.dumps(doc, indent=1) + "\n").encode()
        U.atomic_write_bytes(path, data)
        return doc


# --------------------------------------------------------------------------------------------
# tables


@dataclass(frozen=True)
class Column:
    """A table column. width: characters (None: its widest cell or title; 0: cells as they are,
    for a last column of free text). right: right-aligned (numbers). gap: the text before the
    column (not before the first)."""

    title: str
    width: int | None = None
    right: bool = False
    gap: str = "  "


def format_columns(columns: Sequence[Column], rows: Sequence[Sequence[str] | str], *, rule: int | None = None,
                   strip: bool = True) -> list[str]:
    """Lines of a plain-text table: the titles, a rule (dashes under each column, or ``rule``
    dashes across), then a line per row. A row that is a string is a line of its own (a note under
    the row above): neither aligned nor counted in the widths. ``strip``: drop trailing spaces."""
    cells = [r for r in rows if not isinstance(r, str)]
    widths = [c.width if c.width is not None else max([len(c.title), *(len(r[i]) for r in cells)])
              for i, c in enumerate(columns)]

    def line(texts: Sequence[str]) -> str:
        parts = [(c.gap if i else "") + (t.rjust(w) if c.right else t.ljust(w))
                 for i, (c, w, t) in enumerate(zip(columns, widths, texts))]
        return "".join(parts).rstrip() if strip else "".join(parts)

    out = [line([c.title for c in columns])]
    out.append("-" * rule if rule is not None else "".join((c.gap if i else "") + "-" * w
                                                            for i, (c, w) in enumerate(zip(columns, widths))))
    out += [r if isinstance(r, str) else line(r) for r in rows]
    return out
