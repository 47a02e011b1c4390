"""Managing stores: which prefix is a store, status, listing, removal and verification.

The rule of what counts as a store (``docs/store-format.md``, section 1) lives in
:func:`identify_store`; listing and removal both go through it, so a broken store is listed as
broken and can be removed (``stores rm --broken``), while a prefix that is not a store is never
removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline import uri as U
from pipeline.store.checks import layout_problems
from pipeline.store.chunks import _check_crc32c, _zstd_content_size
from pipeline.store.layout import StoreError, from_stored
from pipeline.store.reader import LatentStore
from pipeline.store.writer import _sha_array, merge_partial_stats, shard_partial_stats
from schemas import store_v1 as S
from schemas.errors import UserError

# Every name a store holds directly under its prefix (besides leftover ``.tmp-*`` files of
# interrupted atomic writes).
STORE_ENTRIES = frozenset({
    "zarr.json", S.LATENTS, S.LATENTS_FLIP, S.LABELS, S.VALID, S.SAMPLE_IDS, "partial_stats", "stats",
    S.RECORDS_DIR, S.SPEC_FILE, S.COMPLETE_MARKER,
})
_TMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------------------------
# what is a store


@dataclass
class StoreIdentity:
    """A prefix that is a store. ``problem``: why its root ``zarr.json`` does not identify it (it
    was recognised by its layout instead); None when it does."""

    uri: str
    store_id: str | None
    problem: str | None = None


def identify_store(uri: str, storage_options: dict | None = None) -> StoreIdentity | None:
    """Whether the prefix ``uri`` is a latent store, by the rule of ``docs/store-format.md``:

    1. its ``zarr.json`` is a Zarr group whose ``attributes.rae_store.format`` is
       ``rae-latent-store`` (the group the writer creates first); or
    2. it holds the store's own layout: an array ``latents/zarr.json``, a ``records/`` folder, and
       nothing directly under it but the store's names (:data:`STORE_ENTRIES`) and ``.tmp-*``
       leftovers.

    None when neither holds. Metadata reads only.
    """
    uri = U.normalize(uri)
    so = storage_options or {}
    try:
        group = U.read_json(U.join(uri, "zarr.json"), so)
        problem = "zarr.json is not a latent store's group (no attributes.rae_store)"
    except FileNotFoundError:
        group, problem = None, "zarr.json (the store's group) is missing"
    except ValueError as e:
        group, problem = None, f"zarr.json is not valid JSON ({e})"
    if isinstance(group, dict):
        attributes = group.get("attributes")
        meta = attributes.get("rae_store") if isinstance(attributes, dict) else None
        if group.get("node_type") == "group" and isinstance(meta, dict) and meta.get("format") == S.FORMAT:
            store_id = meta.get("store_id") if isinstance(meta.get("store_id"), str) else None
            problem = None
            if meta.get("version") != S.VERSION:
                problem = f"store format version {meta.get('version')!r}; this software reads version {S.VERSION}"
            elif store_id is None:
                problem = "zarr.json attributes.rae_store has no store_id"
            return StoreIdentity(uri, store_id, problem)
    fs, path = U.get_fs(uri, so)
    try:
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return None
    if S.LATENTS not in names or S.RECORDS_DIR not in names:
        return None
    if any(n not in STORE_ENTRIES and not n.startswith(_TMP_PREFIX) for n in names):
        return None
    if not fs.exists(f"{path.rstrip('/')}/{S.LATENTS}/zarr.json"):
        return None
    return StoreIdentity(uri, None, problem)


# --------------------------------------------------------------------------------------------
# status, listing, removal


@dataclass
class StoreStatus:
    uri: str
    store_id: str | None
    complete: bool
    shards_done: int | None = None
    num_shards: int | None = None
    summary: dict = field(default_factory=dict)
    broken: str | None = None  # why the store cannot be read; None: it can (or it is incomplete)


def _progress(uri: str, so: dict) -> tuple[int | None, int | None]:
    """(shards with a completion record, number of shards) of a store; None where unknown."""
    fs, path = U.get_fs(U.join(uri, S.RECORDS_DIR), so)
    try:
        done = len([p for p in fs.ls(path, detail=False) if p.endswith(".json")])
    except FileNotFoundError:
        done = 0
    try:
        n = U.read_json(U.join(uri, S.PARTIAL_MEAN, "zarr.json"), so)["shape"][0]
    except (FileNotFoundError, ValueError, KeyError, TypeError, IndexError):
        n = None
    return done, n


def store_status(uri: str, storage_options: dict | None = None) -> StoreStatus | None:
    """Status of the store at ``uri`` (see :func:`identify_store`), or None when it is no store.
    A store that cannot be read has ``broken`` set to the reason instead of raising."""
    so = storage_options or {}
    ident = identify_store(uri, so)
    if ident is None:
        return None
    uri = ident.uri
    complete = U.exists(U.join(uri, S.COMPLETE_MARKER), so)
    if ident.problem is None and complete:
        try:
            store = LatentStore.open(uri, so)
        except (UserError, OSError) as e:
            done, n = _progress(uri, so)
            return StoreStatus(uri, ident.store_id, True, done, n, broken=str(e))
        n = store.num_shards
        return StoreStatus(uri, ident.store_id, True, n, n, S.summary(store.spec))
    done, n = _progress(uri, so)
    return StoreStatus(uri, ident.store_id, complete, done, n, broken=ident.problem)


def list_stores(root: str, storage_options: dict | None = None) -> list[StoreStatus]:
    """Every store directly under ``root`` (complete, incomplete and broken), sorted by location.
    A folder that cannot be read at all is listed as broken, with the error."""
    fs, path = U.get_fs(root, storage_options)
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            continue
        uri = U.join(root, entry["name"].rstrip("/").rsplit("/", 1)[-1])
        try:
            st = store_status(uri, storage_options)
        except (UserError, OSError) as e:
            st = StoreStatus(U.normalize(uri), None, False, broken=f"cannot be read ({type(e).__name__}: {e})")
        if st is not None:
            out.append(st)
    return out


def remove_store(uri: str, storage_options: dict | None = None, *, broken: bool = False) -> StoreStatus:
    """Delete a store: the marker first, so a half-deleted store never reads as complete.

    Only a prefix that is a store (:func:`identify_store`) is removed; a broken one only with
    ``broken=True``. Returns the status it had."""
    st = store_status(uri, storage_options)
    if st is None:
        raise StoreError(f"{U.normalize(uri)} is not a latent store (see 'Which prefix counts as a store' in "
                         "docs/store-format.md); nothing removed")
    if st.broken and not broken:
        raise StoreError(f"store {st.uri} is broken ({st.broken}); refusing to remove it unless asked to "
                         "remove a broken store (`stores rm --broken`)")
    marker = U.join(st.uri, S.COMPLETE_MARKER)
    if U.exists(marker, storage_options):
        U.rm(marker, storage_options)
    U.rm(st.uri, storage_options)
    return st


# --------------------------------------------------------------------------------------------
# verification


@dataclass
class VerifyReport:
    uri: str
    ok: bool
    problems: list[str]
    checked_shards: int
    error: str | None = None  # the store could not be opened at all (then problems == [error])

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.uri}: FAILED: {self.error}"
        head = f"{self.uri}: {'OK' if self.ok else 'FAILED'} ({self.checked_shards} shards checked)"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def default_verify_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _decode(meta: bytes, name: str, objects: dict[str, bytes], sel) -> np.ndarray:
    """Rows ``sel`` of array ``name`` decoded by zarr from bytes already read (its ``zarr.json`` and
    the shard's objects), so that every object is read once for both its checksum and its data."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    buffer = default_buffer_prototype().buffer
    held = {f"{name}/zarr.json": buffer.from_bytes(meta)}
    held.update({k: buffer.from_bytes(bytes(v)) for k, v in objects.items() if k.startswith(f"{name}/c/")})
    return np.asarray(zarr.open_array(MemoryStore(held, read_only=True), path=name, mode="r")[sel])


def _decode_rows(meta: bytes, name: str, objects: dict[str, bytes], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a small unsharded array (labels, valid, sample ids, partial statistics)
    lying in one chunk, decoded from the bytes already read: crc32c, then zstd or none, as zarr
    would, without zarr's event loop (whose single thread would serialize the verify threads). Any
    other layout goes through zarr."""
    m = json.loads(meta)
    try:
        names = [c["name"] for c in m["codecs"]]
        rows = int(m["chunk_grid"]["configuration"]["chunk_shape"][0])
        chunk_shape = tuple(m["chunk_grid"]["configuration"]["chunk_shape"])
        plain = (names in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"])
                 and m["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                 and m["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                 and m["chunk_grid"]["name"] == "regular" and chunk_shape[1:] == tuple(m["shape"][1:])
                 and start % rows == 0 and stop - start <= rows)
        dtype = np.dtype(m["data_type"]).newbyteorder("<")
    except (KeyError, TypeError, ValueError, IndexError):
        plain = False
    if not plain:
        return _decode(meta, name, objects, slice(start, stop))
    key = f"{name}/c/{start // rows}" + "/0" * (len(chunk_shape) - 1)
    data = objects.get(key)
    if data is None:  # zarr writes no chunk of fill values only
        return np.full((stop - start,) + chunk_shape[1:], m["fill_value"], dtype=dtype)
    _check_crc32c(data, f"object {key}")
    payload = memoryview(data)[:-4]
    nbytes = int(np.prod(chunk_shape)) * dtype.itemsize
    if names[1] == "zstd":
        if _zstd_content_size(payload) not in (None, nbytes):
            raise ValueError(f"object {key}: zstd frame declares {_zstd_content_size(payload)} bytes, expected {nbytes}")
        from numcodecs.zstd import Zstd

        payload = Zstd().decode(payload)
    if len(payload) != nbytes:
        raise ValueError(f"object {key}: {len(payload)} bytes, expected {nbytes}")
    return np.frombuffer(payload, dtype=dtype).reshape(chunk_shape)[:stop - start]


_scratch = threading.local()  # per verify thread: buffers reused shard after shard


def _reused(slot: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """This thread's array for ``slot``, at least ``shape``: big fresh arrays cost page faults that
    the threads of one process take one at a time, so the verify threads reuse theirs."""
    have = getattr(_scratch, slot, None)
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if have is None or have.nbytes < need:
        have = np.empty(need, dtype=np.uint8)
        setattr(_scratch, slot, have)
    return have[:need].view(dtype).reshape(shape)


def _read_object(uri: str, key: str, so: dict, slot: int):
    """An object's bytes: local files into this thread's reused buffer number ``slot`` (a
    memoryview, valid until the thread reads into that slot again), others as read."""
    path = U.join(uri, key)
    if not U.is_local(path):
        return U.read_bytes(path, so)
    with U.storage_errors(path, "cannot read", so, passthrough=U.MISSING):
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buffer = _reused(f"object{slot}", (size,), np.uint8)
            view = memoryview(buffer)
            got = f.readinto(view)
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            return view[:got]


def _decode_latents(store: LatentStore, meta: bytes, name: str, objects: dict[str, bytes], shard: int,
                    rows: int) -> np.ndarray:
    """The ``rows`` rows of shard ``shard`` of latent array ``name``, decoded from its object's bytes
    already read: by the fast chunk reader (the crc32c and codecs release the GIL, so verify threads
    decode side by side), or by zarr for a layout it does not handle."""
    reader = store._chunk_reader(name)
    key = reader.object_key(shard) if reader is not None else None
    if reader is None or key not in objects:
        start = shard * store.samples_per_shard
        return _decode(meta, name, objects, slice(start, start + rows))
    whole = -(-rows // reader.rows) * reader.rows
    out = _reused("latents:" + name, (whole,) + reader.chunk_shape[1:], reader.dtype.newbyteorder("="))
    return reader.decode_shard(objects[key], rows, out)


@dataclass
class _ShardCheck:
    problems: list[str]
    stats: tuple | None = None  # (count, mean, m2) of the shard's stored values; None: not computed
    has_record: bool = True


def _verify_shard(store: LatentStore, entry: dict, valid: np.ndarray, metas: dict[str, bytes],
                  check_stats: bool) -> _ShardCheck:
    """Every check of one shard: its record against the spec and the valid mask, each object's
    sha256 against the record, every chunk decoded (crc32c), and its partial statistics."""
    spec, so = store.spec, store.storage_options
    s, a, b = entry["index"], entry["start"], entry["stop"]
    problems: list[str] = []
    try:
        rec = store.record(s)
    except FileNotFoundError:
        return _ShardCheck([f"shard {s}: completion record {entry['record']} is missing"], has_record=False)
    except ValueError as e:
        return _ShardCheck([f"shard {s}: completion record {entry['record']} is not valid JSON ({e})"],
                           has_record=False)
    if rec.get("content_hash") != entry["content_hash"]:
        problems.append(f"shard {s}: record content hash differs from the spec")
    if hashlib.sha256(U.canonical_json(rec.get("objects"))).hexdigest() != rec.get("content_hash"):
        problems.append(f"shard {s}: record's object list does not match its content hash")
    v = valid[a:b]
    expected = {"store_id": spec["store_id"], "shard": s, "start": a, "stop": b, "num_valid": int(v.sum()),
                "num_failed": int((~v).sum())}
    for key, want in expected.items():
        if rec.get(key) != want:
            problems.append(f"shard {s}: record {key} is {rec.get(key)!r}, the spec and valid mask say {want!r}")
    if entry["num_valid"] != int(v.sum()):
        problems.append(f"shard {s}: spec.json shards[{s}].num_valid is {entry['num_valid']}, "
                        f"the valid mask counts {int(v.sum())}")
    failed = sorted(f.get("index") for f in rec.get("failures", []))
    if failed != (a + np.flatnonzero(~v)).tolist():
        problems.append(f"shard {s}: record failures {failed[:10]} do not match the invalid rows")

    objects: dict[str, bytes] = {}
    damaged = False
    for slot, (key, digest) in enumerate(sorted((rec.get("objects") or {}).items())):
        try:
            data = _read_object(store.uri, key, so, slot)
        except FileNotFoundError:
            problems.append(f"shard {s}: object {key} is missing")
            damaged = True
            continue
        if U.sha256_bytes(data) != digest:
            problems.append(f"shard {s}: object {key} is corrupt (sha256 differs from its record)")
            damaged = True
            continue
        objects[key] = data
    if damaged:
        return _ShardCheck(problems)  # named above; decoding it would only repeat that

    arrays = spec["statistics"]["arrays"]
    try:
        decoded = []
        for name in arrays:
            x = _decode_latents(store, metas[name], name, objects, s, b - a)
            # float16 and float32 widen to float64 exactly in shard_partial_stats: no float32 copy first.
            x = from_stored(x, store.logical_dtype) if store.logical_dtype == "bfloat16" else x
            decoded.append(x if v.all() else x[v])
        for name in (S.LABELS, S.VALID, S.SAMPLE_IDS):
            _decode_rows(metas[name], name, objects, a, b)  # crc32c and zstd of the 1-D arrays' chunks
    except Exception as e:  # zarr raises codec errors (crc32c, zstd) of several types
        return _ShardCheck(problems + [f"shard {s}: decoding failed ({type(e).__name__}: {e})"])
    if not check_stats:
        return _ShardCheck(problems)
    count, mean, m2 = shard_partial_stats(decoded)
    if count != rec.get("stats_count"):
        problems.append(f"shard {s}: {count} stored values, record says {rec.get('stats_count')}")
    elif count:
        try:
            pm = _decode_rows(metas[S.PARTIAL_MEAN], S.PARTIAL_MEAN, objects, s, s + 1)[0]
            pm2 = _decode_rows(metas[S.PARTIAL_M2], S.PARTIAL_M2, objects, s, s + 1)[0]
        except Exception as e:  # as above
            return _ShardCheck(problems + [f"shard {s}: partial statistics unreadable ({type(e).__name__}: {e})"])
        if not (np.array_equal(pm, mean) and np.array_equal(pm2, m2)):
            problems.append(f"shard {s}: partial statistics differ from the stored values")
    return _ShardCheck(problems, (count, mean, m2))


def verify_store(uri: str, storage_options: dict | None = None, *, check_stats: bool = True,
                 workers: int | None = None) -> VerifyReport:
    """Re-check a complete store. First the spec against itself and the arrays' metadata (shapes,
    dtypes, shard and chunk shapes, codecs, the store id: a spec that lies fails here, naming the
    key); then per shard, ``workers`` shards at a time (threads: reading, sha256 and decoding
    release the GIL; default :func:`default_verify_workers`): the record against the spec and the
    valid mask, every object's sha256 against the record, every chunk decoded (crc32c), the
    partial statistics; then labels, failures, and the merged statistics recomputed from the stored
    values. Problems name the shard and object or the spec key. A store that cannot be opened at
    all gives a report with ``error`` set."""
    so = storage_options or {}
    try:
        store = LatentStore.open(uri, so, check_arrays=False)
    except UserError as e:
        return VerifyReport(U.normalize(uri), False, [str(e)], 0, error=str(e))
    spec = store.spec
    problems = layout_problems(store.uri, spec, so)
    if problems:
        return VerifyReport(store.uri, False, problems, 0)

    fs, records_path = U.get_fs(U.join(store.uri, S.RECORDS_DIR), so)
    try:
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(records_path, detail=False)}
    except FileNotFoundError:
        present = set()
    expected_records = {sh["record"].rsplit("/", 1)[-1] for sh in spec["shards"]}
    for name in sorted(present - expected_records):
        if not name.startswith(_TMP_PREFIX):
            problems.append(f"{S.RECORDS_DIR}/{name} is not a record of this store's "
                            f"{spec['layout']['num_shards']} shards")

    try:
        valid, labels = store.valid(), store.labels()
    except StoreError as e:
        return VerifyReport(store.uri, False, problems + [f"labels/valid unreadable: {e}"], 0)
    except Exception as e:  # zarr's codec errors, as in LatentStore.read_rows
        return VerifyReport(store.uri, False, problems + [f"labels/valid unreadable ({type(e).__name__}: {e})"], 0)
    if int(valid.sum()) != spec["counts"]["num_valid"]:
        problems.append(f"valid mask counts {int(valid.sum())} samples, spec says {spec['counts']['num_valid']}")
    bad_labels = np.flatnonzero(valid & ((labels < 0) | (labels >= store.num_classes)))
    if len(bad_labels):
        problems.append(f"labels out of range at rows {bad_labels[:10].tolist()}")
    failed = sorted(f["index"] for f in spec["failures"])
    if failed != np.flatnonzero(~valid).tolist():
        problems.append("failures listed in the spec do not match the invalid rows")

    names = list(spec["statistics"]["arrays"]) + [S.LABELS, S.VALID, S.SAMPLE_IDS, S.PARTIAL_MEAN, S.PARTIAL_M2]
    metas = {name: U.read_bytes(U.join(store.uri, name, "zarr.json"), so) for name in names}

    for name in spec["statistics"]["arrays"]:
        store._chunk_reader(name)  # made once, before the threads share it

    def check(entry):
        return _verify_shard(store, entry, valid, metas, check_stats)

    workers = default_verify_workers() if workers is None else max(1, int(workers))
    # Pool threads also for one worker: their reused buffers (_reused) go with them.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        results = list(pool.map(check, spec["shards"]))  # in shard order: a deterministic report
    for r in results:
        problems.extend(r.problems)
    checked = sum(r.has_record for r in results)

    if check_stats and not problems:
        count, mean, m2 = merge_partial_stats(r.stats for r in results)
        smean, svar = store.stats()
        if count != spec["statistics"]["count"]:
            problems.append(f"statistics count {count} != spec {spec['statistics']['count']}")
        elif count and not (np.array_equal(smean, mean) and np.array_equal(svar, m2 / count)):
            problems.append("stats/mean or stats/var differ from a recomputation over the stored values")
        sha = spec["statistics"]["sha256"]
        if _sha_array(smean) != sha["mean"] or _sha_array(svar) != sha["var"]:
            problems.append("stats arrays do not match the checksums in the spec")
    return VerifyReport(store.uri, not problems, problems, checked)
