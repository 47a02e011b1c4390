"""``rae-pipeline train-dit``: train DiT^DH / DiT on a latent store (``trainer/train_dit.py``).

Run directly (one process) or under ``torchrun`` (one process per device: gloo on CPU, NCCL on
CUDA), e.g. ``make train-dit STORE=... NPROC=8``. Progress and messages go to stdout on rank 0;
errors of the user's inputs end the command with exit code 1 and a one-line message.
"""
from __future__ import annotations

import json
from typing import Callable, List, Optional

import typer

from pipeline.cli.common import user_command


def train_dit_command(
    store: str = typer.Option(..., "--store", help="Latent store to train on (path or URI)."),
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory (path or URI); an existing one resumes."),
    preset: str = typer.Option(..., "--preset", help="Named config: dit_dh_{s,b,xl}_dinov2_256, "
                               "dit_dh_xl_dinov2_512, dit_xl_dinov2_256, debug."),
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a config value, e.g. --set optim.lr=1e-4 (repeatable)."),
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="Start from this checkpoint's weights (checkpoint or run directory) with a fresh "
        "optimizer; ignored when the run directory already has checkpoints (it resumes)."),
    stats: Optional[str] = typer.Option(
        None, "--stats", help="Normalize with this statistics file (.safetensors, .npz or the reference stat.pt) "
        "instead of the store's statistics."),
    preview_decoder: Optional[str] = typer.Option(
        None, "--preview-decoder", help="Decoder checkpoint: write a sample grid (EMA weights) to "
        "<run-dir>/previews/ at each checkpoint, or every train.preview_every steps."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
) -> None:
    """Train DiT^DH (or plain DiT) with flow matching on a store's normalized latents; resume a run directory."""
    from trainer.train_dit import resolve_config, train_dit

    run_training_command(
        resolve_config, preset, overrides, print_config,
        lambda cfg: train_dit(cfg, store, run_dir, init_from=init_from, stats=stats, preview_decoder=preview_decoder),
    )


def run_training_command(resolve_config: Callable, preset: str, overrides: Optional[List[str]], print_config: bool,
                         train: Callable) -> None:
    """What train-dit and fit-decoder do with their options: resolve the preset and overrides, print
    the config (``--print-config``) or train. The user's errors (a non-finite loss among them: it
    names the step) become one line and exit code 1 through ``user_command``."""
    from pipeline.config import to_dict

    cfg = resolve_config(preset, overrides or [])
    if print_config:
        typer.echo(json.dumps(to_dict(cfg), indent=1))
        return
    result = train(cfg)
    if result.checkpoint is not None:  # rank 0
        typer.echo(f"trained to step {result.step} ({result.stopped_by}); checkpoint {result.checkpoint}")


def register(app: typer.Typer) -> None:
    app.command("train-dit")(user_command(train_dit_command))
