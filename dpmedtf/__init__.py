"""dpmedtf: differentially private diagnostic models for medical imaging, audited and certified.

From Python: ``dpmedtf.make_private(model, ...)`` trains any Keras model the clipping engines can clip
with DP-SGD through ``model.fit``; ``dpmedtf.register_layer`` adds a per-example norm rule for a layer
class of your own. Both import TensorFlow when first used, so ``import dpmedtf`` stays light.

Two installs: a plain ``pip install dpmedtf`` verifies, loads and runs release bundles without
TensorFlow; training, evaluation and release need the ``[train]`` extra. Reaching for the training side
without it raises ``TrainingStackMissing`` (an ImportError) that says how to install it.
"""

from importlib import import_module
from importlib import metadata as _metadata
from importlib.util import find_spec as _find_spec

try:
    __version__ = _metadata.version("dpmedtf")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

INSTALL_TRAINING_STACK = "pip install 'dpmedtf[train]'"

# Top-level import names of what only the `train` extra installs (pyproject.toml), with what they pull
# in that dpmedtf imports itself (keras, tensorflow_probability). A test keeps this beside the extra.
TRAINING_MODULES = frozenset({"tensorflow", "tensorflow_privacy", "tensorflow_io", "tensorflow_probability", "keras",
                              "tf2onnx", "fairlearn", "sklearn", "matplotlib", "markdown_it"})


class TrainingStackMissing(ImportError):
    """Something that needs the training stack was used in the consumer install (no `[train]` extra)."""

    def __init__(self, what: str, module: str):
        super().__init__(f"{what} needs the training stack ({module} is not installed); install it with: "
                         f"{INSTALL_TRAINING_STACK}", name=module)


def missing_training_module(exc: ImportError) -> str | None:
    """The training package whose absence raised ``exc``, or None when ``exc`` is about anything else
    (a consumer package, a broken install, a bug), which must surface as it is."""
    module = (exc.name or "").partition(".")[0]
    if module not in TRAINING_MODULES or _find_spec(module) is not None:
        return None
    return module


_LAZY = {"make_private": "dpmedtf.training.make_private", "register_layer": "dpmedtf.privacy.clipping.registry",
         "DpSgdMechanism": "dpmedtf.privacy.mechanism", "Ledger": "dpmedtf.privacy.ledger",
         "DpmedtfError": "dpmedtf.errors"}

__all__ = ["__version__", "INSTALL_TRAINING_STACK", "TrainingStackMissing", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dpmedtf' has no attribute {name!r}")
    try:
        module = import_module(_LAZY[name])
    except ImportError as exc:
        missing = missing_training_module(exc)
        if missing is None:
            raise
        raise TrainingStackMissing(f"dpmedtf.{name}", missing) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
