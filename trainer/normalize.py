"""Latent statistics: reading a statistics file (``stat.pt``, ``.safetensors``, ``.npz``) and the
per-element normalization the trainer applies to latents (:class:`LatentNormalizer`)."""
from __future__ import annotations

import io

import numpy as np
import torch

from pipeline import uri as U
from pipeline.store import LatentStore
from pipeline.weights import WeightsFileError, parse_tensor_file
from schemas import store_v1 as S
from schemas.errors import UserError


# Which statistics normalize a DiT's latents: "mean_var" (z - mean) / sqrt(var + eps), the default
# and what checkpoints that record no mode used; "var" z / sqrt(var + eps) (mean taken as zero), as
# the released DiT^DH-XL was trained (the released DINOv2-B stat.pt holds the variance only).
STATS_MODES = ("mean_var", "var")


class StatsFileError(UserError, ValueError):
    """Latent statistics that cannot be used (missing or unreadable file, wrong keys or shapes); names the file."""


def _stats_array(value, uri: str, key: str) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise StatsFileError(f"statistics file {uri}: {key!r} is not a numeric array ({type(value).__name__})") from None
    while arr.ndim > 3 and arr.shape[0] == 1:  # tolerate a saved leading batch dim [1, C, H, W]
        arr = arr[0]
    if arr.ndim != 3:
        raise StatsFileError(f"statistics file {uri}: {key!r} has shape {list(arr.shape)}, expected [C, H, W]")
    if not np.isfinite(arr).all():
        raise StatsFileError(f"statistics file {uri}: {key!r} holds non-finite values")
    if key == "var" and (arr < 0).any():
        raise StatsFileError(f"statistics file {uri}: 'var' holds negative values")
    return arr


def load_stats_file(uri: str, storage_options: dict | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(mean, var) float64 [C, H, W] from a statistics file; either may be None (absent).

    Formats by extension: ``.safetensors`` and ``.npz`` (arrays named ``mean`` / ``var``); anything
    else is read as the reference's ``stat.pt``: a dict with optional ``"mean"`` / ``"var"`` tensors,
    loaded with ``torch.load(weights_only=True)``.
    """
    try:
        data = U.read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise StatsFileError(f"statistics file {uri} does not exist") from None
    name = str(uri).lower()
    try:
        if name.endswith(".safetensors"):
            import safetensors.numpy

            entries = safetensors.numpy.load(data)
        elif name.endswith(".npz"):
            with np.load(io.BytesIO(data)) as z:
                entries = {k: z[k] for k in z.files}
        else:
            entries = parse_tensor_file(data, uri)
    except StatsFileError:
        raise
    except WeightsFileError as e:
        raise StatsFileError(f"statistics file {e}") from None
    except Exception as e:  # torch/safetensors/numpy each raise their own types for unreadable files
        raise StatsFileError(f"statistics file {uri} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(entries, dict):
        raise StatsFileError(f"statistics file {uri} holds a {type(entries).__name__}, expected a dict with 'mean'/'var'")
    mean = _stats_array(entries.get("mean"), uri, "mean")
    var = _stats_array(entries.get("var"), uri, "var")
    if mean is None and var is None:
        raise StatsFileError(f"statistics file {uri} holds neither 'mean' nor 'var' (keys: {sorted(entries)[:10]})")
    if mean is not None and var is not None and mean.shape != var.shape:
        raise StatsFileError(f"statistics file {uri}: 'mean' {list(mean.shape)} and 'var' {list(var.shape)} differ in shape")
    return mean, var


class LatentNormalizer:
    """z_norm = (z - mean) / sqrt(var + eps), per element of [C, H, W]; absent mean = 0, absent var = 1.

    Computed in float32 in the reference's order of operations. ``source`` says where the
    statistics came from ("store", "file:<uri>", ...); it names them in error messages.
    """

    def __init__(self, mean=None, var=None, eps: float = S.STATS_EPS, *, source: str = "given"):
        def tensor(a):
            return None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.float32).clone()

        self.mean, self.var, self.eps, self.source = tensor(mean), tensor(var), float(eps), source
        if self.mean is not None and self.var is not None and self.mean.shape != self.var.shape:
            raise StatsFileError(
                f"statistics from {source}: mean {list(self.mean.shape)} and var {list(self.var.shape)} differ"
            )
        one = torch.ones((), dtype=torch.float32)
        self._shift = self.mean if self.mean is not None else torch.zeros((), dtype=torch.float32)
        self._scale = torch.sqrt((self.var if self.var is not None else one) + self.eps)

    @classmethod
    def from_store(cls, store: LatentStore) -> "LatentNormalizer":
        mean, var = store.stats()
        return cls(mean, var, eps=store.spec["statistics"].get("eps", S.STATS_EPS), source="store")

    @classmethod
    def from_file(cls, uri: str, storage_options: dict | None = None, eps: float = S.STATS_EPS) -> "LatentNormalizer":
        mean, var = load_stats_file(uri, storage_options)
        return cls(mean, var, eps=eps, source=f"file:{uri}")

    @property
    def shape(self) -> tuple[int, ...] | None:
        t = self.mean if self.mean is not None else self.var
        return None if t is None else tuple(t.shape)

    def check_shape(self, latent_shape: tuple[int, int, int]) -> None:
        """ValueError naming the source and key when the statistics do not fit the latents."""
        for key, t in (("mean", self.mean), ("var", self.var)):
            if t is not None and tuple(t.shape) != tuple(latent_shape):
                raise StatsFileError(
                    f"statistics from {self.source}: {key!r} has shape {list(t.shape)}, "
                    f"the store's latents are {list(latent_shape)}"
                )

    def _on(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale.device != z.device:
            self.to(z.device)
        return self._shift, self._scale

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """z: float [..., C, H, W] -> same shape."""
        shift, scale = self._on(z)
        return (z - shift) / scale

    def normalize_(self, z: torch.Tensor) -> torch.Tensor:
        """In place; same values as :meth:`normalize`."""
        shift, scale = self._on(z)
        return z.sub_(shift).div_(scale)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        shift, scale = self._on(z)
        return z * scale + shift

    def to(self, device) -> "LatentNormalizer":
        self._shift, self._scale = self._shift.to(device), self._scale.to(device)
        return self

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The present statistics as float32 CPU tensors ({"mean"?, "var"?}), the reference `stat.pt` layout."""
        return {k: t.clone() for k, t in (("mean", self.mean), ("var", self.var)) if t is not None}

    def with_mode(self, mode: str) -> "LatentNormalizer":
        """These statistics as ``mode`` (one of :data:`STATS_MODES`) uses them: "mean_var" returns
        ``self``; "var" a normalizer with the variance alone (mean zero; var 1 where none is given)."""
        if mode not in STATS_MODES:
            raise StatsFileError(f"statistics mode {mode!r} is not one of {list(STATS_MODES)}")
        if mode == "mean_var" or self.mean is None:
            return self
        var = None if self.var is None else self.var.numpy()
        return LatentNormalizer(None, var, self.eps, source=self.source).to(self._scale.device)

    def describe(self) -> dict:
        """For checkpoint metadata: {"mean": bool, "var": bool, "source": str}."""
        return {"mean": self.mean is not None, "var": self.var is not None, "source": self.source}


__all__ = ["STATS_MODES", "LatentNormalizer", "load_stats_file"]
