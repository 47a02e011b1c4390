"""Images as the stages show them: float pixels -> uint8, grids of samples, grids of
(original | reconstruction) pairs, PNG bytes, and the original crops of store rows.

Pixel conversion everywhere: round(255 * clamp(x, 0, 1)) (DiT's and torchvision's ``save_image``).
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.store import LatentStore

GRID_MAX = 64  # images in a sample grid
GRID_PAIRS_PER_ROW = 4
_GAP = 4  # pixels between images in a pair grid


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] (any layout) -> uint8 0..255 of the same layout (clamped, rounded to nearest)."""
    return x01.float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def to_uint8_hwc(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> uint8 [B, H, W, 3] numpy (the layout of sample files and PNGs)."""
    return to_uint8(pixels).permute(0, 2, 3, 1).cpu().numpy()


def resize_images(x01: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, R, R) in [0, 1] -> (n, 3, size, size): bicubic, antialiased, clamped (as the trainer's targets)."""
    if x01.shape[-1] == size:
        return x01
    return F.interpolate(x01, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)


def grid_indices(num: int, grid_max: int = GRID_MAX) -> np.ndarray:
    """Up to ``grid_max`` sample indices spread evenly over 0..num-1, increasing (all when num <= grid_max)."""
    if grid_max <= 0:
        return np.zeros(0, dtype=np.int64)
    if num <= grid_max:
        return np.arange(num, dtype=np.int64)
    return np.unique(np.linspace(0, num - 1, grid_max).round().astype(np.int64))


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [n, H, W, 3] -> one uint8 image [rows * (H + pad) + pad, cols * (W + pad) + pad, 3],
    row-major, white padding; cols defaults to ceil(sqrt(n))."""
    n, h, w, c = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return out


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


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


def store_samples(store: "LatentStore", num: int, size: int, storage_options: dict | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The store's first ``num`` valid rows: (unflipped latents float32 (n, C, H, W), original crops
    uint8 (n, 3, size, size), rows int64 (n,))."""
    from pipeline.preprocess import preprocess_image_bytes
    from pipeline.store import StoreError
    from trainer.decoder_data import SourceFetcher, store_resolution

    rows = np.flatnonzero(store.valid())[:num]
    if len(rows) == 0:
        raise StoreError(f"store {store.uri} has no valid rows")
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
