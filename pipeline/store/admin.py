"""Managing stores: status, listing, removal and verification."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from pipeline import uri as U
from pipeline.store.layout import StoreError
from pipeline.store.reader import LatentStore
from pipeline.store.writer import _sha_array, merge_partial_stats, shard_partial_stats
from schemas import store_v1 as S


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
