"""``rae-pipeline reconstruct``: a trained decoder's reconstructions of a store's latents, beside
the original images, with PSNR and SSIM (``trainer/metrics/pixels.py``; rFID is ``trainer/rfid.py``).

The originals are the store's source images, fetched through the recorded source references and
checked (size, sha256; ``trainer/decoder_data.SourceFetcher``), ADM-center-cropped to the store's
resolution, and resized down (bicubic, antialiased) when the decoder outputs fewer pixels. The
latents are the store's unflipped ones, decoded as they are (no noise), with the checkpoint's EMA
weights unless told otherwise. The rows are the store's first ``num`` valid rows (rows are stored in
a seeded shuffle, so these are a random sample of the source, the same one on every call).

A decoder reads the latents of one encoder: ``loading.check_decoder_for_store`` refuses a checkpoint whose
encoder identity (``meta["encoder"]``) differs from the store's (``schemas.store_v1.encoder_identity``;
the comparison rule is ``schemas.store_v1.encoder_mismatch``: name, architecture and input size equal,
weight checksums equal where both are known), and one that records none (trained on a synthetic
store) -- except a decoder imported with ``import-rae --encoder none`` (a model of a width none of
our encoders has): the user named no encoder, so it is taken on trust when it reads the store's
latent shape, and one warning line says that no identity could be checked. Sampling and rFID
compare identities by the same rule but let an unknown (None) identity through (sampling says so).

The grid (PNG): rows of ``pairs_per_row`` pairs, each pair the original then its reconstruction.
A JSON summary is written beside it (``<out>.json``, or the ``.png`` replaced by ``.json``).
"""
from __future__ import annotations

import json
import sys
from typing import Callable

import torch

from pipeline import uri as uri_lib
from pipeline.store import LatentStore
from schemas.errors import UserError
from schemas.store_v1 import encoder_identity
from trainer.images import decode_uint8, grid_png, store_samples
from trainer.loading import check_decoder_for_store, check_decoder_reads, load_decoder


class ReconstructError(UserError, ValueError):
    """Settings reconstruct refuses; says which and why (checkpoints and stores: ``loading.LoadError``)."""


def summary_uri(out: str) -> str:
    """Where the JSON summary of a grid goes: ``x.png`` -> ``x.json``, anything else -> ``<out>.json``."""
    return out[:-4] + ".json" if out.lower().endswith(".png") else out + ".json"


def reconstruct(decoder_ckpt: str, store: str, out: str, *, num: int = 8, use_ema: bool = True,
                batch_size: int = 16, device: str | torch.device | None = None,
                storage_options: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Decode ``num`` rows of ``store`` with the decoder of ``decoder_ckpt``; write the grid PNG to
    ``out`` and the summary beside it; return the summary (PSNR in dB, SSIM, on 0..255 images).
    ``log`` gets the warning line of a decoder without an encoder identity (default: stderr); the
    summary keeps it under ``"warning"``."""
    from trainer.metrics.pixels import psnr, ssim

    if num < 1:
        raise ReconstructError(f"--num must be >= 1, got {num}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent_store = LatentStore.open(store, storage_options)
    ckpt = load_decoder(decoder_ckpt, weights="ema" if use_ema else "model", device=device,
                        storage_options=storage_options)
    note = check_decoder_for_store(ckpt.encoder, ckpt.uri, latent_store,
                                   imported_without_encoder=ckpt.imported_without_encoder)
    check_decoder_reads(ckpt, latent_store.latent_shape, f"store {latent_store.uri}",
                        encoder_identity(latent_store.spec))
    if note:
        (log or _stderr)(f"WARNING: {note}")
    decoder = ckpt.model
    size = decoder.config.patch_size * decoder.grid_size
    latents, originals, rows = store_samples(latent_store, num, size, storage_options)
    recons = decode_uint8(decoder, latents, device, batch_size)
    out = uri_lib.normalize(out)
    uri_lib.atomic_write_bytes(out, grid_png(originals, recons), storage_options)
    result = {
        "psnr": psnr(originals, recons), "ssim": ssim(originals, recons), "num": int(len(rows)),
        "rows": [int(r) for r in rows], "grid": out, "decoder": ckpt.uri, "step": ckpt.step,
        "weights": ckpt.weights,
        "store": latent_store.uri, "store_id": latent_store.store_id, "output_size": size,
        "resolution": int(originals.shape[-1]),
    }
    if note:
        result["warning"] = note
    uri_lib.atomic_write_bytes(summary_uri(out), (json.dumps(result, indent=1) + "\n").encode(), storage_options)
    return result


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = ["ReconstructError", "reconstruct", "summary_uri"]
