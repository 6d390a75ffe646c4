"""Sample-quality metrics of the ``evaluate`` stage: a domain classifier's feature space (FD, KID, precision/recall,
density/coverage), its posteriors (classifier score, label accuracy, class KL) and, optionally, Inception-v3.

No MLflow and no Ray here: these are plain functions over uint8 N×C×H×W images.
"""
from gan_models.sampling import to_uint8  # the pixel convention's owner
from pipelines.metrics.classifier import (
    ClassifierCacheError,
    DomainClassifier,
    as_images,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    train_domain_classifier,
)
from pipelines.metrics.distances import frechet_distance, frechet_distance_from_features, gaussian_stats, kernel_distance
from pipelines.metrics.inception import inception_features, load_inception
from pipelines.metrics.manifold import density_coverage, manifold_metrics
from pipelines.metrics.scores import class_histogram, class_kl, classifier_score, label_accuracy, per_class_frechet
from pipelines.metrics.suite import (
    METRIC_DIRECTION,
    METRICS,
    compute_cheap_metrics,
    compute_metrics,
    metric_direction,
    real_floor,
    reference_subset,
    register_metric,
)

__all__ = [
    "ClassifierCacheError", "DomainClassifier", "as_images", "load_classifier", "load_or_train_classifier",
    "save_classifier", "to_uint8", "train_domain_classifier", "frechet_distance", "frechet_distance_from_features",
    "gaussian_stats", "kernel_distance", "inception_features", "load_inception", "density_coverage",
    "manifold_metrics", "class_histogram", "class_kl", "classifier_score", "label_accuracy",
    "per_class_frechet", "METRIC_DIRECTION", "METRICS", "compute_cheap_metrics", "compute_metrics",
    "metric_direction", "real_floor", "reference_subset", "register_metric",
]
