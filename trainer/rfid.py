"""``rae-pipeline rfid``: how well a decoder reconstructs a store's images from their latents.

For each chosen valid row of the store (all, or a seeded subset of ``num``: the same rows
``metrics.images.store_image_set`` picks): the decoder decodes the row's stored latent, as is (the
unflipped ``latents`` array, unnormalized: the decoder reads raw encoder tokens), and the result is
compared with the original image, read through the source reference the store recorded and ADM
center-cropped to the decoder's output size (``store_image_set``). Reported:

- rFID: Frechet distance between the Inception pool features of the reconstructions and of the
  originals (torch-fidelity's network; which weights, and whether they are the reference ones, is
  recorded: ``random`` weights give numbers comparable to nothing published);
- PSNR (dB, peak 255) and SSIM (11 x 11 Gaussian, sigma 1.5), per image on uint8 pixels, averaged.

Reconstructions are converted to uint8 as samples are (``sample.to_uint8``: round to nearest).
Everything runs chunk by chunk: memory holds one chunk of images and the features.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from pipeline import uri as uri_lib
from schemas.errors import UserError
from trainer.images import image_grid, png_bytes, to_uint8_hwc
from trainer.loading import check_decoder_reads, load_decoder


class ReconstructionError(UserError, ValueError):
    """A decoder/store pair rfid refuses; says which and why."""


def _row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted row indices -> [start, stop) runs of consecutive rows (one store read each)."""
    runs: list[tuple[int, int]] = []
    for r in rows.tolist():
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def read_latents(store, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), C, H, W]: the stored (unflipped) latents of sorted ``rows``."""
    return np.concatenate([store.read_rows(a, b) for a, b in _row_runs(np.asarray(rows))])


@torch.no_grad()
def reconstruction_metrics(decoder_ckpt: str, store: str, *, num: int | None = None, seed: int = 0,
                           weights: str = "ema", inception_weights: str = "hub", extractor=None,
                           device: str | torch.device = "cpu", batch_size: int = 32, chunk: int = 64,
                           grid_out: str | None = None, grid_pairs: int = 8, progress: bool = False,
                           storage_options: dict | None = None) -> dict[str, Any]:
    """rFID, PSNR and SSIM of ``decoder_ckpt`` on the store at ``store`` (module docstring).

    num/seed: a seeded random subset of the valid rows (default all). extractor: an
    ``metrics.inception.InceptionExtractor`` (default ``load_inception(inception_weights, device)``).
    grid_out: optionally a PNG of the first ``grid_pairs`` originals (top row) over their
    reconstructions (bottom row). Returns a JSON-ready dict.
    """
    from pipeline.store import LatentStore
    from schemas import store_v1
    from trainer.metrics.errors import EvaluationError
    from trainer.metrics.fid import feature_statistics, frechet_distance_from_features
    from trainer.metrics.images import _choose, store_image_set
    from trainer.metrics.inception import inception_features, load_inception
    from trainer.metrics.pixels import psnr, ssim

    lat_store = LatentStore.open(store, storage_options)
    device = torch.device(device)
    decoder = load_decoder(decoder_ckpt, weights=weights, device=device, storage_options=storage_options)
    identity = store_v1.encoder_identity(lat_store.spec)
    check_decoder_reads(decoder, lat_store.latent_shape, f"store {lat_store.uri}", identity)
    resolution = int((lat_store.spec.get("preprocessing") or {}).get("resolution") or decoder.image_size)
    if resolution != decoder.image_size:
        raise ReconstructionError(
            f"decoder {decoder.uri} outputs {decoder.image_size} px images; store {lat_store.uri} was encoded from "
            f"{resolution} px crops: compare at one size (use a decoder for {resolution} px)"
        )
    images = store_image_set(lat_store.uri, resolution=resolution, num=num, seed=seed, chunk=chunk)
    valid_rows = np.flatnonzero(lat_store.valid())
    # The rows store_image_set reads, in its order (same choice function, same arguments).
    rows = valid_rows[_choose(len(valid_rows), num, seed, f"store {lat_store.uri} (valid rows)")]
    if len(rows) < 2:
        raise EvaluationError(f"store {lat_store.uri}: rFID needs at least 2 images, {len(rows)} chosen")
    if extractor is None:
        extractor, _ = load_inception(inception_weights, device)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), unit="img", desc="rfid", file=sys.stderr, dynamic_ncols=True)
    pool_orig, pool_recon, psnrs, ssims, grid_orig, grid_recon = [], [], [], [], [], []
    done = 0
    for originals in images.chunks():
        chunk_rows = rows[done: done + len(originals)]
        recon = []
        for s in range(0, len(chunk_rows), batch_size):
            z = torch.from_numpy(read_latents(lat_store, chunk_rows[s: s + batch_size])).to(device)
            recon.append(to_uint8_hwc(decoder.model.decode_to_pixels(z)))
        recon_np = np.concatenate(recon)
        psnrs.append(psnr(originals, recon_np, channels_last=True, per_image=True))
        ssims.append(ssim(originals, recon_np, channels_last=True, per_image=True))
        pool_orig.append(inception_features(originals, extractor, batch_size)["pool"])
        pool_recon.append(inception_features(recon_np, extractor, batch_size)["pool"])
        if len(grid_orig) < grid_pairs:
            take = grid_pairs - len(grid_orig)
            grid_orig.extend(originals[:take])
            grid_recon.extend(recon_np[:take])
        done += len(originals)
        if bar is not None:
            bar.update(len(originals))
    if bar is not None:
        bar.close()
    if done != len(rows):
        raise EvaluationError(f"store {lat_store.uri}: read {done} source images for {len(rows)} rows")

    mu, sigma = feature_statistics(np.concatenate(pool_orig))
    rfid = frechet_distance_from_features(np.concatenate(pool_recon), mu, sigma)
    psnr_all, ssim_all = np.concatenate(psnrs), np.concatenate(ssims)
    if grid_out is not None and grid_orig:
        pairs = np.stack(grid_orig + grid_recon)
        uri_lib.atomic_write_bytes(grid_out, png_bytes(image_grid(pairs, cols=len(grid_orig))), storage_options)
    info = extractor.info
    result: dict[str, Any] = {
        "rfid": float(rfid) if np.isfinite(rfid) else None,
        "psnr": float(psnr_all[np.isfinite(psnr_all)].mean()) if np.isfinite(psnr_all).any() else None,
        "psnr_identical_images": int((~np.isfinite(psnr_all)).sum()),
        "ssim": float(ssim_all.mean()),
        "num_images": int(done),
        "image_size": [resolution, resolution],
        "store": {**images.description, "encoder": identity},
        "decoder": {"uri": decoder.uri, "weights": decoder.weights, "weights_sha256": decoder.weights_sha256,
                    "encoder": decoder.encoder},
        "inception": dict(info),
        "comparable_to_published": bool(info["reference_weights"]),
        "grid": uri_lib.normalize(grid_out) if grid_out else None,
        "settings": {"latents": "latents (unflipped), unnormalized", "pixels": "round(255 * clamp(x, 0, 1))",
                     "psnr": "per image, peak 255, mean over images (identical images excluded)",
                     "ssim": "gaussian 11x11 sigma 1.5, valid positions, mean over images",
                     "fid_features": "pool (2048)"},
    }
    if not result["comparable_to_published"]:
        result["warning"] = (f"Inception weights are {info['source']} (sha256 {info['sha256'] or 'n/a'}), not the "
                             "reference network: rFID is not comparable to published numbers")
    return result


__all__ = ["ReconstructionError", "read_latents", "reconstruction_metrics"]
