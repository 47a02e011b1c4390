"""fsspec URI helpers: one code path for local paths, ``file://``, ``s3://`` and ``memory://``.

S3 endpoints and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...) which botocore reads itself, or from explicit ``storage_options``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem


def normalize(uri: str) -> str:
    """A local path becomes an absolute path; URIs with a protocol are returned unchanged."""
    uri = str(uri)
    if "://" in uri:
        if uri.startswith("file://"):
            return os.path.abspath(uri[len("file://"):])
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    fs, path = fsspec.core.url_to_fs(normalize(uri), **(storage_options or {}))
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def join(uri: str, *parts: str) -> str:
    out = normalize(uri) if is_local(uri) else str(uri).rstrip("/")
    for p in parts:
        out = out.rstrip("/") + "/" + str(p).strip("/")
    return out


def exists(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    return fs.exists(path)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    fs, path = get_fs(uri, storage_options)
    return fs.cat_file(path)


def read_json(uri: str, storage_options: dict | None = None) -> Any:
    return json.loads(read_bytes(uri, storage_options))


def atomic_write_with(uri: str, write: Callable[[Any], None], storage_options: dict | None = None) -> None:
    """Write ``uri`` through ``write(file)`` (a binary file object opened for writing) so that
    readers see either nothing, the old object, or all of the new one, without holding it in memory.

    Local files: a temporary file in the same folder, fsync'ed, then ``os.replace``. Object stores
    (S3): a local temporary file, uploaded in one PUT (atomic there) once ``write`` has returned.
    """
    fs, path = get_fs(uri, storage_options)
    local = isinstance(fs, LocalFileSystem)
    folder = os.path.dirname(path) if local else None
    if local:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write an object so that readers see either nothing, the old bytes, or all of the new ones
    (local: :func:`atomic_write_with`; object stores have atomic PUTs already)."""
    fs, path = get_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        atomic_write_with(uri, lambda f: f.write(data), storage_options)
    else:
        fs.pipe_file(path, data)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace variance, trailing newline)."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode()


def write_json(uri: str, obj: Any, storage_options: dict | None = None) -> None:
    atomic_write_bytes(uri, canonical_json(obj), storage_options)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rm(uri: str, storage_options: dict | None = None, recursive: bool = True) -> None:
    fs, path = get_fs(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
