"""`make bench` item ``codecs``: the latent arrays' codec, chosen by measurement.

For each codec option (:data:`CODEC_OPTIONS`: no compression, zstd-3 (the default before this item),
blosc-lz4 and blosc-zstd with byte shuffle at a few levels) and each kind of latents the bench can
make (:func:`codec_latents`):

- **bytes at rest** per sample (both latent arrays' objects / 2N) over float16's bytes;
- **encode** ms per sample, single thread (the codec alone, as the writer applies it per chunk);
- **decode** ms per sample, single thread: the store's fast chunk reader
  (``LatentStore.read_chunk_stored``: byte-range read from the warm page cache, crc32c, decode into
  a reused buffer), every chunk of both arrays, codecs interleaved round by round;

and, on a store of ``--loader-samples`` samples per codec (the DINOv2-architecture latents tiled),
the trainer's :class:`trainer.data.LatentLoader` samples/s per rank (default settings, one rank):

- **locally** (warm page cache: decode cost matters), every option, interleaved round by round;
- **through the latency proxy** (``bench.faultproxy``, a real process on loopback in front of the
  bench's moto server) adding :data:`PROXY_DELAY_MS` per request and capping every connection at
  :data:`BANDWIDTH_CAP_MB_S` (bytes matter), first epoch, the options of :data:`PROXY_OPTIONS`,
  interleaved round by round;

figures: samples/s of each option / none's, both ways.

Real DINOv2 latents need the hub weights, which are not reachable here: the DINOv2-B architecture
with random weights (the storage item's latents) stands in, with i.i.d. random normal latents (what
the loader benchmarks store) for contrast.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

from bench.common import (BENCHMARKS, BenchContext, Measurement, ObjectReader, item_result, rates, ratio_figure,
                          register, run_interleaved, side)
from pipeline import uri as U
from pipeline.store import LatentStore, StoreError, StoreLayout, write_array_store
from schemas import store_v1 as S

# name -> StoreLayout options. "none" first: the loader figures' denominator.
CODEC_OPTIONS: dict[str, dict] = {
    "none": {"compressor": "none"},
    "zstd-3": {"compressor": "zstd", "zstd_level": 3},
    "blosc-lz4-5": {"compressor": "blosc-lz4", "blosc_level": 5, "blosc_blocksize": 0},
    "blosc-zstd-1": {"compressor": "blosc-zstd", "blosc_level": 1, "blosc_blocksize": 1 << 20},
    "blosc-zstd-3": {"compressor": "blosc-zstd", "blosc_level": 3, "blosc_blocksize": 1 << 20},
    "blosc-zstd-5": {"compressor": "blosc-zstd", "blosc_level": 5, "blosc_blocksize": 0},
}
PREVIOUS_DEFAULT = "zstd-3"
# Through the proxy: an object store's time to first byte, and a per-connection cap low enough that
# the loader here (2 cores shared with moto and the proxy) is bound by bandwidth, not by its CPU, as
# a rank streaming at its full rate is (one S3 connection gives about 50-100 MB/s).
PROXY_DELAY_MS = 50.0
BANDWIDTH_CAP_MB_S = 16.0
PROXY_OPTIONS = ("none", "zstd-3", "blosc-lz4-5", "blosc-zstd-1")
MIN_DECODE_SECONDS = 0.3  # a decode measurement repeats passes over the chunks at least this long


def _bench_module():
    """bench/bench.py, whose helpers (the storage item's latents, the loader's timing) this item reuses:
    reached through the registry, because ``python -m bench.bench`` runs it as ``__main__`` and
    importing ``bench.bench`` again would run it twice."""
    return sys.modules[BENCHMARKS["storage"].run.__module__]


def default_option() -> str:
    """The name of the option that :class:`StoreLayout`'s defaults resolve to."""
    shape = (768, 16, 16)
    want = StoreLayout().resolved(shape)
    for name, kw in CODEC_OPTIONS.items():
        if StoreLayout(**kw).resolved(shape) == want:
            return name
    raise RuntimeError(f"the default layout's codec {want.compressor_spec()} is not one of the bench's options")


def numcodecs_codec(layout: StoreLayout):
    """The numcodecs codec the writer applies to each inner chunk (None: no compression)."""
    from numcodecs import Blosc, Zstd

    if layout.compressor == "zstd":
        return Zstd(level=layout.zstd_level)
    if layout.is_blosc:
        return Blosc(cname=S.BLOSC_CNAME[layout.compressor], clevel=layout.blosc_level, shuffle=Blosc.SHUFFLE,
                     blocksize=layout.blosc_blocksize, typesize=np.dtype(S.STORAGE_DTYPE[layout.dtype]).itemsize)
    return None


# --------------------------------------------------------------------------------------------
# the latents


def codec_latents(ctx: BenchContext) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, str]], int | None]:
    """(kind -> (latents float32 [N, C, H, W], flipped latents, description), samples per chunk that
    divide N (None: the default layout's))."""
    bench = _bench_module()
    params = bench.storage_params(ctx.options)
    lat, flip, _, desc = bench.storage_latents(ctx, params)
    rng = np.random.default_rng(0)
    return {
        "dinov2_random_weights": (lat, flip, desc["kind"] + f" on {desc['images']} sample images (+ flips)"),
        "iid_normal": (rng.standard_normal(lat.shape, dtype=np.float32),
                       rng.standard_normal(lat.shape, dtype=np.float32),
                       "i.i.d. random normal numbers of the same shape (what the loader benchmarks store)"),
    }, params["samples_per_chunk"]


def _store_bytes(store_dir: str) -> int:
    return sum(size for a in (S.LATENTS, S.LATENTS_FLIP) for _, size in ObjectReader(store_dir).list(a))


def _decode_pass(store: LatentStore, cpu_ms: list[float] | None = None) -> Measurement:
    """Every chunk of both latent arrays through the fast chunk reader, into one reused buffer,
    passes repeated for at least :data:`MIN_DECODE_SECONDS`; amount = latents decoded. Appends the
    thread's CPU ms per latent to ``cpu_ms`` (on a busy machine CPU time moves less than wall time)."""
    out = np.empty((store.samples_per_chunk,) + store.latent_shape, dtype=S.STORAGE_DTYPE[store.logical_dtype])
    n, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while True:
        for array in (S.LATENTS, S.LATENTS_FLIP):
            for chunk in range(store.num_chunks):
                n += len(store.read_chunk_stored(chunk, array, out=out))
        if time.perf_counter() - t0 >= MIN_DECODE_SECONDS:
            if cpu_ms is not None:
                cpu_ms.append((time.thread_time() - c0) / n * 1e3)
            return Measurement(n, time.perf_counter() - t0)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (the loader's workers,
    joined when it closes)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _encode_ms_per_sample(layout: StoreLayout, latents: np.ndarray, rounds: int) -> float | None:
    """Median over ``rounds`` of the codec's encode CPU time (this thread's) per sample, chunk by chunk
    (None: no codec)."""
    from pipeline.store.layout import to_stored

    codec = numcodecs_codec(layout)
    if codec is None:
        return None
    stored = to_stored(latents, layout.dtype)
    k = layout.samples_per_chunk
    chunks = [np.ascontiguousarray(stored[i:i + k]) for i in range(0, len(stored), k)]
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for c in chunks:
            codec.encode(c)
        times.append(time.thread_time() - t0)
    return float(np.median(times)) / len(stored) * 1e3


def measure_kind(ctx: BenchContext, kind: str, latents: np.ndarray, flips: np.ndarray,
                 samples_per_chunk: int | None) -> dict[str, dict]:
    """Bytes at rest, encode and decode cost of every option on one kind of latents (N a multiple of
    ``samples_per_chunk``: no padding at rest)."""
    opts = ctx.options
    n, f16 = len(latents), int(np.prod(latents.shape[1:])) * 2
    labels = np.zeros(n, dtype=np.int64)
    root = os.path.join(ctx.work_dir, "codecs", "small", kind)
    shutil.rmtree(root, ignore_errors=True)
    stores, rows = {}, {}
    for name, kw in CODEC_OPTIONS.items():
        folder = os.path.join(root, name)
        layout = StoreLayout(**kw, samples_per_chunk=samples_per_chunk)
        store = write_array_store(folder, latents, labels, latents_flip=flips, num_classes=1, layout=layout)
        stores[name] = store
        layout = layout.resolved(store.latent_shape)
        rows[name] = {"codec": store.spec["layout"]["compressor"], "samples": n,
                      "bytes_per_sample": _store_bytes(folder) / (2 * n), "float16_bytes_per_sample": f16,
                      "encode_ms_per_sample": _encode_ms_per_sample(layout, latents, opts.rounds),
                      "fast_reader": store._chunk_reader(S.LATENTS) is not None}
        rows[name]["bytes_over_float16"] = rows[name]["bytes_per_sample"] / f16
        _decode_pass(store)  # the page cache and the reader's shard index, before timing
    cpu = {name: [] for name in stores}
    m = run_interleaved({name: (lambda s=s, c=cpu[name]: _decode_pass(s, c)) for name, s in stores.items()},
                        opts.rounds, ctx.log)
    for name, ms in m.items():
        rows[name]["decode_ms_per_sample"] = 1e3 / float(np.median(rates(ms)))
        rows[name]["decode_ms_per_sample_rounds"] = [round(1e3 / r, 4) for r in rates(ms)]
        rows[name]["decode_cpu_ms_per_sample"] = float(np.median(cpu[name]))
        rows[name]["decode_cpu_ms_per_sample_rounds"] = [round(c, 4) for c in cpu[name]]
    shutil.rmtree(root, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------------------------
# the loader per codec


def _tiled(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x] * -(-n // len(x)))[:n]


def ensure_codec_loader_stores(ctx: BenchContext, latents: np.ndarray, flips: np.ndarray) -> dict[str, str]:
    """A store of ``--loader-samples`` samples per option, the given latents tiled (cut to whole
    chunks of the tile, so that no chunk holds a sample twice), written once and reused while its
    marker matches: {option: store URI}."""
    opts = ctx.options
    n = max(len(latents), opts.loader_samples - opts.loader_samples % len(latents))
    digest = hashlib.sha256(latents.tobytes() + flips.tobytes()).hexdigest()[:12]
    out = {}
    for name, kw in CODEC_OPTIONS.items():
        params = {"samples": n, "layout": kw, "latents": digest, "quick": opts.quick}
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        folder = os.path.join(ctx.work_dir, "codecs", "loader", f"{name}-{key}")
        marker = os.path.join(folder + ".ready.json")
        try:
            ready = U.read_json(marker)
            if ready.get("store_id") != LatentStore.open(folder).store_id:
                raise ValueError("marker of another store")
        except (FileNotFoundError, ValueError, OSError, StoreError):
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            layout = StoreLayout(**kw) if not opts.quick else StoreLayout(**kw, samples_per_shard=16,
                                                                          samples_per_chunk=4)
            store = write_array_store(folder, _tiled(latents, n), np.arange(n) % 1000, latents_flip=_tiled(flips, n),
                                      num_classes=1000, layout=layout)
            U.write_json(marker, {"store_id": store.store_id, "params": params})
            ctx.log(f"codecs: wrote the {name} loader store ({n} samples) in {time.perf_counter() - t0:.1f} s")
        out[name] = folder
    return out


def measure_loaders(ctx: BenchContext, stores: dict[str, str]) -> tuple[dict[str, list[Measurement]],
                                                                        dict[str, list[float]]]:
    """The trainer's loader on every option's store, interleaved round by round: (measurements,
    CPU ms of the main process and its workers per timed sample, per round)."""
    from trainer.data import LoaderConfig

    opts, bench = ctx.options, _bench_module()
    bench._warm_page_cache(*stores.values())
    k = LatentStore.open(next(iter(stores.values()))).samples_per_chunk
    min_n = max(2 * LoaderConfig.block_chunks * k, 2 * opts.batch)
    seeds = iter(range(5000, 6000))
    cpu: dict[str, list[float]] = {name: [] for name in stores}

    def run(name: str, uri: str) -> Measurement:
        c0 = _cpu_seconds()
        m = bench.measure_ours(uri, opts, next(seeds), min_n)
        cpu[name].append((_cpu_seconds() - c0) / m.amount * 1e3)
        return m

    return run_interleaved({name: (lambda n=name, u=uri: run(n, u)) for name, uri in stores.items()},
                           opts.rounds, ctx.log), cpu


def measure_through_proxy(ctx: BenchContext, stores: dict[str, str]) -> tuple[dict[str, list[Measurement]],
                                                                              dict[str, list[dict]]]:
    """The trainer's loader (default settings, the bench's batch) over the first epoch of each
    :data:`PROXY_OPTIONS` store, uploaded to the bench's S3 server, through the latency proxy at
    :data:`PROXY_DELAY_MS` and :data:`BANDWIDTH_CAP_MB_S` per connection, interleaved round by round:
    (measurements, the proxy's counters per round)."""
    from bench.bench_stream import measure_first_epoch
    from bench.faultproxy import FaultProxy
    from trainer.data import LoaderConfig

    opts, s3 = ctx.options, ctx.s3()
    uris = {}
    for name in PROXY_OPTIONS:
        t0 = time.perf_counter()
        total = s3.upload_dir(stores[name], f"codecs/{name}")
        ctx.log(f"codecs: uploaded the {name} store ({total / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        uris[name] = s3.uri("codecs", name)
    seeds = iter(range(7000, 8000))
    counters: dict[str, list[dict]] = {name: [] for name in PROXY_OPTIONS}
    proxy = FaultProxy(s3.url).start()
    try:
        m = run_interleaved({name: (lambda n=name: measure_first_epoch(
            uris[n], proxy, LoaderConfig(global_batch=opts.batch, num_workers=opts.workers, seed=next(seeds)),
            PROXY_DELAY_MS, BANDWIDTH_CAP_MB_S * 1e6, counters[n])) for name in PROXY_OPTIONS}, opts.rounds, ctx.log)
    finally:
        proxy.stop()
    return m, counters


# --------------------------------------------------------------------------------------------
# the item


@register("codecs", "the latents' codec: bytes at rest, encode and decode cost per sample, loader samples/s")
def codecs(ctx: BenchContext) -> dict:
    opts = ctx.options
    kinds, samples_per_chunk = codec_latents(ctx)
    table = {}
    for kind, (lat, flip, _) in kinds.items():
        ctx.log(f"codecs: bytes, encode and decode on {kind}")
        table[kind] = measure_kind(ctx, kind, lat, flip, samples_per_chunk)
    ctx.log("codecs: the loader on a store per codec")
    lat, flip, _ = kinds["dinov2_random_weights"]
    loader_stores = ensure_codec_loader_stores(ctx, lat, flip)
    loader, loader_cpu = measure_loaders(ctx, loader_stores)
    ctx.log(f"codecs: the loader through the latency proxy ({PROXY_DELAY_MS:g} ms, {BANDWIDTH_CAP_MB_S:g} MB/s "
            "per connection)")
    proxied, proxy_counters = measure_through_proxy(ctx, loader_stores)
    chosen = default_option()
    dino, iid = table["dinov2_random_weights"], table["iid_normal"]
    cap = BANDWIDTH_CAP_MB_S * 1e6
    none_side = side("none", rates(loader["none"]), "samples/s")
    figures, options = [], []
    for name in CODEC_OPTIONS:
        d, r = dino[name], iid[name]
        loader_median = float(np.median(rates(loader[name])))
        options.append({
            "option": name, "default": name == chosen, "codec": d["codec"],
            "bytes_over_float16": {"dinov2_random_weights": round(d["bytes_over_float16"], 4),
                                   "iid_normal": round(r["bytes_over_float16"], 4)},
            "decode_ms_per_sample": {"dinov2_random_weights": round(d["decode_ms_per_sample"], 4),
                                     "iid_normal": round(r["decode_ms_per_sample"], 4)},
            "decode_cpu_ms_per_sample": {"dinov2_random_weights": round(d["decode_cpu_ms_per_sample"], 4),
                                         "iid_normal": round(r["decode_cpu_ms_per_sample"], 4)},
            "encode_ms_per_sample": {"dinov2_random_weights": _r(d["encode_ms_per_sample"]),
                                     "iid_normal": _r(r["encode_ms_per_sample"])},
            "loader_samples_per_s": round(loader_median, 1),
            "loader_cpu_ms_per_sample": round(float(np.median(loader_cpu[name])), 4),
            "loader_cpu_ms_per_sample_rounds": [round(c, 4) for c in loader_cpu[name]],
            "bandwidth_bound_samples_per_s_per_connection": round(cap / d["bytes_per_sample"], 1),
            "proxy_samples_per_s": round(float(np.median(rates(proxied[name]))), 1) if name in proxied else None,
            "proxy_counters": proxy_counters.get(name),
            "fast_reader": d["fast_reader"] and r["fast_reader"],
            "detail": {"dinov2_random_weights": d, "iid_normal": r},
        })
        if name == "none":
            continue
        figures.append(ratio_figure(
            f"{name}{' (default)' if name == chosen else ''}: LatentLoader samples/s local / none's",
            side(name, rates(loader[name]), "samples/s"), none_side,
            note=f"bytes/float16 {d['bytes_over_float16']:.3f} (i.i.d. normal {r['bytes_over_float16']:.3f}); "
                 f"decode CPU {d['decode_cpu_ms_per_sample']:.3f} ms/sample (none "
                 f"{dino['none']['decode_cpu_ms_per_sample']:.3f}); loader CPU "
                 f"{np.median(loader_cpu[name]):.2f} ms/sample (none {np.median(loader_cpu['none']):.2f}); "
                 f"encode CPU {d['encode_ms_per_sample']:.2f} ms/sample; at {BANDWIDTH_CAP_MB_S:.0f} MB/s per "
                 f"connection {cap / d['bytes_per_sample']:.0f} samples/s (none "
                 f"{cap / dino['none']['bytes_per_sample']:.0f})"))
    proxy_none = side("none", rates(proxied["none"]), "samples/s")
    for name in PROXY_OPTIONS[1:]:
        mb = float(np.median([c["mb_per_s"] for c in proxy_counters[name]]))
        flight = float(np.median([c["in_flight_mean"] for c in proxy_counters[name]]))
        figures.append(ratio_figure(
            f"{name}{' (default)' if name == chosen else ''}: samples/s through the proxy "
            f"({PROXY_DELAY_MS:g} ms, {BANDWIDTH_CAP_MB_S:g} MB/s per connection) / none's",
            side(name, rates(proxied[name]), "samples/s"), proxy_none,
            note=f"{mb:.0f} MB/s through the proxy, {flight:.1f} requests in flight (means over the timed epoch); "
                 f"bytes/float16 {dino[name]['bytes_over_float16']:.3f}"))
    return item_result(
        figures,
        settings={
            "options": CODEC_OPTIONS, "default": chosen, "previous_default": PREVIOUS_DEFAULT,
            "proxy": {"process": "python -m bench.faultproxy (own process, 127.0.0.1), no faults",
                      "delay_ms": PROXY_DELAY_MS, "bandwidth_cap_mb_s_per_connection": BANDWIDTH_CAP_MB_S,
                      "options": list(PROXY_OPTIONS), "measured": "the first epoch after its first batch",
                      "s3_endpoint": ctx.s3().describe()},
            "bytes": "latents/ and latents_flip/ objects (shards with index and crc32c) / (2 x samples)",
            "encode": "numcodecs codec of the option on each inner chunk of the stored float16 latents, one "
                      f"thread's CPU time; median of {opts.rounds} passes",
            "decode": "LatentStore.read_chunk_stored of every chunk of both arrays into one reused buffer (the fast "
                      "chunk reader: range read from the warm page cache, crc32c, decode), one thread; options "
                      f"interleaved, median of {opts.rounds} rounds; wall time and the thread's CPU time",
            "loader_cpu": "user + system CPU of the bench process and the loader's workers over a measurement / "
                          "timed samples (worker start, warm-up batch and read-ahead included: the same for every "
                          "option)",
            "loader": {"workers": opts.workers, "batch": opts.batch, "device": opts.device,
                       "rounds": opts.rounds, "seconds": opts.seconds,
                       "store": "the DINOv2-architecture latents (and their flips) tiled to --loader-samples, "
                                "default chunking"},
            "bandwidth_cap_mb_s_per_connection": BANDWIDTH_CAP_MB_S,
        },
        data="; ".join(f"{k}: {v[2]}" for k, v in kinds.items()),
        options=options,
        notes=["real DINOv2 latents need the hub weights, unreachable here: the DINOv2-B architecture with random "
               "weights stands in (LayerNorm-standardized tokens, per-channel scales 0.3-2.7), with i.i.d. normal "
               "numbers for contrast",
               "float16's low byte is mantissa (incompressible); byte shuffle groups the sign/exponent bytes, which "
               "an entropy coder (zstd) compresses and lz4 mostly cannot",
               "through object storage a capped connection delivers cap / bytes per sample: fewer bytes raise the "
               "samples/s of every connection by the inverse of bytes_over_float16"],
    )


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)
