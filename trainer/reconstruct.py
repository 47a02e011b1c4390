"""``rae-pipeline reconstruct``: a trained decoder's reconstructions of a store's latents, beside
the original images, with PSNR and SSIM (``trainer/evaluate.py``; rFID is the evaluation stage's).

The originals are the store's source images, fetched through the recorded source references and
checked (size, sha256; ``trainer/decoder_data.SourceFetcher``), ADM-center-cropped to the store's
resolution, and resized down (bicubic, antialiased) when the decoder outputs fewer pixels. The
latents are the store's unflipped ones, decoded as they are (no noise), with the checkpoint's EMA
weights unless told otherwise. The rows are the store's first ``num`` valid rows (rows are stored in
a seeded shuffle, so these are a random sample of the source, the same one on every call).

A decoder reads the latents of one encoder: :func:`check_decoder_encoder` refuses a checkpoint whose
encoder identity (``meta["encoder"]``) differs from the store's (``schemas.store_v1.encoder_identity``;
the comparison rule is ``trainer.interop.encoder_mismatch``: name, architecture and input size equal,
weight checksums equal where both are known), and one that records none. Sampling and rFID compare
identities by the same rule but let an unknown (None) identity through.

The grid (PNG): rows of ``pairs_per_row`` pairs, each pair the original then its reconstruction.
A JSON summary is written beside it (``<out>.json``, or the ``.png`` replaced by ``.json``).
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import uri as uri_lib
from pipeline.store import LatentStore
from schemas import store_v1

GRID_PAIRS_PER_ROW = 4
_GAP = 4  # pixels between images in the grid


class ReconstructError(ValueError):
    """A decoder checkpoint or store that cannot be used together; says which and why."""


def check_decoder_encoder(theirs: dict | None, ckpt_uri: str, store: LatentStore) -> None:
    """Refuse a decoder (encoder identity ``theirs``) trained on another encoder's latents than
    ``store``'s, or on unknown ones."""
    from trainer.interop import encoder_mismatch

    ours = store_v1.encoder_identity(store.spec)
    if ours is None:
        raise ReconstructError(f"store {store.uri} records no encoder (a synthetic store): no decoder applies to it")
    if theirs is None:
        raise ReconstructError(f"decoder {ckpt_uri} records no encoder identity (trained on a synthetic store?); "
                               f"store {store.uri} was encoded by {ours['name']} ({ours['arch']})")
    why = encoder_mismatch(theirs, ours)
    if why:
        raise ReconstructError(f"decoder {ckpt_uri} was trained on latents of another encoder than store {store.uri}'s "
                               f"({why}): decoder {theirs}, store {ours}")


def load_decoder(uri: str, *, use_ema: bool = True, device: str | torch.device = "cpu",
                 storage_options: dict | None = None):
    """(RAEDecoder in eval mode on ``device``, :class:`trainer.sample.LoadedDecoder`) from a
    checkpoint or run directory (EMA weights unless ``use_ema`` is False or it has none)."""
    from trainer.sample import SampleError
    from trainer.sample import load_decoder as load

    try:
        loaded = load(uri, weights="ema" if use_ema else "model", device=device, storage_options=storage_options)
    except SampleError as e:
        raise ReconstructError(str(e)) from None
    return loaded.model, loaded


def resize_images(x01: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, R, R) in [0, 1] -> (n, 3, size, size): bicubic, antialiased, clamped (as the trainer's targets)."""
    if x01.shape[-1] == size:
        return x01
    return F.interpolate(x01, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 0..255 (rounded)."""
    return (x01.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)


def store_samples(store: LatentStore, num: int, size: int, storage_options: dict | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The store's first ``num`` valid rows: (unflipped latents float32 (n, C, H, W), original crops
    uint8 (n, 3, size, size), rows int64 (n,))."""
    from pipeline.preprocess import preprocess_image_bytes
    from trainer.decoder_data import SourceFetcher, store_resolution

    rows = np.flatnonzero(store.valid())[:num]
    if len(rows) == 0:
        raise ReconstructError(f"store {store.uri} has no valid rows")
    latents = torch.from_numpy(np.concatenate([store.read_rows(int(r), int(r) + 1) for r in rows]))
    refs = [store.source_ref(int(r)) for r in rows]
    blobs = SourceFetcher(store, storage_options).fetch(rows.tolist(), refs)
    resolution = store_resolution(store)
    crops = torch.from_numpy(np.stack([preprocess_image_bytes(b, resolution) for b in blobs]))
    originals = to_uint8(resize_images(crops.float() / 255.0, size)) if size != resolution else crops
    return latents, originals, rows


@torch.no_grad()
def decode_uint8(decoder, latents: torch.Tensor, device: str | torch.device, batch_size: int = 16) -> torch.Tensor:
    """Latents (n, C, H, W) -> reconstructions uint8 (n, 3, S, S) on the CPU, in batches."""
    out = []
    for start in range(0, len(latents), batch_size):
        z = latents[start:start + batch_size].to(device)
        out.append(to_uint8(decoder.decode_to_pixels(z).float()).cpu())
    return torch.cat(out)


def grid_png(originals: torch.Tensor, recons: torch.Tensor, pairs_per_row: int = GRID_PAIRS_PER_ROW) -> bytes:
    """PNG of (original | reconstruction) pairs, ``pairs_per_row`` pairs a row, on a white background.
    Both inputs uint8 (n, 3, S, S)."""
    from PIL import Image

    if originals.shape != recons.shape:
        raise ValueError(f"originals {list(originals.shape)} and reconstructions {list(recons.shape)} differ in shape")
    n, _, s, _ = originals.shape
    cols = min(pairs_per_row, n)
    rows = math.ceil(n / cols)
    pair_w = 2 * s + _GAP
    canvas = np.full((rows * (s + _GAP) - _GAP, cols * (pair_w + 2 * _GAP) - 2 * _GAP, 3), 255, dtype=np.uint8)
    for i in range(n):
        top, left = (i // cols) * (s + _GAP), (i % cols) * (pair_w + 2 * _GAP)
        canvas[top:top + s, left:left + s] = originals[i].permute(1, 2, 0).numpy()
        canvas[top:top + s, left + s + _GAP:left + pair_w] = recons[i].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def summary_uri(out: str) -> str:
    """Where the JSON summary of a grid goes: ``x.png`` -> ``x.json``, anything else -> ``<out>.json``."""
    return out[:-4] + ".json" if out.lower().endswith(".png") else out + ".json"


def reconstruct(decoder_ckpt: str, store: str, out: str, *, num: int = 8, use_ema: bool = True,
                batch_size: int = 16, device: str | torch.device | None = None,
                storage_options: dict | None = None) -> dict:
    """Decode ``num`` rows of ``store`` with the decoder of ``decoder_ckpt``; write the grid PNG to
    ``out`` and the summary beside it; return the summary (PSNR in dB, SSIM, on 0..255 images)."""
    from trainer.evaluate import psnr, ssim

    if num < 1:
        raise ReconstructError(f"--num must be >= 1, got {num}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent_store = LatentStore.open(store, storage_options)
    decoder, ckpt = load_decoder(decoder_ckpt, use_ema=use_ema, device=device, storage_options=storage_options)
    check_decoder_encoder(ckpt.encoder, ckpt.uri, latent_store)
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
    uri_lib.atomic_write_bytes(summary_uri(out), (json.dumps(result, indent=1) + "\n").encode(), storage_options)
    return result


__all__ = [
    "ReconstructError", "check_decoder_encoder", "decode_uint8", "grid_png", "load_decoder", "reconstruct",
    "resize_images", "store_samples", "summary_uri", "to_uint8",
]
