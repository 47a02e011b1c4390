"""The latent store library: Zarr v3 writer and reader for store spec v1 (``schemas/store_v1.py``).

Writing: a :class:`StorePlan` holds everything known before encoding (it determines the store id);
:class:`StoreWriter` creates the metadata, writes one shard at a time (each object atomically, its
completion record after it), and :meth:`StoreWriter.finalize` merges the statistics and writes
the spec and then the ``COMPLETE`` marker. :func:`write_array_store` writes a whole store from
in-memory arrays (source "synthetic"), which the trainer's tests use.

Reading: :class:`LatentStore` opens a complete store at any fsspec URI and reads whole chunks,
labels, the valid mask, statistics and per-sample source references; :func:`verify_store`
re-checks every object, count and statistic.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np

from pipeline import uri as U
from schemas import store_v1 as S

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_SAMPLES_PER_SHARD = 256


class StoreError(RuntimeError):
    """A store that cannot be written or read as asked; the message names the store and key."""


class IncompleteStoreError(StoreError):
    """The store has no COMPLETE marker (still being written, or the job died): not readable as data."""


# --------------------------------------------------------------------------------------------
# dtypes


def encode_latents(x: np.ndarray, logical_dtype: str) -> np.ndarray:
    """float32 latents -> the storage dtype (bfloat16 as uint16 bit patterns, round to nearest even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if logical_dtype == "float32":
        return x
    if logical_dtype == "float16":
        return x.astype(np.float16)
    if logical_dtype == "bfloat16":
        bits = x.view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    raise ValueError(f"unknown latent dtype {logical_dtype!r}; expected one of {S.LOGICAL_DTYPES}")


def decode_latents(x: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Stored latents -> float32."""
    if logical_dtype == "bfloat16":
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# the plan: everything known before encoding


@dataclass(frozen=True)
class StoreLayout:
    """How latents are laid out at rest (part of the store id)."""

    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    compressor: Literal["zstd", "none"] = "zstd"
    zstd_level: int = 3
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    samples_per_chunk: int | None = None  # None: about DEFAULT_CHUNK_BYTES per chunk
    flips: bool = True

    def resolved(self, latent_shape: tuple[int, int, int]) -> "StoreLayout":
        """Fill in ``samples_per_chunk`` and check the combination."""
        if self.dtype not in S.LOGICAL_DTYPES:
            raise ValueError(f"layout.dtype {self.dtype!r} is not one of {S.LOGICAL_DTYPES}")
        if self.compressor not in S.COMPRESSORS:
            raise ValueError(f"layout.compressor {self.compressor!r} is not one of {S.COMPRESSORS}")
        if self.samples_per_shard < 1:
            raise ValueError("layout.samples_per_shard must be >= 1")
        k = self.samples_per_chunk
        if k is None:
            per_sample = math.prod(latent_shape) * np.dtype(S.STORAGE_DTYPE[self.dtype]).itemsize
            target = max(1, DEFAULT_CHUNK_BYTES // per_sample)
            k = max(d for d in range(1, self.samples_per_shard + 1) if self.samples_per_shard % d == 0 and d <= target)
        if k < 1 or self.samples_per_shard % k:
            raise ValueError(
                f"layout.samples_per_chunk ({k}) must divide layout.samples_per_shard ({self.samples_per_shard})"
            )
        return dataclasses.replace(self, samples_per_chunk=k)


@dataclass(frozen=True)
class StorePlan:
    """Everything that determines a store's content, known before any latent is computed.

    ``encoder``, ``preprocessing``, ``source`` and ``classes`` follow the spec's sections of the
    same names. The store id is a hash of :meth:`id_inputs`.
    """

    kind: Literal["encoded", "synthetic"]
    num_samples: int
    latent_shape: tuple[int, int, int]
    layout: StoreLayout
    source: dict
    classes: dict
    encoder: dict | None = None
    preprocessing: dict | None = None
    content_hash: str | None = None  # synthetic stores: hash of the input arrays

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(int(d) for d in self.latent_shape))
        object.__setattr__(self, "layout", self.layout.resolved(self.latent_shape))
        if self.num_samples < 1:
            raise ValueError("a store needs at least one sample")

    def id_inputs(self) -> dict:
        return {
            "format": S.FORMAT,
            "version": S.VERSION,
            "kind": self.kind,
            "encoder": self.encoder,
            "preprocessing": self.preprocessing,
            "source": {k: self.source[k] for k in ("kind", "split", "fingerprint", "num_items", "order")},
            "classes": self.classes,
            "latent_shape": list(self.latent_shape),
            "layout": dataclasses.asdict(self.layout),
            "num_samples": self.num_samples,
            "content_hash": self.content_hash,
        }

    @property
    def store_id(self) -> str:
        return hashlib.sha256(U.canonical_json(self.id_inputs())).hexdigest()[:20]

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.layout.samples_per_shard)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        s = self.layout.samples_per_shard
        return shard * s, min((shard + 1) * s, self.num_samples)

    def default_name(self) -> str:
        """Folder name of the store under an output root: readable, and unique by id."""
        if self.kind == "synthetic":
            return f"synthetic_{self.store_id}"
        enc = self.encoder["name"] if self.encoder else "none"
        res = (self.preprocessing or {}).get("resolution", "x")
        return f"{enc}_{self.source['split']}_{res}px_{self.store_id}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StorePlan":
        d = dict(d)
        d["layout"] = StoreLayout(**d["layout"])
        d["latent_shape"] = tuple(d["latent_shape"])
        return cls(**d)


def _array_definitions(plan: StorePlan) -> dict[str, dict]:
    """Zarr array arguments for every array of the store (identical for metadata and shard writes)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    lay = plan.layout
    n, (c, h, w) = plan.num_samples, plan.latent_shape
    s, k = lay.samples_per_shard, lay.samples_per_chunk
    # crc32c on every inner chunk as well as on each shard's index: a flipped bit is an error on read.
    compressors: list = [ZstdCodec(level=lay.zstd_level, checksum=False)] if lay.compressor == "zstd" else []
    latent = dict(
        shape=(n, c, h, w),
        dtype=S.STORAGE_DTYPE[lay.dtype],
        chunks=(k, c, h, w),
        shards=(s, c, h, w),
        compressors=compressors + [Crc32cCodec()],
        fill_value=0,
    )
    small = dict(chunks=(s,), compressors=[ZstdCodec(level=lay.zstd_level, checksum=False), Crc32cCodec()])
    defs = {S.LATENTS: latent}
    if lay.flips:
        defs[S.LATENTS_FLIP] = dict(latent)
    defs[S.LABELS] = dict(shape=(n,), dtype="int32", fill_value=-1, **small)
    defs[S.VALID] = dict(shape=(n,), dtype="uint8", fill_value=0, **small)
    defs[S.SAMPLE_IDS] = dict(shape=(n,), dtype="int64", fill_value=-1, **small)
    stat_chunk = dict(dtype="float64", fill_value=0.0, compressors=[Crc32cCodec()])
    defs[S.PARTIAL_MEAN] = dict(shape=(plan.num_shards, c, h, w), chunks=(1, c, h, w), **stat_chunk)
    defs[S.PARTIAL_M2] = dict(shape=(plan.num_shards, c, h, w), chunks=(1, c, h, w), **stat_chunk)
    defs[S.STATS_MEAN] = dict(shape=(c, h, w), chunks=(c, h, w), **stat_chunk)
    defs[S.STATS_VAR] = dict(shape=(c, h, w), chunks=(c, h, w), **stat_chunk)
    return defs


def _memory_group(plan: StorePlan):
    """The store's group with every array, in memory: its dict holds exactly the objects written."""
    import zarr
    from zarr.storage import MemoryStore

    objects: dict = {}
    root = zarr.create_group(
        MemoryStore(store_dict=objects),
        attributes={"rae_store": {"format": S.FORMAT, "version": S.VERSION, "store_id": plan.store_id}},
    )
    root.create_group("stats")
    root.create_group("partial_stats")
    arrays = {name: root.create_array(name=name, **kw) for name, kw in _array_definitions(plan).items()}
    return objects, arrays


def _object_bytes(objects: dict, skip: Iterable[str] = ()) -> dict[str, bytes]:
    skip = set(skip)
    return {k: v.to_bytes() for k, v in sorted(objects.items()) if k not in skip}


# --------------------------------------------------------------------------------------------
# statistics


def shard_partial_stats(decoded: Iterable[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, m2) in float64 over the rows of the given [n, C, H, W] arrays (the valid stored
    values, decoded back from the storage dtype, all orientations)."""
    x = np.concatenate([np.asarray(a, dtype=np.float64) for a in decoded], axis=0)
    if len(x) == 0:
        return 0, None, None
    mean = x.mean(axis=0)
    m2 = ((x - mean) ** 2).sum(axis=0)
    return len(x), mean, m2


def merge_partial_stats(parts: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise merge, applied left to right in the given (shard) order: deterministic."""
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        tot = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (n * nb / tot)
        n = tot
    return n, mean, m2


def _sha_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# writer


def _software_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("rae-pipeline", "zarr", "numcodecs", "numpy", "torch", "timm", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class StoreWriter:
    """Writes one store. Picklable (it holds only the URI, the plan and storage options), so Ray
    tasks each write the shards they own.

    Every method is idempotent: rewriting a shard writes the same bytes, and two writers working on
    the same store (two jobs on one output) leave it correct.
    """

    def __init__(self, uri: str, plan: StorePlan, storage_options: dict | None = None):
        self.uri = U.normalize(uri)
        self.plan = plan
        self.storage_options = storage_options or {}

    def _key(self, key: str) -> str:
        return U.join(self.uri, key)

    def create(self) -> "StoreWriter":
        """Write the group and array metadata. An existing store with other metadata is an error."""
        objects, _ = _memory_group(self.plan)
        fs, _ = U.get_fs(self.uri, self.storage_options)
        for key, data in _object_bytes(objects).items():
            target = self._key(key)
            _, path = U.get_fs(target, self.storage_options)
            if fs.exists(path):
                if fs.cat_file(path) != data:
                    raise StoreError(
                        f"{target} exists with other metadata than store {self.plan.store_id} expects; "
                        "refusing to mix two stores in one location"
                    )
                continue
            U.atomic_write_bytes(target, data, self.storage_options)
        return self

    def shard_done(self, shard: int) -> bool:
        """True when the shard's completion record exists and names this store."""
        try:
            rec = U.read_json(self._key(S.record_name(shard)), self.storage_options)
        except FileNotFoundError:
            return False
        except (ValueError, OSError):
            return False  # a damaged record is rewritten with the shard
        return rec.get("store_id") == self.plan.store_id

    def pending_shards(self) -> list[int]:
        """Shards without a completion record (one listing of the records folder)."""
        fs, path = U.get_fs(self._key(S.RECORDS_DIR), self.storage_options)
        try:
            names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            names = set()
        return [s for s in range(self.plan.num_shards) if S.record_name(s).rsplit("/", 1)[-1] not in names]

    def is_complete(self) -> bool:
        return U.exists(self._key(S.COMPLETE_MARKER), self.storage_options)

    def write_shard(
        self,
        shard: int,
        *,
        latents: np.ndarray,
        labels: np.ndarray,
        valid: np.ndarray,
        sample_ids: np.ndarray,
        latents_flip: np.ndarray | None = None,
        samples: list[dict] | None = None,
        failures: list[dict] | None = None,
    ) -> dict:
        """Write rows ``shard_bounds(shard)`` of every array, then the shard's completion record.

        latents, latents_flip: float32 [n, C, H, W] (rows of invalid samples are ignored and stored as
        zeros); labels int [n]; valid bool [n]; sample_ids int [n]; samples: per-row source references
        (``index``, ``id``, ``key``, ``uri``, ``row``, ``size``, ``sha256``, ``label``); failures:
        ``{"index", "id", "key", "reason"}`` for the invalid rows. Returns the record.
        """
        plan = self.plan
        start, stop = plan.shard_bounds(shard)
        n = stop - start
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        _check_rows("valid", valid, n, shard)
        _check_rows("labels", labels, n, shard)
        _check_rows("sample_ids", sample_ids, n, shard)
        _check_rows("latents", latents, n, shard, plan.latent_shape)
        if plan.layout.flips:
            if latents_flip is None:
                raise StoreError(f"shard {shard}: this store keeps flipped latents; latents_flip is missing")
            _check_rows("latents_flip", latents_flip, n, shard, plan.latent_shape)
        failures = sorted(failures or [], key=lambda f: f["index"])
        failed_rows = {f["index"] for f in failures}
        expected_failed = {start + i for i in np.flatnonzero(~valid)}
        if failed_rows != expected_failed:
            raise StoreError(
                f"shard {shard}: failures {sorted(failed_rows)} do not match the invalid rows {sorted(expected_failed)}"
            )
        labels = np.where(valid, np.asarray(labels, dtype=np.int64), -1).astype(np.int32)
        if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= plan.classes["num_classes"]):
            raise StoreError(f"shard {shard}: labels outside [0, {plan.classes['num_classes']})")

        objects, arrays = _memory_group(plan)
        header_keys = set(objects)
        decoded = []
        orientations = [(S.LATENTS, latents)] + ([(S.LATENTS_FLIP, latents_flip)] if plan.layout.flips else [])
        for name, x in orientations:
            stored = encode_latents(np.where(valid[:, None, None, None], x, 0.0), plan.layout.dtype)
            arrays[name][start:stop] = stored
            decoded.append(decode_latents(stored[valid], plan.layout.dtype))
        arrays[S.LABELS][start:stop] = labels
        arrays[S.VALID][start:stop] = valid.astype(np.uint8)
        arrays[S.SAMPLE_IDS][start:stop] = np.asarray(sample_ids, dtype=np.int64)
        count, mean, m2 = shard_partial_stats(decoded)
        if count:
            arrays[S.PARTIAL_MEAN][shard] = mean
            arrays[S.PARTIAL_M2][shard] = m2
        payload = _object_bytes(objects, skip=header_keys)
        for key, data in payload.items():
            U.atomic_write_bytes(self._key(key), data, self.storage_options)
        hashes = {key: U.sha256_bytes(data) for key, data in payload.items()}
        record = {
            "format": "rae-shard-record",
            "version": S.VERSION,
            "store_id": plan.store_id,
            "shard": shard,
            "start": start,
            "stop": stop,
            "num_valid": int(valid.sum()),
            "num_failed": int((~valid).sum()),
            "stats_count": int(count),
            "failures": failures,
            "samples": samples if samples is not None else [
                {"index": start + i, "id": int(sample_ids[i]), "key": f"row-{int(sample_ids[i])}"} for i in range(n)
            ],
            "objects": hashes,
            "content_hash": hashlib.sha256(U.canonical_json(hashes)).hexdigest(),
        }
        U.write_json(self._key(S.record_name(shard)), record, self.storage_options)
        return record

    def finalize(self) -> dict:
        """Merge the statistics, write them, the spec, then COMPLETE. Returns the spec."""
        plan = self.plan
        missing = self.pending_shards()
        if missing:
            raise IncompleteStoreError(
                f"store {self.uri}: {len(missing)} shard(s) have no completion record (first: {missing[:5]})"
            )
        records = [U.read_json(self._key(S.record_name(s)), self.storage_options) for s in range(plan.num_shards)]
        for r in records:
            if r["store_id"] != plan.store_id:
                raise StoreError(f"{self._key(S.record_name(r['shard']))} belongs to store {r['store_id']}")
        reader = _RawArrays(self.uri, self.storage_options)
        count, mean, var = _merged_stats(reader, records, plan.latent_shape)

        objects, arrays = _memory_group(plan)
        header_keys = set(objects)
        arrays[S.STATS_MEAN][...] = mean
        arrays[S.STATS_VAR][...] = var
        for key, data in _object_bytes(objects, skip=header_keys).items():
            U.atomic_write_bytes(self._key(key), data, self.storage_options)

        failures = [f for r in records for f in r["failures"]]
        num_valid = sum(r["num_valid"] for r in records)
        lay = plan.layout
        spec = {
            "format": S.FORMAT,
            "version": S.VERSION,
            "store_id": plan.store_id,
            "kind": plan.kind,
            "id_inputs": plan.id_inputs(),
            "encoder": plan.encoder,
            "preprocessing": plan.preprocessing,
            "source": plan.source,
            "classes": plan.classes,
            "latent": {
                "shape": list(plan.latent_shape),
                "logical_dtype": lay.dtype,
                "storage_dtype": S.STORAGE_DTYPE[lay.dtype],
            },
            "layout": {
                "num_samples": plan.num_samples,
                "samples_per_shard": lay.samples_per_shard,
                "samples_per_chunk": lay.samples_per_chunk,
                "num_shards": plan.num_shards,
                "compressor": {"name": lay.compressor, "level": lay.zstd_level},
                "checksum": "crc32c",
                "flips": lay.flips,
                "arrays": {
                    name: {
                        "shape": list(kw["shape"]),
                        "dtype": kw["dtype"],
                        "chunks": list(kw["chunks"]),
                        "shards": list(kw["shards"]) if kw.get("shards") else None,
                    }
                    for name, kw in _array_definitions(plan).items()
                },
            },
            "counts": {"num_samples": plan.num_samples, "num_valid": num_valid, "num_failed": len(failures)},
            "failures": failures,
            "statistics": {
                "mean": S.STATS_MEAN,
                "var": S.STATS_VAR,
                "dtype": "float64",
                "count": int(count),
                "arrays": [S.LATENTS] + ([S.LATENTS_FLIP] if lay.flips else []),
                "eps": S.STATS_EPS,
                "variance": "population",
                "sha256": {"mean": _sha_array(mean), "var": _sha_array(var)},
            },
            "shards": [
                {
                    "index": r["shard"],
                    "start": r["start"],
                    "stop": r["stop"],
                    "num_valid": r["num_valid"],
                    "record": S.record_name(r["shard"]),
                    "content_hash": r["content_hash"],
                }
                for r in records
            ],
            "software": _software_versions(),
        }
        S.validate_spec(spec)
        spec_bytes = U.canonical_json(spec)
        U.atomic_write_bytes(self._key(S.SPEC_FILE), spec_bytes, self.storage_options)
        U.write_json(
            self._key(S.COMPLETE_MARKER),
            {"store_id": plan.store_id, "spec_sha256": U.sha256_bytes(spec_bytes)},
            self.storage_options,
        )
        return spec


def _check_rows(name: str, a, n: int, shard: int, tail: tuple | None = None) -> None:
    shape = np.shape(a)
    want = (n,) + tuple(tail or ())
    if tuple(shape) != want:
        raise StoreError(f"shard {shard}: {name} has shape {tuple(shape)}, expected {want}")


def _merged_stats(reader: "_RawArrays", records: list[dict], latent_shape) -> tuple[int, np.ndarray, np.ndarray]:
    def parts():
        for r in records:
            n = r["stats_count"]
            if n == 0:
                yield 0, None, None
            else:
                yield n, reader.read(S.PARTIAL_MEAN, r["shard"]), reader.read(S.PARTIAL_M2, r["shard"])

    count, mean, m2 = merge_partial_stats(parts())
    if count == 0:
        return 0, np.zeros(latent_shape), np.ones(latent_shape)
    return count, mean, m2 / count


class _RawArrays:
    """Lazily opened zarr arrays of a store (no completeness check)."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = U.normalize(uri)
        self.storage_options = storage_options or {}
        self._zstore = None
        self._arrays: dict[str, Any] = {}

    def zarr_store(self):
        if self._zstore is None:
            from zarr.storage import FsspecStore, LocalStore

            if U.is_local(self.uri):
                self._zstore = LocalStore(U.normalize(self.uri), read_only=True)
            else:
                # zarr runs its own event loop: it needs an fsspec filesystem created asynchronous.
                self._zstore = FsspecStore.from_url(self.uri, storage_options=dict(self.storage_options), read_only=True)
        return self._zstore

    def array(self, name: str):
        if name not in self._arrays:
            import zarr

            try:
                self._arrays[name] = zarr.open_array(self.zarr_store(), path=name, mode="r")
            except FileNotFoundError as e:
                raise StoreError(f"{self.uri}: array {name!r} is missing") from e
        return self._arrays[name]

    def read(self, name: str, sel) -> np.ndarray:
        return np.asarray(self.array(name)[sel])

    def __getstate__(self):
        # Each process (DataLoader worker, Ray task) opens its own clients.
        return {"uri": self.uri, "storage_options": self.storage_options, "_zstore": None, "_arrays": {}}


# --------------------------------------------------------------------------------------------
# direct reads of whole inner chunks of a sharded latent array (the trainer loader's read path)

_EMPTY_CHUNK = 2**64 - 1  # offset and length of a chunk the shard does not hold (all fill value)


def _zstd_content_size(frame) -> int | None:
    """The decompressed size a zstd frame header declares (None: not declared)."""
    b = bytes(frame[:18])
    if len(b) < 6 or b[:4] != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame (bad magic number)")
    desc = b[4]
    fcs_flag, single, dict_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0:
        return None
    if len(b) < pos + width:
        raise ValueError("truncated zstd frame header")
    size = int.from_bytes(b[pos:pos + width], "little")
    return size + 256 if width == 2 else size


class _ShardedChunkReader:
    """Whole inner chunks of one sharded array of a store, read without zarr's per-call machinery.

    Each shard's index (the object's last 16 * chunks_per_shard + 4 bytes) is read once per reader
    and cached, its crc32c checked; a chunk is then one byte-range read, its crc32c checked, and
    decompressed (zstd) or copied straight into the caller's buffer. Same bytes, same checks as
    zarr's read. Only the layout this library writes is handled: :meth:`create` returns None for any
    other array metadata (the caller then reads through zarr). Errors are ValueError/OSError with
    the detail; :meth:`LatentStore.read_chunk_stored` names the shard and object.
    """

    def __init__(self, uri: str, name: str, storage_options: dict, dtype: np.dtype, chunk_shape: tuple,
                 shard_rows: int, zstd: bool, fill_value):
        self.uri, self.name, self.storage_options = uri, name, storage_options
        self.dtype, self.chunk_shape, self.shard_rows = dtype, tuple(chunk_shape), shard_rows
        self.rows = self.chunk_shape[0]
        self.chunks_per_shard = shard_rows // self.rows
        self.chunk_bytes = math.prod(self.chunk_shape) * dtype.itemsize
        self.zstd, self.fill_value = zstd, fill_value
        self._local = U.is_local(uri)
        self._fs = self._root = self._zstd = None
        self._thread = threading.local()  # the last read's bytes, valid until this thread's next read
        self._index: dict[int, np.ndarray | None] = {}

    @classmethod
    def create(cls, uri: str, name: str, storage_options: dict, meta: dict) -> "_ShardedChunkReader | None":
        """A reader for the array whose ``zarr.json`` is ``meta``, or None when its layout is not
        exactly: one sharding codec (index at the end, bytes + crc32c), inner chunks of whole rows
        along axis 0, inner codecs bytes (little endian) + optional zstd + crc32c."""
        try:
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            chunk_shape = tuple(conf["chunk_shape"])
            inner = [c["name"] for c in conf["codecs"]]
            ok = (
                codec["name"] == "sharding_indexed"
                and meta["chunk_grid"]["name"] == "regular"
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and conf.get("index_location", "end") == "end"
                and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
                and conf["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and inner in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"])
                and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and chunk_shape[1:] == shard_shape[1:] == tuple(meta["shape"][1:])
                and shard_shape[0] % chunk_shape[0] == 0
                and meta["data_type"] in ("float16", "float32", "uint16")
                and isinstance(meta["fill_value"], (int, float))
                and not meta.get("storage_transformers")
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not ok:
            return None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        return cls(uri, name, storage_options, dtype, chunk_shape, shard_shape[0], "zstd" in inner,
                   meta["fill_value"])

    def object_key(self, shard: int) -> str:
        return f"{self.name}/c/{shard}" + "/0" * (len(self.chunk_shape) - 1)

    def _read(self, key: str, start: int, stop: int | None) -> bytes | None:
        """Bytes [start, stop) of an object (start < 0 and stop None: the last -start bytes);
        None when the object does not exist."""
        try:
            if self._local:
                with open(U.join(self.uri, key), "rb", buffering=0) as f:
                    f.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
                    size = -start if stop is None else stop - start
                    buffer = getattr(self._thread, "buffer", None)
                    if buffer is None or len(buffer) < size:
                        buffer = self._thread.buffer = bytearray(size)
                    view = memoryview(buffer)[:size]
                    return view[:f.readinto(view)]  # into this thread's buffer: no fresh pages per read
            if self._fs is None:
                self._fs, self._root = U.get_fs(self.uri, self.storage_options)
            return self._fs.cat_file(f"{self._root.rstrip('/')}/{key}", start=start, end=stop)
        except FileNotFoundError:
            return None

    def _shard_index(self, shard: int) -> np.ndarray | None:
        """uint64 [chunks_per_shard, 2] (offset, length) of every chunk; None: no shard object."""
        if shard not in self._index:
            size = 16 * self.chunks_per_shard + 4
            raw = self._read(self.object_key(shard), -size, None)
            if raw is not None:
                if len(raw) != size:
                    raise ValueError(f"shard index is {len(raw)} bytes, expected {size}")
                _check_crc32c(raw, "shard index")
                raw = np.frombuffer(raw, dtype="<u8", count=2 * self.chunks_per_shard).reshape(-1, 2).copy()
            self._index[shard] = raw
        return self._index[shard]

    def read(self, chunk: int, out: np.ndarray | None = None) -> np.ndarray:
        """Inner chunk ``chunk`` (rows [chunk * k, (chunk + 1) * k)), whole: [k, ...] of the stored dtype,
        decoded into ``out`` when given (C-contiguous, that shape, the dtype's item size: checked by
        the caller)."""
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype.newbyteorder("="))
        shard, local = divmod(chunk, self.chunks_per_shard)
        index = self._shard_index(shard)
        offset, length = (_EMPTY_CHUNK, _EMPTY_CHUNK) if index is None else (int(v) for v in index[local])
        if offset == _EMPTY_CHUNK and length == _EMPTY_CHUNK:
            out[...] = self.fill_value  # a chunk of fill values only is not written (zarr's rule)
            return out
        data = self._read(self.object_key(shard), offset, offset + length)
        if data is None or len(data) != length:
            raise ValueError(f"chunk bytes [{offset}, {offset + length}) lie outside the shard object")
        _check_crc32c(data, f"chunk {local} of the shard")
        payload = memoryview(data)[:-4]
        dest = out.reshape(-1).view(np.uint8)
        if self.zstd:
            declared = _zstd_content_size(payload)
            if declared != self.chunk_bytes:
                raise ValueError(f"chunk {local} decompresses to {declared} bytes, expected {self.chunk_bytes}")
            if self._zstd is None:
                from numcodecs.zstd import Zstd

                self._zstd = Zstd()
            self._zstd.decode(payload, out=dest)
        else:
            if len(payload) != self.chunk_bytes:
                raise ValueError(f"chunk {local} holds {len(payload)} bytes, expected {self.chunk_bytes}")
            dest[:] = np.frombuffer(payload, dtype=np.uint8)
        if not self.dtype.isnative:
            out.byteswap(inplace=True)  # the stored little-endian values on a big-endian machine
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_root": None, "_zstd": None, "_index": {}, "_thread": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _thread=threading.local())


def _check_crc32c(data: bytes, what: str) -> None:
    import google_crc32c

    body = np.frombuffer(data, dtype=np.uint8)
    if google_crc32c.value(body[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{what}: stored and computed crc32c differ (corrupt bytes)")


# --------------------------------------------------------------------------------------------
# reader


class LatentStore:
    """A complete latent store, read through zarr over fsspec.

    Picklable: a copy sent to another process (a DataLoader worker) opens its own store client.
    """

    def __init__(self, uri: str, spec: dict, storage_options: dict | None = None):
        self.uri = U.normalize(uri)
        self.spec = spec
        self.storage_options = storage_options or {}
        self._raw = _RawArrays(self.uri, self.storage_options)
        self._small: dict[str, np.ndarray] = {}
        self._records: dict[int, dict] = {}
        self._chunk_readers: dict[str, _ShardedChunkReader | None] = {}

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None, *, require_complete: bool = True) -> "LatentStore":
        """Open a store; without ``COMPLETE`` (or its spec) raise :class:`IncompleteStoreError`."""
        uri = U.normalize(uri)
        so = storage_options or {}
        marker = U.join(uri, S.COMPLETE_MARKER)
        if require_complete and not U.exists(marker, so):
            if not U.exists(U.join(uri, "zarr.json"), so):
                raise StoreError(f"{uri} is not a latent store (no zarr.json)")
            raise IncompleteStoreError(
                f"store {uri} is incomplete (no {S.COMPLETE_MARKER} marker): an encode job is still running or "
                "died; rerun the same encode command to finish it"
            )
        try:
            spec_bytes = U.read_bytes(U.join(uri, S.SPEC_FILE), so)
        except FileNotFoundError:
            raise IncompleteStoreError(f"store {uri} has no {S.SPEC_FILE}") from None
        if require_complete:
            done = json.loads(U.read_bytes(marker, so))
            if done.get("spec_sha256") != U.sha256_bytes(spec_bytes):
                raise StoreError(f"{uri}/{S.SPEC_FILE} does not match the checksum in {S.COMPLETE_MARKER}")
        spec = S.validate_spec(json.loads(spec_bytes))
        return cls(uri, spec, so)

    # -- shape facts, all from the spec
    @property
    def store_id(self) -> str:
        return self.spec["store_id"]

    @property
    def num_samples(self) -> int:
        return self.spec["layout"]["num_samples"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return S.latent_shape(self.spec)

    @property
    def logical_dtype(self) -> str:
        return self.spec["latent"]["logical_dtype"]

    @property
    def samples_per_chunk(self) -> int:
        return self.spec["layout"]["samples_per_chunk"]

    @property
    def samples_per_shard(self) -> int:
        return self.spec["layout"]["samples_per_shard"]

    @property
    def num_shards(self) -> int:
        return self.spec["layout"]["num_shards"]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.samples_per_chunk)

    @property
    def has_flips(self) -> bool:
        return bool(self.spec["layout"]["flips"])

    @property
    def num_classes(self) -> int:
        return self.spec["classes"]["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.spec["classes"]["names"]

    @property
    def encoder(self) -> dict | None:
        return self.spec["encoder"]

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        k = self.samples_per_chunk
        return chunk * k, min((chunk + 1) * k, self.num_samples)

    def shard_of(self, index: int) -> int:
        return index // self.samples_per_shard

    def shard_name(self, shard: int) -> str:
        return f"{self.uri}/{S.LATENTS}/c/{shard}/0/0/0 (shard {shard})"

    # -- data
    def read_rows(self, start: int, stop: int, array: str = S.LATENTS) -> np.ndarray:
        """float32 [stop - start, C, H, W] of ``latents`` or ``latents_flip``."""
        if array == S.LATENTS_FLIP and not self.has_flips:
            raise StoreError(f"store {self.uri} keeps no flipped latents")
        try:
            raw = self._raw.read(array, slice(start, stop))
        except StoreError:
            raise
        except Exception as e:  # zarr raises codec errors (crc32c, zstd) of several types
            shards = sorted({self.shard_of(start), self.shard_of(max(start, stop - 1))})
            raise StoreError(
                f"store {self.uri}: reading {array}[{start}:{stop}] failed in shard(s) {shards} "
                f"(object {array}/c/{shards[0]}/0/0/0): {type(e).__name__}: {e}"
            ) from e
        return decode_latents(raw, self.logical_dtype)

    def read_chunk(self, chunk: int, array: str = S.LATENTS) -> np.ndarray:
        """One whole inner chunk (the read unit): float32 [k, C, H, W]."""
        return decode_latents(self.read_chunk_stored(chunk, array), self.logical_dtype)

    def read_chunk_stored(self, chunk: int, array: str = S.LATENTS, out: np.ndarray | None = None) -> np.ndarray:
        """One whole inner chunk as stored, no conversion: [k, C, H, W] of the storage dtype (float16,
        float32, or uint16 bfloat16 bit patterns; k < samples_per_chunk for a short last chunk).

        out: optional C-contiguous [samples_per_chunk, C, H, W] buffer of the storage dtype's item size
        to decode into (the whole inner chunk, also for a short last one); the result is then a view
        of it. Reads the shard index once per shard and this object, then one byte range per chunk,
        crc32c-checked (see ``_ShardedChunkReader``); arrays of another layout go through zarr.
        """
        if array == S.LATENTS_FLIP and not self.has_flips:
            raise StoreError(f"store {self.uri} keeps no flipped latents")
        if out is not None:
            shape = (self.samples_per_chunk,) + tuple(self.latent_shape)
            itemsize = np.dtype(S.STORAGE_DTYPE[self.logical_dtype]).itemsize
            if tuple(out.shape) != shape or out.dtype.itemsize != itemsize or not out.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous {list(shape)} array of {itemsize}-byte items, "
                                 f"got {list(out.shape)} {out.dtype}")
        start, stop = self.chunk_bounds(chunk)
        try:
            reader = self._chunk_reader(array)
            if reader is None:
                raw = self._raw.read(array, slice(start, stop))
                if out is None:
                    return raw
                dest = out.reshape(-1)[:raw.size].reshape(raw.shape)
                dest.view(raw.dtype)[...] = raw
                return dest
            return reader.read(chunk, out)[:stop - start]
        except StoreError:
            raise
        except Exception as e:  # crc32c, zstd, I/O: several types
            shard = self.shard_of(start)
            raise StoreError(
                f"store {self.uri}: reading {array}[{start}:{stop}] failed in shard(s) [{shard}] "
                f"(object {array}/c/{shard}/0/0/0): {type(e).__name__}: {e}"
            ) from e

    def _chunk_reader(self, array: str) -> "_ShardedChunkReader | None":
        if array not in self._chunk_readers:
            try:
                meta = U.read_json(U.join(self.uri, array, "zarr.json"), self.storage_options)
            except FileNotFoundError:
                raise StoreError(f"{self.uri}: array {array!r} is missing") from None
            reader = _ShardedChunkReader.create(self.uri, array, self.storage_options, meta)
            if reader is not None and (reader.rows, reader.shard_rows) != (self.samples_per_chunk,
                                                                            self.samples_per_shard):
                reader = None
            self._chunk_readers[array] = reader
        return self._chunk_readers[array]

    def _small_array(self, name: str) -> np.ndarray:
        if name not in self._small:
            self._small[name] = self._raw.read(name, slice(None))
        return self._small[name]

    def labels(self) -> np.ndarray:
        return self._small_array(S.LABELS).astype(np.int64)

    def valid(self) -> np.ndarray:
        return self._small_array(S.VALID).astype(bool)

    def sample_ids(self) -> np.ndarray:
        return self._small_array(S.SAMPLE_IDS)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, var) float64 [C, H, W], population variance over both orientations."""
        return self._raw.read(S.STATS_MEAN, slice(None)), self._raw.read(S.STATS_VAR, slice(None))

    def record(self, shard: int) -> dict:
        if shard not in self._records:
            self._records[shard] = U.read_json(U.join(self.uri, S.record_name(shard)), self.storage_options)
        return self._records[shard]

    def source_ref(self, index: int) -> dict:
        """The source reference of row ``index``: key, URI (or Parquet file + row), size, sha256, label."""
        rec = self.record(self.shard_of(index))
        return rec["samples"][index - rec["start"]]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_raw"] = _RawArrays(self.uri, self.storage_options)
        d["_chunk_readers"] = {}
        return d


# --------------------------------------------------------------------------------------------
# whole stores from arrays (synthetic)


def write_array_store(
    uri: str,
    latents: np.ndarray,
    labels: np.ndarray,
    *,
    latents_flip: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    layout: StoreLayout | None = None,
    storage_options: dict | None = None,
) -> LatentStore:
    """Write a complete store from in-memory arrays (source "synthetic", no encoder).

    latents, latents_flip: float32 [N, C, H, W]; labels: int [N]; valid: bool [N] (default all).
    ``layout.flips`` is taken from whether ``latents_flip`` is given.
    """
    latents = np.asarray(latents, dtype=np.float32)
    n = len(latents)
    labels = np.asarray(labels, dtype=np.int64)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if class_names is None:
        num_classes = int(num_classes if num_classes is not None else labels[valid].max() + 1)
        class_names = [f"class_{i}" for i in range(num_classes)]
    num_classes = len(class_names)
    layout = dataclasses.replace(layout or StoreLayout(), flips=latents_flip is not None)
    h = hashlib.sha256()
    for a in (latents, latents_flip, labels, valid):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    plan = StorePlan(
        kind="synthetic",
        num_samples=n,
        latent_shape=latents.shape[1:],
        layout=layout,
        source={
            "kind": "synthetic",
            "uri": None,
            "split": "train",
            "fingerprint": h.hexdigest(),
            "num_items": n,
            "order": {"seed": 0, "granularity": "none"},
        },
        classes={"num_classes": num_classes, "names": list(class_names)},
        content_hash=h.hexdigest(),
    )
    writer = StoreWriter(uri, plan, storage_options).create()
    for shard in range(plan.num_shards):
        a, b = plan.shard_bounds(shard)
        v = valid[a:b]
        writer.write_shard(
            shard,
            latents=latents[a:b],
            latents_flip=None if latents_flip is None else latents_flip[a:b],
            labels=labels[a:b],
            valid=v,
            sample_ids=np.arange(a, b),
            failures=[
                {"index": a + int(i), "id": a + int(i), "key": f"row-{a + int(i)}", "reason": "marked invalid"}
                for i in np.flatnonzero(~v)
            ],
        )
    writer.finalize()
    return LatentStore.open(uri, storage_options)


# --------------------------------------------------------------------------------------------
# listing, verification, removal


@dataclass
class StoreStatus:
    uri: str
    store_id: str | None
    complete: bool
    shards_done: int | None = None
    num_shards: int | None = None
    summary: dict = field(default_factory=dict)


def store_status(uri: str, storage_options: dict | None = None) -> StoreStatus | None:
    """Status of the store at ``uri``, or None when there is none."""
    uri = U.normalize(uri)
    so = storage_options or {}
    try:
        group = U.read_json(U.join(uri, "zarr.json"), so)
    except FileNotFoundError:
        return None
    meta = (group.get("attributes") or {}).get("rae_store")
    if not meta:
        return None
    if U.exists(U.join(uri, S.COMPLETE_MARKER), so):
        store = LatentStore.open(uri, so)
        n = store.num_shards
        return StoreStatus(uri, meta["store_id"], True, n, n, S.summary(store.spec))
    fs, path = U.get_fs(U.join(uri, S.RECORDS_DIR), so)
    try:
        done = len([p for p in fs.ls(path, detail=False) if p.endswith(".json")])
    except FileNotFoundError:
        done = 0
    try:
        n = U.read_json(U.join(uri, S.PARTIAL_MEAN, "zarr.json"), so)["shape"][0]
    except FileNotFoundError:
        n = None
    return StoreStatus(uri, meta["store_id"], False, done, n)


def list_stores(root: str, storage_options: dict | None = None) -> list[StoreStatus]:
    """Every store directly under ``root`` (complete and incomplete), sorted by location."""
    fs, path = U.get_fs(root, storage_options)
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        st = store_status(U.join(root, name), storage_options)
        if st is not None:
            out.append(st)
    return out


def remove_store(uri: str, storage_options: dict | None = None) -> None:
    """Delete a store: the marker first, so a half-deleted store never reads as complete."""
    if store_status(uri, storage_options) is None:
        raise StoreError(f"{uri} is not a latent store")
    marker = U.join(uri, S.COMPLETE_MARKER)
    if U.exists(marker, storage_options):
        U.rm(marker, storage_options)
    U.rm(uri, storage_options)


@dataclass
class VerifyReport:
    uri: str
    ok: bool
    problems: list[str]
    checked_shards: int

    def __str__(self) -> str:
        head = f"{self.uri}: {'OK' if self.ok else 'FAILED'} ({self.checked_shards} shards checked)"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def verify_store(uri: str, storage_options: dict | None = None, *, check_stats: bool = True) -> VerifyReport:
    """Re-check a complete store: every object's sha256 against its shard record, the records against
    the spec, counts, labels and valid mask, every chunk's crc32c (by decoding it), and the
    statistics recomputed from the stored values. Problems name the shard and object."""
    so = storage_options or {}
    problems: list[str] = []
    try:
        store = LatentStore.open(uri, so)
    except StoreError as e:
        return VerifyReport(U.normalize(uri), False, [str(e)], 0)
    spec = store.spec
    records = []
    for sh in spec["shards"]:
        s = sh["index"]
        try:
            rec = store.record(s)
        except FileNotFoundError:
            problems.append(f"shard {s}: completion record {sh['record']} is missing")
            records.append(None)
            continue
        records.append(rec)
        if rec["content_hash"] != sh["content_hash"]:
            problems.append(f"shard {s}: record content hash differs from the spec")
        if hashlib.sha256(U.canonical_json(rec["objects"])).hexdigest() != rec["content_hash"]:
            problems.append(f"shard {s}: record's object list does not match its content hash")
        for key, digest in sorted(rec["objects"].items()):
            try:
                data = U.read_bytes(U.join(store.uri, key), so)
            except FileNotFoundError:
                problems.append(f"shard {s}: object {key} is missing")
                continue
            if U.sha256_bytes(data) != digest:
                problems.append(f"shard {s}: object {key} is corrupt (sha256 differs from its record)")
    try:
        valid, labels = store.valid(), store.labels()
    except Exception as e:
        return VerifyReport(store.uri, False, problems + [f"labels/valid unreadable: {e}"], len(records))
    if int(valid.sum()) != spec["counts"]["num_valid"]:
        problems.append(f"valid mask counts {int(valid.sum())} samples, spec says {spec['counts']['num_valid']}")
    bad_labels = np.flatnonzero(valid & ((labels < 0) | (labels >= store.num_classes)))
    if len(bad_labels):
        problems.append(f"labels out of range at rows {bad_labels[:10].tolist()}")
    failed = sorted(f["index"] for f in spec["failures"])
    if failed != np.flatnonzero(~valid).tolist():
        problems.append("failures listed in the spec do not match the invalid rows")

    arrays = spec["statistics"]["arrays"]
    parts = []
    for rec in records:
        if rec is None:
            continue
        s, (a, b) = rec["shard"], (rec["start"], rec["stop"])
        v = valid[a:b]
        try:
            decoded = [store.read_rows(a, b, name)[v] for name in arrays]
        except StoreError as e:
            problems.append(f"shard {s}: {e}")
            continue
        if check_stats:
            count, mean, m2 = shard_partial_stats(decoded)
            if count != rec["stats_count"]:
                problems.append(f"shard {s}: {count} stored values, record says {rec['stats_count']}")
            elif count:
                pm, pm2 = store._raw.read(S.PARTIAL_MEAN, s), store._raw.read(S.PARTIAL_M2, s)
                if not (np.array_equal(pm, mean) and np.array_equal(pm2, m2)):
                    problems.append(f"shard {s}: partial statistics differ from the stored values")
            parts.append((count, mean, m2))
    if check_stats and not problems:
        count, mean, m2 = merge_partial_stats(parts)
        smean, svar = store.stats()
        if count != spec["statistics"]["count"]:
            problems.append(f"statistics count {count} != spec {spec['statistics']['count']}")
        elif count and not (np.array_equal(smean, mean) and np.array_equal(svar, m2 / count)):
            problems.append("stats/mean or stats/var differ from a recomputation over the stored values")
        if _sha_array(smean) != spec["statistics"]["sha256"]["mean"] or _sha_array(svar) != spec["statistics"]["sha256"]["var"]:
            problems.append("stats arrays do not match the checksums in the spec")
    return VerifyReport(store.uri, not problems, problems, len(records))
