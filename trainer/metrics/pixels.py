"""Reconstruction metrics: PSNR and SSIM of image pairs, on the 0..255 scale."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _as_255(x: Any, name: str, channels_last: bool) -> torch.Tensor:
    """Images -> float64 [N, C, H, W] on the 0..255 scale. uint8 is taken as is; floats must be in
    [0, 1] and are multiplied by 255 (not rounded). [C, H, W] (or [H, W, C]) is one image."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"{name}: expected images [N, C, H, W] or [C, H, W], got shape {list(t.shape)}")
    if channels_last:
        t = t.permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.to(torch.float64)
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected uint8 (0..255) or float (0..1) images, got {t.dtype}")
    t = t.to(torch.float64)
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: float images must lie in [0, 1] (got {lo:.4g}..{hi:.4g}); clamp or pass uint8")
    return t * 255.0


def _pair(a: Any, b: Any, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_255(a, "a", channels_last), _as_255(b, "b", channels_last)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {list(x.shape)} vs {list(y.shape)}")
    return x, y.to(x.device)


def psnr(a: Any, b: Any, *, channels_last: bool = False, per_image: bool = False) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB, peak 255: 10 log10(255^2 / MSE) per image (MSE over all
    its pixels and channels), averaged over images (inf for identical images).

    a, b: [N, C, H, W] or [C, H, W] (``channels_last``: [N, H, W, C], e.g. ADM ``.npz`` arrays);
    uint8 0..255 or float 0..1 (x 255, not quantized), numpy or torch. ``per_image``: the [N] array.
    """
    x, y = _pair(a, b, channels_last)
    mse = (x - y).pow(2).flatten(1).mean(1)
    values = (10.0 * torch.log10(255.0**2 / mse)).cpu().numpy()
    return values if per_image else float(values.mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: Any, b: Any, *, channels_last: bool = False, per_image: bool = False, window: int = 11, sigma: float = 1.5,
) -> float | np.ndarray:
    """Structural similarity (Wang et al. 2004) on the 0..255 scale, per channel, averaged.

    Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03 (C1 = (0.01*255)^2, C2 = (0.03*255)^2),
    population (co)variances under the window, SSIM map over the "valid" positions only (no
    padding, as the reference MATLAB code); per image the mean of the map over positions and
    channels, then the mean over images. Inputs as :func:`psnr`; images need H, W >= ``window``.
    """
    x, y = _pair(a, b, channels_last)
    n, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"SSIM needs images of at least {window} x {window} pixels, got {h} x {w}")
    g = _gaussian_window(window, sigma).to(x.device)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        z = z.reshape(n * c, 1, h, w)
        z = F.conv2d(F.conv2d(z, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
        return z.reshape(n, c, h - window + 1, w - window + 1)

    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    values = ssim_map.flatten(1).mean(1).cpu().numpy()
    return values if per_image else float(values.mean())


__all__ = ["psnr", "ssim"]
