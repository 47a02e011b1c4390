"""`make bench` item 1, ``encode_efficiency``: the whole encode job's images/s / the bare encoder forward's.

Numerator: the encode job (:func:`pipeline.encode.encode`: source files -> read and ADM-crop tasks ->
encoder actor -> write tasks -> a finished store), timed by the job itself: the steady state (from the
first shard's completion to the last's, ``EncodeResult.details["steady_images_per_s"]``) and end to
end (``images_encoded / seconds``: listing, the driver's encoder, Ray start, actor start, finalize).

Denominator: the same encoder (built by the job's own :func:`pipeline.encode.build_configured_encoder`,
same random weights), the same micro-batch, float32, device and thread count, two forwards per image
(image and flip, :func:`pipeline.encode_tasks.encode_pixels`, the function the actor runs) on uint8 images
already in memory; measured before and after the job (both reported, their median is the figure's).

The data: the built-in sample images copied (not re-encoded) round-robin to ``images`` files, so that
several shards follow the first one and the steady state is measured over most of the job.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import torch

from bench.common import (BenchContext, BenchOptions, Measurement, item_result, ratio_figure, register,
                          sample_image_files, side)
from pipeline import uri as U

STEADY_TARGET = ">= 0.9"
BARE_SPREAD_WARNING = 1.25  # bare rates before/after the job further apart than this: a noisy machine


def encode_params(opts: BenchOptions) -> dict:
    """Sizes of the item. CPU: the real DINOv2-B (12 blocks) on 48 images in 6 shards of 8, one
    micro-batch of 8 per shard and orientation (~0.4 s per image forward on this 2-core CPU); the
    bare side times 8 images (one shard's worth) per measurement. CUDA: 2048 images in shards of 256,
    micro-batch 64, 512 bare images. Quick: a 1-block encoder, 12 images in shards of 4 (figures
    meaningless)."""
    if opts.quick:
        return {"images": 12, "samples_per_shard": 4, "batch_size": 4, "bare_images": 4, "depth": 1,
                "resolution": 256}
    if torch.device(opts.device).type == "cuda":
        return {"images": 2048, "samples_per_shard": 256, "batch_size": 64, "bare_images": 512, "depth": None,
                "resolution": 256}
    return {"images": 48, "samples_per_shard": 8, "batch_size": 8, "bare_images": 8, "depth": None,
            "resolution": 256}


# --------------------------------------------------------------------------------------------
# pieces


def replicate_images(files: list[str], dest: str, count: int) -> tuple[str, list[str]]:
    """An ImageFolder ``dest/train/<class>/...`` of ``count`` copies of ``files`` taken round-robin
    (copy j of ``<split>/<class>/<name>.<ext>`` is ``train/<class>/<name>-<split>-r<j>.<ext>``: the
    sample data has the same names in train and val).

    Written once: a marker file lists what is there and a matching one is reused. Returns (dest,
    the copies in the order of ``files`` round-robin)."""
    if not files:
        raise ValueError("no image files to replicate")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    plan = []
    for i in range(count):
        src = files[i % len(files)]
        stem, ext = os.path.splitext(os.path.basename(src))
        class_dir = os.path.dirname(src)
        split = os.path.basename(os.path.dirname(class_dir))
        rel = f"train/{os.path.basename(class_dir)}/{stem}-{split}-r{i // len(files)}{ext}"
        plan.append((src, rel, os.path.getsize(src)))
    if len({rel for _, rel, _ in plan}) != count:
        raise ValueError("image files with the same class folder and name in the same split: copies would collide")
    marker = os.path.join(dest, "replicas.json")
    want = [[rel, size] for _, rel, size in plan]
    try:
        if U.read_json(marker) == want:
            return dest, [os.path.join(dest, rel) for _, rel, _ in plan]
    except (FileNotFoundError, ValueError):
        pass
    shutil.rmtree(dest, ignore_errors=True)
    for src, rel, _ in plan:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(dest, rel))
    U.write_json(marker, want)  # last: a half-written folder has no marker and is rewritten
    return dest, [os.path.join(dest, rel) for _, rel, _ in plan]


def shard_completions(store_uri: str, num_shards: int) -> list[tuple[float, int]]:
    """(completion time, images) of each shard of a local store: the modification time of the
    shard's completion record, which the job's write task writes right after the shard's objects,
    and the record's row count. Sorted by time."""
    from schemas import store_v1 as S

    if not U.is_local(store_uri):
        raise ValueError(f"{store_uri}: shard completion times need a local store")
    out = []
    for shard in range(num_shards):
        path = os.path.join(U.normalize(store_uri), S.record_name(shard))
        record = U.read_json(path)
        out.append((os.path.getmtime(path), int(record["stop"]) - int(record["start"])))
    return sorted(out)


def steady_rate(completions: list[tuple[float, int]]) -> dict:
    """Images/s once the first shard is done: images of the later shards / time from the first
    completion to the last. ``completions``: (time in s, images) per shard, any order. Also the
    per-shard intervals (s). Raises ValueError for fewer than two shards or no elapsed time."""
    done = sorted(completions)
    if len(done) < 2:
        raise ValueError(f"{len(done)} shard(s) completed; a steady state needs at least 2")
    span = done[-1][0] - done[0][0]
    if span <= 0:
        raise ValueError("the shards completed at the same instant: no steady state to measure")
    images = sum(n for _, n in done[1:])
    return {"images_per_s": images / span, "images": images, "seconds": span,
            "intervals_s": [round(b[0] - a[0], 3) for a, b in zip(done, done[1:])]}


def encode_rates(result, completions: list[tuple[float, int]]) -> dict:
    """Rates of one fresh encode job (:class:`pipeline.encode.EncodeResult`) and its shards'
    completions (:func:`shard_completions`).

    steady: :func:`steady_rate` of the completions (the write tasks' clock); steady_driver: the
    job's own ``steady_images_per_s`` (the driver's clock, when each shard's row reaches it);
    end_to_end: images / the job's wall seconds (listing, encoder build, Ray and actor start,
    finalize); ray_pipeline: images / the Ray pipeline's seconds. Raises ValueError when the job
    reused a store, failed images or wrote fewer than two shards."""
    if result.reused:
        raise ValueError(f"the encode job reused the complete store {result.uri}; the bench needs a fresh job")
    if result.num_failed:
        raise ValueError(f"the encode job recorded {result.num_failed} failed image(s) in {result.uri}")
    if result.shards_encoded < 2 or "steady_images_per_s" not in result.details:
        raise ValueError(f"the encode job wrote {result.shards_encoded} shard(s); a steady state needs at least 2")
    if result.seconds <= 0 or result.encode_seconds <= 0:
        raise ValueError("the encode job reports no elapsed time")
    steady = steady_rate(completions)
    return {"steady": steady["images_per_s"], "steady_images": steady["images"], "steady_seconds": steady["seconds"],
            "shard_intervals_s": steady["intervals_s"],
            "steady_driver": float(result.details["steady_images_per_s"]),
            "end_to_end": result.images_encoded / result.seconds,
            "ray_pipeline": result.images_encoded / result.encode_seconds,
            "first_shard_s": float(result.details.get("first_shard_s", float("nan")))}


def read_pixels(files: list[str], resolution: int) -> np.ndarray:
    """uint8 [n, 3, R, R]: the files decoded and ADM-cropped as the job's read tasks do."""
    from pipeline.preprocess import preprocess_image_bytes

    out = np.zeros((len(files), 3, resolution, resolution), dtype=np.uint8)
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            out[i] = preprocess_image_bytes(f.read(), resolution)
    return out


def bare_forward(encoder, pixels: np.ndarray, batch_size: int, flips: bool, device: torch.device,
                 threads: int) -> Measurement:
    """Images/s of :func:`pipeline.encode_tasks.encode_pixels` (the actor's function: micro-batches of
    ``batch_size``, the flip as its own forward) on ``pixels`` in memory, with ``threads`` torch
    intra-op threads (restored after)."""
    from pipeline.encode_tasks import encode_pixels

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        encode_pixels(encoder, pixels, batch_size, flips, device)  # returns host arrays: synchronized
        return Measurement(len(pixels), time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (runnable processes; None where unknown):
    beside a figure, it says how busy a shared machine was while it was measured."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _encoder_device() -> torch.device:
    # The encode actor computes on CUDA whenever it is available (pipeline.encode.ShardEncoder);
    # the bare side follows it so that both sides run on the same device.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# the item


@register("encode_efficiency", "the encode job's images/s (steady state; end to end) / the bare encoder forward's")
def encode_efficiency(ctx: BenchContext) -> dict:
    from pipeline.encode import EncodeConfig, build_configured_encoder, encode
    from pipeline.sample_data import ensure_sample_data

    p = encode_params(ctx.options)
    load_start = load_average()
    # Both sides use this many torch threads: the actor pins exactly EncodeConfig.threads. CPU: this
    # process's threads (all cores); CUDA: 4, the job's default for GPU actors, leaving the other CPUs
    # to the read tasks (the actor reserves as many Ray CPUs as threads).
    device = _encoder_device()
    threads = 4 if device.type == "cuda" else torch.get_num_threads()
    sample_root = ensure_sample_data(ctx.options.sample_data)
    images_root, copies = replicate_images(sample_image_files(sample_root),
                                           os.path.join(ctx.work_dir, "encode", f"images-{p['images']}"), p["images"])
    out = os.path.join(ctx.work_dir, "encode", "stores")
    cfg = EncodeConfig(
        encoder="dinov2", data=images_root, out=out, weights="random", weights_seed=0, split="train",
        resolution=p["resolution"], samples_per_shard=p["samples_per_shard"], batch_size=p["batch_size"],
        flips=True, num_actors=1, threads=threads, progress=False,
        encoder_overrides={"depth": p["depth"]} if p["depth"] else None)

    # The bare side: the job's encoder builder, the job's weights (random, seed 0), real decoded pixels.
    encoder, weights_info = build_configured_encoder(cfg)
    encoder = encoder.to(device)
    pixels = read_pixels(copies[:p["bare_images"]], p["resolution"])

    def bare(label: str) -> Measurement:
        m = bare_forward(encoder, pixels, cfg.batch_size, cfg.flips, device, threads)
        ctx.log(f"  bare encoder forward ({label}): {m.rate:.2f} images/s ({m.amount:.0f} in {m.seconds:.1f} s)")
        return m

    ctx.log(f"encode_efficiency: warm-up forward, then bare / encode job ({p['images']} images) / bare")
    # Untimed warm-up: 2 images on the CPU (thread pool, caches); a whole micro-batch on CUDA (its kernels).
    bare_forward(encoder, pixels[:cfg.batch_size if device.type == "cuda" else 2], cfg.batch_size, False, device,
                 threads)
    before = bare("before the job")
    shutil.rmtree(out, ignore_errors=True)  # a complete store would be reused: always a fresh job
    result = encode(cfg)
    rates_ = encode_rates(result, shard_completions(result.uri, result.num_shards))
    if result.images_encoded != p["images"]:
        raise RuntimeError(f"the encode job encoded {result.images_encoded} images of {images_root}, "
                           f"the bench copied {p['images']} there")
    ctx.log(f"  encode job: steady {rates_['steady']:.2f} images/s (driver clock {rates_['steady_driver']:.2f}), "
            f"end to end {rates_['end_to_end']:.2f} images/s "
            f"({result.images_encoded} images in {result.seconds:.1f} s, first shard after "
            f"{rates_['first_shard_s']:.1f} s)")
    after = bare("after the job")
    del encoder

    ex = result.details
    bare_side = side("bare encoder forward, before and after the job", [before.rate, after.rate], "images/s",
                     measurements=[before.to_dict(), after.to_dict()], torch_threads=threads, device=device.type)
    figures = [
        ratio_figure(
            "encode job, steady state / bare encoder forward",
            side("encode job after its first shard", [rates_["steady"]], "images/s", images=rates_["steady_images"],
                 seconds=round(rates_["steady_seconds"], 3), shard_intervals_s=rates_["shard_intervals_s"],
                 driver_clock_images_per_s=round(rates_["steady_driver"], 4),
                 actor_threads=ex.get("threads_per_actor")),
            bare_side, target=STEADY_TARGET,
            note=f"from the shards' completion records (the job's driver clock says {rates_['steady_driver']:.3g} "
                 f"images/s); actor pinned {ex.get('threads_per_actor')} torch threads, bare side {threads}; "
                 "2 forwards per image (image + flip) on both sides"),
        ratio_figure(
            "encode job, end to end (incl. Ray start) / bare encoder forward",
            side("encode job, whole", [rates_["end_to_end"]], "images/s", images=result.images_encoded,
                 seconds=round(result.seconds, 3), ray_pipeline_seconds=round(result.encode_seconds, 3),
                 first_shard_s=round(rates_["first_shard_s"], 3)),
            bare_side,
            note=f"{result.images_encoded} images; the fixed start (encoder build, Ray, actor) weighs less "
                 "in a longer job"),
    ]
    store_dtype = cfg.dtype
    shutil.rmtree(out, ignore_errors=True)
    notes = []
    spread = max(before.rate, after.rate) / min(before.rate, after.rate)
    if spread > BARE_SPREAD_WARNING:
        notes.append(f"the bare forward before and after the job differ {spread:.2f}x: the machine's load changed "
                     "during the measurement (see load_average); the figure is uncertain by as much")
    return item_result(
        figures,
        settings={
            "encoder": {"name": "dinov2", "arch": "DINOv2-B/14 reg4", "depth": p["depth"] or "full (12 blocks)",
                        "weights": weights_info, "resolution": p["resolution"], "compute_dtype": "float32"},
            "images": result.images_encoded, "samples_per_shard": cfg.samples_per_shard,
            "shards": result.num_shards, "micro_batch": cfg.batch_size, "forwards_per_image": 2,
            "store": {"dtype": store_dtype, "compressor": cfg.compressor, "flips": True},
            "device": {"job_actor": "cuda" if ex.get("actor_gpus") else "cpu", "bare": device.type},
            "threads": {"job_actor_pinned_torch_threads": ex.get("threads_per_actor"),
                        "job_actor_ray_cpus": ex.get("actor_cpus"), "bare_torch_threads": threads,
                        "cpus": os.cpu_count()},
            "job": {"num_actors": ex.get("num_actors"), "ray_cluster": ex.get("ray_cluster"),
                    "read_tasks": "as many as Ray schedules"},
            "bare_images_per_measurement": len(pixels),
            "steady_state": "images of the later shards / time from the first shard's completion to the last's, "
                            "completion = the modification time of the shard's completion record (written by the "
                            "job's write task after the shard's objects); the job's own steady_images_per_s (driver "
                            "clock: when each shard's row reaches the driver) is beside it",
            "end_to_end": "encode() wall time: source listing, driver encoder build, Ray start, actor start, "
                          "read/encode/write, finalize",
        },
        data=f"built-in sample images (24 JPEGs, 300-1024 px) copied round-robin to {p['images']} files",
        notes=notes + [
            f"steady state by the job's driver clock / by the completion records: "
            f"{rates_['steady_driver'] / rates_['steady']:.3g} (above 1 when the first shard's row reaches the driver "
            "later after its write than the last one's, which shortens the driver's interval)",
            "the actor reserves fewer Ray CPUs than its threads so that read and write tasks can run: on this "
            "machine they share the cores with the actor's threads, as in any CPU encode",
            f"bare side: encode_pixels on {len(pixels)} decoded images in memory after an untimed warm-up forward "
            "(2 images; a micro-batch on CUDA); the encoder is built once (the encode contributor's "
            "encoder_forward_throughput rebuilds and re-warms it per call)",
        ],
        load_average={"start": load_start, "end": load_average()},
        encode_result={"uri": result.uri, "store_id": result.store_id, "seconds": round(result.seconds, 3),
                       "encode_seconds": round(result.encode_seconds, 3), "images_encoded": result.images_encoded,
                       "execution": ex},
    )


__all__ = ["bare_forward", "encode_params", "encode_rates", "load_average", "read_pixels", "replicate_images",
           "sample_image_files", "shard_completions", "steady_rate"]
