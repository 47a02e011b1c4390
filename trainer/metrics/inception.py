"""torch-fidelity's Inception network, its weights, and the features the metrics are computed from.

Images are uint8 [N, H, W, 3] (RGB, 0..255), as the ADM evaluation suite's ``.npz`` files hold them
in ``arr_0`` (guided-diffusion's ``evaluations/evaluator.py``).

What is torch-fidelity's (0.4) and what is ours
- torch-fidelity's: the network and everything from uint8 pixels to features. Its
  ``inception-v3-compat`` extractor is the TensorFlow Inception of 2015-12-05 (the one FID, IS
  and the ADM suite use) ported to PyTorch; its ``forward`` takes uint8 [B, 3, H, W], resizes to
  299 x 299 with a TF-1.x-compatible bilinear resize and scales by (x - 128) / 128. We only turn
  [N, H, W, 3] into [3, H, W] items of a torch Dataset that torch-fidelity's own batching loop
  (``get_featuresdict_from_dataset``) consumes.
- Ours: weights handling (hub / file / random, recorded with sha256s) and the sFID features (not
  in torch-fidelity).

Features (:func:`inception_features`):
- ``pool``: the 2048 pool features (FID, precision/recall).
- ``logits_unbiased``: the bias-free logits (pool @ W, 1008 classes; Inception Score).
- ``spatial`` (sFID): the first 7 channels of the TF graph's ``mixed_6/conv`` (torch-fidelity's
  ``Mixed_6d.branch1x1`` output, after its ReLU; 17 x 17 at 299 px), flattened in TF's
  (H, W, C) order so that the ``mu_s``/``sigma_s`` of ADM reference batches apply: 2023 values.

Inception weights: ``"hub"`` (torch-fidelity's release file, downloaded by torch.hub into
``$TORCH_HOME/hub/checkpoints`` and checked against the hash in its name), a local file or
fsspec URI (``.pth``/``.pt`` state dict or ``.safetensors``), or ``"random"`` (seeded init; only
for tests). Every result records which, with the file's sha256, and whether the weights are the
reference ones, so a random-weights number cannot pass for a real one.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import posixpath
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.utils import get_featuresdict_from_dataset

from pipeline import uri as U
from pipeline.weights import WeightsFileError, parse_tensor_file, unwrap_state_dict
from pipeline.encoders import state_dict_checksum
from schemas.errors import UserError
from trainer.metrics.errors import EvaluationError
from trainer.metrics.images import check_images

INCEPTION_URL = URL_INCEPTION_V3
# The release file's sha256 starts with the hex in its name; torch.hub checks it on download.
INCEPTION_SHA256_PREFIX = "6726825d"
FEATURE_EXTRACTOR = "inception-v3-compat"
NETWORK_DESCRIPTION = "torch-fidelity inception-v3-compat (TensorFlow Inception 2015-12-05, ported)"
RANDOM_SEED = 0
# torch-fidelity layer names: pool features (FID, precision/recall) and bias-free logits (IS).
_POOL_LAYER, _LOGITS_LAYER = "2048", "logits_unbiased"
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]


class InceptionWeightsError(UserError, ValueError):
    """A weights file that cannot be read or is not torch-fidelity's Inception."""


class InceptionWeightsUnavailable(UserError, RuntimeError):
    """The hub weights are not cached and cannot be downloaded (offline)."""


# --------------------------------------------------------------------------------------------
# Inception weights and network
# --------------------------------------------------------------------------------------------
def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def _weights_advice(url: str) -> str:
    name = posixpath.basename(urllib.parse.urlparse(url).path)
    return (
        f"Pass a local copy of torch-fidelity's Inception weights ({name}, from {url}) with "
        f"--inception-weights PATH (Python: weights=PATH), or put it in {_hub_cache_dir()}; "
        "--inception-weights random gives a seeded random network for tests only (its numbers mean nothing)."
    )


def _hash_prefix(url: str) -> str | None:
    """The sha256 prefix in a torch.hub file name (``name-<hex>.ext``), as torch.hub reads it."""
    match = torch.hub.HASH_REGEX.search(posixpath.basename(urllib.parse.urlparse(url).path))
    return match.group(1) if match and match.group(1) else None


def _hub_cache_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def hub_weights_path(url: str = INCEPTION_URL, *, timeout_s: float = 10.0) -> str:
    """Local path of torch-fidelity's Inception weights: the torch.hub cache, downloaded if needed.

    Offline (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set) only the cache is looked at. Online,
    a HEAD request with a ``timeout_s`` timeout comes first, so an unreachable host fails at once
    instead of hanging in the download. Raises InceptionWeightsUnavailable telling the user to pass
    a local file.
    """
    name = posixpath.basename(urllib.parse.urlparse(url).path)
    cached = os.path.join(_hub_cache_dir(), name)
    if os.path.exists(cached):
        return cached
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise InceptionWeightsUnavailable(
            f"the Inception weights are not in the torch.hub cache ({cached}) and HF_HUB_OFFLINE is set, "
            f"so they are not downloaded. {_weights_advice(url)}"
        )
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:  # URLError, HTTPError and socket timeouts are OSErrors
        raise InceptionWeightsUnavailable(f"cannot reach {url} ({e}). {_weights_advice(url)}") from e
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:  # writes a temporary file, checks the hash prefix, then renames: no half file is cached
        torch.hub.download_url_to_file(url, cached, hash_prefix=_hash_prefix(url), progress=True)
    except (OSError, RuntimeError) as e:
        raise InceptionWeightsUnavailable(f"downloading {url} failed ({e}). {_weights_advice(url)}") from e
    return cached


def _read_weights_file(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file's bytes) of a ``.pth``/``.pt``/``.bin`` torch pickle (loaded
    with ``weights_only=True``; a state dict, or one under ``state_dict``) or a ``.safetensors``."""
    location = U.normalize(uri)
    try:
        data = U.read_bytes(location)
    except FileNotFoundError:
        raise InceptionWeightsError(f"Inception weights file not found: {uri}") from None
    except OSError as e:
        raise InceptionWeightsError(f"cannot read Inception weights file {uri}: {e}") from e
    try:
        sd = unwrap_state_dict(parse_tensor_file(data, location), uri, nested=("state_dict",))
    except WeightsFileError as e:
        raise InceptionWeightsError(str(e)) from None
    return sd, U.sha256_bytes(data)


class _InceptionV3Skeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's network with its freshly made layers: the constructor always loads a state
    dict and is handed an empty one, which only this override lets through."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if len(state_dict) == 0:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _empty_state_dict_file() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return buf


def random_inception_state_dict(seed: int = RANDOM_SEED) -> dict[str, torch.Tensor]:
    """A seeded random state dict for torch-fidelity's Inception (same on every machine).

    Convolutions get He-normal weights (std sqrt(2 / fan_in)) so activations keep their scale
    through the 94 layers (PyTorch's default init shrinks them towards zero); batch norms stay at
    identity statistics; the classifier gets std 1 / sqrt(2048), zero bias.
    """
    net = _InceptionV3Skeleton(FEATURE_EXTRACTOR, [_POOL_LAYER], feature_extractor_weights_path=_empty_state_dict_file())
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(module.in_features))
                module.bias.zero_()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# One random network per seed and process: several commands in one process (tests, the demo) need
# the same one, and making it costs seconds on a busy CPU. Read only: _build_network copies it.
_cached_random_state_dict = functools.lru_cache(maxsize=2)(random_inception_state_dict)


def _build_network(state_dict: dict[str, torch.Tensor], where: str) -> FeatureExtractorInceptionV3:
    """torch-fidelity's own constructor, loading ``state_dict`` (strict) through its own path."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)  # tensors only, so torch-fidelity's weights_only=False load is safe
    buf.seek(0)
    try:
        return FeatureExtractorInceptionV3(
            FEATURE_EXTRACTOR, [_POOL_LAYER, _LOGITS_LAYER], feature_extractor_weights_path=buf
        )
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shape mismatches
        detail = str(e).strip().splitlines()
        raise InceptionWeightsError(
            f"{where}: not weights of torch-fidelity's {FEATURE_EXTRACTOR} network ({' '.join(detail[:3])[:400]})"
        ) from e


@dataclass
class InceptionExtractor:
    """torch-fidelity's Inception (eval mode, frozen, float32) on ``device``, and what it is."""

    network: FeatureExtractorInceptionV3
    device: torch.device
    info: dict


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """"cpu", "cuda" or "auto"/None (CUDA when available). torch-fidelity's loop moves batches with
    ``.cuda()``, i.e. to the current CUDA device, so "cuda:N" is accepted only for that one."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise EvaluationError(f"device must be 'cpu', 'cuda' or 'auto', got {device}")
    if not torch.cuda.is_available():
        raise EvaluationError("device 'cuda' was asked for, but CUDA is not available here")
    if device.index is not None and device.index != torch.cuda.current_device():
        raise EvaluationError(f"device {device}: only the current CUDA device ({torch.cuda.current_device()}) is supported")
    return torch.device("cuda")


def load_inception(
    weights: str = "hub", device: str | torch.device | None = "cpu", *, hub_url: str = INCEPTION_URL
) -> tuple[InceptionExtractor, dict]:
    """torch-fidelity's Inception with the given weights, and a description of them.

    weights: ``"hub"`` (torch-fidelity's release file via the torch.hub cache, see
    :func:`hub_weights_path`), a local path or fsspec URI of a weights file, or ``"random"``
    (:func:`random_inception_state_dict`, seed 0). device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    The info dict (also ``extractor.info``; recorded in every metrics JSON and stats file):
    ``source`` ("hub" | "file" | "random"), ``path`` (the file read; None for random), ``url`` (hub
    only), ``sha256`` (of the file's bytes; None for random), ``state_dict_sha256`` (of the loaded
    tensors, :func:`pipeline.encoders.state_dict_checksum`: what reference statistics are matched
    on), ``reference_weights`` (True when the file is torch-fidelity's release, by the sha256 prefix
    in its name), ``seed``, ``network`` and ``torch_fidelity`` (version).
    """
    device = _resolve_device(device)
    if weights == "random":
        state_dict, path, file_sha256, source = _cached_random_state_dict(RANDOM_SEED), None, None, "random"
    elif weights == "hub":
        path = hub_weights_path(hub_url)
        state_dict, file_sha256 = _read_weights_file(path)
        source = "hub"
        expected = _hash_prefix(hub_url)
        if expected and not file_sha256.startswith(expected):
            raise InceptionWeightsError(
                f"the cached hub file {path} has sha256 {file_sha256}, not {expected}...: it is corrupt or was "
                "replaced; delete it (it is downloaded again) or pass a file with --inception-weights"
            )
    else:
        path = U.normalize(weights)
        state_dict, file_sha256 = _read_weights_file(weights)
        source = "file"
    network = _build_network(state_dict, path or "random weights").to(device)
    info = {
        "source": source,
        "path": path,
        "url": hub_url if source == "hub" else None,
        "sha256": file_sha256,
        "state_dict_sha256": state_dict_checksum(network.state_dict()),
        "reference_weights": bool(file_sha256 and file_sha256.startswith(INCEPTION_SHA256_PREFIX)),
        "seed": RANDOM_SEED if source == "random" else None,
        "network": NETWORK_DESCRIPTION,
        "torch_fidelity": torch_fidelity.__version__,
    }
    return InceptionExtractor(network, device, info), info


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
class _ImagesNHWC(Dataset):
    """uint8 [N, H, W, 3] -> items uint8 [3, H, W], the input torch-fidelity's Inception takes."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(self.images[i]).transpose(2, 0, 1)))


@contextlib.contextmanager
def _ieee_float32(device: torch.device):
    """No TF32 in convolutions and matmuls while features are computed: CUDA convolutions use TF32
    by default, whose 10-bit mantissa perturbs the features that published FIDs were computed
    without. The previous settings are restored afterwards (not thread-safe, like the flags)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def inception_features(
    images: Any, extractor: InceptionExtractor, batch_size: int = 64, *, verbose: bool = False
) -> dict[str, np.ndarray]:
    """Inception features of uint8 [N, H, W, 3] images (any H, W: torch-fidelity resizes to 299).

    Returns float32 arrays: ``pool`` [N, 2048] (FID, precision/recall), ``logits_unbiased``
    [N, 1008] (IS), ``spatial`` [N, 2023] (sFID: ``Mixed_6d.branch1x1`` channels 0-6, (H, W, C)
    order). ``verbose`` shows torch-fidelity's progress bar on stderr.
    """
    images = check_images(images, "images")
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    spatial: list[torch.Tensor] = []

    def keep_spatial(_module, _inputs, output):  # output: (B, 192, 17, 17), after the ReLU
        spatial.append(torch.flatten(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1), 1).float().cpu())

    handle = extractor.network.Mixed_6d.branch1x1.register_forward_hook(keep_spatial)
    try:
        with _ieee_float32(extractor.device):
            features = get_featuresdict_from_dataset(
                _ImagesNHWC(images), extractor.network, batch_size, extractor.device.type == "cuda", True, verbose
            )
    finally:
        handle.remove()
    return {
        "pool": features[_POOL_LAYER].numpy(),
        "logits_unbiased": features[_LOGITS_LAYER].numpy(),
        "spatial": torch.cat(spatial).numpy(),
    }


def inception_features_of_chunks(
    chunks: Iterable[np.ndarray], extractor: InceptionExtractor, batch_size: int, total: int | None, verbose: bool
) -> dict[str, np.ndarray]:
    """:func:`inception_features` over an iterable of image chunks, concatenated."""
    from tqdm import tqdm

    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=total, disable=not verbose, unit="img", desc="Inception features") as bar:
        for chunk in chunks:
            for key, value in inception_features(chunk, extractor, batch_size).items():
                parts.setdefault(key, []).append(value)
            bar.update(len(chunk))
    if not parts:
        raise EvaluationError("no images")
    return {k: np.concatenate(v) for k, v in parts.items()}


__all__ = [
    "FEATURE_EXTRACTOR", "INCEPTION_SHA256_PREFIX", "INCEPTION_URL", "InceptionExtractor", "InceptionWeightsError",
    "InceptionWeightsUnavailable", "NETWORK_DESCRIPTION", "RANDOM_SEED", "SPATIAL_CHANNELS", "hub_weights_path",
    "inception_features", "inception_features_of_chunks", "load_inception", "random_inception_state_dict",
]
