"""The optional local-disk chunk cache (pipeline/store/cache.py) under the streaming loader: later
epochs read chunks from the disk, the batches do not change, a corrupt entry is read from the store
again, and the folder stays within its size bound."""
from __future__ import annotations

import os
import stat
import uuid

import google_crc32c
import numpy as np
import pytest
import torch

from pipeline import uri as U
from pipeline.store import ChunkCache, StoreLayout, write_array_store
from trainer.data import LatentLoader, LoaderConfig
from trainer.normalize import LatentNormalizer

SHAPE = (8, 4, 4)
IDENTITY = LatentNormalizer(None, None, eps=0.0)


def _rows(n: int) -> np.ndarray:
    return np.broadcast_to((np.arange(n, dtype=np.float32) + 1)[:, None, None, None], (n,) + SHAPE).copy()


def _take(uri: str, steps: int, cache: str | None, workers: int = 0):
    cfg = LoaderConfig(global_batch=4, num_workers=workers, block_chunks=2, num_streams=1, chunk_cache=cache)
    loader = LatentLoader(uri, cfg, normalizer=IDENTITY)
    it = iter(loader)
    out = [tuple(t.clone() for t in next(it)) for _ in range(steps)]
    it.close()
    stats = loader.store._cache.stats if loader.store._cache is not None else None
    loader.close()
    return out, stats


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.timeout(120)
def test_cached_epochs_serve_the_same_batches_without_the_store(s3_endpoint, tmp_path):
    n = 12  # 4 chunks of 3 in 2 shards, one orientation: an epoch reads every chunk
    uri = f"s3://test-bucket/cache-{uuid.uuid4().hex[:8]}/store"
    store = write_array_store(uri, _rows(n), np.arange(n), num_classes=n,
                              layout=StoreLayout(dtype="float16", samples_per_shard=6, samples_per_chunk=3))
    cache = str(tmp_path / "cache")
    steps = 3 * n // 4  # three epochs
    want, _ = _take(uri, steps, None)

    got, stats = _take(uri, steps, cache)
    assert _same(got, want)
    # Each chunk fetched and kept (twice at most when a read-ahead starts it before its first read
    # is kept); later epochs read from the disk.
    assert stats.writes == stats.misses and 4 <= stats.writes <= 8 and stats.hits >= 2 * 4
    entries = sorted(p.name for p in (tmp_path / "cache" / store.store_id / "latents").iterdir())
    assert entries == ["0", "1", "2", "3"]

    # A corrupt entry is deleted and read from the store again: same batches.
    entry = tmp_path / "cache" / store.store_id / "latents" / "2"
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    got, stats = _take(uri, steps, cache, workers=2)
    assert _same(got, want)
    assert ChunkCache(cache, 2**30).get(store.store_id, "latents", 2) is not None  # rewritten whole

    # The chunks' objects gone from the store: every chunk still comes from the cache.
    fs, path = U.get_fs(U.join(uri, "latents", "c"))
    fs.rm(path, recursive=True)
    got, stats = _take(uri, steps, cache)
    assert _same(got, want)
    assert stats.misses == 0 and stats.corrupt == 0 and stats.writes == 0


def _entry(size: int, seed: int) -> bytes:
    body = np.random.default_rng(seed).integers(0, 256, size - 4, dtype=np.uint8).tobytes()
    return body + google_crc32c.value(body).to_bytes(4, "little")


def test_the_cache_stays_within_its_bound_evicting_the_least_recently_used(tmp_path):
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=10_000)
    for i in range(8):
        cache.put("store", "latents", i, _entry(1000, i))
    for i in range(8):  # distinct ages, oldest first, whatever the clock's resolution
        os.utime(cache.path("store", "latents", i), (1_000_000 + i, 1_000_000 + i))
    assert cache.get("store", "latents", 0) == _entry(1000, 0)  # used: now the newest
    for i in range(8, 12):
        cache.put("store", "latents", i, _entry(1000, i))
    assert cache.size() <= 10_000
    kept = {i for i in range(12) if os.path.exists(cache.path("store", "latents", i))}
    # 11 entries (11,000 bytes) are over the bound: the two least recently used go (to <= 90%).
    assert kept == {0, 3, 4, 5, 6, 7, 8, 9, 10, 11} and cache.stats.evicted == 2
    cache.put("store", "latents", 99, _entry(20_000, 99))  # larger than the whole cache: not kept
    assert not os.path.exists(cache.path("store", "latents", 99))
    # Absent and corrupt entries are misses; a corrupt one is deleted.
    assert cache.get("store", "latents", 1) is None
    path = cache.path("store", "latents", 11)
    with open(path, "r+b") as f:
        f.write(b"\x00\x01\x02")
    assert cache.get("store", "latents", 11) is None and not os.path.exists(path)
    assert cache.stats.corrupt == 1


def test_cache_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        cache = ChunkCache(str(tmp_path / "c"), max_bytes=10_000)
        cache.put("store", "latents", 0, _entry(100, 0))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cache.path("store", "latents", 0)).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(os.path.dirname(cache.path("store", "latents", 0))).st_mode) == 0o750


def test_a_remote_cache_folder_is_refused(tmp_path):
    n = 6
    uri = str(tmp_path / "s")
    write_array_store(uri, _rows(n), np.arange(n), num_classes=n,
                      layout=StoreLayout(dtype="float16", samples_per_shard=6, samples_per_chunk=3))
    with pytest.raises(ValueError, match="data.chunk_cache must be a local folder"):
        LatentLoader(uri, LoaderConfig(global_batch=2, chunk_cache="s3://bucket/cache"))
