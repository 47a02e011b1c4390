"""``rae-pipeline train-dit``: train DiT^DH / DiT on a latent store (``trainer/train_dit.py``).

Run directly (one process) or under ``torchrun`` (one process per device: gloo on CPU, NCCL on
CUDA), e.g. ``make train-dit STORE=... NPROC=8``. Progress and messages go to stdout on rank 0;
errors of the user's inputs end the command with exit code 1 and a one-line message.

Exit codes (train-dit and fit-decoder): 0 trained to the end; 1 an error of the user's inputs (one
line); 143 (128 + SIGTERM) stopped by SIGTERM after saving a checkpoint at the current step: the
model is unfinished, so ``train-dit ... && sample ...`` stops there; the same command resumes.
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
                               "dit_dh_xl_dinov2_512, dit_xl_dinov2_256 (the official runs: fp32, variance-only "
                               "statistics; --set train.precision=bf16 opts in to bf16, which the official README "
                               "advises against: 'we recommend fp32 for more stable training'), "
                               "dit_dh_s_dinov2_256_ag_guide (AutoGuidance's weak model: DiT^DH-S, 14 epochs), "
                               "debug."),
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a config value, e.g. --set optim.lr=1e-4 (repeatable)."),
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="Start from this checkpoint's weights (checkpoint or run directory) with a fresh "
        "optimizer; ignored when the run directory already has checkpoints (it resumes)."),
    stats: Optional[str] = typer.Option(
        None, "--stats", help="Normalize with this statistics file (.safetensors, .npz or the reference stat.pt) "
        "instead of the store's statistics."),
    stats_mode: Optional[str] = typer.Option(
        None, "--stats-mode", help="mean_var: normalize as (z - mean) / sqrt(var + eps); var: z / sqrt(var + eps), "
        "mean zero, as the released DiT^DH-XL was trained (the official-run presets' choice). Recorded in the "
        "checkpoint; sample follows it. Same as --set data.stats_mode=..."),
    preview_decoder: Optional[str] = typer.Option(
        None, "--preview-decoder", help="Decoder checkpoint: write a sample grid (EMA weights) to "
        "<run-dir>/previews/ at each checkpoint, or every train.preview_every steps."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
) -> None:
    """Train DiT^DH (or plain DiT) with flow matching on a store's normalized latents; resume a run directory.

    Exit codes: 0 trained to the end; 1 an error of the inputs (one line).
    143 (128 + SIGTERM): stopped by SIGTERM after saving a checkpoint; unfinished, the same command resumes.
    """
    from trainer.train_dit import resolve_config, train_dit

    if stats_mode is not None:
        overrides = [*(overrides or []), f"data.stats_mode={stats_mode}"]
    run_training_command(
        resolve_config, preset, overrides, print_config,
        lambda cfg: train_dit(cfg, store, run_dir, init_from=init_from, stats=stats, preview_decoder=preview_decoder),
    )


def run_training_command(resolve_config: Callable, preset: str, overrides: Optional[List[str]], print_config: bool,
                         train: Callable) -> None:
    """What train-dit and fit-decoder do with their options: resolve the preset and overrides, print
    the config (``--print-config``) or train. The user's errors (a non-finite loss among them: it
    names the step) become one line and exit code 1 through ``user_command``. A run stopped by
    SIGTERM (saved, unfinished) exits with ``SIGTERM_EXIT_CODE`` (143) on every rank."""
    from pipeline.config import to_dict
    from trainer.loop import SIGTERM_EXIT_CODE

    cfg = resolve_config(preset, overrides or [])
    if print_config:
        typer.echo(json.dumps(to_dict(cfg), indent=1))
        return
    result = train(cfg)
    if result.checkpoint is not None:  # rank 0
        typer.echo(f"trained to step {result.step} ({result.stopped_by}); checkpoint {result.checkpoint}")
    if result.stopped_by == "sigterm":
        if result.checkpoint is not None:
            typer.echo(f"stopped by SIGTERM at step {result.step} of {result.total_steps}, after saving; unfinished: "
                       f"run the same command to resume (exit code {SIGTERM_EXIT_CODE})", err=True)
        raise typer.Exit(SIGTERM_EXIT_CODE)


def register(app: typer.Typer) -> None:
    app.command("train-dit")(user_command(train_dit_command))
