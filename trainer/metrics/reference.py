"""Reference statistics: the Inception statistics of the real images that samples are compared with.

Reference statistics files (``ref-stats``; format ``rae-inception-ref-stats`` v1), ``.npz`` keys:
    format, version      0-d str "rae-inception-ref-stats", 0-d int 1
    mu, sigma            float64 [2048], [2048, 2048]: FID statistics (ADM key names)
    mu_s, sigma_s        float64 [2023], [2023, 2023]: sFID statistics (ADM key names)
    pool                 float32 [N, 2048]: pool features, for precision/recall
    logits_unbiased      float32 [N, 1008]: bias-free logits, for the reference's own IS
    num_images           0-d int64
    inception            0-d str: JSON of the network's description (``load_inception``'s info dict)
    source               0-d str: JSON of where the images came from
ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images plus ``mu``,
``sigma``, ``mu_s``, ``sigma_s`` of the TensorFlow network) are read as they are: their
``mu``/``sigma`` serve FID when the network is the reference one, and ``arr_0`` gives the features
for precision/recall; see :func:`load_reference`.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pipeline import uri as U
from trainer.metrics.errors import EvaluationError
from trainer.metrics.fid import feature_statistics
from trainer.metrics.images import ImageSet, check_images, open_npz
from trainer.metrics.inception import InceptionExtractor, inception_features, inception_features_of_chunks

REF_STATS_FORMAT = "rae-inception-ref-stats"
REF_STATS_VERSION = 1


def compute_reference_stats(
    images: Any, extractor: InceptionExtractor, *, batch_size: int = 64, verbose: bool = False,
    source: dict | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of a reference-statistics file (module docstring) for ``images``: uint8
    [N, H, W, 3], or an :class:`ImageSet` (read chunk by chunk)."""
    if isinstance(images, ImageSet):
        source = source or images.description
        feats = inception_features_of_chunks(images.chunks(), extractor, batch_size, images.count, verbose)
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


__all__ = [
    "REF_STATS_FORMAT", "REF_STATS_VERSION", "ReferenceStats", "compute_reference_stats", "load_reference",
    "save_reference_stats",
]
