"""Fast per-example clipping: layer-wise norms (ghost or instantiated) and book-keeping clipped sums.

``register_layer(layer_class, rule)`` adds a per-example norm rule for a layer class of one's own
(``registry.register_layer`` says what a rule returns; ``LayerGradients`` is one way to return it).

Names are resolved on first use, so that ``models.validate`` can ask ``registry`` which layers are
supported without importing the engine (and tensorflow-privacy, ~1.5 s) with every ``dpmedtf.models``.
"""

from importlib import import_module

_EXPORTS = {"ClippedGradients": "engine", "UnsupportedLayerError": "engine", "check_supported": "engine",
            "fast_clipped_gradient_sum": "engine", "unsupported_layers": "engine",
            "LayerGradients": "rules", "is_supported": "registry", "make_layer_registry": "registry",
            "register_layer": "registry", "supported_layer_types": "registry"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
