"""`make bench`: every figure a ratio of two sides measured in the same run, absolute values beside it.

Usage: ``python -m bench.bench [--device cpu|cuda] [--quick] [--only NAME,...] [--out bench/results.json]``.
Results are merged into the results file by item name (``--only`` updates those items) and printed
as a table. Items are benchmark functions registered with :func:`bench.common.register`, run in
registration order; each returns :func:`bench.common.item_result`.

Items here:

- ``loader_efficiency``: the trainer's :class:`trainer.data.LatentLoader` samples/s / reading the
  same latents *uncompressed* (float16, in shard-sized files) raw and sequentially (samples/s =
  bytes/s / float16 bytes per sample, so the store's codec cannot raise the ratio by itself: a
  codec that saves bytes and costs little CPU raises it), from local disk (warm page cache on both
  sides) and from an S3 endpoint on loopback:
  moto in its own process, by default patched to serve a ranged GET by reading only the range as
  S3 does (``--s3-server stock``: moto as is, which reads the whole object per ranged GET); the
  item's endpoint check figure shows which behaviour a run had.
- ``format_peers``: fast-DiT's and LightningDiT's layouts and access patterns (``bench.peers``)
  through a DataLoader with the same workers and batch, samples/s / ours, local and S3.
- ``storage``: bytes at rest per sample / float32 bytes for every dtype and compressor of the
  store, with the round-trip error, on latent-like data from the real DINOv2-B architecture.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

from bench.common import (BENCHMARKS, BenchContext, BenchOptions, Measurement, ObjectReader, format_table,
                          item_result, merge_results, rates, ratio_figure, raw_read, register, run_interleaved,
                          sample_image_files, select_benchmarks, side)
from pipeline import uri as U
from pipeline.store import LatentStore, StoreError, StoreLayout, write_array_store
from schemas import store_v1 as S

WARMUP_BATCHES = 1  # per loader measurement, untimed: worker start and the first reads
MAX_SECONDS_FACTOR = 4  # a measurement ends after this many times --seconds even short of its samples


# --------------------------------------------------------------------------------------------
# the latent store of the loader benchmarks, its peer layouts, and their S3 copies


@dataclasses.dataclass(frozen=True)
class LoaderData:
    """The loader benchmarks' store and peer files (local), and their bytes facts."""

    root: str
    store_uri: str
    npy_dir: str
    safetensors_dir: str
    raw_dir: str  # the stored float16 latents, uncompressed: loader_efficiency's denominator
    store_id: str
    num_samples: int
    latent_shape: tuple[int, int, int]
    latent_keys: list[str]  # the latent arrays' objects, relative to the store
    latent_bytes: int
    orientations: int
    samples_per_chunk: int
    raw_keys: list[str]  # the raw files, relative to raw_dir

    @property
    def bytes_per_sample(self) -> float:
        """Bytes at rest of one sample in one orientation (what an epoch reads per sample)."""
        return self.latent_bytes / (self.num_samples * self.orientations)

    @property
    def raw_bytes_per_sample(self) -> int:
        """Bytes of one uncompressed float16 latent."""
        return int(np.prod(self.latent_shape)) * 2

    def min_timed_samples(self, opts: BenchOptions) -> int:
        """Samples every loader measurement times at least: two of our loader's shuffle blocks (it
        reads a block, then serves it), and at least two batches."""
        from trainer.data import LoaderConfig

        return max(2 * LoaderConfig.block_chunks * self.samples_per_chunk, 2 * opts.batch)


def loader_params(opts: BenchOptions) -> dict:
    """Everything the loader benchmarks' data depends on (its cache key)."""
    if opts.quick:
        return {"num_samples": 48, "latent_shape": [32, 8, 8], "seed": 0,
                "layout": {"samples_per_shard": 16, "samples_per_chunk": 4}, "peer_samples_per_file": 16,
                "raw_samples_per_file": 16, "compressor": StoreLayout().compressor}
    return {"num_samples": int(opts.loader_samples), "latent_shape": [768, 16, 16], "seed": 0,
            "layout": {}, "peer_samples_per_file": StoreLayout().samples_per_shard,
            "raw_samples_per_file": StoreLayout().samples_per_shard, "compressor": StoreLayout().compressor}


def _latent_objects(store_dir: str, arrays: list[str]) -> list[tuple[str, int]]:
    return [(rel, size) for a in arrays for rel, size in ObjectReader(store_dir).list(a)]


def ensure_loader_data(ctx: BenchContext) -> LoaderData:
    """Write (once; reused while its store id matches) a store of random float16 latents with flips
    in the default layout, and the same latents in the peers' layouts."""
    if "loader_data" in ctx.cache:
        return ctx.cache["loader_data"]
    params = loader_params(ctx.options)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.join(ctx.work_dir, "loader", key)
    store_dir, npy_dir, st_dir, raw_dir = (os.path.join(root, n) for n in ("store", "npy", "safetensors", "raw"))
    marker = os.path.join(root, "ready.json")
    store_id = None
    try:
        ready = U.read_json(marker)
        store = LatentStore.open(store_dir)
        if ready.get("store_id") == store.store_id and ready.get("params") == params:
            store_id = store.store_id
            ctx.log(f"bench: reusing the loader store {store_dir} (id {store_id})")
    except (FileNotFoundError, ValueError, OSError, StoreError) as e:  # none yet, or damaged: (re)write it
        ctx.log(f"bench: writing the loader store ({type(e).__name__}: no reusable one)")
    if store_id is None:
        shutil.rmtree(root, ignore_errors=True)
        store_id = _write_loader_data(ctx, params, store_dir, npy_dir, st_dir, raw_dir)
        U.write_json(marker, {"params": params, "store_id": store_id})
    objects = _latent_objects(store_dir, [S.LATENTS, S.LATENTS_FLIP])
    data = LoaderData(root, store_dir, npy_dir, st_dir, raw_dir, store_id, params["num_samples"],
                      tuple(params["latent_shape"]), [rel for rel, _ in objects], sum(s for _, s in objects), 2,
                      LatentStore.open(store_dir).samples_per_chunk, [rel for rel, _ in ObjectReader(raw_dir).list()])
    ctx.cache["loader_data"] = data
    return data


def _write_loader_data(ctx: BenchContext, params: dict, store_dir: str, npy_dir: str, st_dir: str,
                       raw_dir: str) -> str:
    from bench.peers import write_npy_per_sample, write_safetensors_shards

    t0 = time.perf_counter()
    n, shape = params["num_samples"], tuple(params["latent_shape"])
    rng = np.random.default_rng(params["seed"])
    latents = rng.standard_normal((n, *shape), dtype=np.float32)
    flips = rng.standard_normal((n, *shape), dtype=np.float32)
    labels = rng.integers(0, 1000, n)
    store = write_array_store(store_dir, latents, labels, latents_flip=flips, num_classes=1000,
                              layout=StoreLayout(compressor=params["compressor"], **params["layout"]))
    del latents, flips
    # The peers get exactly the stored values (float16), read back from the store.
    stored = store.read_rows(0, n, S.LATENTS).astype(np.float16)
    stored_flip = store.read_rows(0, n, S.LATENTS_FLIP).astype(np.float16)
    write_npy_per_sample(npy_dir, stored, stored_flip, store.labels())
    write_safetensors_shards(st_dir, stored, stored_flip, store.labels(), params["peer_samples_per_file"])
    write_raw_files(raw_dir, [stored, stored_flip], params["raw_samples_per_file"])
    ctx.log(f"bench: wrote the loader store and peer files ({n} samples) in {time.perf_counter() - t0:.1f} s")
    return store.store_id


def write_raw_files(folder: str, arrays: list[np.ndarray], rows_per_file: int) -> list[str]:
    """Each array's rows as plain files of ``rows_per_file`` rows (the bytes of the rows, C order, no
    header): ``<i>-<start>.bin``; returns their names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, arr in enumerate(arrays):
        for start in range(0, len(arr), rows_per_file):
            names.append(f"{i}-{start:08d}.bin")
            with open(os.path.join(folder, names[-1]), "wb") as f:
                f.write(np.ascontiguousarray(arr[start:start + rows_per_file]).tobytes())
    return names


def ensure_loader_data_s3(ctx: BenchContext, *parts: str) -> dict:
    """The named parts ("store", "npy", "safetensors", "raw") of the loader data copied to the
    bench's S3 endpoint (each once per run): {part: URI}."""
    data, s3 = ensure_loader_data(ctx), ctx.s3()
    uploaded = ctx.cache.setdefault("loader_data_s3", {})
    folders = {"store": data.store_uri, "npy": data.npy_dir, "safetensors": data.safetensors_dir,
               "raw": data.raw_dir}
    for name in parts:
        if name not in uploaded:
            t0 = time.perf_counter()
            total = s3.upload_dir(folders[name], f"loader/{name}")
            ctx.log(f"bench: uploaded {name} ({total / 1e6:.0f} MB) to {s3.url} in {time.perf_counter() - t0:.1f} s")
            uploaded[name] = s3.uri("loader", name)
    return {name: uploaded[name] for name in parts}


# --------------------------------------------------------------------------------------------
# the sides


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_batches(batches, opts: BenchOptions, min_samples: int, *, to_device: bool) -> Measurement:
    """Samples/s of an iterator of (x, y) batches after ``WARMUP_BATCHES``, for at least
    ``opts.seconds`` and ``min_samples`` (but no longer than ``MAX_SECONDS_FACTOR * opts.seconds``);
    ``to_device``: move each batch to the device as a trainer would."""
    dev = torch.device(opts.device)

    def take():
        x, y = next(batches)
        if to_device and dev.type != "cpu":
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        return len(x)

    for _ in range(WARMUP_BATCHES):
        take()
    _sync(opts.device)
    n, t0 = 0, time.perf_counter()
    while True:
        n += take()
        elapsed = time.perf_counter() - t0
        if (n >= min_samples and elapsed >= opts.seconds) or elapsed >= MAX_SECONDS_FACTOR * opts.seconds:
            break
    _sync(opts.device)
    return Measurement(n, time.perf_counter() - t0)


def loader_config(opts: BenchOptions, seed: int):
    from trainer.data import LoaderConfig

    return LoaderConfig(global_batch=opts.batch, num_workers=opts.workers, seed=seed)


def measure_ours(store_uri: str, opts: BenchOptions, seed: int, min_samples: int,
                 storage_options: dict | None = None) -> Measurement:
    """The trainer's loader, as the trainer builds it (shuffled, flipped, normalized, workers)."""
    from trainer.data import LatentLoader

    with LatentLoader(store_uri, loader_config(opts, seed), device=opts.device,
                      storage_options=storage_options) as loader:
        return time_batches(iter(loader), opts, min_samples, to_device=False)  # it delivers on the device


def peer_loader(dataset, opts: BenchOptions, seed: int):
    """A DataLoader as the peers use theirs, at its best honest settings: shuffled (a fresh
    permutation per epoch, endless so that no epoch boundary is timed), the same workers and batch
    as ours, default prefetch, pinned memory on CUDA, drop_last."""
    from torch.utils.data import DataLoader, RandomSampler

    from trainer.data import worker_start_method

    gen = torch.Generator().manual_seed(seed)
    w, cuda = opts.workers, torch.device(opts.device).type == "cuda"
    return DataLoader(dataset, batch_size=opts.batch,
                      sampler=RandomSampler(dataset, num_samples=len(dataset) * 10_000, generator=gen),
                      num_workers=w, prefetch_factor=2 if w else None, pin_memory=cuda, drop_last=True,
                      multiprocessing_context=worker_start_method(w))  # as our loader's workers


def measure_peer(dataset, opts: BenchOptions, seed: int, min_samples: int) -> Measurement:
    it = iter(peer_loader(dataset, opts, seed))
    try:
        return time_batches(it, opts, min_samples, to_device=True)
    finally:
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def measure_raw(reader: ObjectReader, keys: list[str], bytes_per_sample: float, opts: BenchOptions) -> Measurement:
    """Sequential whole-object reads of ``keys``, passes repeated for ``opts.seconds`` (at least one);
    samples = bytes / bytes_per_sample."""
    total_bytes, total_s = 0, 0.0
    while total_s < opts.seconds or total_bytes == 0:
        b, s = raw_read(reader, keys)
        total_bytes, total_s = total_bytes + b, total_s + s
    return Measurement(total_bytes / bytes_per_sample, total_s)


def _normalization(data: LoaderData) -> tuple[np.ndarray, np.ndarray]:
    """The store's normalization as (shift, scale) float32 [C, H, W], exactly our loader's."""
    from trainer.normalize import LatentNormalizer

    norm = LatentNormalizer.from_store(LatentStore.open(data.store_uri))  # a store always has mean and var
    return norm.mean.numpy(), torch.sqrt(norm.var + norm.eps).numpy()  # the normalizer's own float32 ops


def _threads_facts(opts: BenchOptions) -> dict:
    return {"main_process_torch_threads": torch.get_num_threads(), "dataloader_workers": opts.workers,
            "worker_torch_threads": 1 if opts.workers else None, "cpus": os.cpu_count()}


def _store_facts(data: LoaderData) -> dict:
    store = LatentStore.open(data.store_uri)
    return {"store_id": data.store_id, "num_samples": data.num_samples, "latent_shape": list(data.latent_shape),
            "dtype": store.logical_dtype, "compressor": store.spec["layout"]["compressor"],
            "samples_per_chunk": store.samples_per_chunk, "samples_per_shard": store.samples_per_shard,
            "flips": store.has_flips, "latent_objects": len(data.latent_keys), "latent_bytes": data.latent_bytes,
            "bytes_per_sample": round(data.bytes_per_sample, 1), "data": "random normal float32 -> float16"}


def _warm_page_cache(*folders: str) -> None:
    """Read every file once so that every side reads from the page cache."""
    for folder in folders:
        raw_read(ObjectReader(folder), [rel for rel, _ in ObjectReader(folder).list()])


# --------------------------------------------------------------------------------------------
# 2. loader_efficiency

STOCK_MOTO_NOTE = ("stock moto (--s3-server stock) serves a ranged GET by reading the whole object (S3 reads only "
                   "the range): every range read (ours: shard index and chunk; LightningDiT's row) pays for the "
                   "whole object")


def _s3_note(ctx: BenchContext) -> str:
    if ctx.options.s3_ranged_reads:
        return "moto serving ranged GETs by reading only the range, as S3 does (--s3-server ranged)"
    return STOCK_MOTO_NOTE


def range_get_check(ctx: BenchContext, data: LoaderData, store_uri: str, opts: BenchOptions) -> dict:
    """The endpoint's cost of a ranged GET of one chunk's bytes from a shard object / a whole GET
    of an object of the same size (requests/s each). Near 1 on real S3; far below 1 on stock moto."""
    s3 = ctx.s3()
    reader = ObjectReader(store_uri, s3.access)
    shard_key, shard_size = max(((rel, size) for rel, size in reader.list(S.LATENTS)), key=lambda t: t[1])
    size = max(1, int(data.bytes_per_sample * data.samples_per_chunk))
    probe = f"{store_uri[len(f's3://{s3.bucket}/'):]}-probe/chunk-sized"
    s3.access.client().put_object(Bucket=s3.bucket, Key=probe, Body=os.urandom(size))
    whole = ObjectReader(f"s3://{s3.bucket}", s3.access)
    starts = np.linspace(0, max(0, shard_size - size), 5).astype(int).tolist()

    def ranged() -> Measurement:
        t0 = time.perf_counter()
        for a in starts:
            reader.read_range(shard_key, a, a + size)
        return Measurement(len(starts), time.perf_counter() - t0)

    def plain() -> Measurement:
        t0 = time.perf_counter()
        for _ in starts:
            whole.read(probe)
        return Measurement(len(starts), time.perf_counter() - t0)

    m = run_interleaved({"ranged": ranged, "whole": plain}, opts.rounds, ctx.log)
    return ratio_figure(
        "S3 endpoint check: ranged GET from a shard / whole GET, same bytes",
        side(f"{size / 1e6:.1f} MB range of a {shard_size / 1e6:.0f} MB object", rates(m["ranged"]), "GET/s"),
        side(f"whole {size / 1e6:.1f} MB object", rates(m["whole"]), "GET/s"),
        note="the endpoint, not our code: near 1 on S3; far below 1 on stock moto (whole object read per range)")


@register("loader_efficiency", "the trainer's loader samples/s / raw sequential reads of the uncompressed latents")
def loader_efficiency(ctx: BenchContext) -> dict:
    opts, data = ctx.options, ensure_loader_data(ctx)
    bps, min_n = data.raw_bytes_per_sample, data.min_timed_samples(opts)
    figures = []
    seeds = iter(range(1000))

    def raw_side(label: str, m: list[Measurement]) -> dict:
        return side(label, rates(m), "samples/s", mb_per_s=round(float(np.median(rates(m))) * bps / 1e6, 1))

    ctx.log("loader_efficiency: local")
    _warm_page_cache(data.store_uri, data.raw_dir)
    local = ObjectReader(data.raw_dir)
    m = run_interleaved({
        "raw": lambda: measure_raw(local, data.raw_keys, bps, opts),
        "ours": lambda: measure_ours(data.store_uri, opts, next(seeds), min_n),
    }, opts.rounds, ctx.log)
    figures.append(ratio_figure("local: LatentLoader / raw sequential read of the uncompressed latents",
                                side("LatentLoader", rates(m["ours"]), "samples/s"),
                                raw_side("open().read()", m["raw"]), target=">= 0.7"))

    ctx.log("loader_efficiency: S3")
    uris, s3 = ensure_loader_data_s3(ctx, "store", "raw"), ctx.s3()
    uri, remote, so = uris["store"], ObjectReader(uris["raw"], s3.access), s3.access.storage_options()
    m = run_interleaved({
        "raw": lambda: measure_raw(remote, data.raw_keys, bps, dataclasses.replace(opts, seconds=0)),
        "ours": lambda: measure_ours(uri, opts, next(seeds), min_n, so),
    }, opts.rounds, ctx.log)
    figures.append(ratio_figure("S3: LatentLoader / raw sequential GETs of the uncompressed latents",
                                side("LatentLoader", rates(m["ours"]), "samples/s"),
                                raw_side("GET each object", m["raw"]), note=_s3_note(ctx)))
    figures.append(range_get_check(ctx, data, uri, opts))

    return item_result(
        figures,
        settings={
            "ours": {**dataclasses.asdict(loader_config(opts, 0)), "seed": "one per measurement",
                     "device": opts.device, "normalize": "per element, on the device", "flips": "per chunk per epoch"},
            "raw": {"local": "open(path, 'rb').read() of each raw file, sorted, one thread, passes "
                             "repeated for --seconds",
                    "s3": "boto3 get_object(...).read() of each raw file, sorted, one thread, one pass",
                    "objects": f"{len(data.raw_keys)} files of the stored float16 latents of both orientations, "
                               "uncompressed, one per shard (samples_per_shard rows)",
                    "samples_from_bytes": f"bytes / {data.raw_bytes_per_sample} (float16 bytes of one latent)",
                    "why": "the same denominator for every codec: a codec raises the ratio only by saving "
                           "bytes (and time) at low CPU cost, never by making the raw side read fewer bytes"},
            "timing": _timing_facts(opts, min_n),
            "threads": _threads_facts(opts),
            "page_cache": "warm on both sides (every file read once before timing; the store fits in memory)",
            "s3_endpoint": ctx.s3().describe(),
            "store": _store_facts(data),
        },
        data=f"synthetic store: {data.num_samples} random latents {list(data.latent_shape)} with flips, float16, "
             f"{LatentStore.open(data.store_uri).spec['layout']['compressor']['name']}",
        notes=["an epoch reads each sample once in one orientation, so samples/s of the raw side count "
               "the bytes of both orientations over 2 x samples"],
    )


def _timing_facts(opts: BenchOptions, min_n: int) -> dict:
    return {"rounds": opts.rounds, "statistic": "median of the rounds; sides alternated in rotated order",
            "warmup_batches_untimed": WARMUP_BATCHES, "seconds_per_measurement": opts.seconds,
            "min_timed_samples": min_n, "max_seconds_per_measurement": MAX_SECONDS_FACTOR * opts.seconds}


# --------------------------------------------------------------------------------------------
# 3. format_peers


@register("format_peers", "fast-DiT's and LightningDiT's layouts read their way / our loader")
def format_peers(ctx: BenchContext) -> dict:
    from bench.peers import NpyPerSample, SafetensorsPerItem

    opts, data = ctx.options, ensure_loader_data(ctx)
    min_n = data.min_timed_samples(opts)
    shift, scale = _normalization(data)
    seeds = iter(range(1000, 2000))
    figures = []

    def compare(where: str, store_uri: str, npy, st, so, note=None) -> None:
        m = run_interleaved({
            "ours": lambda: measure_ours(store_uri, opts, next(seeds), min_n, so),
            "npy": lambda: measure_peer(npy, opts, next(seeds), min_n),
            "safetensors": lambda: measure_peer(st, opts, next(seeds), min_n),
        }, opts.rounds, ctx.log)
        ours = side("LatentLoader", rates(m["ours"]), "samples/s")
        target = "<= 0.5" if where == "local" else "< 1"  # locally at least twice the peers' rate
        figures.append(ratio_figure(f"{where}: .npy per sample (fast-DiT) / ours",
                                    side("npy per sample", rates(m["npy"]), "samples/s"), ours, target=target,
                                    note=note))
        figures.append(ratio_figure(f"{where}: safetensors per item (LightningDiT) / ours",
                                    side("safetensors per item", rates(m["safetensors"]), "samples/s"), ours,
                                    target=target))

    ctx.log("format_peers: local")
    _warm_page_cache(data.store_uri, data.npy_dir, data.safetensors_dir)
    compare("local", data.store_uri,
            NpyPerSample(data.npy_dir, shift=shift, scale=scale),
            SafetensorsPerItem(data.safetensors_dir, shift=shift, scale=scale), None)

    ctx.log("format_peers: S3")
    uris, s3 = ensure_loader_data_s3(ctx, "store", "npy", "safetensors"), ctx.s3()
    compare("S3", uris["store"],
            NpyPerSample(uris["npy"], shift=shift, scale=scale, s3=s3.access),
            SafetensorsPerItem(uris["safetensors"], shift=shift, scale=scale, s3=s3.access),
            s3.access.storage_options(),
            note=None if opts.s3_ranged_reads else "npy reads whole objects: it alone escapes " + STOCK_MOTO_NOTE)

    st_files = len(SafetensorsPerItem(data.safetensors_dir).files)
    return item_result(
        figures,
        settings={
            "common": {"batch": opts.batch, "workers": opts.workers, "device": opts.device,
                       "work": "both sides flip (a coin per item / per chunk) and normalize per element in float32",
                       "dtype_at_rest": "float16 everywhere"},
            "ours": {**dataclasses.asdict(loader_config(opts, 0)), "reads": "whole zarr chunks (range GETs on S3)"},
            "npy_fast_dit": {"files": f"{2 * data.num_samples} .npy ([1, C, H, W] float16, one per sample and "
                                      "orientation)",
                             "item": "np.load(path) locally, one GET + np.load on S3",
                             "labels": "one labels.npy read once (fast-DiT loads a label file per item)",
                             "sampler": "RandomSampler (endless: no epoch boundary timed)",
                             "dataloader": "default_collate, prefetch_factor 2, pin_memory on CUDA"},
            "safetensors_lightningdit": {
                "files": f"{st_files} files of <= {loader_params(opts)['peer_samples_per_file']} rows "
                         "(latents, latents_flip float16, labels int64); LightningDiT writes 10000 rows per file",
                "item": "safe_open + get_slice(row) + get_slice(label) per item locally (no handle cache, as "
                        "LightningDiT); on S3 one ranged GET of the row, headers and labels read once per process",
                "sampler": "RandomSampler (endless)", "dataloader": "as the npy peer"},
            "timing": _timing_facts(opts, min_n),
            "threads": _threads_facts(opts),
            "page_cache": "warm for every side",
            "s3_endpoint": ctx.s3().describe(),
            "store": _store_facts(data),
        },
        data=f"the loader benchmark's {data.num_samples} random latents {list(data.latent_shape)}, "
             "identical float16 values in every layout",
        notes=["ratios are peer / ours: below 1 means our loader is faster"],
    )


# --------------------------------------------------------------------------------------------
# 5. storage


def storage_params(opts: BenchOptions) -> dict:
    """Resolution, encoder depth, image count and chunking of the storage benchmark.

    ``whole_chunks``: the image count is cut to a multiple of it, because a store pads its last
    chunk and an uncompressed store keeps the padding at rest (8 = samples per chunk of the default
    layout at [768, 16, 16] for float16 / bfloat16; float32 has 4). Quick mode: 128 px, one block,
    4 images, chunks of 4 samples.
    """
    if opts.quick:
        return {"resolution": 128, "depth": 1, "images": 4, "samples_per_chunk": 4, "whole_chunks": 4}
    return {"resolution": 256, "depth": None, "images": opts.storage_images, "samples_per_chunk": None,
            "whole_chunks": 8}


def storage_latents(ctx: BenchContext, params: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Latent-like data: the real DINOv2-B architecture (random weights, seed 0) on the built-in
    sample images, each image and its horizontal flip (see :func:`storage_params`).

    Returns (latents float32 [N, 768, g, g], flipped latents, labels int64 [N], description).
    Cached in the work folder by encoder weights checksum, depth, resolution and image contents.
    """
    from pipeline.encoders import build_encoder
    from pipeline.preprocess import preprocess_image_bytes, to_unit_float
    from pipeline.sample_data import ensure_sample_data

    res, depth, limit, whole = params["resolution"], params["depth"], params["images"], params["whole_chunks"]
    root = ensure_sample_data(ctx.options.sample_data)  # None: the repository's data/sample
    files = sample_image_files(root)
    if limit:
        files = files[::max(1, len(files) // limit)][:limit]
    files = files[:len(files) - len(files) % whole]
    if not files:
        raise RuntimeError(f"fewer than {whole} sample images under {root}")
    encoder, info = build_encoder("dinov2", res, weights="random", seed=0, depth=depth)
    h = hashlib.sha256(json.dumps([info["sha256"], depth, res]).encode())
    for p in files:
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    cache = os.path.join(ctx.work_dir, "storage", f"latents-{h.hexdigest()[:16]}.npz")
    classes = sorted({os.path.basename(os.path.dirname(p)) for p in files})
    labels = np.array([classes.index(os.path.basename(os.path.dirname(p))) for p in files], dtype=np.int64)
    desc = {"kind": "DINOv2-B/14 reg4 architecture, random weights (seed 0)"
                    + (f", {depth} block(s) (quick)" if depth else ""),
            "encoder": {"name": "dinov2", "depth": encoder.depth, "weights": info},
            "images": len(files), "source": "built-in sample data (pipeline.sample_data), train + val",
            "resolution": res, "flips": True,
            "why": "the real architecture's latents (LayerNorm-standardized tokens with spatial structure) "
                   "rather than i.i.d. random numbers; the hub weights are unreachable here"}
    if os.path.exists(cache):
        with np.load(cache) as z:
            return z["latents"], z["latents_flip"], labels, {**desc, "cached": True}
    device = torch.device(ctx.options.device)
    encoder = encoder.to(device)
    t0 = time.perf_counter()
    outs, outs_flip = [], []
    with torch.no_grad():
        for p in files:  # batch 2: the image and its flip
            with open(p, "rb") as f:
                x = to_unit_float(preprocess_image_bytes(f.read(), res)[None]).to(device)
            z = encoder(torch.cat([x, torch.flip(x, dims=[3])])).float().cpu().numpy()  # (2, 768, g, g)
            outs.append(z[:1])
            outs_flip.append(z[1:])
    latents, flips = np.concatenate(outs), np.concatenate(outs_flip)
    ctx.log(f"storage: encoded {len(files)} images (+ flips) in {time.perf_counter() - t0:.1f} s")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache, latents=latents, latents_flip=flips)
    return latents, flips, labels, {**desc, "cached": False}


def _dir_bytes(folder: str) -> int:
    return sum(size for _, size in ObjectReader(folder).list())


def measure_storage(latents: np.ndarray, flips: np.ndarray, labels: np.ndarray, folder: str,
                    dtype: str, compressor: str, samples_per_chunk: int | None = None) -> dict:
    """Write a store with this dtype and compressor; bytes at rest per sample (the ``latents``
    array's objects / N), the whole store's bytes per sample, and the round trip's error relative
    to the std of the float32 latents (both orientations)."""
    shutil.rmtree(folder, ignore_errors=True)
    store = write_array_store(folder, latents, labels, latents_flip=flips, num_classes=int(labels.max()) + 1,
                              layout=StoreLayout(dtype=dtype, compressor=compressor,
                                                 samples_per_chunk=samples_per_chunk))
    n = len(latents)
    diffs = [store.read_rows(0, n, S.LATENTS) - latents, store.read_rows(0, n, S.LATENTS_FLIP) - flips]
    std = float(np.sqrt(np.mean([np.var(latents, dtype=np.float64), np.var(flips, dtype=np.float64)])))
    d = np.concatenate([x.reshape(-1) for x in diffs]).astype(np.float64)
    out = {"dtype": dtype, "compressor": compressor, "codec": store.spec["layout"]["compressor"],
           "samples_per_chunk": store.samples_per_chunk,
           "bytes_per_sample": _dir_bytes(os.path.join(folder, S.LATENTS)) / n,
           "store_bytes_per_sample": _dir_bytes(folder) / n,
           "max_abs_error_over_std": float(np.abs(d).max() / std),
           "rms_error_over_std": float(np.sqrt(np.mean(d * d)) / std),
           "latent_std": std}
    shutil.rmtree(folder, ignore_errors=True)
    return out


STORAGE_OPTIONS = [(d, c) for d in S.LOGICAL_DTYPES for c in S.COMPRESSORS]


@register("storage", "bytes at rest per sample / float32 bytes, and round-trip error, per dtype and compressor")
def storage(ctx: BenchContext) -> dict:
    params = storage_params(ctx.options)
    latents, flips, labels, desc = storage_latents(ctx, params)
    spc = params["samples_per_chunk"]
    n, shape = len(latents), latents.shape[1:]
    f32 = float(np.prod(shape) * 4)
    folder = os.path.join(ctx.work_dir, "storage", "store")
    figures, rows = [], []
    for dtype, comp in STORAGE_OPTIONS:
        r = measure_storage(latents, flips, labels, folder, dtype, comp, spc)
        rows.append(r)
        figures.append(ratio_figure(
            f"{dtype} + {comp}: bytes at rest / float32",
            side("at rest", [r["bytes_per_sample"]], "B/sample"),
            side("float32", [f32], "B/sample"),
            note=f"round trip: max {r['max_abs_error_over_std']:.3g} std, RMS {r['rms_error_over_std']:.3g} std"))
    # The contrast: i.i.d. random normal numbers of the same shape (what the loader benchmarks store).
    rnd = np.random.default_rng(0).standard_normal(latents.shape, dtype=np.float32)
    contrast = {f"{d}+zstd": round(measure_storage(rnd, rnd, labels, folder, d, "zstd", spc)["bytes_per_sample"]
                                   / f32, 4) for d in S.LOGICAL_DTYPES}
    return item_result(
        figures,
        settings={"samples": n, "latent_shape": list(shape), "float32_bytes_per_sample": f32,
                  "bytes_counted": "objects of the store's latents array (one orientation) / samples; "
                                   "store_bytes_per_sample counts the whole store (both orientations, labels, stats, "
                                   "metadata)",
                  "error": "stored -> float32 minus the float32 latents, over both orientations, relative to "
                           "their std (population, all elements)",
                  "layout": "default StoreLayout otherwise (zstd level 3, crc32c, samples_per_shard 256"
                            + (f", samples_per_chunk {spc})" if spc else ", default samples_per_chunk)")},
        data=desc["kind"] + f" on {desc['images']} sample images (+ flips)",
        options=rows, latent_data=desc, contrast_random_normal_bytes_over_float32=contrast,
        notes=[f"i.i.d. random normal latents of the same shape, for contrast (bytes / float32): {contrast}",
               "every compressor is lossless: each dtype's error is the same with all of them"],
    )


# --------------------------------------------------------------------------------------------
# entry point

# Items 1, 4 and 6 live in their own modules; imported here, they register after the items above
# (decoder_data, in bench_decoder, then codecs, in bench_codecs).
from bench import bench_encode, bench_train  # noqa: E402,F401
from bench import bench_decoder  # noqa: E402,F401
from bench import bench_codecs  # noqa: E402,F401
from bench import bench_stream  # noqa: E402,F401  (loader_latency, chunk_readers)
from bench import bench_scale  # noqa: E402,F401  (scale)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = BenchOptions()
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device, help="where the trainer's batches go")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code paths, figures meaningless")
    p.add_argument("--only", default=None, help=f"comma-separated items (default all: {', '.join(BENCHMARKS)})")
    p.add_argument("--out", default="bench/results.json", help="results file, merged by item name")
    p.add_argument("--rounds", type=int, default=d.rounds, help="alternations of the sides of every ratio")
    p.add_argument("--seconds", type=float, default=d.seconds, help="timed seconds per throughput measurement")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers of every loader compared")
    p.add_argument("--batch", type=int, default=d.batch, help="batch size of every loader compared")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads of the main process (0: torch's default); workers use 1")
    p.add_argument("--loader-samples", type=int, default=d.loader_samples,
                   help="samples in the loader benchmarks' store")
    p.add_argument("--storage-images", type=int, default=d.storage_images, help="images encoded for storage (0: all)")
    p.add_argument("--work-dir", default=d.work_dir, help="stores and peer files kept between runs")
    p.add_argument("--sample-data", default=None, help="sample image folder for storage (default: data/sample)")
    p.add_argument("--s3-server", choices=["ranged", "stock"], default="ranged",
                   help="the bench's moto S3 server: ranged (a ranged GET reads only the range, as S3 does) or "
                        "stock (moto reads the whole object for every ranged GET)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception weights file: items that can report rFID do (default: none)")
    p.add_argument("--list", action="store_true", help="list the items and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for b in BENCHMARKS.values():
            print(f"{b.name}: {b.summary}")
        return 0
    try:
        names = select_benchmarks(args.only)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads < 0:
        print("bench: --threads must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)  # this command's process only; recorded with every result
    opts = BenchOptions(device=args.device, quick=args.quick, rounds=args.rounds, workers=args.workers,
                        batch=args.batch, loader_samples=args.loader_samples, storage_images=args.storage_images,
                        work_dir=args.work_dir, sample_data=args.sample_data,
                        s3_ranged_reads=args.s3_server == "ranged", seconds=0.2 if args.quick else args.seconds,
                        inception_weights=args.inception_weights)
    if args.quick:
        opts = dataclasses.replace(opts, rounds=min(opts.rounds, 2), batch=min(opts.batch, 8))
    ctx = BenchContext(opts)
    done: dict[str, dict] = {}
    t_all = time.perf_counter()
    try:
        for name in names:
            ctx.log(f"bench: {name}")
            t0 = time.perf_counter()
            result = BENCHMARKS[name].run(ctx)
            result.update(
                runtime_s=round(time.perf_counter() - t0, 1), device=opts.device, quick=opts.quick,
                finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python -m bench.bench"] + (argv if argv is not None else sys.argv[1:])),
                machine={"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.cuda.get_device_name() if opts.device == "cuda" else None},
            )
            done[name] = result
            merge_results(args.out, {name: result})  # after each item: a later failure keeps it
            ctx.log(f"bench: {name} took {result['runtime_s']:.0f} s")
    finally:
        ctx.close()
    print(format_table(done))
    print(f"\n{len(done)} item(s) in {time.perf_counter() - t_all:.0f} s; results merged into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
