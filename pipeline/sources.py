"""Image sources: ImageFolder trees and Parquet shards, listed over fsspec with stable ids.

A :class:`Source` is the canonical, sorted listing of one split. Every item has a stable
``index`` (its position in that listing), a stable string ``key`` and a read ``group`` (the unit
that is cheapest to read at once). The listing alone (no image decoding) gives a
:meth:`Source.fingerprint`, which the latent store records so that a resumed or extended encode
can prove it is reading the same data.

Layouts (``open_source`` picks the first that exists and records which in ``Source.layout``):

ImageFolder
    ``uri/<split>/<class>/...`` ("split folder"), or ``uri/<class>/...`` when ``uri`` has no
    ``<split>`` folder ("no split folder"; refused when ``uri`` has other split folders such as
    ``val/`` so that split folders are never taken for classes).
Parquet (Hugging Face ``datasets`` style)
    ``uri/<split>/*.parquet`` ("split folder"), ``uri/<split>-*.parquet`` ("split in file name",
    e.g. ``train-00000-of-00010.parquet``), ``uri/data/<split>-*.parquet`` ("hub data folder"), or
    ``uri`` itself a ``.parquet`` file ("single file").

Choices for cases the spec leaves open:
- ImageFolder lists class folders recursively (as torchvision does) and keeps only files with an
  image extension (``IMAGE_EXTENSIONS``, case-insensitive). Other files inside class folders are
  *not* items; their keys are kept in ``Source.ignored`` for reporting. Hidden files and folders
  (name starting with ".") are skipped at every depth. A PNG named ``.JPEG`` is an item (decoding
  looks at the bytes, not the name).
- Items are sorted by class folder name, then by their path inside it (Python string order).
  Labels are the position of the class folder in the sorted folder names (torchvision's rule, the
  standard ImageNet-1k index for the 1000 wnids) unless ``class_index`` fixes them.
- A class folder with no image is an error without ``class_index`` (it would shift every later
  label, silently), and is allowed with it.
- Parquet items have ``size=None``: a cell's byte length is only known once read; the files' sizes
  and row counts are in the fingerprint instead. Parquet labels may be -1 (the Hugging Face test
  split is unlabelled); other negative labels are an error.
- ``read_bytes`` on an ImageFolder item checks the byte count against the listing and raises
  :class:`SourceChangedError` when it differs (the fingerprint would otherwise lie). A null image
  cell in Parquet reads as ``b""``, which decoding reports as ``"empty file"``.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import posixpath
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import uri as uri_lib
from schemas.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
KNOWN_SPLITS = ("train", "val", "validation", "test")
FINGERPRINT_VERSION = "rae-source-fingerprint-v1"


class SourceError(UserError, ValueError):
    """A source that cannot be listed: missing folder, no classes, bad column, bad class index."""


class SourceChangedError(UserError, ValueError):
    """A file whose bytes differ from the listing the source (and its fingerprint) was made from."""


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One image of a source.

    index: position in the canonical sorted listing (stable id number).
    key: stable string id, ``"n01440764/n01440764_10026.JPEG"`` or ``"train-00000.parquet#17"``.
    uri: the image file, or the Parquet file holding it.
    row: the row inside the Parquet file; None for ImageFolder.
    size: the image file's size in bytes (ImageFolder, from the listing); None for Parquet.
    label: class index (-1: unlabelled Parquet row).
    group: read group: each ImageFolder file is its own group; Parquet: one per (file, row group),
        numbered over the files in listing order.
    """

    index: int
    key: str
    uri: str
    row: int | None
    size: int | None
    label: int
    group: int


@dataclass(frozen=True, slots=True)
class ParquetFileInfo:
    """One Parquet file of a source: its name (relative to the folder listed), size in bytes,
    row count and rows per row group, plus where its items and groups start."""

    name: str
    uri: str
    size: int
    num_rows: int
    row_group_rows: tuple[int, ...]
    first_index: int
    first_group: int


@dataclass(frozen=True)
class SourceReader:
    """What a worker needs to read items of a source, without the listing (small to pickle).

    ``Source.reader`` makes one; a Ray task receives it with its own items only.
    """

    kind: str
    storage_options: dict[str, Any] | None = None
    files: tuple[ParquetFileInfo, ...] = ()
    image_column: str | None = None

    def read_bytes(self, item: SourceItem) -> bytes:
        """One image's encoded bytes."""
        return self.read_group([item])[0]

    def read_group(self, items: Sequence[SourceItem]) -> list[bytes]:
        """Encoded bytes of ``items``, in the order given.

        ImageFolder: all files fetched in one ``fs.cat_ranges`` call (concurrent on S3); a byte count
        that differs from the listing raises SourceChangedError. Parquet: each (file, row group)
        touched is read once, image column only.
        """
        if not items:
            return []
        if self.kind == "imagefolder":
            return self._read_files(items)
        return self._read_parquet_rows(items)

    def _read_files(self, items: Sequence[SourceItem]) -> list[bytes]:
        fs, _ = uri_lib.get_fs(items[0].uri, self.storage_options)
        paths = [uri_lib.get_fs(it.uri, self.storage_options)[1] for it in items]
        unique = list(dict.fromkeys(paths))
        # cat_ranges, not cat: cat expands glob characters, and "img[1].jpg" is a valid name.
        fetched = dict(zip(unique, fs.cat_ranges(unique, None, None, on_error="return")))
        out = []
        for it, path in zip(items, paths):
            data = fetched[path]
            if isinstance(data, BaseException):
                # Re-raised as is: callers tell FileNotFoundError (permanent) from other OSErrors.
                data.add_note(f"reading source item {it.key} ({it.uri})")
                raise data
            if it.size is not None and len(data) != it.size:
                raise SourceChangedError(
                    f"{it.uri} changed since it was listed: listed {it.size} bytes, read {len(data)}"
                )
            out.append(data)
        return out

    def _file_of_group(self, group: int) -> ParquetFileInfo:
        starts = [f.first_group for f in self.files]
        pos = int(np.searchsorted(starts, group, side="right")) - 1
        if pos < 0 or group >= self.files[pos].first_group + len(self.files[pos].row_group_rows):
            raise ValueError(f"read group {group} is not in this source's Parquet files")
        return self.files[pos]

    def _read_parquet_rows(self, items: Sequence[SourceItem]) -> list[bytes]:
        by_group: dict[int, list[int]] = defaultdict(list)
        for pos, it in enumerate(items):
            by_group[it.group].append(pos)
        out: list[bytes | None] = [None] * len(items)
        for group, positions in by_group.items():
            info = self._file_of_group(group)
            local_group = group - info.first_group
            group_first_row = sum(info.row_group_rows[:local_group])
            fs, path = uri_lib.get_fs(info.uri, self.storage_options)
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(local_group, columns=[self.image_column])
            column = table.column(0).combine_chunks()
            cells = column.field("bytes") if pa.types.is_struct(column.type) else column
            for pos in positions:
                value = cells[items[pos].row - group_first_row].as_py()
                out[pos] = b"" if value is None else bytes(value)
        return out  # type: ignore[return-value]


@dataclass
class Source:
    """The canonical listing of one split of an ImageFolder tree or a Parquet dataset (picklable).

    ``root`` is the folder actually listed (e.g. ``uri/train``), ``layout`` says which layout was
    found (see the module docstring). ``items[i].index == i``.

    Pickling stores the items column-wise (ImageNet train: about 60 MB instead of 160 MB, several
    times faster; unpickling still builds 1.28M SourceItem objects, seconds). To ship work to many
    Ray tasks, send ``source.reader`` (a few hundred bytes) and each task's items, not the source.
    """

    kind: str  # "imagefolder" | "parquet"
    uri: str
    split: str
    class_names: list[str]
    items: list[SourceItem]
    root: str
    layout: str
    storage_options: dict[str, Any] | None = None
    files: tuple[ParquetFileInfo, ...] = ()
    image_column: str | None = None
    label_column: str | None = None
    ignored: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_groups(self) -> int:
        return (self.items[-1].group + 1) if self.items else 0

    @property
    def reader(self) -> SourceReader:
        return SourceReader(self.kind, self.storage_options, self.files, self.image_column)

    def fingerprint(self) -> str:
        """sha256 hex of the listing: kind, split, class names, each Parquet file's name, size and
        row count, and each item's key, size and label. Independent of where the data lives (a
        copy on S3 has the fingerprint of the local original) and of decoding."""
        h = hashlib.sha256()

        def put(obj: Any) -> None:
            # JSON is unambiguous for any string (quotes escaped), so fields never run together.
            h.update(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
            h.update(b"\n")

        put([FINGERPRINT_VERSION, self.kind, self.split, list(self.class_names)])
        put([[f.name, f.size, f.num_rows] for f in self.files])
        put(len(self.items))
        chunk = 65536
        for start in range(0, len(self.items), chunk):
            put([[it.key, it.size, it.label] for it in self.items[start : start + chunk]])
        return h.hexdigest()

    def read_bytes(self, item: SourceItem) -> bytes:
        """One image's encoded bytes (see :meth:`SourceReader.read_group`)."""
        return self.reader.read_group([item])[0]

    def read_group(self, items: Sequence[SourceItem]) -> list[bytes]:
        """Encoded bytes of ``items`` in the order given; a Parquet row group is read once."""
        return self.reader.read_group(items)

    # Column-wise pickling: one list of keys and a few int64 arrays instead of a Python object
    # per item. URIs are rebuilt from the root (ImageFolder) or the file list (Parquet) when
    # they follow open_source's rule, and stored as a list otherwise.
    def __getstate__(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "items"}
        items = self.items

        positions = np.arange(len(items), dtype=np.int64)

        def column(values) -> np.ndarray | None:
            """int32 where it fits, else int64; -1 for None; None when it equals the positions."""
            array = np.array([-1 if v is None else v for v in values], dtype=np.int64)
            if np.array_equal(array, positions):
                return None
            fits = array.size == 0 or (array.min() >= -(2**31) and array.max() < 2**31)
            return array.astype(np.int32) if fits else array

        keys = [it.key for it in items]
        groups = column(it.group for it in items)
        uris: list[str] | None = [it.uri for it in items]
        if uris == self._derived_uris(keys, positions if groups is None else groups):
            uris = None
        state["_items"] = {
            "key": keys,
            "uri": uris,
            "index": column(it.index for it in items),
            "row": column(it.row for it in items),
            "size": column(it.size for it in items),
            "label": column(it.label for it in items),
            "group": groups,
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        packed = state.pop("_items")
        self.__dict__.update(state)
        keys = packed["key"]
        positions = np.arange(len(keys), dtype=np.int64)

        def column(name: str) -> np.ndarray:
            return positions if packed[name] is None else packed[name].astype(np.int64)

        groups = column("group")
        uris = packed["uri"] if packed["uri"] is not None else self._derived_uris(keys, groups)
        rows = [None if r < 0 else r for r in column("row").tolist()]
        sizes = [None if v < 0 else v for v in column("size").tolist()]
        indices, labels = column("index").tolist(), column("label").tolist()
        self.items = list(map(SourceItem, indices, keys, uris, rows, sizes, labels, groups.tolist()))

    def _derived_uris(self, keys: list[str], groups: np.ndarray) -> list[str]:
        if self.kind == "imagefolder":
            prefix = self.root.rstrip("/") + "/"
            return [prefix + key for key in keys]
        if not self.files:
            return []
        starts = np.array([f.first_group for f in self.files])
        file_uris = [f.uri for f in self.files]
        return [file_uris[i] for i in (np.searchsorted(starts, groups, side="right") - 1).tolist()]


# ---------------------------------------------------------------------------------------------
# Class index files


def read_class_index(class_index: str, storage_options: dict | None = None) -> dict[str, int]:
    """{class name (wnid): label} from a class index file.

    Accepted: a JSON list of names (label = position); a JSON object ``{name: label}``; the Keras
    ``imagenet_class_index.json`` shape ``{"0": ["n01440764", "tench"], ...}``; or text with one
    name per line (first whitespace-separated token, so ``LOC_synset_mapping.txt`` works; blank
    lines skipped).
    """
    try:
        raw = uri_lib.read_bytes(class_index, storage_options)
    except FileNotFoundError as e:
        raise SourceError(f"class index file not found: {class_index}") from e
    text = raw.decode("utf-8-sig")
    stripped = text.lstrip()
    mapping: dict[str, int] = {}
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"class index file {class_index} is not valid JSON: {e}") from e
        if isinstance(obj, list):
            pairs = [(name, i) for i, name in enumerate(obj)]
        elif all(isinstance(v, list) and v and str(k).isdigit() for k, v in obj.items()):
            pairs = [(v[0], int(k)) for k, v in obj.items()]  # Keras layout
        else:
            pairs = list(obj.items())
    else:
        names = [line.split()[0] for line in text.splitlines() if line.strip()]
        pairs = [(name, i) for i, name in enumerate(names)]
    for name, label in pairs:
        if not isinstance(name, str) or not name:
            raise SourceError(f"class index file {class_index}: bad class name {name!r}")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise SourceError(f"class index file {class_index}: bad label {label!r} for {name!r}")
        if name in mapping:
            raise SourceError(f"class index file {class_index}: class {name!r} appears twice")
        mapping[name] = label
    if not mapping:
        raise SourceError(f"class index file {class_index} is empty")
    labels = list(mapping.values())
    if len(set(labels)) != len(labels):
        raise SourceError(f"class index file {class_index}: two classes share a label")
    return mapping


def _names_from_mapping(mapping: dict[str, int]) -> list[str]:
    """class_names[label] = name; label slots the mapping does not name become ``class_<i>``."""
    names = [f"class_{i}" for i in range(max(mapping.values()) + 1)]
    for name, label in mapping.items():
        names[label] = name
    return names


# ---------------------------------------------------------------------------------------------
# Listing helpers


def _check_name(name: str, where: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SourceError(f"file name is not valid UTF-8 (cannot make a stable key): {where}/{name!r}") from e


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _list_dir(fs, path: str) -> dict[str, dict]:
    """{name: info} of the direct children of ``path`` ({} when it does not exist)."""
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for info in entries:
        name = posixpath.basename(info["name"].rstrip("/"))
        if name and info["name"].rstrip("/") != path.rstrip("/"):
            out[name] = info
    return out


def _is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except FileNotFoundError:
        return False


_LISTINGS_IN_FLIGHT = 16  # folder listings at once on an object store (each a few 50 ms GETs)


def _listings(fs, folders: list[str]):
    """``(folder, {path: info})`` of every file and folder under each of ``folders``, in their
    order, each listing dropped by the caller before more than a few more are held: on an
    asynchronous filesystem (S3, GCS...) up to :data:`_LISTINGS_IN_FLIGHT` are listed at once."""
    def find(folder: str) -> dict:
        try:
            return fs.find(folder, withdirs=True, detail=True)
        except FileNotFoundError:
            return {}
        finally:
            fs.invalidate_cache(folder)  # s3fs keeps what find listed in its (long-lived) listings cache

    from fsspec.asyn import AsyncFileSystem

    if not isinstance(fs, AsyncFileSystem) or len(folders) < 2:
        for folder in folders:
            yield folder, find(folder)
        return
    with ThreadPoolExecutor(_LISTINGS_IN_FLIGHT, thread_name_prefix="list") as pool:
        pending: collections.deque = collections.deque()
        for folder in folders:
            pending.append((folder, pool.submit(find, folder)))
            if len(pending) >= _LISTINGS_IN_FLIGHT:
                done_folder, future = pending.popleft()
                yield done_folder, future.result()
        while pending:
            done_folder, future = pending.popleft()
            yield done_folder, future.result()


# ---------------------------------------------------------------------------------------------
# ImageFolder


def _open_imagefolder(uri: str, split: str, class_index: str | None, storage_options: dict | None) -> Source:
    fs, base = uri_lib.get_fs(uri, storage_options)
    base = base.rstrip("/")
    if not _is_dir(fs, base):
        raise SourceError(f"no such folder: {uri}")
    top = _list_dir(fs, base)
    if split in top and top[split]["type"] == "directory":
        root_path, root_uri, layout = f"{base}/{split}", uri_lib.join(uri, split), "split folder"
    else:
        other_splits = sorted(n for n in top if n in KNOWN_SPLITS and top[n]["type"] == "directory")
        if other_splits:
            raise SourceError(
                f"{uri} has no '{split}' folder but has split folder(s) {other_splits}; pass one of those as split"
            )
        root_path, root_uri, layout = base, uri_lib.normalize(uri), "no split folder"

    top = top if root_path == base else _list_dir(fs, root_path)
    if not top:
        raise SourceError(f"folder {root_uri} is empty")
    class_dirs: set[str] = set()
    files_by_class: dict[str, list[tuple[str, int]]] = {}
    ignored: list[str] = []
    for name, info in top.items():
        _check_name(name, root_uri)
        if not _is_hidden(name) and info["type"] == "directory":
            class_dirs.add(name)
        # files next to the class folders are not images of any class
    # One class folder's listing at a time (a few in flight on object stores), never the whole
    # tree's: fsspec's detail dicts cost ~1 KB per file, 1.3 GB for ImageNet's train split.
    for cls, listing in _listings(fs, [f"{root_path}/{c}" for c in sorted(class_dirs)]):
        files = files_by_class[posixpath.basename(cls)] = []
        prefix = root_path + "/"
        for path, info in listing.items():
            path = path.rstrip("/")
            if not path.startswith(prefix) or info["type"] == "directory":
                continue
            rel = path[len(prefix):]
            _check_name(rel, root_uri)
            if _is_hidden(rel):
                continue
            if posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                files.append((rel, int(info["size"])))
            else:
                ignored.append(rel)
        del listing
    if not class_dirs:
        raise SourceError(f"no class folders in {root_uri} (expected {root_uri}/<class>/<image>)")

    if class_index is not None:
        mapping = read_class_index(class_index, storage_options)
        unknown = sorted(c for c in class_dirs if c not in mapping)
        if unknown:
            raise SourceError(
                f"class folder(s) {unknown[:5]}{'...' if len(unknown) > 5 else ''} in {root_uri} "
                f"are not in class index file {class_index}"
            )
        class_names = _names_from_mapping(mapping)
    else:
        empty = sorted(c for c in class_dirs if not files_by_class.get(c))
        if empty:
            raise SourceError(
                f"class folder(s) without images in {root_uri}: {empty[:5]}{'...' if len(empty) > 5 else ''} "
                "(they would shift the labels; remove them or pass class_index)"
            )
        class_names = sorted(class_dirs)
        mapping = {name: i for i, name in enumerate(class_names)}

    items: list[SourceItem] = []
    for cls in sorted(class_dirs):
        for rel, size in sorted(files_by_class.get(cls, [])):
            index = len(items)
            items.append(SourceItem(index, rel, uri_lib.join(root_uri, rel), None, size, mapping[cls], index))
    if not items:
        raise SourceError(f"no images in {root_uri} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return Source(
        kind="imagefolder",
        uri=uri,
        split=split,
        class_names=class_names,
        items=items,
        root=root_uri,
        layout=layout,
        storage_options=storage_options,
        ignored=tuple(sorted(ignored)),
    )


# ---------------------------------------------------------------------------------------------
# Parquet


def _split_file_pattern(split: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(split)}([-_.].*)?\.parquet$")


def _find_parquet_files(fs, base: str, uri: str, split: str) -> tuple[str, str, list[str]] | None:
    """(folder uri, layout, sorted file names) for the first Parquet layout found, else None."""
    if base.endswith(".parquet") and fs.isfile(base):
        return posixpath.dirname(uri_lib.normalize(uri)), "single file", [posixpath.basename(base)]
    top = _list_dir(fs, base)
    if split in top and top[split]["type"] == "directory":
        entries = _list_dir(fs, f"{base}/{split}")
        names = sorted(n for n, i in entries.items() if n.endswith(".parquet") and i["type"] == "file")
        if names:
            return uri_lib.join(uri, split), "split folder", names
    pattern = _split_file_pattern(split)
    names = sorted(n for n, i in top.items() if pattern.match(n) and i["type"] == "file")
    if names:
        return uri_lib.normalize(uri), "split in file name", names
    if "data" in top and top["data"]["type"] == "directory":
        names = sorted(n for n, i in _list_dir(fs, f"{base}/data").items() if pattern.match(n) and i["type"] == "file")
        if names:
            return uri_lib.join(uri, "data"), "hub data folder", names
    return None


def _parquet_splits_available(fs, base: str, look_in_subfolders: bool = True) -> list[str]:
    """Split names of the Parquet files in ``base`` and ``base/data`` (and, if asked, of the
    sub-folders of ``base`` holding Parquet files): for error messages."""
    found = set()
    for folder in (base, f"{base}/data"):
        for name in _list_dir(fs, folder):
            if name.endswith(".parquet"):
                found.add(re.split(r"[-_.]", name, maxsplit=1)[0])
    if look_in_subfolders:
        for name, info in _list_dir(fs, base).items():
            if info["type"] == "directory" and any(n.endswith(".parquet") for n in _list_dir(fs, f"{base}/{name}")):
                found.add(name)
    return sorted(found)


def _detect_image_column(schema: pa.Schema, file_uri: str, image_column: str | None) -> str:
    def usable(t: pa.DataType) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        if pa.types.is_struct(t):
            idx = t.get_field_index("bytes")
            return idx >= 0 and (pa.types.is_binary(t.field(idx).type) or pa.types.is_large_binary(t.field(idx).type))
        return False

    if image_column is not None:
        if image_column not in schema.names:
            raise SourceError(f"{file_uri}: no image column {image_column!r} (columns: {schema.names})")
        if not usable(schema.field(image_column).type):
            raise SourceError(
                f"{file_uri}: column {image_column!r} has type {schema.field(image_column).type}; "
                "expected binary or a struct with a binary 'bytes' field"
            )
        return image_column
    candidates = [f.name for f in schema if usable(f.type)]
    if "image" in candidates:
        return "image"
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SourceError(
            f"{file_uri}: no image column (binary, or struct with a 'bytes' field) among columns {schema.names}"
        )
    raise SourceError(f"{file_uri}: several possible image columns {candidates}; pass image_column=")


def _class_names_from_files(fs, folders: list[str], schema: pa.Schema, label_column: str) -> list[str] | None:
    """Class names from a ``classes.json`` (JSON list, or {name: label}) in the data folder or the
    dataset root, else from the Hugging Face ``datasets`` schema metadata; None if neither."""
    for folder in folders:
        path = f"{folder}/classes.json"
        if fs.isfile(path):
            try:
                obj = json.loads(fs.cat_file(path))
            except json.JSONDecodeError as e:
                raise SourceError(f"{path} is not valid JSON: {e}") from e
            if isinstance(obj, dict) and isinstance(obj.get("names"), list):
                obj = obj["names"]
            if isinstance(obj, list) and all(isinstance(n, str) for n in obj):
                return list(obj)
            if isinstance(obj, dict) and all(isinstance(v, int) for v in obj.values()):
                return _names_from_mapping(obj)
            raise SourceError(f"{path}: expected a JSON list of class names or {{name: label}}")
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            features = json.loads(meta)["info"]["features"]
            names = features[label_column].get("names")
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
            names = None
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    return None


def _open_parquet(
    uri: str,
    split: str,
    found: tuple[str, str, list[str]],
    class_index: str | None,
    storage_options: dict | None,
    image_column: str | None,
    label_column: str,
) -> Source:
    folder_uri, layout, names = found
    fs, folder_path = uri_lib.get_fs(folder_uri, storage_options)
    files: list[ParquetFileInfo] = []
    items: list[SourceItem] = []
    schema0: pa.Schema | None = None
    chosen_column = image_column
    max_label = -1
    for name in names:
        _check_name(name, folder_uri)
        file_uri = uri_lib.join(folder_uri, name)
        path = f"{folder_path.rstrip('/')}/{name}"
        size = int(fs.info(path)["size"])
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise SourceError(f"{file_uri} is not a readable Parquet file: {e}") from e
            schema = pf.schema_arrow
            column = _detect_image_column(schema, file_uri, chosen_column)
            if chosen_column is None:
                chosen_column = column  # every file must then use the same column
            if label_column not in schema.names:
                raise SourceError(f"{file_uri}: no label column {label_column!r} (columns: {schema.names})")
            if not pa.types.is_integer(schema.field(label_column).type):
                raise SourceError(
                    f"{file_uri}: label column {label_column!r} has type {schema.field(label_column).type}, "
                    "expected integers"
                )
            labels_col = pf.read(columns=[label_column]).column(0)
            meta = pf.metadata
            row_group_rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        if labels_col.null_count:
            raise SourceError(f"{file_uri}: label column {label_column!r} has {labels_col.null_count} null value(s)")
        labels = labels_col.to_numpy().astype(np.int64)
        if labels.size and labels.min() < -1:
            raise SourceError(f"{file_uri}: label column {label_column!r} has negative label {int(labels.min())}")
        if labels.size:
            max_label = max(max_label, int(labels.max()))
        schema0 = schema0 or schema
        first_index = len(items)
        first_group = files[-1].first_group + len(files[-1].row_group_rows) if files else 0
        row = 0
        for g, n in enumerate(row_group_rows):
            for _ in range(n):
                items.append(
                    SourceItem(len(items), f"{name}#{row}", file_uri, row, None, int(labels[row]), first_group + g)
                )
                row += 1
        files.append(ParquetFileInfo(name, file_uri, size, len(labels), row_group_rows, first_index, first_group))
    if not items:
        raise SourceError(f"the Parquet files of split '{split}' in {folder_uri} have no rows")

    if class_index is not None:
        class_names = _names_from_mapping(read_class_index(class_index, storage_options))
    else:
        base_path = uri_lib.get_fs(uri, storage_options)[1].rstrip("/")
        folders = list(dict.fromkeys([folder_path.rstrip("/"), base_path]))
        class_names = _class_names_from_files(fs, folders, schema0, label_column)
        if class_names is None:
            class_names = [f"class_{i}" for i in range(max_label + 1)]
    if max_label >= len(class_names):
        raise SourceError(f"label {max_label} in {folder_uri} but only {len(class_names)} class names")
    return Source(
        kind="parquet",
        uri=uri,
        split=split,
        class_names=class_names,
        items=items,
        root=folder_uri,
        layout=layout,
        storage_options=storage_options,
        files=tuple(files),
        image_column=chosen_column,
        label_column=label_column,
    )


def open_source(
    uri: str,
    split: str = "train",
    class_index: str | None = None,
    storage_options: dict | None = None,
    *,
    kind: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
) -> Source:
    """List one split of an ImageFolder tree or a Parquet dataset at ``uri`` (path or fsspec URI).

    ``kind`` ("imagefolder" | "parquet") is detected when None: Parquet when one of the Parquet
    layouts (module docstring) has files for ``split``. ``class_index`` is a file fixing the
    label of each class (see :func:`read_class_index`); for Parquet it only supplies class names.
    Raises SourceError with the folder, file or column at fault.
    """
    if kind not in (None, "imagefolder", "parquet"):
        raise ValueError(f"kind must be 'imagefolder' or 'parquet', got {kind!r}")
    if not split or "/" in split:
        raise ValueError(f"bad split name {split!r}")
    uri = uri_lib.normalize(uri)
    fs, base = uri_lib.get_fs(uri, storage_options)
    base = base.rstrip("/")
    fs.invalidate_cache(base)  # fsspec caches S3 listings per instance; a listing must be fresh
    if not fs.exists(base):
        raise SourceError(f"no such folder or file: {uri}")
    if kind != "imagefolder":
        found = _find_parquet_files(fs, base, uri, split)
        if found is not None:
            return _open_parquet(uri, split, found, class_index, storage_options, image_column, label_column)
        # Parquet files of other splits next to `uri` mean a Parquet dataset, not an ImageFolder
        # (sub-folders are not scanned here: an ImageFolder may have a thousand of them).
        available = _parquet_splits_available(fs, base, look_in_subfolders=kind == "parquet")
        if kind == "parquet" or available:
            raise SourceError(
                f"no Parquet files for split '{split}' in {uri} (looked for {split}/*.parquet, "
                f"{split}-*.parquet, data/{split}-*.parquet); splits found: {available or 'none'}"
            )
    return _open_imagefolder(uri, split, class_index, storage_options)


def storage_order(source: Source, seed: int) -> np.ndarray:
    """A seeded order of item indices (int64 [N]) that reads well from storage.

    The read groups (files for ImageFolder, row groups for Parquet) are shuffled with
    ``np.random.default_rng(seed)``; the items of a group stay together and in listing order, so a
    contiguous run of the order mixes classes while each group is still read once.
    """
    groups = np.fromiter((it.group for it in source.items), dtype=np.int64, count=len(source.items))
    if groups.size == 0:
        return groups
    num_groups = int(groups.max()) + 1
    rank = np.empty(num_groups, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(num_groups)] = np.arange(num_groups)
    return np.argsort(rank[groups], kind="stable").astype(np.int64)


__all__ = [
    "IMAGE_EXTENSIONS",
    "ParquetFileInfo",
    "Source",
    "SourceChangedError",
    "SourceError",
    "SourceItem",
    "SourceReader",
    "open_source",
    "read_class_index",
    "storage_order",
]
