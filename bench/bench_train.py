"""`make bench` items 4 and 6: what cached latents buy the DiT trainer, and how long it waits for data.

``cache_speedup``: the trainer's step (:meth:`trainer.train_dit.DiTTrainer.train_step`, the same
model, optimizer, batch and step randomness) fed two ways, alternated round by round in one process:

- cached: the trainer's own :class:`trainer.data.LatentLoader` on a latent store (normalized latents);
- reference: the reference's data path, every step: a torch Dataset reading the sample JPEG files
  (decode, ADM crop, random horizontal flip, to float) in DataLoader workers, then the frozen encoder
  (DINOv2-B, random weights) in the training process, the store's normalization, then the same step.

The figure is samples/s cached / samples/s reference, for the ``debug`` preset and DiT^DH-S.

``data_wait``: the fraction of the step time the trainer waits for data, read from its own
``logs/metrics.jsonl`` (``data_wait_frac``, per log window, time-weighted over the windows after the
first, which holds the loader's start), from real ``DiTTrainer.train()`` runs of the ``debug``
model on the bench's loader store (768x16x16 float16) with 1 and 2 DataLoader workers.
"""
from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from bench.bench_encode import load_average, sample_image_files
from bench.common import (BENCHMARKS, BenchContext, BenchOptions, Measurement, item_result, rates, ratio_figure,
                          register, run_interleaved, side)

NEGLIGIBLE_WAIT = 0.01  # data-wait fractions below this are noise (a queue hand-over per step)

# --------------------------------------------------------------------------------------------
# sizes


def cache_speedup_params(opts: BenchOptions) -> list[dict]:
    """One entry per preset: its batch (both sides), rounds (alternations of the sides, each side at
    least ``opts.seconds`` and one step per round) and config overrides. On this 2-core CPU the
    reference side's step costs ~0.4 s per image for the encoder, and a DiT^DH-S step (196M
    parameters) tens of seconds: debug at batch 8 in 2 rounds, DiT^DH-S at batch 2 in 1 round.
    CUDA: batch 64 and ``opts.rounds`` for both. Quick: a 1-block encoder and a shrunken DiT^DH-S
    (figures meaningless)."""
    if opts.quick:
        tiny = ["model.hidden_size=64", "model.depth=1", "model.num_heads=2", "model.head_hidden_size=64",
                "model.head_depth=1", "model.head_num_heads=2"]
        return [{"preset": "debug", "batch": 4, "rounds": min(opts.rounds, 2), "overrides": []},
                {"preset": "dit_dh_s_dinov2_256", "batch": 2, "rounds": 1, "overrides": tiny}]
    if torch.device(opts.device).type == "cuda":
        return [{"preset": "debug", "batch": 64, "rounds": opts.rounds, "overrides": []},
                {"preset": "dit_dh_s_dinov2_256", "batch": 64, "rounds": opts.rounds, "overrides": []}]
    return [{"preset": "debug", "batch": 8, "rounds": min(opts.rounds, 2), "overrides": []},
            {"preset": "dit_dh_s_dinov2_256", "batch": 2, "rounds": 1, "overrides": []}]


def encoder_params(opts: BenchOptions) -> dict:
    """The reference path's encoder: the store's (DINOv2-B at 256 px, random weights, seed 0)."""
    return {"name": "dinov2", "resolution": 256, "seed": 0, "depth": 1 if opts.quick else None}


def data_wait_params(opts: BenchOptions) -> dict:
    """Steps per trainer run and its log interval (the first window, with the loader's start, is
    not counted), the workers compared and the rounds (each round runs every worker count once).
    The debug model's step takes ~0.5-1 s at its batch of 16 on this CPU: 16 steps per run."""
    if opts.quick:
        return {"preset": "debug", "steps": 12, "log_every": 4, "workers": [1, 2], "rounds": 1}
    if torch.device(opts.device).type == "cuda":
        return {"preset": "debug", "steps": 200, "log_every": 20, "workers": [1, 2], "rounds": opts.rounds}
    return {"preset": "debug", "steps": 16, "log_every": 4, "workers": [1, 2], "rounds": min(opts.rounds, 2)}


# --------------------------------------------------------------------------------------------
# the trainer's metrics log


def read_run_metrics(run_dir: str) -> list[dict]:
    """The records of ``<run_dir>/logs/metrics.jsonl`` (the trainer's own log), in step order."""
    from trainer.runlog import METRICS_FILE, read_metrics

    path = os.path.join(run_dir, METRICS_FILE)
    records, _ = read_metrics(path)
    if not records:
        raise ValueError(f"{path}: no metric records")
    return sorted(records, key=lambda r: r["step"])


def wait_fraction(records: list[dict], skip: int = 1) -> dict:
    """Data-wait fraction and samples/s over the log windows after the first ``skip``, time-weighted.

    A record at step s covers the steps since the previous record; its window lasted
    ``steps / steps_per_s`` seconds, of which ``data_wait_frac`` waited for data. Returns
    ``{"data_wait_frac", "samples_per_s", "seconds", "steps", "windows": [per-window fraction]}``.
    Raises ValueError when no window is left or a record lacks a rate.
    """
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if len(records) <= skip:
        raise ValueError(f"{len(records)} metric record(s): nothing left after skipping {skip}")
    prev = records[skip - 1]["step"] if skip else 0
    seconds = wait = samples = 0.0
    windows = []
    for rec in records[skip:]:
        try:
            frac, sps, steps_per_s = (float(rec[k]) for k in ("data_wait_frac", "samples_per_s", "steps_per_s"))
        except KeyError as e:
            raise ValueError(f"metric record of step {rec.get('step')} has no {e.args[0]!r}") from None
        steps = rec["step"] - prev
        if steps <= 0 or not steps_per_s > 0:
            raise ValueError(f"metric record of step {rec['step']}: {steps} step(s) at {steps_per_s} steps/s")
        secs = steps / steps_per_s
        seconds, wait, samples = seconds + secs, wait + frac * secs, samples + sps * secs
        windows.append(frac)
        prev = rec["step"]
    return {"data_wait_frac": wait / seconds, "samples_per_s": samples / seconds, "seconds": seconds,
            "steps": records[-1]["step"] - (records[skip - 1]["step"] if skip else 0), "windows": windows}


# --------------------------------------------------------------------------------------------
# the reference's data path


class ReferenceImages(Dataset):
    """The reference trainer's image dataset: JPEG file -> decode -> ADM center crop ->
    random horizontal flip (probability ``hflip_prob``) -> float32 [3, R, R] in [0, 1] (ToTensor).

    ``files[i]`` has label ``labels[i]``; items are (image, label int). The crop is
    :func:`pipeline.preprocess.preprocess_image_bytes`, the encode job's.
    """

    def __init__(self, files: list[str], labels: list[int], resolution: int, hflip_prob: float = 0.5):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        if not files:
            raise ValueError("no image files")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.files, self.labels = list(files), [int(y) for y in labels]
        self.resolution, self.hflip_prob = resolution, hflip_prob

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from pipeline.preprocess import preprocess_image_bytes

        with open(self.files[i], "rb") as f:
            img = torch.from_numpy(preprocess_image_bytes(f.read(), self.resolution))  # uint8 (3, R, R)
        if self.hflip_prob and torch.rand(()) < self.hflip_prob:  # the worker's torch RNG, as RandomHorizontalFlip
            img = torch.flip(img, dims=[2])
        return img.to(torch.float32).div_(255.0), self.labels[i]


def labelled_files(files: list[str]) -> tuple[list[str], list[int]]:
    """(files, labels): label = the index of the file's class folder among the sorted class folders."""
    classes = sorted({os.path.basename(os.path.dirname(p)) for p in files})
    return list(files), [classes.index(os.path.basename(os.path.dirname(p))) for p in files]


def reference_loader(dataset: ReferenceImages, batch: int, workers: int, device: torch.device,
                     seed: int = 0) -> DataLoader:
    """A DataLoader as the reference trainer builds one: shuffled (endless, so that no epoch end is
    timed), ``workers`` processes, default prefetch, pinned memory on CUDA, drop_last."""
    from trainer.data import worker_start_method

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch,
                      sampler=RandomSampler(dataset, num_samples=len(dataset) * 100_000, generator=gen),
                      num_workers=workers, prefetch_factor=2 if workers else None,
                      multiprocessing_context=worker_start_method(workers),  # as our loader's workers
                      pin_memory=device.type == "cuda", drop_last=True)


def reference_batches(loader: DataLoader, encoder: torch.nn.Module, normalizer, device: torch.device,
                      autocast_dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x normalized latents (B, C, g, g), y (B,)) per batch: the encoder forward runs here, in the
    training process, on every batch, as in the reference trainer."""
    for images, labels in loader:
        images = images.to(device, non_blocking=True)                               # (B, 3, R, R)
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                             enabled=autocast_dtype is not None):
            z = encoder(images)                                                     # (B, C, g, g)
        yield normalizer.normalize(z.float()), labels.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# trainer plumbing


def _dist_info(device: str):
    from trainer.distributed import DistInfo

    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return DistInfo(0, 1, 0, dev, None)


def _fresh_dir(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def bench_store(ctx: BenchContext, latent_shape: tuple[int, ...]) -> tuple[str, str]:
    """(store URI, description) of a store of ``latent_shape`` latents for the trainer: the bench's
    loader store (bench.bench.ensure_loader_data) when its shape matches, else (quick runs) a small
    store of random latents written here once per run."""
    data = loader_data(ctx)
    if tuple(data.latent_shape) == tuple(latent_shape):
        return data.store_uri, f"the bench's loader store ({data.num_samples} random float16 latents with flips)"
    key = "train_store_" + "x".join(map(str, latent_shape))
    if key not in ctx.cache:
        from pipeline.store import StoreLayout, write_array_store

        folder = _fresh_dir(os.path.join(ctx.work_dir, "train", "store-" + "x".join(map(str, latent_shape))))
        rng = np.random.default_rng(0)
        n = 32
        write_array_store(folder, rng.standard_normal((n, *latent_shape), dtype=np.float32), rng.integers(0, 1000, n),
                          latents_flip=rng.standard_normal((n, *latent_shape), dtype=np.float32), num_classes=1000,
                          layout=StoreLayout(samples_per_shard=16, samples_per_chunk=4))
        ctx.cache[key] = folder
    return ctx.cache[key], "a small store of random float16 latents with flips (quick)"


def loader_data(ctx: BenchContext):
    """The bench's loader store (``LoaderData``), written or reused by the ``loader_efficiency``
    item's helper. The helper is reached through the registry: ``python -m bench.bench`` runs
    bench/bench.py as ``__main__``, and importing ``bench.bench`` again would run it twice."""
    if "loader_data" in ctx.cache:
        return ctx.cache["loader_data"]
    owner = sys.modules[BENCHMARKS["loader_efficiency"].run.__module__]
    return owner.ensure_loader_data(ctx)


def _train_config(preset: str, overrides: list[str]):
    from trainer.train_dit import resolve_config

    return resolve_config(preset, ["train.progress=false", "train.tensorboard=false", *overrides])


# --------------------------------------------------------------------------------------------
# 4. cache_speedup


def _step_side(trainer, batches: Iterator, min_seconds: float, wait: list[float]) -> Measurement:
    """Trainer steps on ``batches`` until ``min_seconds`` have passed (at least one); adds the time
    spent fetching batches to ``wait[0]``. ``train_step`` ends with a host sync (loss.tolist())."""
    batch = trainer.cfg.data.global_batch
    n, t0 = 0, time.perf_counter()
    while True:
        tw = time.perf_counter()
        x, y = next(batches)
        wait[0] += time.perf_counter() - tw
        trainer.step += 1
        trainer.train_step(x, y)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return Measurement(n * batch, elapsed)


def measure_cache_speedup(ctx: BenchContext, spec: dict, store_uri: str, files: list[str], labels: list[int],
                          encoder) -> dict:
    """One preset: a DiTTrainer on the store; an untimed warm-up step on each side (loader and
    worker start, optimizer state, first encoder call; the cached loader's first read-ahead ends
    during the reference step), then ``rounds`` rounds of both sides in rotated order. Returns the
    figure."""
    from trainer.models.dit import count_parameters
    from trainer.train_dit import DiTTrainer

    opts, B, W = ctx.options, spec["batch"], ctx.options.workers
    cfg = _train_config(spec["preset"], [f"data.global_batch={B}", f"data.num_workers={W}",
                                         "train.grad_accum_steps=1", *spec["overrides"]])
    run_dir = _fresh_dir(os.path.join(ctx.work_dir, "train", "cache_speedup", spec["preset"]))
    trainer = DiTTrainer(cfg, store_uri, run_dir, dist_info=_dist_info(opts.device))
    reference = None
    try:
        device = trainer.device
        encoder = encoder.to(device)
        dataset = ReferenceImages(files, labels, encoder.resolution)
        cached = iter(trainer.loader)
        reference = reference_batches(reference_loader(dataset, B, W, device), encoder, trainer.normalizer, device,
                                      trainer.autocast_dtype)
        waits = {"cached": [0.0], "reference": [0.0]}
        with trainer.train_context():  # what DiTTrainer.train() sets around its loop
            trainer.train_model.train()
            t0 = time.perf_counter()
            _step_side(trainer, cached, 0.0, [0.0])
            _step_side(trainer, reference, 0.0, [0.0])
            ctx.log(f"  {spec['preset']}: warm-up {time.perf_counter() - t0:.1f} s")
            m = run_interleaved({
                "cached": lambda: _step_side(trainer, cached, opts.seconds, waits["cached"]),
                "reference": lambda: _step_side(trainer, reference, opts.seconds, waits["reference"]),
            }, spec["rounds"], lambda msg: ctx.log(f"  {spec['preset']}:{msg[1:]}"))
        params = count_parameters(trainer.model)
        model = type(trainer.model).__name__
    finally:
        if reference is not None:
            reference.close()  # drops the DataLoader iterator: its workers exit
        trainer.close()
        del trainer
        gc.collect()

    def described(name: str, label: str) -> dict:
        total_s = sum(x.seconds for x in m[name])
        return side(label, rates(m[name]), "samples/s", steps=[round(x.amount / B) for x in m[name]],
                    seconds=[round(x.seconds, 3) for x in m[name]],
                    data_wait_frac=round(waits[name][0] / total_s, 4))

    cached_side = described("cached", "cached latents (LatentLoader)")
    reference_side = described("reference", "JPEG decode + crop (workers) + encoder forward")
    return ratio_figure(
        f"{spec['preset']}: train step on cached latents / on the reference's data path",
        cached_side, reference_side,
        note=f"{model} {params / 1e6:.1f}M parameters, batch {B}, {W} DataLoader workers each side; time spent "
             f"fetching batches: cached {cached_side['data_wait_frac']:.1%}, reference "
             f"{reference_side['data_wait_frac']:.1%} (decode + encoder)")


@register("cache_speedup", "train-dit samples/s on cached latents / on the reference's JPEG + encoder data path")
def cache_speedup(ctx: BenchContext) -> dict:
    from pipeline.encoders import build_encoder, latent_shape
    from pipeline.sample_data import ensure_sample_data

    opts, enc = ctx.options, encoder_params(ctx.options)
    load_start = load_average()
    files, labels = labelled_files(sample_image_files(ensure_sample_data(opts.sample_data)))
    shape = latent_shape(enc["name"], enc["resolution"])
    store_uri, store_desc = bench_store(ctx, shape)
    encoder, weights_info = build_encoder(enc["name"], enc["resolution"], weights="random", seed=enc["seed"],
                                          depth=enc["depth"])
    figures, specs = [], cache_speedup_params(opts)
    for spec in specs:
        ctx.log(f"cache_speedup: {spec['preset']} (batch {spec['batch']}, {spec['rounds']} round(s))")
        figures.append(measure_cache_speedup(ctx, spec, store_uri, files, labels, encoder))
    return item_result(
        figures,
        settings={
            "presets": [{k: s[k] for k in ("preset", "batch", "rounds", "overrides")} for s in specs],
            "overrides_both_sides": ["data.global_batch=<batch>", f"data.num_workers={opts.workers}",
                                     "train.grad_accum_steps=1"],
            "step": "DiTTrainer.train_step on the same trainer (model, AdamW, EMA, step randomness) for both sides",
            "measurement": f"per round and side: steps until >= {opts.seconds} s (at least 1); sides alternated "
                           "in rotated order; one untimed warm-up step on each side before",
            "cached_side": {"loader": "trainer.data.LatentLoader as the trainer builds it", "store": store_uri,
                            "store_data": store_desc},
            "reference_side": {
                "dataset": f"{len(files)} sample JPEGs, read per item; decode + ADM crop + random h-flip + to float "
                           "in DataLoader workers",
                "dataloader": {"workers": opts.workers, "shuffle": True, "prefetch_factor": 2 if opts.workers else None,
                               "drop_last": True},
                "encoder": {"name": enc["name"], "arch": "DINOv2-B/14 reg4",
                            "depth": enc["depth"] or "full (12 blocks)", "weights": weights_info,
                            "resolution": enc["resolution"], "where": "the training process, every step, no grad",
                            "autocast": "bf16 on CUDA (as the step), off on the CPU"},
                "normalization": "the trainer's normalizer (the store's statistics)"},
            "threads": {"main_process_torch_threads": torch.get_num_threads(), "dataloader_worker_torch_threads": 1,
                        "cpus": os.cpu_count()},
            "device": opts.device,
        },
        data="cached: random float16 latents of the encoder's shape; reference: the built-in sample JPEGs",
        load_average={"start": load_start, "end": load_average()},
        notes=["both sides run the identical DiT step; the ratio is the data path's cost: on a 2-core CPU a "
               "large DiT step dwarfs the encoder, a small one does not",
               "side values are per round; data_wait_frac is the share of the side's time spent fetching batches "
               "(for the reference side that includes the encoder forward)"],
    )


# --------------------------------------------------------------------------------------------
# 6. data_wait


def run_trainer(store_uri: str, run_dir: str, preset: str, overrides: list[str], device: str) -> list[dict]:
    """A real ``DiTTrainer.train()`` run in a fresh ``run_dir``; returns its metrics records."""
    from trainer.train_dit import DiTTrainer

    cfg = _train_config(preset, overrides)
    _fresh_dir(run_dir)
    DiTTrainer(cfg, store_uri, run_dir, dist_info=_dist_info(device)).train()
    return read_run_metrics(run_dir)


@register("data_wait", "the trainer's data-wait fraction (its own metrics log) with 2 / 1 DataLoader workers")
def data_wait(ctx: BenchContext) -> dict:
    opts, p = ctx.options, data_wait_params(ctx.options)
    load_start = load_average()
    data = loader_data(ctx)
    runs: dict[int, list[dict]] = {w: [] for w in p["workers"]}
    for r in range(p["rounds"]):
        order = p["workers"][r % len(p["workers"]):] + p["workers"][:r % len(p["workers"])]
        for w in order:
            run_dir = os.path.join(ctx.work_dir, "train", "data_wait", f"workers-{w}")
            t0 = time.perf_counter()
            records = run_trainer(data.store_uri, run_dir, p["preset"],
                                  [f"data.num_workers={w}", f"train.max_steps={p['steps']}",
                                   f"train.log_every={p['log_every']}", f"train.ckpt_every={p['steps']}"],
                                  opts.device)
            got = wait_fraction(records, skip=1)
            got["run_seconds"] = round(time.perf_counter() - t0, 2)
            runs[w].append(got)
            ctx.log(f"  round {r + 1}/{p['rounds']} {w} worker(s): wait {got['data_wait_frac']:.3f} of the step time, "
                    f"{got['samples_per_s']:.0f} samples/s (run {got['run_seconds']:.1f} s)")
        shutil.rmtree(os.path.join(ctx.work_dir, "train", "data_wait"), ignore_errors=True)

    def wait_side(w: int) -> dict:
        rs = runs[w]
        return side(f"{w} DataLoader worker{'s' if w > 1 else ''}", [x["data_wait_frac"] for x in rs],
                    "of step time", samples_per_s=[round(x["samples_per_s"], 1) for x in rs],
                    windows=[[round(f, 4) for f in x["windows"]] for x in rs],
                    timed_seconds=[round(x["seconds"], 2) for x in rs])

    def rate_side(w: int) -> dict:
        return side(f"{w} DataLoader worker{'s' if w > 1 else ''}", [x["samples_per_s"] for x in runs[w]],
                    "samples/s")

    hi, lo = max(p["workers"]), min(p["workers"])
    batch = _train_config(p["preset"], []).data.global_batch
    waits = [wait_side(hi), wait_side(lo)]
    note = "data_wait_frac from the trainer's logs/metrics.jsonl, time-weighted over the log windows after the first"
    if max(w["median"] for w in waits) < NEGLIGIBLE_WAIT:
        note += (f"; both below {NEGLIGIBLE_WAIT:.0%}: the loader keeps ahead of the step with either worker count "
                 "and the ratio compares noise")
    step_time = {f"{w} workers": round(batch / float(np.median([x["samples_per_s"] for x in runs[w]])), 4)
                 for w in p["workers"]}
    return item_result(
        [ratio_figure(f"data-wait fraction, {hi} workers / {lo} worker", *waits, note=note),
         ratio_figure(f"trainer samples/s, {hi} workers / {lo} worker", rate_side(hi), rate_side(lo))],
        settings={"preset": p["preset"], "global_batch": batch, "steps_per_run": p["steps"],
                  "log_every": p["log_every"], "windows_counted": "all but the first", "step_time_s": step_time,
                  "rounds": p["rounds"], "workers": p["workers"], "run": "DiTTrainer.train() in a fresh run directory",
                  "store": {"uri": data.store_uri, "samples": data.num_samples, "latent_shape": list(data.latent_shape),
                            "bytes_per_sample": round(data.bytes_per_sample, 1), "dtype": "float16", "flips": True},
                  "threads": {"main_process_torch_threads": torch.get_num_threads(),
                              "dataloader_worker_torch_threads": 1, "cpus": os.cpu_count()},
                  "device": opts.device},
        data="the bench's loader store: random normal latents stored as float16 (zstd), with flips",
        load_average={"start": load_start, "end": load_average()},
        notes=["the debug model (a tiny DiT^DH) keeps the step short so that the data path can show; a "
               "fraction near 0 on both sides means the loader keeps ahead of the step with either worker count",
               "runs alternate the worker counts round by round"],
    )


__all__ = ["ReferenceImages", "cache_speedup_params", "data_wait_params", "labelled_files", "read_run_metrics",
           "reference_batches", "reference_loader", "run_trainer", "wait_fraction"]
