"""fusedvq: the masked, normalized feature-reconstruction loss of VQ-VAE-guided training, fused.

    loss = fusedvq.masked_mse(features [B, D], reconstruction [B, K], feature_mask [D], mean, std)
    z = fusedvq.clean_features(features [B, D], feature_mask [D], norm="batch")    # the encoder's input
    errors = loss_fn.category_errors(loss_fn(features, recon))    # reduction="column": one per category
"""

from .categories import gini
from .clean import FeatureCleaner, clean_features
from .checkpoint import (
    CheckpointError, FeatureSpec, StatsNotUsedWarning, UnsafeLoadWarning, diagnose, load_feature_spec,
)
from .loss import MaskedMSELoss, masked_mse
from .partials import PartialsMSELoss, partial_category_errors, partials_mse
from .recon import VQReconLoss

__version__ = "0.1.0"

__all__ = [
    "masked_mse",
    "MaskedMSELoss",
    "VQReconLoss",
    "partials_mse",
    "PartialsMSELoss",
    "partial_category_errors",
    "clean_features",
    "FeatureCleaner",
    "gini",
    "load_feature_spec",
    "FeatureSpec",
    "diagnose",
    "CheckpointError",
    "UnsafeLoadWarning",
    "StatsNotUsedWarning",
    "__version__",
]
