"""The metric maths on Inception features: Frechet distance (FID, sFID), Inception Score and k-NN
precision/recall, in the ADM evaluation-suite convention.

The maths are torch-fidelity's (0.4): ``fid_statistics_to_metric`` (Frechet distance),
``isc_features_to_metric`` (Inception Score), ``calculate_precision_recall_part`` (k-NN precision
and recall); ours are the input checks and the low-rank Frechet distance of few samples.

Conventions (ADM's where it differs from torch-fidelity's defaults):
- FID statistics: float64 mean and covariance (``np.cov``, N - 1) of the 2048 pool features.
- Precision/recall: k = 3 nearest neighbours on the Inception pool features (Kynkaenniemi et al.
  as the ADM suite runs it; torch-fidelity's own default network for them is VGG-16).
- Inception Score: softmax of the bias-free logits (pool @ W, 1008 classes, as ADM and
  torch-fidelity both do), the mean (and std) of exp(E KL) over splits. Two split conventions:
  the ADM evaluator's (``split_size=5000``: consecutive 5,000-row chunks in file order, no
  shuffle; a file written class by class then shows each chunk ~100 classes and scores near
  100) and torch-fidelity's (10 equal splits after a seeded shuffle, seed 2020). On a file whose
  labels are in a random order (``sample --labels equal``) the two agree to about 1%.
"""
from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from trainer.metrics.errors import EvaluationError

ISC_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed
ADM_ISC_SPLIT_SIZE = 5000  # guided-diffusion evaluations/evaluator.py compute_inception_score(split_size=5000)


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
    scores: np.ndarray, splits: int = 10, *, kind: str = "logits", shuffle: bool = True, seed: int = ISC_SHUFFLE_SEED,
    split_size: int | None = None,
) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))).

    scores [N, C]: logits (``kind="logits"``, softmax taken here) or probabilities
    (``kind="probs"``, rows summing to 1). Splits: ``splits`` equal parts, after shuffling the
    rows with ``seed`` unless ``shuffle=False`` (torch-fidelity; splits are capped at N); or, with
    ``split_size``, consecutive chunks of ``split_size`` rows in the given order, the last one
    shorter when N is not a multiple (the ADM evaluator: ``split_size=ADM_ISC_SPLIT_SIZE``;
    ``splits``, ``shuffle`` and ``seed`` are then unused).
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
    if split_size is not None:
        if split_size < 1:
            raise EvaluationError(f"Inception Score needs split_size >= 1, got {split_size}")
        per_split = [isc_features_to_metric(torch.from_numpy(scores[i:i + split_size]), 1, False)[KEY_METRIC_ISC_MEAN]
                     for i in range(0, len(scores), int(split_size))]
        return float(np.mean(per_split)), float(np.std(per_split))
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


__all__ = [
    "ADM_ISC_SPLIT_SIZE", "ISC_SHUFFLE_SEED", "feature_statistics", "frechet_distance", "frechet_distance_from_features", "inception_score",
    "precision_recall",
]
