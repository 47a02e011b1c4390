"""``rae-pipeline encode`` and ``rae-pipeline stores ...``.

``encode`` prints the store's URI as the last line of stdout (scripts take it from there);
progress and messages go to stderr. Heavy imports happen inside the commands.
"""
from __future__ import annotations

import json
from enum import Enum
from typing import Optional

import typer

from pipeline.cli.common import EncoderChoice, error_line, fail, log_to_stderr, user_command
from schemas.errors import UserError

stores_app = typer.Typer(
    name="stores",
    help="List, describe, verify and remove latent stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class SplitChoice(str, Enum):
    train = "train"
    val = "val"


class DtypeChoice(str, Enum):
    float16 = "float16"
    float32 = "float32"
    bfloat16 = "bfloat16"


class CompressorChoice(str, Enum):
    """The latents' codec (``schemas.store_v1.COMPRESSORS``; docs/store-format.md, "Codecs")."""

    blosc_zstd = "blosc-zstd"
    blosc_lz4 = "blosc-lz4"
    zstd = "zstd"
    none = "none"


def _task_error_cause(e: BaseException) -> str | None:
    """The message of the error a Ray task raised (StoreError, OSError...) under Ray Data's
    wrappers, which keep it only as text; None when ``e`` is not a Ray task failure."""
    import re
    import sys

    ray_exceptions = sys.modules.get("ray.exceptions")  # not imported: no Ray task ran (nor failed)
    if ray_exceptions is None or not isinstance(e, ray_exceptions.RayTaskError):
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    for line in text.splitlines():
        m = re.match(r"^([\w.]+(?:Error|Exception)): (.+)$", line)
        if m and not m.group(1).startswith("ray."):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def encode_command(
    encoder: EncoderChoice = typer.Option(..., "--encoder", help="Frozen encoder (siglip = siglip2)."),
    data: Optional[str] = typer.Option(
        None, "--data", help="ImageFolder or Parquet dataset (path or URI). Default: the built-in sample data."
    ),
    out: str = typer.Option("out/stores", "--out", help="Root under which the store is created (path or URI)."),
    weights: str = typer.Option(
        "hub", "--weights", help="'hub' (Hugging Face Hub), a weights file (timm or transformers layout), a "
        "save_pretrained folder (config.json + safetensors, sharded or not; its config is checked), or 'random'."
    ),
    split: SplitChoice = typer.Option(SplitChoice.train, "--split", help="Split to encode; each split is its own store."),
    resolution: int = typer.Option(256, "--resolution", help="ADM center-crop size: 256 or 512."),
    class_index: Optional[str] = typer.Option(None, "--class-index", help="File fixing the class -> label mapping."),
    dtype: DtypeChoice = typer.Option(DtypeChoice.float16, "--dtype", help="Latent storage dtype."),
    compressor: CompressorChoice = typer.Option(
        CompressorChoice.blosc_zstd, "--compressor",
        help="Latents' codec: blosc-zstd (byte shuffle + zstd: fewest bytes, cheap decode), blosc-lz4 (cheapest "
             "decode, few bytes saved), zstd (the format's earlier default), none."),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", help="Rows per shard (one write task)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per encoder forward."),
    num_actors: Optional[int] = typer.Option(None, "--num-actors", help="Encoder actors (default: one per GPU, else 1)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per encoder actor."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Existing Ray cluster (default: local Ray)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the rows' storage order."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Any other EncodeConfig field, e.g. --set samples_per_chunk=16 --set flips=false."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar on stderr."),
) -> None:
    """Encode images once into a latent store; prints the store's URI (reused if already complete)."""
    from pipeline.config import apply_overrides
    from pipeline.encode import EncodeConfig, encode
    from pipeline.encoders import HubWeightsUnavailableError
    from pipeline.uri import redact

    cfg = EncodeConfig()
    given = {
        "encoder": encoder.value,
        "data": data,
        "out": out,
        "weights": weights,
        "split": split.value,
        "resolution": resolution,
        "class_index": class_index,
        "dtype": dtype.value,
        "compressor": compressor.value,
        "samples_per_shard": samples_per_shard,
        "batch_size": batch_size,
        "num_actors": num_actors,
        "threads": threads,
        "ray_address": ray_address,
        "order_seed": seed,
    }
    try:
        cfg = apply_overrides(cfg, list(overrides))
        for key, value in given.items():
            if value is not None:
                setattr(cfg, key, value)
        if no_progress:
            cfg.progress = False
        log_to_stderr()
        result = encode(cfg)
    except HubWeightsUnavailableError as e:
        raise typer.BadParameter(str(e), param_hint="'--weights'") from None
    except Exception as e:
        # A task's StoreError comes back from Ray as a RayTaskError subclass of it, holding the traceback.
        cause = _task_error_cause(e)
        if cause is not None:
            fail(f"{redact(cause, cfg.storage_options)}\n(the store is resumable: rerun the same command)")
        if isinstance(e, UserError):
            fail(redact(error_line(e), cfg.storage_options))  # one line, never a credential in it
        raise
    if result.reused:
        typer.echo(f"store is complete, reused: {result.uri}", err=True)
    else:
        typer.echo(
            f"encoded {result.images_encoded} images in {result.shards_encoded} shard(s), "
            f"{result.images_per_s:.2f} images/s, {result.num_failed} failed; run log {result.run_log}",
            err=True,
        )
    typer.echo(result.uri)


@stores_app.command("list")
@user_command
def stores_list(root: str = typer.Argument(..., help="Folder or URI holding stores.")) -> None:
    """Every store under ROOT: complete, INCOMPLETE, or BROKEN (the reason follows the table)."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.store import list_stores

    statuses = list_stores(root)
    if not statuses:
        typer.echo(f"no stores under {root}", err=True)
        return
    table = Table(title=f"stores under {root}", show_lines=False)
    for col in ("name", "state", "shards", "encoder", "weights", "split", "latent", "dtype", "samples", "failed"):
        table.add_column(col)
    for st in statuses:
        s = st.summary
        state = "BROKEN" if st.broken else "complete" if st.complete else "INCOMPLETE"
        shards = "/".join("?" if v is None else str(v) for v in (st.shards_done, st.num_shards))
        table.add_row(
            st.uri.rstrip("/").rsplit("/", 1)[-1],
            state,
            shards,
            *(str(s.get(k, "")) for k in ("encoder", "weights", "split", "latent", "dtype", "samples", "failed")),
        )
    Console(width=200).print(table)
    for st in statuses:
        if st.broken:
            typer.echo(f"BROKEN {st.uri.rstrip('/').rsplit('/', 1)[-1]}: {st.broken}")


@stores_app.command("describe")
@user_command
def stores_describe(uri: str = typer.Argument(..., help="The store.")) -> None:
    """The store's spec as JSON (complete stores), or its progress (incomplete ones)."""
    from pipeline.store import IncompleteStoreError, LatentStore, store_status

    try:
        spec = LatentStore.open(uri).spec
    except IncompleteStoreError as e:
        st = store_status(uri)
        done = f" ({st.shards_done}/{st.num_shards} shards written)" if st else ""
        fail(f"{e}{done}")
    typer.echo(json.dumps(spec, indent=1, sort_keys=True))


@stores_app.command("verify")
@user_command
def stores_verify(
    uri: str = typer.Argument(..., help="The store."),
    no_stats: bool = typer.Option(False, "--no-stats", help="Skip recomputing the statistics."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Shards checked at once (threads). Default: min(4, CPU cores)."),
) -> None:
    """Check the spec against the arrays (shapes, dtypes, shard and chunk shapes, codecs, counts), then
    every object's checksum, every chunk, the counts and the statistics; non-zero exit naming the
    spec key or the bad shard(s) when anything is wrong."""
    from pipeline.store import verify_store

    report = verify_store(uri, check_stats=not no_stats, workers=workers)
    if report.error is not None:
        fail(report.error)  # not openable at all: one line
    typer.echo(str(report))
    if not report.ok:
        raise typer.Exit(1)


@stores_app.command("rm")
@user_command
def stores_rm(
    uri: str = typer.Argument(..., help="The store."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    broken: bool = typer.Option(
        False, "--broken", help="Also remove a broken store (spec missing, invalid or not matching its arrays); "
        "a prefix that is not a store is still refused."),
) -> None:
    """Delete a store (its COMPLETE marker first, so a half-deleted store never reads as complete)."""
    from pipeline.store import remove_store, store_status

    st = store_status(uri)
    if st is None:
        fail(f"{uri} is not a latent store (see 'Which prefix counts as a store' in docs/store-format.md); "
             "nothing removed")
    if st.broken and not broken:
        fail(f"store {st.uri} is broken ({st.broken}); `rae-pipeline stores rm --broken {uri}` removes it")
    if not yes:
        state = "BROKEN" if st.broken else "complete" if st.complete else "incomplete"
        typer.confirm(f"delete store {st.uri} ({state})?", abort=True)
    remove_store(uri, broken=broken)
    typer.echo(f"removed {st.uri}", err=True)


def register(app: typer.Typer) -> None:
    app.command("encode")(user_command(encode_command))
    app.add_typer(stores_app, name="stores")
