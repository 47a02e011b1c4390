"""``rae-pipeline import-rae`` and ``rae-pipeline export-rae``: the published RAE files <-> our checkpoints.

Both print what they wrote on stdout, one ``<role>: <uri>`` line each (scripts take them from
there); inferred architectures and notes go to stderr. Heavy imports happen inside the commands.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from pipeline.cli.common import EncoderChoice, WeightsChoice, fail, user_command


class ImportEncoderChoice(str, Enum):
    """import-rae's encoders: those of :class:`EncoderChoice`, and ``none`` for a model whose width
    is none of theirs (custom or tiny) -- for this command only: every other command needs a real one."""

    dinov2 = EncoderChoice.dinov2.value
    siglip2 = EncoderChoice.siglip2.value
    mae = EncoderChoice.mae.value
    siglip = EncoderChoice.siglip.value
    none = "none"


NO_ENCODER_NOTE = ("no encoder identity recorded (--encoder none): sample and reconstruct will accept these "
                   "checkpoints when the latent shapes match, and warn that no encoder identity could be checked")


def import_rae_command(
    dit: Optional[str] = typer.Option(None, "--dit", help="Published DiT^DH / DiT file (bare state dict or training checkpoint)."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="Published decoder file (bare, or a decoder-training checkpoint)."),
    stats: Optional[str] = typer.Option(None, "--stats", help="The stat.pt the DiT was trained with (mean and/or var)."),
    encoder: ImportEncoderChoice = typer.Option(
        ..., "--encoder", help="Encoder the files belong to (siglip = siglip2); not visible in the shapes, so it is "
        "recorded as the checkpoints' encoder identity and checked against their latent shape. 'none': a model whose "
        "width is none of these encoders' (custom or tiny): no identity is recorded, the DiT and decoder are only "
        "checked against each other; sample and reconstruct then accept them when the latent shapes match and warn "
        "that no encoder identity could be checked (the decoder un-normalizes with the ImageNet mean/std)."),
    resolution: int = typer.Option(256, "--resolution", help="Image resolution the encoder identity is recorded for: 256 or 512."),
    out: str = typer.Option(..., "--out", help="Folder or URI; checkpoints go to <out>/dit and <out>/decoder."),
    use: Optional[WeightsChoice] = typer.Option(
        None, "--use", help="Weights of a training checkpoint: ema (default when present, as the reference sampler) or model."
    ),
    decoder_heads: Optional[int] = typer.Option(None, "--decoder-heads", help="Decoder attention heads, for sizes outside B/L/XL."),
    head_depth: Optional[int] = typer.Option(
        None, "--head-depth", help="DiT^DH head blocks, needed only when backbone and head widths are equal (default 2)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing <out>/dit or <out>/decoder."),
) -> None:
    """Convert published RAE files into this project's checkpoints (configs inferred from shapes)."""
    from trainer.checkpoint import read_meta
    from trainer.interop import import_rae

    encoder_name = None if encoder.value == "none" else encoder.value
    written = import_rae(out, dit=dit, decoder=decoder, stats=stats, encoder=encoder_name, resolution=resolution,
                         use=use.value if use is not None else "auto", decoder_num_heads=decoder_heads,
                         head_depth=head_depth, overwrite=overwrite)
    for kind, uri in written.items():
        meta = read_meta(uri)
        info = meta.extra["imported"]
        typer.echo(f"{kind}: {meta.model['class']} from {info['file']} ({info['container']}"
                   f"{', ' + info['weights'] + ' weights' if info['weights'] else ''})", err=True)
        for field, how in info["inferred"].items():
            typer.echo(f"  {field}: {how}", err=True)
        if meta.statistics is not None:
            typer.echo(f"  statistics: mean {'present' if meta.statistics['mean'] else 'absent (0)'}, "
                       f"var {'present' if meta.statistics['var'] else 'absent (1)'}", err=True)
    if encoder_name is None:
        typer.echo(f"note: {NO_ENCODER_NOTE}", err=True)
    for kind, uri in written.items():
        typer.echo(f"{kind}: {uri}")


def export_rae_command(
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="Our checkpoint (or run directory: its newest)."),
    store: Optional[str] = typer.Option(None, "--store", help="Export this latent store's statistics alone, as stat.pt."),
    out: str = typer.Option(..., "--out", help="Folder or URI for dit.pt / decoder.pt / stat.pt."),
    which: WeightsChoice = typer.Option(
        WeightsChoice.ema, "--which", help="ema (falls back to model when absent) or model. An imported checkpoint "
        "holds one set of weights, the ones picked from the published file at import (a training checkpoint's ema "
        "by default): that set is exported either way, and the command says which it is."),
    learn_sigma: bool = typer.Option(
        False, "--learn-sigma", help="Plain DiT: write the 2C-output final layer of LightningDiT(learn_sigma=True) "
        "(the released LightningDiT defaults to learn_sigma=False)."
    ),
) -> None:
    """Write a checkpoint in the published RAE layout (loadable strictly by the reference code)."""
    from trainer.interop import export_rae, export_store_stats

    if (ckpt is None) == (store is None):
        fail("give exactly one of --ckpt and --store")
    if store is not None:
        files = {"stats": export_store_stats(store, out)}
    else:
        result = export_rae(ckpt, out, which=which.value, learn_sigma=learn_sigma)
        typer.echo(f"exported {result.description}", err=True)
        files = result.files
    for role, uri in files.items():
        typer.echo(f"{role}: {uri}")


def register(app: typer.Typer) -> None:
    app.command("import-rae")(user_command(import_rae_command))
    app.command("export-rae")(user_command(export_rae_command))
