"""Writing stores: :class:`StoreWriter` (one shard at a time, then :meth:`StoreWriter.finalize`),
the per-shard and merged statistics, and :func:`write_array_store` (a whole store from arrays)."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline import uri as U
from pipeline.store.layout import (
    IncompleteStoreError,
    StoreError,
    StoreLayout,
    StorePlan,
    _array_definitions,
    from_stored,
    to_stored,
)
from pipeline.store.reader import LatentStore, _RawArrays
from schemas import store_v1 as S

# --------------------------------------------------------------------------------------------
# the store's objects, encoded in memory


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


_STATS_TILE_BYTES = 2**21  # float64 bytes of all rows of one column tile: stays in a core's cache


def shard_partial_stats(decoded: Iterable[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, m2) in float64 over the rows of the given [n, C, H, W] arrays (the valid stored
    values, decoded back from the storage dtype, all orientations).

    By definition ``x = concatenate(arrays).astype(float64)``, ``mean = x.mean(0)``,
    ``m2 = ((x - mean) ** 2).sum(0)``. numpy reduces over axis 0 row by row for every element, so
    computing it on column tiles of the flattened elements (all rows of a few hundred elements at
    a time) gives the same bits while the float64 copy stays within ~2 MiB of cache instead of
    8 bytes x rows x elements of memory (805 MB for a full shard of 256 rows, both orientations):
    faster, and threads verifying shards side by side no longer compete for memory bandwidth.
    """
    parts = [np.asarray(a) for a in decoded]
    n = sum(len(a) for a in parts)
    if n == 0:
        return 0, None, None
    shape = parts[0].shape[1:]
    flat = [a.reshape(len(a), -1) for a in parts if len(a)]
    elements = flat[0].shape[1]
    mean, m2 = np.empty(elements), np.empty(elements)
    tile = max(1, min(elements, _STATS_TILE_BYTES // (8 * n)))
    x = np.empty((n, tile))
    for j in range(0, elements, tile):
        k = min(tile, elements - j)
        xt = x[:, :k] if k == tile else np.empty((n, k))
        row = 0
        for a in flat:
            xt[row:row + len(a)] = a[:, j:j + k]  # widened to float64, exactly
            row += len(a)
        mean[j:j + k] = xt.mean(axis=0)
        xt -= mean[j:j + k]
        np.square(xt, out=xt)
        m2[j:j + k] = xt.sum(axis=0)
    return n, mean.reshape(shape), m2.reshape(shape)


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
        for key, data in _object_bytes(objects).items():
            target = self._key(key)
            # Through the uri helpers: a storage failure here (the job's first write) is a StorageError naming it.
            if U.exists(target, self.storage_options):
                if U.read_bytes(target, self.storage_options) != data:
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
        records = self._key(S.RECORDS_DIR)
        fs, path = U.get_fs(records, self.storage_options)
        try:
            with U.storage_errors(records, "cannot list", self.storage_options, passthrough=(FileNotFoundError,)):
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
        written_by: dict | None = None,
    ) -> dict:
        """Write rows ``shard_bounds(shard)`` of every array, then the shard's completion record.

        latents, latents_flip: float32 [n, C, H, W] (rows of invalid samples are ignored and stored as
        zeros); labels int [n]; valid bool [n]; sample_ids int [n]; samples: per-row source references
        (``index``, ``id``, ``key``, ``uri``, ``row``, ``size``, ``sha256``, ``label``); failures:
        ``{"index", "id", "key", "reason"}`` for the invalid rows; written_by: the Ray node that wrote
        the shard (``{"node_id", "node_ip", "hostname"}``), recorded as the record's ``written_by``
        (provenance: the one host-dependent field of a store, outside every object hash). Returns the record.
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
            stored = to_stored(np.where(valid[:, None, None, None], x, 0.0), plan.layout.dtype)
            arrays[name][start:stop] = stored
            decoded.append(from_stored(stored[valid], plan.layout.dtype))
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
        if written_by is not None:
            record[S.RECORD_WRITTEN_BY] = dict(written_by)
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
        # Only what the spec and the statistics need of each record (not its per-row sources: about
        # 0.8 GB of parsed JSON for ImageNet), fetched FINALIZE_FETCHES at a time, kept in shard order.
        def summary(shard: int) -> dict:
            rec = U.read_json(self._key(S.record_name(shard)), self.storage_options)
            return {k: rec[k] for k in _RECORD_SUMMARY}

        records = list(_in_order(summary, range(plan.num_shards), FINALIZE_FETCHES))
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
                "compressor": lay.compressor_spec(),
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


# Objects a finalize fetches at once (a record, then a shard's two partial statistics): an object store
# answers each GET after tens of ms, and an ImageNet store has ~5,000 shards.
FINALIZE_FETCHES = 16
_RECORD_SUMMARY = ("store_id", "shard", "start", "stop", "num_valid", "stats_count", "failures", "content_hash")


def _in_order(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``fn(item)`` for every item, ``workers`` at a time on threads, yielded in the items' order
    (at most ``workers`` results wait to be taken)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="finalize") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _check_rows(name: str, a, n: int, shard: int, tail: tuple | None = None) -> None:
    shape = np.shape(a)
    want = (n,) + tuple(tail or ())
    if tuple(shape) != want:
        raise StoreError(f"shard {shard}: {name} has shape {tuple(shape)}, expected {want}")


def _merged_stats(reader: "_RawArrays", records: list[dict], latent_shape) -> tuple[int, np.ndarray, np.ndarray]:
    def part(r: dict):
        n = r["stats_count"]
        if n == 0:
            return 0, None, None
        return n, reader.read(S.PARTIAL_MEAN, r["shard"]), reader.read(S.PARTIAL_M2, r["shard"])

    if any(r["stats_count"] for r in records):
        reader.array(S.PARTIAL_MEAN), reader.array(S.PARTIAL_M2)  # opened here, before the threads share them
    # Fetched FINALIZE_FETCHES shards at a time, merged strictly in shard order: the same bits as one by one.
    count, mean, m2 = merge_partial_stats(_in_order(part, records, FINALIZE_FETCHES))
    if count == 0:
        return 0, np.zeros(latent_shape), np.ones(latent_shape)
    return count, mean, m2 / count


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
