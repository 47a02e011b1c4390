"""Sample-quality metrics in the ADM evaluation-suite convention (FID, sFID, Inception Score,
precision, recall) and reconstruction metrics (PSNR, SSIM).

Image sets are uint8 [N, H, W, 3] (RGB, 0..255), as the ADM suite's ``.npz`` files hold them in
``arr_0``. The ADM suite is guided-diffusion's ``evaluations/evaluator.py``.

What is torch-fidelity's (0.4) and what is ours
- torch-fidelity's: the network and everything from uint8 pixels to features. Its
  ``inception-v3-compat`` extractor is the TensorFlow Inception of 2015-12-05 (the one FID, IS
  and the ADM suite use) ported to PyTorch; its ``forward`` takes uint8 [B, 3, H, W], resizes to
  299 x 299 with a TF-1.x-compatible bilinear resize and scales by (x - 128) / 128. We only turn
  [N, H, W, 3] into [3, H, W] items of a torch Dataset that torch-fidelity's own batching loop
  (``get_featuresdict_from_dataset``) consumes. The metric maths are torch-fidelity's too:
  ``fid_statistics_to_metric`` (Frechet distance), ``isc_features_to_metric`` (Inception Score),
  ``calculate_precision_recall_part`` (k-NN precision and recall).
- Ours: weights handling (hub / file / random, recorded with sha256s), the sFID features (not in
  torch-fidelity), reference-statistics files, reading images from ``.npz`` files, folders and
  latent stores, PSNR and SSIM.

Conventions (ADM's where it differs from torch-fidelity's defaults):
- FID statistics: float64 mean and covariance (``np.cov``, N - 1) of the 2048 pool features.
- sFID: the first 7 channels of the TF graph's ``mixed_6/conv`` (torch-fidelity's
  ``Mixed_6d.branch1x1`` output, after its ReLU; 17 x 17 at 299 px), flattened in TF's
  (H, W, C) order so that the ``mu_s``/``sigma_s`` of ADM reference batches apply: 2023 values.
- Precision/recall: k = 3 nearest neighbours on the Inception pool features (Kynkaenniemi et al.
  as the ADM suite runs it; torch-fidelity's own default network for them is VGG-16).
- Inception Score: softmax of the bias-free logits (pool @ W, 1008 classes, as ADM and
  torch-fidelity both do), 10 splits, after torch-fidelity's seeded shuffle (seed 2020). ADM
  splits in file order, which lowers the score of files written class by class.

Inception weights: ``"hub"`` (torch-fidelity's release file, downloaded by torch.hub into
``$TORCH_HOME/hub/checkpoints`` and checked against the hash in its name), a local file or
fsspec URI (``.pth``/``.pt`` state dict or ``.safetensors``), or ``"random"`` (seeded init; only
for tests). Every result records which, with the file's sha256, and whether the weights are the
reference ones, so a random-weights number cannot pass for a real one.

Reference statistics files (``ref-stats``; format ``rae-inception-ref-stats`` v1), ``.npz`` keys:
    format, version      0-d str "rae-inception-ref-stats", 0-d int 1
    mu, sigma            float64 [2048], [2048, 2048]: FID statistics (ADM key names)
    mu_s, sigma_s        float64 [2023], [2023, 2023]: sFID statistics (ADM key names)
    pool                 float32 [N, 2048]: pool features, for precision/recall
    logits_unbiased      float32 [N, 1008]: bias-free logits, for the reference's own IS
    num_images           0-d int64
    inception            0-d str: JSON of the network's description (see :func:`load_inception`)
    source               0-d str: JSON of where the images came from
ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images plus ``mu``,
``sigma``, ``mu_s``, ``sigma_s`` of the TensorFlow network) are read as they are: their
``mu``/``sigma`` serve FID when the network is the reference one, and ``arr_0`` gives the features
for precision/recall; see :func:`load_reference`.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import pickle
import posixpath
import struct
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part
from torch_fidelity.utils import get_featuresdict_from_dataset

from pipeline import uri as U
from pipeline.encoders import state_dict_checksum

INCEPTION_URL = URL_INCEPTION_V3
# The release file's sha256 starts with the hex in its name; torch.hub checks it on download.
INCEPTION_SHA256_PREFIX = "6726825d"
FEATURE_EXTRACTOR = "inception-v3-compat"
NETWORK_DESCRIPTION = "torch-fidelity inception-v3-compat (TensorFlow Inception 2015-12-05, ported)"
RANDOM_SEED = 0
# torch-fidelity layer names: pool features (FID, precision/recall) and bias-free logits (IS).
_POOL_LAYER, _LOGITS_LAYER = "2048", "logits_unbiased"
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]
ISC_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed
REF_STATS_FORMAT = "rae-inception-ref-stats"
REF_STATS_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated: a bad ``.npz``, mismatched statistics, too few images."""


class InceptionWeightsError(ValueError):
    """A weights file that cannot be read or is not torch-fidelity's Inception."""


class InceptionWeightsUnavailable(RuntimeError):
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
    if location.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            obj: Any = load_safetensors(data)
        except SafetensorError as e:
            raise InceptionWeightsError(f"{uri}: not a readable safetensors file ({e})") from e
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise InceptionWeightsError(f"{uri}: not a readable torch weights file ({e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InceptionWeightsError(f"{uri}: expected a state dict (name -> tensor)")
    return obj, U.sha256_bytes(data)


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
def check_images(images: Any, where: str) -> np.ndarray:
    """``images`` as a uint8 [N, H, W, 3] numpy array (memory maps stay memory maps); torch
    tensors are moved to the CPU. Raises EvaluationError naming ``where``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise EvaluationError(f"{where}: expected a uint8 array [N, H, W, 3], got {type(images).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise EvaluationError(
            f"{where}: expected uint8 [N, H, W, 3] images (the ADM suite's arr_0), got {images.dtype} {list(images.shape)}"
        )
    if len(images) == 0:
        raise EvaluationError(f"{where}: no images")
    return images


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


def _features_of_chunks(
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


# --------------------------------------------------------------------------------------------
# Metric maths (torch-fidelity's, with checks and ADM's precision)
# --------------------------------------------------------------------------------------------
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D, D]) of features [N, D]: mean and ``np.cov`` (N - 1)."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise EvaluationError(f"statistics need features [N >= 2, D], got shape {list(features.shape)}")
    stats = fid_features_to_statistics(torch.from_numpy(features.astype(np.float64)))
    return stats["mu"], stats["sigma"]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (torch-fidelity's formula: the
    trace of the square root is the sum of the square roots of the eigenvalues of S1 S2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, a, shape in (("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if d < 1 or a.shape != shape:
            raise EvaluationError(
                f"Frechet distance: mu1 {list(mu1.shape)} needs {name} of shape {list(shape)}, got {list(a.shape)}"
            )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise EvaluationError("Frechet distance: statistics contain NaN or inf")
    stat1, stat2 = {"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}
    return float(fid_statistics_to_metric(stat1, stat2, verbose=False)[KEY_METRIC_FID])


def frechet_distance_from_features(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """:func:`frechet_distance` with the first set given by its features [N, D].

    With fewer samples than dimensions (N - 1 < D: demo runs, previews during training) the
    samples' covariance S1 = A^T A / (N - 1) (A: centred features) has rank < N, and the non-zero
    eigenvalues of S1 S2 are those of the symmetric N x N matrix A S2 A^T / (N - 1): the same
    value, exactly, from an N x N symmetric eigenproblem instead of a D x D non-symmetric one
    (milliseconds instead of tens of seconds on a small CPU at D = 2048). Otherwise the
    statistics go to :func:`frechet_distance`.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise EvaluationError(f"statistics need features [N >= 2, D], got shape {list(x.shape)}")
    n, d = x.shape
    if n - 1 >= d:
        return frechet_distance(*feature_statistics(x), mu2, sigma2)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != (d,) or sigma2.shape != (d, d):
        raise EvaluationError(
            f"Frechet distance: features of dimension {d} need mu2 [{d}] and sigma2 [{d}, {d}], "
            f"got {list(mu2.shape)} and {list(sigma2.shape)}"
        )
    if not (np.isfinite(mu2).all() and np.isfinite(sigma2).all() and np.isfinite(x).all()):
        raise EvaluationError("Frechet distance: features or statistics contain NaN or inf")
    mu1 = x.mean(0)
    centred = x - mu1
    small = centred @ sigma2 @ centred.T / (n - 1)  # (N, N), symmetric PSD up to rounding
    eigenvalues = np.linalg.eigvalsh((small + small.T) / 2)
    # Eigenvalues at rounding level (the null space when S2 has rank < N too) are zero, not noise
    # whose square roots would add up (np.linalg.matrix_rank's tolerance).
    eigenvalues[eigenvalues < eigenvalues.max(initial=0.0) * n * np.finfo(np.float64).eps] = 0.0
    diff = mu1 - mu2
    trace_sigma1 = float((centred**2).sum()) / (n - 1)
    return float(diff @ diff + trace_sigma1 + np.trace(sigma2) - 2.0 * np.sqrt(eigenvalues).sum())


def inception_score(
    scores: np.ndarray, splits: int = 10, *, kind: str = "logits", shuffle: bool = True, seed: int = ISC_SHUFFLE_SEED
) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))).

    scores [N, C]: logits (``kind="logits"``, softmax taken here) or probabilities
    (``kind="probs"``, rows summing to 1). The rows are shuffled with ``seed`` before splitting
    (torch-fidelity); splits are capped at N.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) == 0:
        raise EvaluationError(f"Inception Score needs scores [N >= 1, C], got shape {list(scores.shape)}")
    if kind == "probs":
        if scores.min() < 0 or not np.allclose(scores.sum(1), 1.0, atol=1e-4):
            raise EvaluationError("Inception Score: kind='probs' needs non-negative rows that sum to 1")
        # softmax(log p) = p; zeros become a negligible 1e-300 instead of log(0) = -inf.
        scores = np.log(np.maximum(scores, 1e-300))
    elif kind != "logits":
        raise ValueError(f"kind must be 'logits' or 'probs', got {kind!r}")
    if splits < 1:
        raise EvaluationError(f"Inception Score needs splits >= 1, got {splits}")
    result = isc_features_to_metric(torch.from_numpy(scores), min(int(splits), len(scores)), shuffle, seed)
    return float(result[KEY_METRIC_ISC_MEAN]), float(result[KEY_METRIC_ISC_STD])


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, *, batch_size: int = 10000,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(precision, recall) of the k-NN manifold estimate (Kynkaenniemi et al. 2019, ADM's k = 3).

    Precision: the fraction of fake samples inside the ball of some real sample whose radius is
    the distance to that real sample's k-th nearest real neighbour; recall: the same with the
    roles swapped. Distances are computed in blocks of ``batch_size`` rows on ``device``.
    """
    # Copies: the inputs may be read-only (memory maps, np.load), which torch warns about.
    real = torch.from_numpy(np.array(real_features, dtype=np.float32)).to(device)
    fake = torch.from_numpy(np.array(fake_features, dtype=np.float32)).to(device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise EvaluationError(
            f"precision/recall: features [N, D] of equal D needed, got {list(real.shape)} and {list(fake.shape)}"
        )
    if k < 1 or min(len(real), len(fake)) < k + 1:
        raise EvaluationError(
            f"precision/recall with k={k} needs at least {k + 1} real and fake samples, got {len(real)} and {len(fake)}"
        )
    # torch-fidelity's convention: features_1 are the generated samples, features_2 the real ones.
    precision, recall = calculate_precision_recall_part(fake, real, neighborhood=k, batch_size=batch_size)
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------------
# Image sets: .npz files, folders, latent stores
# --------------------------------------------------------------------------------------------
def _npz_member_memmap(path: str, name: str) -> np.ndarray | None:
    """A read-only memory map of ``name`` inside an uncompressed local ``.npz`` (what np.savez
    writes), so 50k x 256 x 256 x 3 samples are not read into memory at once; None when the member
    is compressed or has a layout a memory map cannot express."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject or math.prod(shape) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def open_npz(uri: str) -> Mapping[str, np.ndarray]:
    """The arrays of an ``.npz`` (local path or fsspec URI), without pickles. Local uncompressed
    members are memory-mapped; others are read on access."""
    location = U.normalize(uri)
    try:
        if U.is_local(location):
            npz = np.load(location, allow_pickle=False)
        else:
            npz = np.load(io.BytesIO(U.read_bytes(location)), allow_pickle=False)
    except FileNotFoundError:
        raise EvaluationError(f"file not found: {uri}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"{uri}: not a readable .npz file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{uri}: a single .npy array, not an .npz file")
    return _NpzArrays(location, npz)


class _NpzArrays(Mapping):
    def __init__(self, location: str, npz):
        self.location, self.npz = location, npz

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.npz.files:
            raise KeyError(key)
        if U.is_local(self.location):
            mapped = _npz_member_memmap(self.location, key + ".npy")
            if mapped is not None:
                return mapped
        return self.npz[key]

    def __iter__(self):
        return iter(self.npz.files)

    def __len__(self) -> int:
        return len(self.npz.files)


def read_npz_images(uri: str, key: str = "arr_0") -> np.ndarray:
    """uint8 [N, H, W, 3] images of an ADM-format ``.npz`` (memory-mapped when possible)."""
    arrays = open_npz(uri)
    if key not in arrays:
        raise EvaluationError(f"{uri}: no '{key}' array (the ADM suite's images); arrays: {sorted(arrays)}")
    return check_images(arrays[key], f"{uri}:{key}")


def _choose(total: int, num: int | None, seed: int, what: str) -> np.ndarray:
    """Sorted indices: all of range(total), or a seeded random subset of ``num`` of them (the
    first N of a listing sorted by class would cover only a few classes)."""
    if num is None or num == total:
        return np.arange(total)
    if num < 1 or num > total:
        raise EvaluationError(f"--num {num}: {what} has {total} image(s)")
    return np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False))


def _decode_all(blobs: list[tuple[str, bytes]], resolution: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """Encoded images -> uint8 [n, R, R, 3] through the ADM center crop (pipeline.preprocess)."""
    from pipeline.preprocess import ImageDecodeError, preprocess_image_bytes

    def one(item: tuple[str, bytes]) -> np.ndarray:
        name, data = item
        try:
            return preprocess_image_bytes(data, resolution).transpose(1, 2, 0)
        except ImageDecodeError as e:
            raise EvaluationError(f"{name}: cannot decode image ({e})") from e

    return np.stack(list(pool.map(one, blobs)))


@dataclass
class ImageSet:
    """Images to evaluate or summarise, read in chunks: ``count`` images, uint8 [n, H, W, 3]
    chunks from ``chunks()``, and ``description`` (JSON: where they came from)."""

    count: int
    chunks: Callable[[], Iterator[np.ndarray]]
    description: dict


def npz_image_set(uri: str, *, num: int | None = None, seed: int = 0, chunk: int = 1024) -> ImageSet:
    images = read_npz_images(uri)
    index = _choose(len(images), num, seed, uri)

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(index), chunk):
            yield np.asarray(images[index[start : start + chunk]])

    desc = {"kind": "npz", "uri": U.normalize(uri), "num": int(len(index)), "seed": seed if num else None,
            "image_size": list(images.shape[1:3])}
    return ImageSet(int(len(index)), chunks, desc)


def folder_image_set(
    uri: str, *, resolution: int = 256, num: int | None = None, seed: int = 0, chunk: int = 256, threads: int | None = None
) -> ImageSet:
    """Every image file under ``uri`` (recursive, sorted, hidden files skipped; extensions as
    pipeline.sources), ADM center-cropped to ``resolution`` (a no-op on images of that size)."""
    fs, root = U.get_fs(uri)
    if not fs.isdir(root):
        raise EvaluationError(f"not a folder: {uri}")
    root = root.rstrip("/")
    paths = []
    for path in sorted(fs.find(root)):
        rel = path[len(root) + 1 :]
        if path.lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in rel.split("/")):
            paths.append(path)
    if not paths:
        raise EvaluationError(f"no image files under {uri}")
    chosen = [paths[i] for i in _choose(len(paths), num, seed, uri)]

    def chunks() -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(chosen), chunk):
                part = chosen[start : start + chunk]
                blobs = fs.cat_ranges(part, None, None, on_error="return")
                for path, data in zip(part, blobs):
                    if isinstance(data, BaseException):
                        raise EvaluationError(f"cannot read {path}: {data}")
                yield _decode_all(list(zip(part, blobs)), resolution, pool)

    desc = {"kind": "folder", "uri": U.normalize(uri), "num": len(chosen), "seed": seed if num else None,
            "resolution": resolution, "crop": "adm_center_crop"}
    return ImageSet(len(chosen), chunks, desc)


def store_image_set(
    uri: str, *, resolution: int | None = None, num: int | None = None, seed: int = 0, chunk: int = 256,
    threads: int | None = None,
) -> ImageSet:
    """The source images of a latent store's valid rows, read through the per-row source
    references the store recorded (ImageFolder: the file; Parquet: file + row, read a row group at
    a time through pipeline.sources), checked against their recorded sha256, and ADM
    center-cropped to ``resolution`` (default: the store's own)."""
    from pipeline.sources import SourceItem, SourceReader, open_source
    from pipeline.store import LatentStore

    store = LatentStore.open(uri)
    source = store.spec["source"]
    if source["kind"] not in ("imagefolder", "parquet"):
        raise EvaluationError(f"store {store.uri} was not encoded from images (source kind {source['kind']!r})")
    if resolution is None:
        resolution = int((store.spec.get("preprocessing") or {}).get("resolution") or 256)
    rows = np.flatnonzero(store.valid())
    if len(rows) == 0:
        raise EvaluationError(f"store {store.uri} has no valid rows")
    chosen = rows[_choose(len(rows), num, seed, f"store {store.uri} (valid rows)")]

    if source["kind"] == "parquet":
        listing = open_source(source["uri"], source["split"], kind="parquet")
        read_group = listing.read_group
    else:
        read_group, listing = SourceReader("imagefolder").read_group, None

    def item_of(ref: dict) -> SourceItem:
        if listing is None:
            return SourceItem(int(ref["id"]), ref["key"], ref["uri"], None, ref.get("size"), int(ref["label"]), 0)
        item = listing.items[int(ref["id"])] if int(ref["id"]) < len(listing.items) else None
        if item is None or item.key != ref["key"]:
            raise EvaluationError(
                f"store {store.uri}: row {ref['index']} ({ref['key']}) is not item {ref['id']} of {source['uri']} any more"
            )
        return item

    def chunks() -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(chosen), chunk):
                refs = [store.source_ref(int(i)) for i in chosen[start : start + chunk]]
                try:
                    blobs = read_group([item_of(r) for r in refs])
                except (OSError, ValueError) as e:
                    if isinstance(e, EvaluationError):
                        raise
                    raise EvaluationError(f"store {store.uri}: reading its source images failed: {e}") from e
                named = []
                for ref, data in zip(refs, blobs):
                    where = ref["uri"] + (f" row {ref['row']}" if ref.get("row") is not None else "")
                    if ref.get("sha256") and U.sha256_bytes(data) != ref["sha256"]:
                        raise EvaluationError(f"{where}: bytes differ from the ones store {store.uri} encoded (sha256)")
                    named.append((where, data))
                yield _decode_all(named, resolution, pool)

    desc = {"kind": "store", "uri": store.uri, "store_id": store.store_id, "source": source["uri"],
            "split": source["split"], "num": int(len(chosen)), "seed": seed if num else None,
            "resolution": resolution, "crop": "adm_center_crop"}
    return ImageSet(int(len(chosen)), chunks, desc)


# --------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------
def compute_reference_stats(
    images: Any, extractor: InceptionExtractor, *, batch_size: int = 64, verbose: bool = False,
    source: dict | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of a reference-statistics file (module docstring) for ``images``: uint8
    [N, H, W, 3], or an :class:`ImageSet` (read chunk by chunk)."""
    if isinstance(images, ImageSet):
        source = source or images.description
        feats = _features_of_chunks(images.chunks(), extractor, batch_size, images.count, verbose)
    else:
        feats = inception_features(images, extractor, batch_size, verbose=verbose)
    n = len(feats["pool"])
    if n < 2:
        raise EvaluationError(f"reference statistics need at least 2 images, got {n}")
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    return {
        "format": np.array(REF_STATS_FORMAT),
        "version": np.array(REF_STATS_VERSION, dtype=np.int64),
        "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
        "pool": feats["pool"].astype(np.float32),
        "logits_unbiased": feats["logits_unbiased"].astype(np.float32),
        "num_images": np.array(n, dtype=np.int64),
        "inception": np.array(json.dumps(extractor.info, sort_keys=True)),
        "source": np.array(json.dumps(source or {}, sort_keys=True)),
    }


def save_reference_stats(stats: Mapping[str, np.ndarray], out_uri: str) -> str:
    """Write the arrays as an uncompressed ``.npz`` (atomically); returns the normalized URI."""
    buf = io.BytesIO()
    np.savez(buf, **stats)
    out = U.normalize(out_uri)
    U.atomic_write_bytes(out, buf.getvalue())
    return out


@dataclass
class ReferenceStats:
    """What the metrics need of the reference set.

    mu, sigma: FID statistics (float64); mu_s, sigma_s: sFID statistics or None; pool: [N, 2048]
    features for precision/recall, or None; logits_unbiased: for the reference's own IS, or None;
    num_images: None when only statistics are known; inception: the network description of a
    stats file, None for ADM's precomputed TensorFlow statistics; origin: how the FID statistics
    were obtained (recorded in the metrics JSON).
    """

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None
    logits_unbiased: np.ndarray | None
    num_images: int | None
    inception: dict | None
    origin: str
    uri: str | None = None


def _text(a: np.ndarray) -> str:
    return str(np.asarray(a)[()])


def load_reference(
    ref: str | Mapping[str, np.ndarray] | ReferenceStats, extractor: InceptionExtractor, *,
    batch_size: int = 64, verbose: bool = False,
) -> ReferenceStats:
    """Reference statistics from a stats file (:func:`compute_reference_stats` arrays), an ADM
    reference batch, or any ``.npz`` with ``arr_0`` images.

    - Stats files must come from the same network (``state_dict_sha256``) as ``extractor``.
    - ``mu``/``sigma`` (and ``mu_s``/``sigma_s``) without our ``format`` key are ADM's, computed
      with the TensorFlow network: they are used for FID when ``extractor`` has the reference
      weights, with ``arr_0`` (if present) giving the features for precision/recall. With other
      weights (``random``) they mean nothing for this network, so the statistics are computed from
      ``arr_0`` instead, or an EvaluationError says why not.
    - Otherwise everything is computed from ``arr_0``.
    """
    if isinstance(ref, ReferenceStats):
        if ref.inception is not None and ref.inception.get("state_dict_sha256") != extractor.info["state_dict_sha256"]:
            raise EvaluationError(_network_mismatch("the reference statistics", ref.inception, extractor.info))
        return ref
    uri = U.normalize(ref) if isinstance(ref, str) else None
    arrays = open_npz(ref) if isinstance(ref, str) else ref
    name = uri or "reference arrays"
    keys = set(arrays)
    if "format" in keys:
        if _text(arrays["format"]) != REF_STATS_FORMAT or int(np.asarray(arrays["version"])) != REF_STATS_VERSION:
            raise EvaluationError(
                f"{name}: unknown statistics format {_text(arrays['format'])!r} v{np.asarray(arrays['version'])}"
            )
        info = json.loads(_text(arrays["inception"]))
        if info.get("state_dict_sha256") != extractor.info["state_dict_sha256"]:
            raise EvaluationError(_network_mismatch(name, info, extractor.info))
        return ReferenceStats(
            mu=np.asarray(arrays["mu"], np.float64), sigma=np.asarray(arrays["sigma"], np.float64),
            mu_s=np.asarray(arrays["mu_s"], np.float64), sigma_s=np.asarray(arrays["sigma_s"], np.float64),
            pool=np.asarray(arrays["pool"]), logits_unbiased=np.asarray(arrays["logits_unbiased"]),
            num_images=int(np.asarray(arrays["num_images"])), inception=info,
            origin="reference statistics file (ref-stats)", uri=uri,
        )
    has_images, has_adm_stats = "arr_0" in keys, {"mu", "sigma"} <= keys
    computed = None
    if has_images:
        images = check_images(arrays["arr_0"], f"{name}:arr_0")
        if has_adm_stats and not extractor.info["reference_weights"]:
            origin = ("computed from arr_0 (the file's precomputed mu/sigma belong to the reference TensorFlow "
                      f"Inception; this network ({extractor.info['source']} weights) is not it, so they were not used)")
        else:
            origin = "computed from arr_0"
        computed = compute_reference_stats(images, extractor, batch_size=batch_size, verbose=verbose,
                                           source={"kind": "npz", "uri": uri})
    if has_adm_stats and extractor.info["reference_weights"]:
        spatial = {"mu_s", "sigma_s"} <= keys
        return ReferenceStats(
            mu=np.asarray(arrays["mu"], np.float64), sigma=np.asarray(arrays["sigma"], np.float64),
            mu_s=np.asarray(arrays["mu_s"], np.float64) if spatial else (computed["mu_s"] if computed else None),
            sigma_s=np.asarray(arrays["sigma_s"], np.float64) if spatial else (computed["sigma_s"] if computed else None),
            pool=computed["pool"] if computed else None,
            logits_unbiased=computed["logits_unbiased"] if computed else None,
            num_images=int(computed["num_images"]) if computed else None, inception=None,
            origin="precomputed mu/sigma in the file (ADM reference batch, TensorFlow Inception)", uri=uri,
        )
    if computed is not None:
        return ReferenceStats(
            mu=computed["mu"], sigma=computed["sigma"], mu_s=computed["mu_s"], sigma_s=computed["sigma_s"],
            pool=computed["pool"], logits_unbiased=computed["logits_unbiased"],
            num_images=int(computed["num_images"]), inception=extractor.info, origin=origin, uri=uri,
        )
    if has_adm_stats:
        raise EvaluationError(
            f"{name}: holds precomputed mu/sigma of the reference TensorFlow Inception but no images (arr_0), and "
            f"this evaluation's network ({extractor.info['source']} weights, sha256 {extractor.info['sha256']}) is not "
            "the reference one: pass the reference Inception weights, or a reference with images"
        )
    raise EvaluationError(f"{name}: neither images (arr_0) nor statistics (mu, sigma); arrays: {sorted(keys)}")


def _network_mismatch(name: str, theirs: dict, ours: dict) -> str:
    return (
        f"{name} were computed with another Inception network ({theirs.get('source')} weights, state_dict_sha256 "
        f"{str(theirs.get('state_dict_sha256'))[:16]}...) than this evaluation's ({ours['source']} weights, "
        f"{ours['state_dict_sha256'][:16]}...): recompute them with ref-stats --inception-weights matching"
    )


# --------------------------------------------------------------------------------------------
# All metrics of a sample set
# --------------------------------------------------------------------------------------------
def compute_metrics(
    samples: Any, ref: str | Mapping[str, np.ndarray] | ReferenceStats, *, extractor: InceptionExtractor | None = None,
    weights: str = "hub", device: str | torch.device | None = "cpu", batch_size: int = 64, k: int = 3,
    isc_splits: int = 10, verbose: bool = False,
) -> dict:
    """FID, sFID, IS, precision and recall of ``samples`` (uint8 [N, H, W, 3], or the path/URI of
    an ADM ``.npz``) against ``ref`` (see :func:`load_reference`). ``extractor`` defaults to
    ``load_inception(weights, device)``.

    Returns a JSON-ready dict: ``fid``, ``sfid`` (None without spatial reference statistics),
    ``inception_score_mean``/``_std``, ``precision``/``recall`` (None without reference features),
    ``num_samples``, ``num_ref``, ``image_size``, ``inception`` (the network's description),
    ``reference`` (uri, how its statistics were obtained, its network, its own IS),
    ``comparable_to_published`` and ``settings``; plus ``warning`` when the weights are not the
    reference ones.
    """
    if extractor is None:
        extractor, _ = load_inception(weights, device)
    samples_uri = U.normalize(samples) if isinstance(samples, str) else None
    images = read_npz_images(samples) if isinstance(samples, str) else check_images(samples, "samples")
    if len(images) < max(2, k + 1):
        raise EvaluationError(
            f"{samples_uri or 'samples'}: {len(images)} image(s); the metrics need at least {max(2, k + 1)}"
        )
    reference = load_reference(ref, extractor, batch_size=batch_size, verbose=verbose)  # before the long part
    feats = inception_features(images, extractor, batch_size, verbose=verbose)

    fid = frechet_distance_from_features(feats["pool"], reference.mu, reference.sigma)
    sfid = None
    if reference.mu_s is not None:
        sfid = frechet_distance_from_features(feats["spatial"], reference.mu_s, reference.sigma_s)
    is_mean, is_std = inception_score(feats["logits_unbiased"], splits=isc_splits)
    precision = recall = None
    if reference.pool is not None:
        precision, recall = precision_recall(reference.pool, feats["pool"], k, device=extractor.device)
    ref_is = None
    if reference.logits_unbiased is not None:
        ref_is = inception_score(reference.logits_unbiased, splits=isc_splits)[0]

    info = extractor.info
    comparable = bool(info["reference_weights"])
    result = {
        "fid": _finite(fid),
        "sfid": _finite(sfid),
        "inception_score_mean": _finite(is_mean),
        "inception_score_std": _finite(is_std),
        "precision": precision,
        "recall": recall,
        "num_samples": int(len(images)),
        "num_ref": reference.num_images,
        "image_size": [int(images.shape[1]), int(images.shape[2])],
        "samples": samples_uri,
        "reference": {
            "uri": reference.uri,
            "fid_statistics": reference.origin,
            "inception": reference.inception if reference.inception is not None else "ADM TensorFlow Inception graph",
            "inception_score_mean": _finite(ref_is),
        },
        "inception": dict(info),
        "comparable_to_published": comparable,
        "settings": {
            "precision_recall_k": k,
            "precision_recall_features": "pool (2048)",
            "isc_splits": min(isc_splits, len(images)),
            "isc_shuffle_seed": ISC_SHUFFLE_SEED,
            "sfid_features": f"Mixed_6d.branch1x1[:{SPATIAL_CHANNELS}] (TF mixed_6/conv), HWC order",
            "torch": torch.__version__,
            "torch_fidelity": torch_fidelity.__version__,
        },
    }
    if not comparable:
        result["warning"] = (
            f"Inception weights are {info['source']} (sha256 {info['sha256'] or 'n/a'}), not torch-fidelity's "
            "release of the reference network: these numbers are not comparable to published ones"
        )
    return result


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# Reconstruction metrics: PSNR and SSIM
# --------------------------------------------------------------------------------------------
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


__all__ = [
    "EvaluationError", "INCEPTION_URL", "ImageSet", "InceptionExtractor", "InceptionWeightsError",
    "InceptionWeightsUnavailable", "ReferenceStats", "check_images", "compute_metrics", "compute_reference_stats",
    "feature_statistics", "folder_image_set", "frechet_distance", "frechet_distance_from_features",
    "hub_weights_path", "inception_features", "inception_score", "load_inception", "load_reference", "npz_image_set",
    "open_npz", "precision_recall", "psnr", "random_inception_state_dict", "read_npz_images", "save_reference_stats",
    "ssim", "store_image_set",
]
