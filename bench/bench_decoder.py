"""`make bench` item ``decoder_data``: what fitting the decoder on cached center-crop latents costs,
against the released recipe's data.

The released stage-1 trainer feeds the decoder Resize(384) + RandomCrop(256) images through the
frozen encoder at every step (``fit-decoder --set data.mode=encode_on_the_fly``, the
``decoder_b_dinov2_reference`` preset); our default fits the store's cached latents of the ADM
center crops (``data.mode=cached``): no encoder in the loop, but one fixed crop per image. This item
fits one decoder each way, from the same init for the same steps, on the built-in sample data
encoded by DINOv2-B with **random weights** (the hubs are unreachable here), and compares the two:

- reconstruction quality, PSNR (dB) and SSIM of each decoder's EMA weights on the held-out ``val``
  images (the val store's latents, decoded as they are, against their center crops), and the same on
  the training images; rFID only with ``--inception-weights FILE`` (on a handful of images: a
  pipeline check, comparable to nothing published);
- the price of the released recipe, seconds per training step each way.

Random encoder weights make this a **pipeline check**: it shows both data paths train the same
decoder to comparable numbers on this machine, not what either costs with real DINOv2 latents.

Sizes: the ``debug`` decoder preset (width 64, 2 layers, 64 px output; LPIPS and the discriminator
with random weights), its batch of 8, 8 steps each way, the released recipe's latent noise
(tau * U(0, 1)); ``--quick``: a 1-block encoder and 2 steps (figures meaningless).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch

from bench.common import BenchContext, BenchOptions, item_result, ratio_figure, register, side

LABEL = "pipeline check (random encoder weights)"
MODES = {"cached": "cached center-crop latents (our default)",
         "encode_on_the_fly": "Resize(384) + RandomCrop(256) through the encoder (released recipe)"}


def decoder_data_params(opts: BenchOptions) -> dict:
    """Encoder depth (None: the real 12 blocks), steps per fit, batch. 8 steps of batch 8 are 4
    epochs of the 16 sample images: every term of the debug preset runs (LPIPS from epoch 1, D from
    2, GAN from 3); LPIPS-VGG dominates a step on the CPU (~1-2 s), so both fits and the two encodes
    take 2-3 min on this 2-core CPU. Quick: a 1-block encoder, 2 steps."""
    if opts.quick:
        return {"depth": 1, "steps": 2, "batch": 8}
    return {"depth": None, "steps": 8, "batch": 8}


def encode_sample_stores(ctx: BenchContext, depth: int | None) -> dict[str, str]:
    """{"train", "val"}: stores of the built-in sample data (DINOv2-B, random weights seed 0, no
    flips), made once under the work folder; a complete store is reused."""
    from pipeline.encode import EncodeConfig, encode, ray_session
    from pipeline.sample_data import ensure_sample_data

    root = ensure_sample_data(ctx.options.sample_data)
    out = os.path.join(ctx.work_dir, "decoder_data", "stores")
    stores = {}
    with ray_session(None):  # one local Ray for both jobs (each would start and stop its own)
        for split in ("train", "val"):
            t0 = time.perf_counter()
            result = encode(EncodeConfig(encoder="dinov2", data=root, out=out, weights="random", weights_seed=0,
                                         split=split, flips=False, batch_size=8, num_actors=1, progress=False,
                                         encoder_overrides={"depth": depth} if depth else None))
            ctx.log(f"decoder_data: {split} store {'reused' if result.reused else 'encoded'} "
                    f"({time.perf_counter() - t0:.1f} s): {result.uri}")
            stores[split] = result.uri
    return stores


def fit_overrides(mode: str, steps: int, batch: int) -> list[str]:
    """The ``debug`` preset fitted ``steps`` steps on ``mode``'s data with the released noise rule;
    one checkpoint at the end, no grids, no progress bar."""
    return [f"data.mode={mode}", "data.encoder_weights=random", f"data.global_batch={batch}",
            f"train.max_steps={steps}", f"train.ckpt_every={steps}", "train.grid_samples=0",
            "train.progress=false", "train.tensorboard=false", "loss.noise_rule=uniform"]


def step_seconds(run_dir: str) -> float:
    """Seconds per training step after the first logged window (which holds the loader's start),
    from the trainer's own metrics log (``logs/metrics.jsonl``: a record every ``train.log_every``
    steps with its wall-clock time)."""
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "steps_per_s" in r]
    if len(records) < 2:
        raise RuntimeError(f"{run_dir}: fewer than 2 metric records to time steps with")
    first, last = records[0], records[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"])


def reconstruction_quality(run_dir: str, store_uri: str, extractor=None) -> dict:
    """PSNR (dB) and SSIM of the run's EMA decoder on every valid row of the store (its latents as
    they are, against the center crops resized to the decoder's output), and rFID with ``extractor``."""
    from pipeline.store import LatentStore
    from trainer.images import decode_uint8, store_samples
    from trainer.loading import load_decoder
    from trainer.metrics.pixels import psnr, ssim

    decoder = load_decoder(run_dir)
    store = LatentStore.open(store_uri)
    latents, originals, rows = store_samples(store, int(store.valid().sum()), decoder.image_size)
    recons = decode_uint8(decoder.model, latents, "cpu")
    out = {"psnr": float(psnr(originals, recons)), "ssim": float(ssim(originals, recons)), "images": int(len(rows))}
    if extractor is not None:
        from trainer.metrics.fid import feature_statistics, frechet_distance_from_features
        from trainer.metrics.inception import inception_features

        def hwc(t: torch.Tensor) -> np.ndarray:
            return t.permute(0, 2, 3, 1).contiguous().numpy()

        mu, sigma = feature_statistics(inception_features(hwc(originals), extractor, 16)["pool"])
        out["rfid"] = float(frechet_distance_from_features(inception_features(hwc(recons), extractor, 16)["pool"],
                                                           mu, sigma))
    return out


@register("decoder_data", "decoder PSNR/SSIM fitted on cached center-crop latents / on the released recipe's "
                          "random crops through the encoder (same steps; random encoder weights)")
def decoder_data(ctx: BenchContext) -> dict:
    from trainer.fit_decoder import fit_decoder, resolve_config

    p = decoder_data_params(ctx.options)
    stores = encode_sample_stores(ctx, p["depth"])
    extractor, inception = None, None
    if ctx.options.inception_weights:
        from trainer.metrics.inception import load_inception

        extractor, _ = load_inception(ctx.options.inception_weights, "cpu")
        inception = dict(extractor.info)
    results: dict[str, dict] = {}
    for mode in MODES:
        run_dir = os.path.join(ctx.work_dir, "decoder_data", "runs", mode)
        if os.path.exists(run_dir):  # a fresh fit every time (an old run directory would resume)
            shutil.rmtree(run_dir)
        cfg = resolve_config("debug", fit_overrides(mode, p["steps"], p["batch"]))
        t0 = time.perf_counter()
        fitted = fit_decoder(cfg, stores["train"], run_dir)
        seconds = time.perf_counter() - t0
        results[mode] = {"steps": fitted.step, "fit_seconds_with_setup": round(seconds, 2),
                         "seconds_per_step": round(step_seconds(run_dir), 4),
                         "val": reconstruction_quality(run_dir, stores["val"], extractor),
                         "train": reconstruction_quality(run_dir, stores["train"], extractor)}
        ctx.log(f"decoder_data: {mode}: {fitted.step} steps in {seconds:.1f} s; val PSNR "
                f"{results[mode]['val']['psnr']:.2f} dB, SSIM {results[mode]['val']['ssim']:.4f}")

    cached, ref = results["cached"], results["encode_on_the_fly"]

    def pair(split: str, metric: str, unit: str, note: str | None = None) -> dict:
        return ratio_figure(
            f"{split} {metric.upper()}: cached latents / released recipe ({LABEL})",
            side(MODES["cached"], [cached[split][metric]], unit),
            side(MODES["encode_on_the_fly"], [ref[split][metric]], unit), note=note)

    figures = [
        pair("val", "psnr", "dB", note=f"held-out images; difference {cached['val']['psnr'] - ref['val']['psnr']:+.2f} "
                                      "dB (cached - released recipe)"),
        pair("val", "ssim", ""),
        pair("train", "psnr", "dB"),
        pair("train", "ssim", ""),
        ratio_figure("seconds per training step: released recipe / cached latents",
                     side("encoder in the loop", [ref["seconds_per_step"]], "s/step"),
                     side("cached latents", [cached["seconds_per_step"]], "s/step"),
                     note="steps after the first logged window, from each run's metrics log; the released "
                          "recipe's step includes the frozen DINOv2-B forward of every training image (CPU here)"),
    ]
    if extractor is not None:
        figures.insert(2, pair("val", "rfid", "", note="rFID on a handful of images: a pipeline check only"))
    return item_result(
        figures,
        settings={"preset": "debug", "overrides": {m: fit_overrides(m, p["steps"], p["batch"]) for m in MODES},
                  "steps": p["steps"], "global_batch": p["batch"], "encoder_depth": p["depth"] or 12,
                  "weights": "encoder, LPIPS and discriminator: seeded random",
                  "evaluation": "EMA weights; val store's latents decoded as they are vs the ADM center crops "
                                "resized to the decoder's 64 px output (bicubic, antialiased)",
                  "inception": inception},
        data="built-in sample data (pipeline.sample_data): train 16 images, val 8; DINOv2-B/14 reg4, random "
             "weights (seed 0)" + (f", {p['depth']} block(s) (quick)" if p["depth"] else ""),
        notes=[f"{LABEL}: the numbers show that both data paths train, not what either costs with the real "
               "encoder; rFID only with --inception-weights FILE"],
        label=LABEL, runs=results, stores=stores,
    )
