"""The loader side of the ``scale`` bench item: a metadata-only store of ImageNet's size and what a
training rank spends on it before its first batch and at every epoch boundary.

A metadata-only store is a complete store (spec, COMPLETE, statistics) of the real layout (DINOv2-B
latents [768, 16, 16] float16 with flips, 8 samples per chunk) whose label, valid-mask and sample-id
arrays and completion records are written, and whose latent arrays hold no chunk: the loader reads
none of them before its first batch. Its shards are 12,800 rows (the epoch plan depends on the chunk
size, not the shard size), so it is written in seconds.

Per rank (a child process each, world size 32 = 4 nodes x 8 GPUs): the time of ``LatentLoader``'s
construction (spec, valid mask, labels, statistics) and of each epoch plan (the chunk permutation,
block shuffles and orientations of an epoch, over all rows: every rank computes the whole plan),
and the memory both hold (Python allocations traced, numpy's included, and resident memory).
"""
from __future__ import annotations

import hashlib
import time

import numpy as np

from bench.drills.tools import json_from_child

META_SAMPLES_PER_SHARD = 12_800
META_CLASSES = 1000
HOLE_EVERY = 100_003  # a hole every ~100k rows: the valid mask is not all ones
WORLD_SIZE = 32  # 4 nodes x 8 GPUs
GLOBAL_BATCH = 1024
EPOCHS = 4  # as many plans as a rank keeps (trainer.data's epoch cache)


def write_metadata_store(uri: str, n: int, seed: int = 0) -> str:
    """A complete metadata-only store of ``n`` rows at ``uri`` (kept when already complete)."""
    import zarr

    from pipeline import uri as U
    from pipeline.store import StoreLayout, StorePlan, StoreWriter
    from schemas import store_v1 as S

    if U.exists(U.join(uri, S.COMPLETE_MARKER)):
        return uri
    plan = StorePlan(
        kind="synthetic", num_samples=n, latent_shape=(768, 16, 16),
        layout=StoreLayout(samples_per_shard=META_SAMPLES_PER_SHARD, flips=True),
        source={"kind": "synthetic", "uri": None, "split": "train", "fingerprint": "0" * 64, "num_items": n,
                "order": {"seed": 0, "granularity": "none"}},
        classes={"num_classes": META_CLASSES, "names": [f"c{i:04d}" for i in range(META_CLASSES)]},
        content_hash=f"bench scale: metadata-only store, {n} rows, seed {seed}")
    writer = StoreWriter(uri, plan).create()
    rng = np.random.default_rng(seed)
    valid = np.ones(n, dtype=bool)
    valid[HOLE_EVERY - 1::HOLE_EVERY] = False
    labels = np.where(valid, rng.integers(0, META_CLASSES, n), -1).astype(np.int32)
    group = zarr.open_group(U.normalize(uri), mode="r+")
    group[S.LABELS][:] = labels
    group[S.VALID][:] = valid.astype(np.uint8)
    group[S.SAMPLE_IDS][:] = np.arange(n, dtype=np.int64)
    empty = hashlib.sha256(U.canonical_json({})).hexdigest()
    for shard in range(plan.num_shards):
        a, b = plan.shard_bounds(shard)
        holes = [a + int(i) for i in np.flatnonzero(~valid[a:b])]
        U.write_json(U.join(uri, S.record_name(shard)), {
            "format": "rae-shard-record", "version": S.VERSION, "store_id": plan.store_id, "shard": shard,
            "start": a, "stop": b, "num_valid": int(valid[a:b].sum()), "num_failed": len(holes), "stats_count": 0,
            "failures": [{"index": i, "id": i, "key": f"row-{i}", "reason": "marked invalid"} for i in holes],
            "samples": [], "objects": {}, "content_hash": empty})
    writer.finalize()
    return uri


def _rss_kib() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    get = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()
           if line.startswith(("VmRSS", "VmHWM"))}
    return get["VmRSS"], get["VmHWM"]


def measure_rank(uri: str, world_size: int = WORLD_SIZE, epochs: int = EPOCHS) -> dict:
    """In this process (a fresh one): one rank's loader on ``uri``; construction and epoch-plan
    seconds, then (a second loader, traced) the memory they hold and their peak."""
    import tracemalloc

    from trainer.data import LatentLoader, LoaderConfig

    cfg = LoaderConfig(global_batch=GLOBAL_BATCH, num_workers=0)
    rss0, _ = _rss_kib()
    t = time.perf_counter()
    loader = LatentLoader(uri, cfg, rank=world_size - 1, world_size=world_size)
    init_s = time.perf_counter() - t
    plan_s = []
    for e in range(epochs):
        t = time.perf_counter()
        loader._order.plan(e)
        plan_s.append(time.perf_counter() - t)
    rss_after, hwm = _rss_kib()
    del loader
    tracemalloc.start()
    loader = LatentLoader(uri, cfg, rank=world_size - 1, world_size=world_size)
    init_bytes = tracemalloc.get_traced_memory()[0]
    plans = [loader._order.plan(e) for e in range(epochs)]
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    plan_bytes = sum(p.seq.nbytes + p.flip.nbytes + p.block_ends.nbytes for p in plans)
    return {"rows": loader.store.num_samples, "valid": loader.num_valid, "world_size": world_size,
            "streams": loader.num_streams, "init_s": init_s, "epoch_plan_s": plan_s,
            "traced_held_bytes": held, "traced_peak_bytes": peak, "traced_after_init_bytes": init_bytes,
            "epoch_plan_bytes_each": plan_bytes / len(plans), "plans_held": len(plans),
            "rss_growth_mib": (rss_after - rss0) / 1024, "rss_peak_growth_mib": (hwm - rss0) / 1024}


def measure_rank_in_child(uri: str, env: dict, log_path: str, timeout_s: float = 600.0) -> dict:
    code = f"import json; from bench.scale_loader import measure_rank; print(json.dumps(measure_rank({uri!r})))"
    return json_from_child(code, env, log_path, timeout_s, f"the loader measurement on {uri}")


__all__ = ["measure_rank", "measure_rank_in_child", "write_metadata_store"]
