"""``make demo``: every stage, end to end, on the built-in sample data, on a CPU, in a few minutes.

encode (DINOv2-B, RANDOM weights) -> fit-decoder (debug) -> train-dit (debug) -> sample -> evaluate
(Inception with RANDOM weights) -> reconstruct, all under one folder (default ``runs/demo/``), with a
Markdown report (``report.md``) showing the sample grid, the reconstruction grid, both loss curves,
the metrics and the store's spec.

The model hubs are unreachable here, so the encoder and the Inception network run with seeded
random weights: every number the demo prints shows the plumbing, not the method's quality. The
output says so. With real weights (``--weights FILE``, ``--inception-weights FILE``) the same
script runs the same stages.

Rerunning reuses what is finished (the store, complete checkpoints, the samples); ``--fresh``
starts over.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Callable

RANDOM_BANNER = """
################################################################################
#  DEMO WITH RANDOM WEIGHTS: the encoder (DINOv2-B) and the Inception network   #
#  run with seeded RANDOM weights (the model hubs are not reachable offline).   #
#  The images and metrics below show that every stage runs end to end; they    #
#  say nothing about the quality of RAE. Pass --weights / --inception-weights   #
#  files for real ones.                                                          #
################################################################################
"""


@dataclasses.dataclass
class DemoConfig:
    out: str = "runs/demo"
    encoder: str = "dinov2"
    weights: str = "random"  # encoder weights: random | hub | FILE
    inception_weights: str = "random"  # random | hub | FILE
    data: str | None = None  # default: the built-in sample data
    store: str | None = None  # an existing latent store: skip the encode stage and use it
    decoder_overrides: tuple[str, ...] = ()
    dit_overrides: tuple[str, ...] = ()
    num_samples: int = 16
    sample_steps: int = 50
    fresh: bool = False


def _stage(name: str, timings: dict, fn: Callable[[], Any]) -> Any:
    print(f"\n=== {name} ===", flush=True)
    t = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - t, 1)
    print(f"=== {name}: {timings[name]} s ===", flush=True)
    return result


def run_demo(cfg: DemoConfig) -> str:
    """Run every stage; returns the path of the report."""
    from pipeline.encode import EncodeConfig, encode
    from pipeline.sample_data import ensure_sample_data
    from trainer import fit_decoder as fd
    from trainer import train_dit as td
    from trainer.evaluate import compute_metrics
    from trainer.metrics.images import store_image_set
    from trainer.metrics.inception import load_inception
    from trainer.metrics.reference import compute_reference_stats, save_reference_stats
    from trainer.reconstruct import reconstruct
    from trainer.sample import SampleConfig, sample

    out = os.path.abspath(cfg.out)
    if cfg.fresh and os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    random_weights = cfg.weights == "random" or cfg.inception_weights == "random"
    if random_weights:
        print(RANDOM_BANNER, flush=True)
    timings: dict[str, float] = {}
    data = cfg.data or (None if cfg.store else ensure_sample_data())

    if cfg.store:
        enc, store, timings["encode"] = None, cfg.store, 0.0
        print(f"\n=== encode: skipped, using the store {store} ===", flush=True)
    else:
        enc = _stage("encode", timings, lambda: encode(EncodeConfig(
            encoder=cfg.encoder, data=data, out=os.path.join(out, "stores"), weights=cfg.weights, split="train",
        )))
        store = enc.uri
    dec_cfg = fd.resolve_config("debug", list(cfg.decoder_overrides))
    dec = _stage("fit-decoder", timings, lambda: fd.fit_decoder(dec_cfg, store, os.path.join(out, "decoder")))
    dit_cfg = td.resolve_config("debug", list(cfg.dit_overrides))
    # The decoder just fitted draws a preview grid at each train-dit checkpoint (dit/previews/).
    dit = _stage("train-dit", timings, lambda: td.train_dit(dit_cfg, store, os.path.join(out, "dit"),
                                                             preview_decoder=dec.checkpoint))

    samples_dir = os.path.join(out, "samples")
    sam = _stage("sample", timings, lambda: sample(
        os.path.join(out, "dit"), os.path.join(out, "decoder"), samples_dir,
        SampleConfig(num=cfg.num_samples, steps=cfg.sample_steps, batch_size=cfg.num_samples, block_size=cfg.num_samples),
    ))
    size = sam.image_shape[0]

    def evaluate() -> dict:
        extractor, _ = load_inception(cfg.inception_weights, "cpu")
        # The reference: the store's own source images, ADM-cropped to the samples' size.
        ref = compute_reference_stats(store_image_set(store, resolution=size), extractor, batch_size=16)
        save_reference_stats(ref, os.path.join(out, "reference_stats.npz"))
        metrics = compute_metrics(sam.samples, ref, extractor=extractor, batch_size=16, isc_splits=1)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, default=str)
        return metrics

    metrics = _stage("evaluate", timings, evaluate)
    recon_png = os.path.join(out, "reconstruction.png")
    recon = _stage("reconstruct", timings, lambda: reconstruct(os.path.join(out, "decoder"), store, recon_png, num=8))

    report = write_report(out, cfg, store, enc, dec, dit, sam, metrics, recon, timings, random_weights)
    print(f"\nreport: {report}\nall outputs under: {out}")
    if random_weights:
        print("(random encoder/Inception weights: see the banner above)")
    return report


def _rel(out: str, path: str | None) -> str:
    if not path:
        return ""
    return path if "://" in path else os.path.relpath(path, out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def write_report(out, cfg, store, enc, dec, dit, sam, metrics, recon, timings, random_weights) -> str:
    """``report.md`` beside the outputs it shows (relative image links)."""
    from pipeline.store import LatentStore

    spec = LatentStore.open(store).spec
    lines = ["# rae-pipeline demo", ""]
    if random_weights:
        lines += ["> **Random weights.** The encoder and/or the Inception network ran with seeded random weights "
                  "(no model hub offline). Everything below shows the pipeline running end to end; the images and "
                  "numbers say nothing about RAE's quality.", ""]
    lines += [
        "## Stages", "",
        "| stage | seconds | result |", "|---|---|---|",
        f"| encode | {timings['encode']} | `{_rel(out, store)}` ({spec['counts']['num_valid']} images, "
        f"{'given' if enc is None else 'reused' if enc.reused else 'encoded'}) |",
        f"| fit-decoder | {timings['fit-decoder']} | step {dec.step}, `{_rel(out, dec.checkpoint)}` |",
        f"| train-dit | {timings['train-dit']} | step {dit.step}, shift alpha {dit.shift_alpha:.3f}, `{_rel(out, dit.checkpoint)}` |",
        f"| sample | {timings['sample']} | {sam.num} images {sam.image_shape[0]}x{sam.image_shape[1]}, `{_rel(out, sam.samples)}` |",
        f"| evaluate | {timings['evaluate']} | `metrics.json` |",
        f"| reconstruct | {timings['reconstruct']} | `reconstruction.png` |",
        "",
        "## Samples (train-dit debug model, Euler on the reference grid, decoded by the debug decoder)", "",
        f"![samples]({_rel(out, sam.grid)})", "",
        "## Reconstructions (each original, then the decoder's reconstruction of its latent)", "",
        "![reconstructions](reconstruction.png)", "",
        f"PSNR {_fmt(recon.get('psnr'))} dB, SSIM {_fmt(recon.get('ssim'))} ({recon.get('num', '')} images)", "",
        "## Loss curves", "",
        "| fit-decoder | train-dit |", "|---|---|",
        "| ![decoder loss](decoder/loss_curve.png) | ![dit loss](dit/loss_curve.png) |", "",
        "Grids written while training: `decoder/reconstructions/` and `dit/previews/` (one per checkpoint).", "",
        "## Metrics (samples against the store's source images)", "",
        "| metric | value |", "|---|---|",
    ]
    for key in ("fid", "sfid", "inception_score_mean", "inception_score_std", "precision", "recall", "num_samples", "num_ref"):
        lines.append(f"| {key} | {_fmt(metrics.get(key))} |")
    inc = metrics.get("inception") or {}
    lines += ["", f"Inception weights: `{inc.get('source')}`; comparable to published numbers: "
              f"{metrics.get('comparable_to_published')}.", "",
              "## The store's spec", "", "```json", json.dumps(spec, indent=1)[:20000], "```", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.cli.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DemoConfig.out, help="folder for everything the demo writes")
    p.add_argument("--encoder", default=DemoConfig.encoder, choices=["dinov2", "siglip2", "siglip", "mae"])
    p.add_argument("--weights", default=DemoConfig.weights, help="encoder weights: random | hub | FILE")
    p.add_argument("--inception-weights", default=DemoConfig.inception_weights, help="random | hub | FILE")
    p.add_argument("--data", default=None, help="ImageFolder/Parquet data (default: the built-in sample data)")
    p.add_argument("--store", default=None, help="an existing latent store URI: skip the encode stage")
    p.add_argument("--num-samples", type=int, default=DemoConfig.num_samples)
    p.add_argument("--sample-steps", type=int, default=DemoConfig.sample_steps)
    p.add_argument("--decoder-set", action="append", default=[], help="fit-decoder override key=value")
    p.add_argument("--dit-set", action="append", default=[], help="train-dit override key=value")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    a = p.parse_args(argv)
    cfg = DemoConfig(out=a.out, encoder=a.encoder, weights=a.weights, inception_weights=a.inception_weights, data=a.data, store=a.store,
                     decoder_overrides=tuple(a.decoder_set), dit_overrides=tuple(a.dit_set), num_samples=a.num_samples,
                     sample_steps=a.sample_steps, fresh=a.fresh)
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
