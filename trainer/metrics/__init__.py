"""Image metrics: the pieces the evaluation stage (``trainer/evaluate.py``), ``rfid`` and
``reconstruct`` are made of.

- ``inception``: torch-fidelity's Inception network, its weights (hub / file / random) and features.
- ``fid``: Frechet distance (FID, sFID), Inception Score, precision/recall on features.
- ``images``: image sets from ADM ``.npz`` files, folders and latent stores' source images.
- ``reference``: reference-statistics files, and reading ADM reference batches.
- ``pixels``: PSNR and SSIM.
- ``errors``: EvaluationError.

The public names are re-exported here for users of the package; modules inside ``trainer/`` import
from the specific submodule.
"""
from trainer.metrics.errors import EvaluationError
from trainer.metrics.fid import (
    ISC_SHUFFLE_SEED, feature_statistics, frechet_distance, frechet_distance_from_features, inception_score,
    precision_recall,
)
from trainer.metrics.images import (
    IMAGE_EXTENSIONS, ImageSet, check_images, folder_image_set, npz_image_set, open_npz, read_npz_images,
    store_image_set,
)
from trainer.metrics.inception import (
    INCEPTION_URL, InceptionExtractor, InceptionWeightsError, InceptionWeightsUnavailable, hub_weights_path,
    inception_features, load_inception, random_inception_state_dict,
)
from trainer.metrics.pixels import psnr, ssim
from trainer.metrics.reference import ReferenceStats, compute_reference_stats, load_reference, save_reference_stats

__all__ = [
    "EvaluationError", "IMAGE_EXTENSIONS", "INCEPTION_URL", "ISC_SHUFFLE_SEED", "ImageSet", "InceptionExtractor",
    "InceptionWeightsError", "InceptionWeightsUnavailable", "ReferenceStats", "check_images",
    "compute_reference_stats", "feature_statistics", "folder_image_set", "frechet_distance",
    "frechet_distance_from_features", "hub_weights_path", "inception_features", "inception_score", "load_inception",
    "load_reference", "npz_image_set", "open_npz", "precision_recall", "psnr", "random_inception_state_dict",
    "read_npz_images", "save_reference_stats", "ssim", "store_image_set",
]
