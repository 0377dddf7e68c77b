"""Fast per-example clipping: layer-wise norms (ghost or instantiated) and book-keeping clipped sums."""

from dpmedtf.privacy.clipping.engine import (ClippedGradients, UnsupportedLayerError, check_supported,
                                             fast_clipped_gradient_sum, unsupported_layers)
from dpmedtf.privacy.clipping.registry import make_layer_registry

__all__ = ["ClippedGradients", "UnsupportedLayerError", "check_supported", "fast_clipped_gradient_sum",
           "make_layer_registry", "unsupported_layers"]
