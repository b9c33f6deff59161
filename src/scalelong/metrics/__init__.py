"""FID and KID: the Frechet distance and KID in float64, the Inception network and its weights,
features of in-memory images with distributed float64 statistics, reference statistics, and the
evaluation of a model's samples.

    from scalelong.metrics import FIDEvaluator
    result = FIDEvaluator(model)(num=10_000, sampler="dpm_solver", steps=50)
"""

from scalelong.metrics.evaluation import FIDEvaluator, compare, evaluate_module, quick_kid_fid, sample_feature_stats
from scalelong.metrics.features import FeatureStats, extract_features, feature_stats, preprocess, to_rgb_uint8
from scalelong.metrics.frechet import KID, frechet_distance, kernel_inception_distance, mean_and_cov, mmd2_unbiased
from scalelong.metrics.inception import (
    DEFAULT_1_SHA1,
    MODES,
    InceptionFeatures,
    InceptionWeights,
    cache_dir,
    load_inception,
    resolve_inception_weights,
)
from scalelong.metrics.reference import (
    ReferenceStats,
    compute_reference,
    convert_published,
    default_reference_path,
    load_reference,
    make_reference_stats,
    published_reference,
    save_reference,
)
from scalelong.metrics.sampling import generate_shard, shard

__all__ = [
    "DEFAULT_1_SHA1", "FIDEvaluator", "KID", "MODES", "FeatureStats", "InceptionFeatures", "InceptionWeights", "ReferenceStats",
    "cache_dir", "compare", "compute_reference", "convert_published", "default_reference_path", "evaluate_module",
    "extract_features", "feature_stats", "frechet_distance", "generate_shard", "kernel_inception_distance",
    "load_inception", "load_reference", "make_reference_stats", "mean_and_cov", "mmd2_unbiased", "preprocess",
    "published_reference", "quick_kid_fid", "resolve_inception_weights", "sample_feature_stats", "save_reference",
    "shard", "to_rgb_uint8",
]
