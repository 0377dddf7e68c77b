"""dpmedtf: differentially private diagnostic models for medical imaging, audited and certified.

From Python: ``dpmedtf.make_private(model, ...)`` trains any Keras model the clipping engines can clip
with DP-SGD through ``model.fit``; ``dpmedtf.register_layer`` adds a per-example norm rule for a layer
class of your own. Both import TensorFlow when first used, so ``import dpmedtf`` stays light.
"""

from importlib import import_module
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("dpmedtf")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {"make_private": "dpmedtf.training.make_private", "register_layer": "dpmedtf.privacy.clipping.registry",
         "DpSgdMechanism": "dpmedtf.privacy.mechanism", "Ledger": "dpmedtf.privacy.ledger",
         "DpmedtfError": "dpmedtf.errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dpmedtf' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
