"""`make bench` items of streaming latents from object storage, and the throughput budget.

``loader_latency``: the trainer's :class:`trainer.data.LatentLoader` (default settings: workers,
read-ahead) streaming the first epoch of a 2,048-latent store (default layout: 8 samples, 2.89 MB
per chunk GET) from the bench's moto S3 server through the latency proxy (``bench.faultproxy``, a
real process on loopback) adding D ms to every request: samples/s at D / samples/s at D = 0, the
same loader through the same proxy, D = 25 and 50 ms, sides interleaved round by round. The proxy
counts the GETs and the requests in flight. Beside it the previous read path (one chunk GET per
worker item: ``read_ahead_bytes=0``, ``prefetch_factor=4``) through the same proxy, and the
``throughput_budget``: what DiT^DH-XL on H100s consumes (derived from FLOPs) against what one
loader rank delivers.

``chunk_readers``: samples/s of one process reading the same 16-chunk blocks through our chunk
reader (one chunk at a time; the block's GETs in flight at once) and through zarr-python with its
default codec pipeline, with the ``zarrs`` pipeline (Rust), and from ``obstore``'s S3 client
(``zarr.storage.ObjectStore``), locally and through the proxy at D = 50 ms. Sides whose package is
not installed are skipped and listed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import time

import numpy as np

from bench.bench_encode import load_average
from bench.common import (BenchContext, BenchOptions, Measurement, S3Access, item_result, rates, ratio_figure,
                          register, run_interleaved, side)
from bench.faultproxy import FaultProxy
from pipeline import uri as U
from pipeline.store import LatentStore, StoreError, StoreLayout, write_array_store
from schemas import store_v1 as S

DELAYS_MS = (25.0, 50.0)
TARGET_AT_50 = ">= 0.8"
BLOCK = 16  # chunks per block read in chunk_readers (the loader's default block_chunks)

# The throughput budget's assumptions (labelled as such in the result): H100 SXM dense peaks, the
# model utilisation, GPUs per node.
H100_PEAK_TFLOPS = {"bf16": 989.0, "tf32": 495.0}
UTILISATION = 0.40
GPUS_PER_NODE = 8


# --------------------------------------------------------------------------------------------
# data: a store in the default layout, kept in the work folder, copied to S3 once per run


def stream_params(opts: BenchOptions) -> dict:
    """The store and batch of both items: 2,048 latents of DINOv2-B/16 shape in the default layout
    (quick: 256 small latents, chunks of 8 in shards of 64, batch 16)."""
    if opts.quick:
        return {"num_samples": 256, "latent_shape": [64, 16, 16], "seed": 0,
                "layout": {"samples_per_shard": 64, "samples_per_chunk": 8}, "global_batch": 16}
    return {"num_samples": 2048, "latent_shape": [768, 16, 16], "seed": 0, "layout": {}, "global_batch": 64}


def ensure_stream_store(ctx: BenchContext) -> str:
    """The local store (written once, reused while its parameters match): random float16 latents
    with flips, default codec."""
    if "stream_store" in ctx.cache:
        return ctx.cache["stream_store"]
    params = {k: v for k, v in stream_params(ctx.options).items() if k != "global_batch"}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.join(ctx.work_dir, "stream", key)
    store_dir, marker = os.path.join(root, "store"), os.path.join(root, "ready.json")
    try:
        if U.read_json(marker).get("params") == params and LatentStore.open(store_dir).num_samples:
            ctx.log(f"bench: reusing the streaming store {store_dir}")
            ctx.cache["stream_store"] = store_dir
            return store_dir
    except (FileNotFoundError, ValueError, OSError, StoreError) as e:
        ctx.log(f"bench: writing the streaming store ({type(e).__name__}: no reusable one)")
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    n, shape = params["num_samples"], tuple(params["latent_shape"])
    rng = np.random.default_rng(params["seed"])
    latents = rng.standard_normal((n, *shape), dtype=np.float32)
    flips = rng.standard_normal((n, *shape), dtype=np.float32)
    write_array_store(store_dir, latents, rng.integers(0, 1000, n), latents_flip=flips, num_classes=1000,
                      layout=StoreLayout(**params["layout"]))
    U.write_json(marker, {"params": params})
    ctx.log(f"bench: wrote the streaming store ({n} samples) in {time.perf_counter() - t0:.0f} s")
    ctx.cache["stream_store"] = store_dir
    return store_dir


def ensure_stream_store_s3(ctx: BenchContext) -> str:
    """The streaming store on the bench's S3 server (uploaded once per run): its URI."""
    if "stream_store_s3" not in ctx.cache:
        local, s3 = ensure_stream_store(ctx), ctx.s3()
        t0 = time.perf_counter()
        total = s3.upload_dir(local, "stream/store")
        ctx.log(f"bench: uploaded the streaming store ({total / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
        ctx.cache["stream_store_s3"] = s3.uri("stream", "store")
    return ctx.cache["stream_store_s3"]


def _store_facts(store_dir: str) -> dict:
    """Facts of the local store (the S3 copy is byte-identical)."""
    from bench.common import ObjectReader

    store = LatentStore.open(store_dir)
    at_rest = sum(size for a in (S.LATENTS, S.LATENTS_FLIP) for _, size in ObjectReader(store_dir).list(a))
    chunks = 2 * store.num_chunks
    return {"num_samples": store.num_samples, "latent_shape": list(store.latent_shape), "dtype": store.logical_dtype,
            "compressor": store.spec["layout"]["compressor"], "samples_per_chunk": store.samples_per_chunk,
            "samples_per_shard": store.samples_per_shard, "flips": store.has_flips,
            "mean_chunk_bytes_at_rest": round(at_rest / chunks),
            "data": "random normal float32 -> float16 (zstd keeps ~0.92 of the bytes)"}


# --------------------------------------------------------------------------------------------
# loader_latency


def proxy_counters(before: dict, after: dict, seconds: float, workers: int) -> dict:
    """What the proxy saw between two of its stats snapshots: GETs/s (per worker too), requests in
    flight (time-weighted mean over the snapshots' interval; peak since the latency was set), MB/s."""
    span = after["clock_s"] - before["clock_s"]
    gets = after["by_method"].get("GET", 0) - before["by_method"].get("GET", 0)
    in_flight = (after["in_flight"]["request_seconds"] - before["in_flight"]["request_seconds"]) / span
    return {"gets": gets, "gets_per_s": round(gets / seconds, 2),
            "gets_per_s_per_worker": round(gets / seconds / max(1, workers), 2),
            "in_flight_mean": round(in_flight, 2), "in_flight_peak": after["in_flight"]["peak"],
            "mb_per_s": round((after["bytes_sent"] - before["bytes_sent"]) / seconds / 1e6, 1)}


def measure_first_epoch(uri: str, proxy: FaultProxy, cfg, delay_ms: float, bytes_per_s: float | None = None,
                        counters: list | None = None) -> Measurement:
    """The loader's samples/s over its first epoch through ``proxy`` at ``delay_ms`` (and the
    per-connection cap ``bytes_per_s``): the store opened without delay (metadata, labels,
    statistics: once per run, not per batch), the first batch (worker start, first reads) untimed,
    then every batch that ends within epoch 0. Appends the proxy's counters to ``counters``."""
    import s3fs

    from trainer.data import LatentLoader

    # Fresh clients: a kept-alive connection of the cached s3fs client, once its process has forked
    # DataLoader workers, can swallow this process's next request through the proxy until s3fs's
    # 15 s read timeout (seen here; never on direct moto connections): harness time, not the loader's.
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.set_latency(0.0)
    so = S3Access(proxy.url).storage_options()
    with LatentLoader(uri, cfg, storage_options=so) as loader:
        proxy.set_latency(delay_ms, bytes_per_s)
        steps = loader.num_valid // cfg.global_batch
        it = iter(loader)
        next(it)
        proxy.set_latency(delay_ms, bytes_per_s)  # the in-flight peak from here (opening the store reads many arrays)
        before, t0 = proxy.stats(), time.perf_counter()
        for _ in range(steps - 1):
            next(it)
        seconds = time.perf_counter() - t0
        after = proxy.stats()
        it.close()
    if counters is not None:
        counters.append(proxy_counters(before, after, seconds, cfg.num_workers))
    return Measurement((steps - 1) * cfg.global_batch, seconds)


def _latency_side(label: str, m: list[Measurement], counters: list[dict]) -> dict:
    keys = ("gets_per_s", "gets_per_s_per_worker", "in_flight_mean", "in_flight_peak", "mb_per_s")
    return side(label, rates(m), "samples/s", **{k: statistics.median(c[k] for c in counters) for k in keys},
                rounds=counters)


@register("loader_latency", "the loader's samples/s through a proxy adding D ms per request / at D = 0 (S3, moto)")
def loader_latency(ctx: BenchContext) -> dict:
    from trainer.data import LoaderConfig

    opts, params = ctx.options, stream_params(ctx.options)
    uri = ensure_stream_store_s3(ctx)
    seeds = iter(range(1000))
    shipped = LoaderConfig(global_batch=params["global_batch"])
    previous = dataclasses.replace(shipped, read_ahead_bytes=0, prefetch_factor=4)
    load_before = load_average()
    proxy = FaultProxy(ctx.s3().url).start()
    try:
        counters: dict[str, list] = {}

        def sides(cfg, tag: str, delays) -> dict:
            out = {}
            for d in delays:
                name = f"{tag} D={d:g}"
                counters[name] = []
                out[name] = (lambda c=cfg, d=d, k=name:
                             measure_first_epoch(uri, proxy, dataclasses.replace(c, seed=next(seeds)), d,
                                                 counters=counters[k]))
            return out

        ctx.log("loader_latency: shipped settings, D = 0, 25, 50 ms")
        m = run_interleaved(sides(shipped, "shipped", (0.0,) + DELAYS_MS), opts.rounds, ctx.log)
        ctx.log("loader_latency: the previous read path (one GET per worker item), D = 0, 50 ms")
        prev_rounds = max(1, min(opts.rounds, 3))
        m.update(run_interleaved(sides(previous, "previous", (0.0, 50.0)), prev_rounds, ctx.log))
        proxy_facts = {"pid": proxy.pid, "url": proxy.url}
    finally:
        proxy.stop()

    def s(name: str, label: str) -> dict:
        return _latency_side(label, m[name], counters[name])

    base = s("shipped D=0", "D = 0 ms")
    figures = [ratio_figure(f"D = {d:g} ms: samples/s / D = 0", s(f"shipped D={d:g}", f"D = {d:g} ms"), base,
                            target=TARGET_AT_50 if d == 50.0 else None,
                            note="shipped LoaderConfig; first epoch; same proxy process both sides")
               for d in DELAYS_MS]
    figures.append(ratio_figure("previous read path, D = 50 ms: samples/s / D = 0",
                                s("previous D=50", "D = 50 ms"), s("previous D=0", "D = 0 ms"),
                                note="read_ahead_bytes=0, prefetch_factor=4: one chunk GET in flight per worker"))
    figures.append(ratio_figure("D = 50 ms: shipped / previous read path",
                                s("shipped D=50", "shipped"), s("previous D=50", "previous"), target="> 1"))
    facts = _store_facts(ensure_stream_store(ctx))
    delivered = float(np.median(rates(m["shipped D=50"])))
    time_per_get = _time_per_get(counters["shipped D=0"])
    budget = throughput_budget(facts["samples_per_chunk"], delay_s=0.050, time_per_get_s=time_per_get,
                               delivered_per_rank=delivered)
    from trainer.data import LatentLoader

    with LatentLoader(uri, shipped, storage_options=ctx.s3().access.storage_options()) as probe:
        group, slots = probe.reads_per_group, probe._slots_needed()
    return item_result(
        figures,
        settings={
            "loader": {**dataclasses.asdict(shipped), "seed": "one per measurement", "device": "cpu",
                       "reads_per_group": group, "chunk_slots": slots,
                       "range_gets_in_flight_per_rank_at_most": 2 * shipped.num_workers * group,
                       "in_flight": "a worker's group and its next group"},
            "previous": dataclasses.asdict(previous),
            "timing": {"rounds": opts.rounds, "previous_rounds": prev_rounds,
                       "statistic": "median of the rounds; sides alternated in rotated order",
                       "measured": "the first epoch after its first batch (store opened at D = 0; worker start "
                                   "and first batch at D, untimed)",
                       "rank": "one (world size 1)", "local_disk_cache": "none"},
            "proxy": {"process": "python -m bench.faultproxy (own process, 127.0.0.1), no faults",
                      "delay": "added to every request after it is read, before it is forwarded",
                      "bandwidth_cap": None, **proxy_facts},
            "s3_endpoint": ctx.s3().describe(),
            "store": facts,
            "load_average_before_after": [load_before, load_average()],
        },
        data=f"synthetic store: {facts['num_samples']} random latents {facts['latent_shape']} with flips, "
             f"float16, zstd, default layout, global batch {params['global_batch']}",
        notes=["on this 2-core machine moto and the proxy share the CPU with the loader: the D = 0 side "
               "through the same proxy is the denominator, not local disk",
               "sides report the proxy's counters: GETs/s (per worker), requests in flight (mean, peak)"],
        throughput_budget=budget,
    )


def _time_per_get(counters: list[dict]) -> float:
    """Seconds a GET spends in flight at D = 0 here (Little's law: mean in flight / GETs per s)."""
    return statistics.median(c["in_flight_mean"] / c["gets_per_s"] for c in counters if c["gets_per_s"])


# --------------------------------------------------------------------------------------------
# the throughput budget


def dit_flops_per_sample(cfg) -> dict:
    """Forward FLOPs of one sample of a DiT^DH (:class:`trainer.models.dit.DiTConfig` with a head),
    counting every matmul (2 FLOPs per multiply-add; what ``torch.utils.flop_counter`` counts), and
    the formula. T = (H/p)^2 tokens, C channels, widths D0 (backbone, L0 blocks) and D1 (head, L1
    blocks), SwiGLU hidden h = int(2/3 * mlp_ratio * D), F Fourier frequencies."""
    if cfg.head_hidden_size is None:
        raise ValueError("dit_flops_per_sample counts a DiT^DH (a config with head_hidden_size)")
    T, C, p, F = cfg.grid_size ** 2, cfg.in_channels, cfg.patch_size, cfg.num_time_freqs
    D0, D1, L0, L1 = cfg.hidden_size, cfg.head_hidden_size, cfg.depth, cfg.head_depth
    h0, h1 = int(2 / 3 * cfg.mlp_ratio * D0), int(2 / 3 * cfg.mlp_ratio * D1)
    macs = {
        "patch_embeds": T * C * p * p * (D0 + D1),
        "time_embed": 2 * F * D0 + D0 * D0,
        "backbone_blocks": L0 * (T * (4 * D0 * D0 + 3 * D0 * h0) + 2 * T * T * D0 + 6 * D0 * D0),
        "s_projector": T * D0 * D1,
        "head_blocks": L1 * (T * (4 * D1 * D1 + 3 * D1 * h1 + 6 * D1 * D1) + 2 * T * T * D1),
        "final_layer": T * (2 * D1 * D1 + D1 * p * p * C),
    }
    return {
        "forward_flops": 2 * sum(macs.values()),
        "terms_flops": {k: 2 * v for k, v in macs.items()},
        "formula": "2 x multiply-adds: T*C*p^2*(D0+D1) [patch embeds] + 2F*D0 + D0^2 [time] "
                   "+ L0*(T*(4*D0^2 + 3*D0*h0) + 2*T^2*D0 + 6*D0^2) [backbone: qkv+proj, SwiGLU, attention, "
                   "adaLN per sample] + T*D0*D1 [s_projector] + L1*(T*(4*D1^2 + 3*D1*h1 + 6*D1^2) + 2*T^2*D1) "
                   "[head: adaLN per token] + T*(2*D1^2 + D1*p^2*C) [final layer]",
        "values": {"T": T, "C": C, "p": p, "F": F, "D0": D0, "L0": L0, "h0": h0, "D1": D1, "L1": L1, "h1": h1},
    }


def throughput_budget(samples_per_chunk: int, *, delay_s: float, time_per_get_s: float | None,
                      delivered_per_rank: float | None) -> dict:
    """Samples/s that DiT^DH-XL training at 256 px consumes per H100 and per node (derived: FLOPs
    at an assumed utilisation of the dense peak), the chunk GETs per second and in flight per rank
    that needs at ``delay_s`` per request, and what one loader rank delivered here."""
    from trainer.models.dit import dit_config

    cfg = dit_config("dit_dh_xl", 768, 16)
    fwd = dit_flops_per_sample(cfg)
    train_flops = 3 * fwd["forward_flops"]  # backward ~ 2x forward
    per_gpu = {k: UTILISATION * peak * 1e12 / train_flops for k, peak in H100_PEAK_TFLOPS.items()}
    out = {
        "label": "derived from FLOPs, not measured (no GPU here)",
        "model": "DiT^DH-XL (backbone 28 x 1152, DDT head 2 x 2048), 256 px: 768x16x16 latents, patch 1, 256 tokens",
        "forward_flops_per_sample": fwd["forward_flops"],
        "forward_terms_flops": fwd["terms_flops"],
        "forward_formula": fwd["formula"],
        "formula_values": fwd["values"],
        "train_flops_per_sample": train_flops,
        "train_formula": "fwd + bwd ~ 3 x forward",
        "assumptions": {"utilisation_of_dense_peak": UTILISATION, "h100_sxm_dense_peak_tflops": H100_PEAK_TFLOPS,
                        "gpus_per_node": GPUS_PER_NODE, "request_delay_s": delay_s},
        "samples_per_chunk_get": samples_per_chunk,
        "time_per_get_s_at_d0_measured_here": None if time_per_get_s is None else round(time_per_get_s, 4),
        "per_precision": {},
    }
    for k, rate in per_gpu.items():
        gets = rate / samples_per_chunk
        entry = {"samples_per_s_per_gpu": round(rate, 1), "samples_per_s_per_node": round(rate * GPUS_PER_NODE),
                 "chunk_gets_per_s_per_rank": round(gets, 1),
                 "gets_in_flight_per_rank_for_the_delay_alone": round(gets * delay_s, 2)}
        if time_per_get_s is not None:
            entry["gets_in_flight_per_rank"] = round(gets * (delay_s + time_per_get_s), 2)
            entry["gets_in_flight_per_node"] = round(GPUS_PER_NODE * gets * (delay_s + time_per_get_s), 1)
        if delivered_per_rank:
            entry["one_loader_rank_delivers_over_need"] = round(delivered_per_rank / rate, 3)
        out["per_precision"][k] = entry
    if delivered_per_rank:
        out["one_loader_rank_delivered_samples_per_s_at_delay"] = round(delivered_per_rank, 1)
    out["in_flight_formula"] = ("GETs in flight per rank = samples/s per GPU / samples per chunk x (D + time per "
                                "GET), the time per GET measured here at D = 0 (proxy's mean in flight / GETs per s)")
    return out


# --------------------------------------------------------------------------------------------
# chunk_readers

DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def reader_sides(uri: str, storage_options: dict | None, obstore_s3: dict | None) -> dict:
    """{name: open()} where ``open()`` makes a fresh client and returns ``read(block)``, reading a
    block (a list of BLOCK consecutive chunk numbers of ``latents``) into float16 arrays.
    ``obstore_s3``: the S3Store arguments (None: no obstore side)."""
    import zarr

    def ours(at_once: bool):
        def open_side():
            store = LatentStore.open(uri, storage_options, check_arrays=False)
            outs = [np.empty((store.samples_per_chunk,) + tuple(store.latent_shape), np.float16) for _ in range(BLOCK)]

            def read(block):
                if at_once:
                    for _ in store.read_chunks_stored([(c, S.LATENTS, o) for c, o in zip(block, outs)]):
                        pass
                else:
                    for c in block:
                        store.read_chunk_stored(c, S.LATENTS, outs[0])
            return read
        return open_side

    def zarr_store(kind: str):
        if kind == "obstore":
            import obstore.store

            return zarr.storage.ObjectStore(obstore.store.S3Store(**obstore_s3), read_only=True)
        if U.is_local(uri):
            return zarr.storage.LocalStore(uri, read_only=True)
        return zarr.storage.FsspecStore.from_url(uri, storage_options=dict(storage_options or {}), read_only=True)

    def through_zarr(kind: str, pipeline: str, per_chunk: bool):
        def open_side():
            with zarr.config.set({"codec_pipeline.path": pipeline}):  # read when the array is opened
                array = zarr.open_array(zarr_store(kind), path=S.LATENTS, mode="r")
            k = array.chunks[0]  # samples per inner chunk (array.shards: per shard)

            def read(block):
                if per_chunk:
                    for c in block:
                        np.asarray(array[c * k:(c + 1) * k])
                else:
                    np.asarray(array[block[0] * k:(block[-1] + 1) * k])
            return read
        return open_side

    sides = {"ours, one chunk at a time": ours(False), "ours, a block's GETs at once": ours(True),
             "zarr default pipeline, per chunk": through_zarr("fsspec", DEFAULT_PIPELINE, True),
             "zarr default pipeline, per block": through_zarr("fsspec", DEFAULT_PIPELINE, False)}
    if _installed("zarrs"):
        sides["zarrs pipeline, per chunk"] = through_zarr("fsspec", ZARRS_PIPELINE, True)
        sides["zarrs pipeline, per block"] = through_zarr("fsspec", ZARRS_PIPELINE, False)
    if obstore_s3 is not None and _installed("obstore"):
        sides["obstore + zarr default, per block"] = through_zarr("obstore", DEFAULT_PIPELINE, False)
        if _installed("zarrs"):
            sides["obstore + zarrs, per block"] = through_zarr("obstore", ZARRS_PIPELINE, False)
    return sides


@register("chunk_readers", "one process reading 16-chunk blocks: zarr's pipelines, zarrs, obstore / our chunk reader")
def chunk_readers(ctx: BenchContext) -> dict:
    opts = ctx.options
    local_dir = ensure_stream_store(ctx)
    store = LatentStore.open(local_dir)
    spc, num_blocks = store.samples_per_chunk, store.num_chunks // BLOCK
    per_side = 2 if opts.quick else 4
    rng = np.random.default_rng(0)
    missing = [p for p in ("zarrs", "obstore") if not _installed(p)]
    figures, details = [], {}
    ours = "ours, a block's GETs at once"

    def compare(where: str, uri: str, so: dict | None, obstore_s3: dict | None, blocks: int,
                proxy: FaultProxy | None = None) -> None:
        sides = reader_sides(uri, so, obstore_s3)
        seen: dict[str, list[dict]] = {name: [] for name in sides}

        def call(name: str, open_side) -> Measurement:
            """A fresh client reads one block untimed (its start: thread pools, a first index), then
            ``blocks`` blocks, timed."""
            warm, *draw = [list(range(b * BLOCK, (b + 1) * BLOCK)) for b in rng.integers(0, num_blocks, blocks + 1)]
            read = open_side()
            read(warm)
            if proxy is not None:
                proxy.set_latency(proxy.latency.delay_ms)  # restarts the in-flight peak
                before = proxy.stats()
            t0 = time.perf_counter()
            for block in draw:
                read(block)
            m = Measurement(blocks * BLOCK * spc, time.perf_counter() - t0)
            if proxy is not None:
                after = proxy.stats()
                gets = after["by_method"].get("GET", 0) - before["by_method"].get("GET", 0)
                seen[name].append({"gets_per_block": gets / blocks, "in_flight_peak": after["in_flight"]["peak"]})
            return m

        m = run_interleaved({name: (lambda n=name, fn=fn: call(n, fn)) for name, fn in sides.items()},
                            opts.rounds, ctx.log)
        details[where] = {}
        for name, v in m.items():
            extra = {k: statistics.median(c[k] for c in seen[name]) for k in ("gets_per_block", "in_flight_peak")} \
                if seen[name] else {}
            details[where][name] = side(name, rates(v), "samples/s", **extra)
        for name in m:
            if name != ours:
                figures.append(ratio_figure(f"{where}: {name} / ours", details[where][name], details[where][ours],
                                            target=None if name.startswith("ours") else "< 1"))

    ctx.log("chunk_readers: local")
    compare("local", local_dir, None, None, 2 * per_side)
    ctx.log("chunk_readers: S3 through the proxy at D = 50 ms")
    uri, s3 = ensure_stream_store_s3(ctx), ctx.s3()
    proxy = FaultProxy(s3.url).start()
    try:
        proxy.set_latency(50.0)
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        obstore_s3 = {"bucket": bucket, "prefix": prefix, "endpoint": proxy.url, "access_key_id": s3.access.key,
                      "secret_access_key": s3.access.secret, "region": s3.access.region,
                      "client_options": {"allow_http": True}}
        compare("S3 D=50ms", uri, S3Access(proxy.url).storage_options(), obstore_s3, per_side, proxy)
    finally:
        proxy.stop()
    versions = {}
    for name in ("zarr", "zarrs", "obstore", "numcodecs", "s3fs"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return item_result(
        figures,
        settings={"block_chunks": BLOCK, "blocks_per_measurement": {"local": 2 * per_side, "s3": per_side},
                  "rounds": opts.rounds,
                  "blocks": "runs of 16 consecutive chunks of `latents` at random, the same draw sequence for "
                            "every side (zarr reads a block as one slice: its best case); each measurement opens "
                            "a fresh client and reads one block untimed first",
                  "output": "float16 arrays in memory (ours: into preallocated chunk buffers, as the loader)",
                  "process": "one process, no DataLoader workers", "versions": versions,
                  "skipped_sides": [f"{p} (not installed)" for p in missing],
                  "s3": "moto (ranged reads) through the latency proxy at D = 50 ms",
                  "store": _store_facts(local_dir)},
        data="the loader_latency store",
        notes=["ratios are other / ours (our chunk reader with a block's GETs in flight at once): below 1 means "
               "ours is faster",
               "S3 sides carry the proxy's counts: GETs per 16-chunk block and the peak of requests in flight "
               "(zarr 3.1's sharding codec reads a partial shard's inner chunks one GET at a time, whatever "
               "the codec pipeline or store)"]
        + ([f"skipped: {', '.join(missing)} not installed (pip install zarrs obstore)"] if missing else []),
        sides=details,
    )
