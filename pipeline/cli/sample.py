"""``rae-pipeline sample`` (trainer/sample.py) and ``rae-pipeline rfid`` (trainer/rfid.py).

``sample`` runs directly (one process) or under ``torchrun`` (one process per device; every rank
samples its blocks, rank 0 merges): ``torchrun --nproc-per-node 8 -m pipeline.cli sample
--num-samples 50000 ...`` (``--num`` there is taken by torchrun's parser for its ``--numa-binding``).
Messages and the progress bar go to stderr on rank 0; the last line of stdout is the samples file.
``rfid`` prints a table of the metrics (stderr) and the metrics JSON (stdout), and writes it with
``--out``. Errors of the user's inputs end the command with exit code 1 and a one-line message; an
interrupted sample run (test hook) with exit code 3.
"""
from __future__ import annotations

import json
from enum import Enum
from typing import Optional

import typer

from pipeline.cli.common import DeviceChoice, WeightsChoice, fail, user_command


class SamplerChoice(str, Enum):
    euler = "euler"
    heun = "heun"


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


def sample_command(
    dit_ckpt: str = typer.Option(
        ..., "--dit-ckpt", help="DiT checkpoint (checkpoint folder, or run directory: its newest)."),
    decoder_ckpt: str = typer.Option(
        ..., "--decoder-ckpt", help="Decoder checkpoint (checkpoint folder, or run directory: its newest)."),
    out: str = typer.Option(..., "--out", help="Output folder (path or URI): samples.npz, grid.png, sample.json."),
    num: int = typer.Option(
        50_000, "--num", "--num-samples",
        help="Number of samples. Under torchrun write --num-samples: torchrun's parser reads --num as an "
        "abbreviation of its own --numa-binding."),
    steps: int = typer.Option(50, "--steps", help="Time points of the reference grid (50: 49 Euler steps)."),
    sampler: SamplerChoice = typer.Option(SamplerChoice.euler, "--sampler", help="ODE integrator."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale (1: none)."),
    cfg_interval: str = typer.Option(
        "0,1", "--cfg-interval", help="LO,HI: guide only for t in [LO, HI] (ends inclusive)."),
    autoguidance_ckpt: Optional[str] = typer.Option(
        None, "--autoguidance-ckpt", help="Weak DiT checkpoint for AutoGuidance (with --ag-scale)."),
    ag_scale: Optional[float] = typer.Option(None, "--ag-scale", help="AutoGuidance scale: weak + s (main - weak)."),
    labels: str = typer.Option(
        "equal", "--labels", help="equal (N/classes per class, in a permutation seeded by --seed: the ADM "
        "evaluator's consecutive 5,000-sample IS splits each see ~all classes) | random (seeded) | a comma list | "
        "a file of labels (each listed label N/L times, in order)."),
    stats: Optional[str] = typer.Option(
        None, "--stats", help="Latent statistics file replacing the checkpoint's (.safetensors, .npz or stat.pt)."),
    seed: int = typer.Option(0, "--seed", help="Sample i's noise comes from (seed, i); it also seeds the label order."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per model call on each rank."),
    block_size: int = typer.Option(
        1000, "--block-size", help="Samples per part file (the unit of distribution and resume)."),
    weights: WeightsChoice = typer.Option(
        WeightsChoice.ema, "--weights", help="EMA weights of every checkpoint (default; the model's when absent) "
        "or the raw model's."),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.fp32, "--precision", help="bf16: autocast (CUDA only)."),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help="TF32 matmuls on CUDA (as the reference sampler)."),
    device: DeviceChoice = typer.Option(DeviceChoice.auto, "--device", help="auto: the rank's CUDA device if any."),
    grid_max: int = typer.Option(64, "--grid-max", help="Images in grid.png (0: none)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace samples of other settings in --out."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    debug_exit_after_blocks: Optional[int] = typer.Option(None, "--debug-exit-after-blocks", hidden=True),
) -> None:
    """Sample class-conditional images from a DiT checkpoint, decode them, write an ADM-format .npz and a grid."""
    from trainer.sample import SampleConfig, SampleInterrupted, parse_interval, sample

    try:
        cfg = SampleConfig(
            num=num, steps=steps, sampler=sampler.value, cfg_scale=cfg_scale, cfg_interval=parse_interval(cfg_interval),
            ag_scale=ag_scale, labels=labels, seed=seed, batch_size=batch_size, block_size=block_size,
            weights=weights.value, precision=precision.value, tf32=tf32, grid_max=grid_max,
            progress=not no_progress, overwrite=overwrite, debug_exit_after_blocks=debug_exit_after_blocks,
        )
        result = sample(dit_ckpt, decoder_ckpt, out, cfg, autoguidance_ckpt=autoguidance_ckpt, stats=stats,
                        device=device.value)
    except SampleInterrupted as e:
        fail(f"interrupted: {e}; rerun the same command to resume", code=3)
    if result is not None:  # rank 0
        typer.echo(result.samples)


def _print_rfid(m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(x, digits=4):
        return "n/a" if x is None else f"{x:.{digits}f}"

    inc = m["inception"]
    table = Table(title="reconstruction", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("rFID", fmt(m["rfid"]))
    table.add_row("PSNR (dB)", fmt(m["psnr"], 2))
    table.add_row("SSIM", fmt(m["ssim"]))
    table.add_row("images", str(m["num_images"]))
    table.add_row("Inception weights", f"{inc['source']} (sha256 {(inc['sha256'] or 'n/a')[:16]})")
    table.add_row("comparable to published", "yes" if m["comparable_to_published"] else "NO")
    Console(width=120, stderr=True).print(table)


def rfid_command(
    decoder_ckpt: str = typer.Option(
        ..., "--decoder-ckpt", help="Decoder checkpoint (checkpoint folder, or run directory: its newest)."),
    store: str = typer.Option(..., "--store", help="Latent store whose images are reconstructed (path or URI)."),
    num: Optional[int] = typer.Option(
        None, "--num", help="Use N images, a seeded random subset (default: all valid rows)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --num subset."),
    inception_weights: str = typer.Option(
        "hub", "--inception-weights",
        help="Inception weights: 'hub', a local weights file, or 'random' (tests only: recorded, never comparable)."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the metrics JSON here (path or URI)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Write a PNG of originals over reconstructions here."),
    weights: WeightsChoice = typer.Option(
        WeightsChoice.ema, "--weights", help="EMA weights (default; the model's when absent) or the raw model's."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per decoder / Inception forward."),
    device: DeviceChoice = typer.Option(DeviceChoice.auto, "--device", help="auto: CUDA when available."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """rFID, PSNR and SSIM of a decoder: a store's images reconstructed from their latents vs the originals."""
    import torch

    from pipeline import uri as U
    from trainer.metrics.inception import InceptionWeightsUnavailable
    from trainer.rfid import reconstruction_metrics

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device is DeviceChoice.auto else device.value
    try:
        metrics = reconstruction_metrics(decoder_ckpt, store, num=num, seed=seed, weights=weights.value,
                                         inception_weights=inception_weights, device=dev, batch_size=batch_size,
                                         grid_out=grid, progress=not no_progress)
        if out is not None:
            U.write_json(out, metrics)
    except InceptionWeightsUnavailable as e:
        raise typer.BadParameter(str(e), param_hint="'--inception-weights'") from None
    if not metrics["comparable_to_published"]:
        inc = metrics["inception"]
        typer.echo(f"WARNING: Inception weights are {inc['source']} ({inc['path'] or 'seeded random init'}), "
                   "not the reference network: rFID is NOT comparable to published numbers.", err=True)
    _print_rfid(metrics)
    if out is not None:
        typer.echo(f"metrics written to {U.normalize(out)}", err=True)
    typer.echo(json.dumps(metrics, indent=1, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("sample")(user_command(sample_command))
    app.command("rfid")(user_command(rfid_command))
