"""``rae-pipeline evaluate``: sample-quality metrics of a sample set in the ADM evaluation-suite
convention (FID, sFID, Inception Score, precision, recall) against a reference.

Samples are uint8 [N, H, W, 3] (RGB, 0..255), as the ADM suite's ``.npz`` files hold them in
``arr_0`` (guided-diffusion's ``evaluations/evaluator.py``). The pieces live in
``trainer/metrics/``: the Inception network, its weights and features (``inception``), the metric
maths (``fid``), reading images (``images``) and reference statistics (``reference``); this module
puts them together into the metrics JSON the command writes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch_fidelity

from pipeline import uri as U
from trainer.metrics.errors import EvaluationError
from trainer.metrics.fid import (
    ADM_ISC_SPLIT_SIZE, ISC_SHUFFLE_SEED, frechet_distance_from_features, inception_score, precision_recall,
)
from trainer.metrics.images import check_images, read_npz_images
from trainer.metrics.inception import SPATIAL_CHANNELS, InceptionExtractor, inception_features, load_inception
from trainer.metrics.reference import ReferenceStats, load_reference

# How the Inception Score splits the samples: "shuffle" (torch-fidelity: isc_splits equal parts
# after a seeded shuffle) or "adm" (the ADM evaluator: consecutive 5,000-sample chunks in file order).
ISC_SPLIT_MODES = ("shuffle", "adm")


# --------------------------------------------------------------------------------------------
# All metrics of a sample set
# --------------------------------------------------------------------------------------------
def compute_metrics(
    samples: Any, ref: str | Mapping[str, np.ndarray] | ReferenceStats, *, extractor: InceptionExtractor | None = None,
    weights: str = "hub", device: str | torch.device | None = "cpu", batch_size: int = 64, k: int = 3,
    isc_splits: int = 10, isc_split_mode: str = "shuffle", verbose: bool = False,
) -> dict:
    """FID, sFID, IS, precision and recall of ``samples`` (uint8 [N, H, W, 3], or the path/URI of
    an ADM ``.npz``) against ``ref`` (see :func:`load_reference`). ``extractor`` defaults to
    ``load_inception(weights, device)``. ``isc_split_mode``: one of :data:`ISC_SPLIT_MODES`
    (``isc_splits`` applies to "shuffle"); the reference's own IS uses the same convention.

    Returns a JSON-ready dict: ``fid``, ``sfid`` (None without spatial reference statistics),
    ``inception_score_mean``/``_std``, ``precision``/``recall`` (None without reference features),
    ``num_samples``, ``num_ref``, ``image_size``, ``inception`` (the network's description),
    ``reference`` (uri, how its statistics were obtained, its network, its own IS),
    ``comparable_to_published`` and ``settings``; plus ``warning`` when the weights are not the
    reference ones.
    """
    if isc_split_mode not in ISC_SPLIT_MODES:
        raise EvaluationError(f"Inception Score split mode {isc_split_mode!r} is not one of {list(ISC_SPLIT_MODES)}")
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
    split_kw = {"split_size": ADM_ISC_SPLIT_SIZE} if isc_split_mode == "adm" else {"splits": isc_splits}
    is_mean, is_std = inception_score(feats["logits_unbiased"], **split_kw)
    precision = recall = None
    if reference.pool is not None:
        precision, recall = precision_recall(reference.pool, feats["pool"], k, device=extractor.device)
    ref_is = None
    if reference.logits_unbiased is not None:
        ref_is = inception_score(reference.logits_unbiased, **split_kw)[0]

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
            "isc_split_mode": isc_split_mode,
            "isc_splits": (-(-len(images) // ADM_ISC_SPLIT_SIZE) if isc_split_mode == "adm"
                           else min(isc_splits, len(images))),
            "isc_split_size": ADM_ISC_SPLIT_SIZE if isc_split_mode == "adm" else None,
            "isc_shuffle_seed": ISC_SHUFFLE_SEED if isc_split_mode == "shuffle" else None,
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


__all__ = ["compute_metrics"]
