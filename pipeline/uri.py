"""fsspec URI helpers: one code path for local paths, ``file://``, ``s3://`` and ``memory://``.

S3 endpoints and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...) which botocore reads itself, or from explicit ``storage_options``.

Storage failures (``OSError``, botocore's credential, endpoint and client errors, and s3fs's
translations of them) leave these helpers as :class:`~schemas.errors.StorageError` naming the URI,
without any credential in the message. A missing object on a read stays ``FileNotFoundError``
(callers test for it). Files written locally get the mode ``open(path, "w")`` gives under the
current umask (0o666 & ~umask), so a store or a run on a shared disk is as readable as any file its
user writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
import tempfile
from typing import Any, Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from schemas.errors import StorageError

# Seconds a probe of a location (check_location) waits for the endpoint, and attempts it makes: a
# dead endpoint or missing credentials must be reported at once, not after botocore's and s3fs's
# retries (tens of seconds).
PROBE_TIMEOUT_S = 10.0


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


# ---------------------------------------------------------------------------------------------
# storage failures -> StorageError

# Variables and storage options whose values are credentials: never part of a message.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
CREDENTIAL_OPTIONS = ("key", "secret", "token", "session_token", "password", "username", "access_key", "secret_key")
CREDENTIAL_CLIENT_OPTIONS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
# A missing object or a folder where a file is expected: what reads report unchanged.
MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def credential_values(storage_options: dict | None = None) -> list[str]:
    """The credentials this process would use: the AWS variables' values and those in
    ``storage_options`` (top level and ``client_kwargs``)."""
    so = storage_options or {}
    values = [os.environ.get(k) for k in _SECRET_ENV]
    values += [so.get(k) for k in CREDENTIAL_OPTIONS]
    values += [(so.get("client_kwargs") or {}).get(k) for k in CREDENTIAL_CLIENT_OPTIONS]
    return [v for v in values if isinstance(v, str) and len(v) >= 8]  # shorter: not a real key, and too common a word


def redact(text: str, storage_options: dict | None = None) -> str:
    """``text`` with every credential of :func:`credential_values` replaced by ``***``."""
    for value in sorted(credential_values(storage_options), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def is_storage_failure(e: BaseException) -> bool:
    """Whether ``e`` is a storage client's failure (OSError; botocore's errors, when it is loaded)."""
    if isinstance(e, OSError):
        return True
    boto = sys.modules.get("botocore.exceptions")  # not loaded: no botocore error can have happened
    return boto is not None and isinstance(e, (boto.BotoCoreError, boto.ClientError))


def _reason(e: BaseException) -> str:
    name = type(e).__name__
    if name == "NoCredentialsError":
        return ("no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS profile or "
                "config file, or use an instance role)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return f"cannot reach the storage endpoint ({e})"
    text = str(e)
    if isinstance(e, OSError):  # errno errors and s3fs's translations of S3's answers (Access Denied...)
        if e.strerror:
            return e.strerror + (f": {e.filename}" if e.filename else "")
        return text or name
    return f"{name}: {text}" if text else name


def storage_error(e: BaseException, uri: str, action: str, storage_options: dict | None = None) -> StorageError:
    """A one-line StorageError ``<action> <uri>: <reason>`` for the storage failure ``e``."""
    message = " ".join(f"{action} {uri}: {_reason(e)}".split())
    return StorageError(redact(message, storage_options))


@contextlib.contextmanager
def storage_errors(uri: str, action: str, storage_options: dict | None = None, *,
                   passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn the storage failures raised inside into :func:`storage_error` (``action`` says what
    was attempted: "cannot read", "cannot write"...); ``passthrough`` types are re-raised as they are."""
    try:
        yield
    except StorageError:
        raise
    except passthrough:
        raise
    except Exception as e:
        if not is_storage_failure(e):
            raise
        raise storage_error(e, uri, action, storage_options) from e


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe_filesystem(protocol: str, storage_options: dict | None, timeout_s: float):
    """A fresh (uncached) filesystem for one probe: S3 with short timeouts and a single attempt."""
    opts = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        config.update(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1})
        opts["config_kwargs"] = config
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
        fs.retries = 1  # s3fs's own retry loop around botocore's
        return fs
    return fsspec.filesystem(protocol, **opts)


def check_location(uri: str, storage_options: dict | None = None, *, write: bool = False,
                   timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether anything exists at ``uri``, asked once before a long job commits to it; raises a
    StorageError naming ``uri`` when the location cannot be used, within about ``timeout_s``.

    Local: with ``write``, the nearest existing folder on the way to ``uri`` must be a folder this
    process may write (a file where a folder is expected, missing permissions or a read-only file
    system fail here). S3: one listing of the prefix (credentials, endpoint, bucket, permission to
    list), with short timeouts and no retries, then whether the object or prefix exists.
    """
    if is_local(uri):
        path = normalize(uri)
        if write:
            base = _nearest_existing(path)
            if not os.path.isdir(base):
                raise StorageError(f"cannot write {uri}: {base} is a file, not a folder")
            if not os.access(base, os.W_OK | os.X_OK):
                raise StorageError(
                    f"cannot write {uri}: {base} is not writable (permissions or a read-only file system)")
        return os.path.exists(path)
    fs, path = get_fs(uri, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    with storage_errors(uri, "cannot use", storage_options):
        probe = _probe_filesystem(protocol, storage_options, timeout_s)
        if protocol in ("s3", "s3a"):
            bucket, key, _ = probe.split_path(path)
            probe.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
            return not key or probe.exists(path)
        return probe.exists(path)


# ---------------------------------------------------------------------------------------------
# reading and writing


def exists(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    with storage_errors(uri, "cannot check", storage_options):
        return fs.exists(path)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The object's bytes; FileNotFoundError (IsADirectoryError, NotADirectoryError) when there is
    no such file, StorageError on any other storage failure."""
    fs, path = get_fs(uri, storage_options)
    with storage_errors(uri, "cannot read", storage_options, passthrough=MISSING):
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
    with storage_errors(uri, "cannot write", storage_options):
        if local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = _create_temp_file(os.path.dirname(path))
        else:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-")  # a private local copy, deleted once uploaded
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


def _create_temp_file(folder: str) -> tuple[int, str]:
    """(fd, path) of a new ``.tmp-<random>`` file in ``folder``, open for reading and writing.

    Created with mode 0o666 like ``open(path, "w")``, so the kernel applies the umask (and a
    folder's default ACL): the file ``os.replace`` installs has the mode any file its user writes
    has. ``tempfile.mkstemp`` would make it 0600, private to one user whatever the umask.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {folder}")


def atomic_write_bytes(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write an object so that readers see either nothing, the old bytes, or all of the new ones
    (local: :func:`atomic_write_with`; object stores have atomic PUTs already)."""
    fs, path = get_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        atomic_write_with(uri, lambda f: f.write(data), storage_options)
    else:
        with storage_errors(uri, "cannot write", storage_options):
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
    with storage_errors(uri, "cannot remove", storage_options, passthrough=(FileNotFoundError,)):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
