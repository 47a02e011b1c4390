"""``rae-pipeline fit-decoder`` (``trainer/fit_decoder.py``) and ``rae-pipeline reconstruct``
(``trainer/reconstruct.py``).

``fit-decoder`` runs directly (one process) or under ``torchrun`` (one process per device: gloo on
CPU, NCCL on CUDA), e.g. ``make fit-decoder STORE=... NPROC=8``. Progress and messages go to
stdout on rank 0; errors of the user's inputs end a command with exit code 1 and a one-line message.
A fit-decoder stopped by SIGTERM saves a checkpoint, then exits with code 143 (128 + SIGTERM): the
decoder is unfinished; the same command resumes.
"""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from pipeline.cli.common import user_command


def fit_decoder_command(
    store: str = typer.Option(..., "--store", help="Latent store whose latents (and source images) to train on."),
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory (path or URI); an existing one resumes."),
    preset: str = typer.Option(..., "--preset", help="Named config: decoder_{b,l,xl}_dinov2, "
                               "decoder_b_dinov2_reference (the released recipe: encoder on the fly), debug."),
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a config value, e.g. --set data.mode=encode_on_the_fly (repeatable)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
) -> None:
    """Train the RAE pixel decoder (L1 + LPIPS + adaptive GAN, EMA) on a store; resume a run directory.

    Exit codes: 0 trained to the end; 1 an error of the inputs (one line).
    143 (128 + SIGTERM): stopped by SIGTERM after saving a checkpoint; unfinished, the same command resumes.
    """
    from pipeline.cli.train import run_training_command
    from trainer.fit_decoder import fit_decoder, resolve_config

    run_training_command(resolve_config, preset, overrides, print_config, lambda cfg: fit_decoder(cfg, store, run_dir))


def reconstruct_command(
    decoder_ckpt: str = typer.Option(..., "--decoder-ckpt", help="Decoder checkpoint, or a fit-decoder run directory "
                                     "(its newest checkpoint)."),
    store: str = typer.Option(..., "--store", help="Latent store to reconstruct (its encoder must be the decoder's)."),
    out: str = typer.Option(..., "--out", help="PNG grid to write (path or URI); a JSON summary goes beside it."),
    num: int = typer.Option(8, "--num", help="Images: the store's first N valid rows."),
    raw_weights: bool = typer.Option(False, "--raw-weights", help="Use the trained weights instead of the EMA."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
) -> None:
    """Write a grid of originals beside their reconstructions; print PSNR and SSIM (and the JSON summary)."""
    from trainer.reconstruct import reconstruct

    result = reconstruct(decoder_ckpt, store, out, num=num, use_ema=not raw_weights, device=device)
    typer.echo(f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} over {result['num']} images "
               f"({result['weights']} weights, step {result['step']}); grid {result['grid']}")
    typer.echo(json.dumps(result))


def register(app: typer.Typer) -> None:
    app.command("fit-decoder")(user_command(fit_decoder_command))
    app.command("reconstruct")(user_command(reconstruct_command))
