"""``rae-pipeline evaluate`` and ``rae-pipeline ref-stats`` (trainer/evaluate.py; metrics in trainer/metrics/).

``evaluate`` prints a table of the metrics and writes them as JSON; ``ref-stats`` writes a
reference-statistics ``.npz`` and prints its path as the last line of stdout. Progress and
messages go to stderr. torch and torch-fidelity are imported inside the commands.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from pipeline.cli.common import DeviceChoice, user_command


class ISSplits(str, Enum):
    shuffle = "shuffle"
    adm = "adm"


class RefSourceKind(str, Enum):
    folder = "folder"
    npz = "npz"
    store = "store"


_WEIGHTS_HELP = (
    "Inception weights: 'hub' (torch-fidelity's release file, cached by torch.hub), a local weights file "
    "(.pth/.pt/.safetensors), or 'random' (tests only: recorded, never comparable)."
)


def _load_inception(weights: str, device: DeviceChoice):
    from trainer.metrics.inception import InceptionWeightsUnavailable, load_inception

    try:
        extractor, info = load_inception(weights, device.value)
    except InceptionWeightsUnavailable as e:
        raise typer.BadParameter(str(e), param_hint="'--inception-weights'") from None
    if not info["reference_weights"]:
        typer.echo(
            f"WARNING: Inception weights are {info['source']} ({info['path'] or 'seeded random init'}), not the "
            "reference network: the numbers are NOT comparable to published ones.",
            err=True,
        )
    return extractor


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _print_table(m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    inc = m["inception"]
    table = Table(title="sample quality", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("FID", _fmt(m["fid"]))
    table.add_row("sFID", _fmt(m["sfid"]))
    table.add_row(f"Inception Score ({m['settings']['isc_split_mode']} splits)",
                  f"{_fmt(m['inception_score_mean'], 2)} ± {_fmt(m['inception_score_std'], 2)}")
    table.add_row("Precision", _fmt(m["precision"]))
    table.add_row("Recall", _fmt(m["recall"]))
    table.add_row("samples / reference", f"{m['num_samples']} / {m['num_ref'] if m['num_ref'] is not None else 'n/a'}")
    table.add_row("reference FID statistics", m["reference"]["fid_statistics"])
    table.add_row("Inception weights", f"{inc['source']} (sha256 {(inc['sha256'] or 'n/a')[:16]})")
    table.add_row("comparable to published", "yes" if m["comparable_to_published"] else "NO")
    Console(width=140).print(table)


def evaluate_command(
    samples: str = typer.Option(..., "--samples", help="ADM-format .npz of the samples: arr_0 uint8 [N, H, W, 3]."),
    ref: str = typer.Option(
        ..., "--ref",
        help="Reference .npz: a ref-stats file, an ADM reference batch (arr_0 and/or mu, sigma), or any arr_0 images.",
    ),
    inception_weights: str = typer.Option("hub", "--inception-weights", help=_WEIGHTS_HELP),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception forward."),
    is_splits: ISSplits = typer.Option(
        ISSplits.shuffle, "--is-splits",
        help="Inception Score splits: shuffle (10 equal splits after torch-fidelity's seeded shuffle) or adm (the "
        "ADM evaluator's consecutive 5,000-sample chunks in file order, no shuffle: what published numbers use; "
        "equal on files whose labels are in a random order, as `sample --labels equal` writes them, to ~1%)."),
    out: Optional[str] = typer.Option(
        None, "--out", help="Metrics JSON (path or URI). Default: <samples without .npz>.metrics.json."
    ),
    device: DeviceChoice = typer.Option(DeviceChoice.auto, "--device", help="auto: CUDA when available."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar on stderr."),
) -> None:
    """FID, sFID, Inception Score, precision and recall (k=3) of a sample .npz against a reference."""
    from pipeline import uri as U
    from trainer.evaluate import compute_metrics

    extractor = _load_inception(inception_weights, device)
    metrics = compute_metrics(samples, ref, extractor=extractor, batch_size=batch_size,
                              isc_split_mode=is_splits.value, verbose=not no_progress)
    if out is None:
        base = U.normalize(samples)
        out = (base[: -len(".npz")] if base.endswith(".npz") else base) + ".metrics.json"
    U.write_json(out, metrics)
    _print_table(metrics)
    typer.echo(f"metrics written to {U.normalize(out)}", err=True)


def ref_stats_command(
    kind: RefSourceKind = typer.Option(
        ..., "--from", help="What URI is: an image folder, an .npz (arr_0), or a latent store."
    ),
    uri: str = typer.Argument(..., help="The folder, .npz or store (path or URI)."),
    out: str = typer.Option(..., "--out", help="Statistics file to write (.npz, path or URI)."),
    num: Optional[int] = typer.Option(None, "--num", help="Use N images, a seeded random subset (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --num subset."),
    resolution: Optional[int] = typer.Option(
        None, "--resolution", help="ADM center-crop size (folder default 256; store default: the store's own)."
    ),
    inception_weights: str = typer.Option("hub", "--inception-weights", help=_WEIGHTS_HELP),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception forward."),
    device: DeviceChoice = typer.Option(DeviceChoice.auto, "--device", help="auto: CUDA when available."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar on stderr."),
) -> None:
    """Inception statistics of reference images, cached in an .npz that `evaluate --ref` reads.

    The file holds mu/sigma (FID) and mu_s/sigma_s (sFID), the pool features (precision/recall) and
    the logits (the reference's IS), and which Inception weights made them."""
    from trainer.metrics.images import folder_image_set, npz_image_set, store_image_set
    from trainer.metrics.reference import compute_reference_stats, save_reference_stats

    if kind is RefSourceKind.npz:
        if resolution is not None:
            raise typer.BadParameter("--resolution applies to folders and stores; .npz images are used as they are")
        images = npz_image_set(uri, num=num, seed=seed)
    elif kind is RefSourceKind.folder:
        images = folder_image_set(uri, resolution=resolution or 256, num=num, seed=seed)
    else:
        images = store_image_set(uri, resolution=resolution, num=num, seed=seed)
    extractor = _load_inception(inception_weights, device)
    stats = compute_reference_stats(images, extractor, batch_size=batch_size, verbose=not no_progress)
    written = save_reference_stats(stats, out)
    typer.echo(
        f"reference statistics of {int(stats['num_images'])} images ({kind.value} {uri}), Inception weights "
        f"{extractor.info['source']}", err=True,
    )
    typer.echo(written)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(user_command(evaluate_command))
    app.command("ref-stats")(user_command(ref_stats_command))
