"""Refuse models DP-SGD cannot train correctly, naming each offending layer and the fix.

Two things break per-example privacy: a layer that mixes examples within a batch (BatchNorm's batch
statistics make one example's output depend on the others, so no per-example gradient exists), and
trainable weights the DP engine cannot clip per example. Which layers the fast engine clips is the
clipping registry's to say (``privacy.clipping.registry``), nowhere else; the vectorized engine
(tensorflow-privacy's per-example Jacobians) clips any layer's weights. Like opacus' ModuleValidator,
every problem is collected and reported at once rather than one per attempt.
"""

from __future__ import annotations

import tensorflow as tf

from dpmedtf.errors import DpmedtfError
from dpmedtf.privacy.engines import get_engine


class DpIncompatibleModelError(DpmedtfError):
    """The model has layers that DP-SGD cannot train with a per-example guarantee."""


def __getattr__(name: str):
    # CLIPPABLE_LAYERS, kept for importers: the registry's classes, read when asked for, not a copy.
    if name == "CLIPPABLE_LAYERS":
        return _registry().supported_layer_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registry():
    # Imported on use: the registry's rules import models.acs, so a module-level import would be circular.
    from dpmedtf.privacy.clipping import registry

    return registry


def leaf_layers(model: tf.keras.layers.Layer):
    """Every layer of ``model``, looking inside nested models."""
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None):  # a nested model or Sequential: look inside
            yield from leaf_layers(layer)
        else:
            yield layer


def _mixes_examples(layer: tf.keras.layers.Layer) -> bool:
    # Catches BatchNormalization, its v1/v2 and synchronised variants, and user subclasses of them.
    return isinstance(layer, tf.keras.layers.BatchNormalization) or "BatchNorm" in type(layer).__name__


def dp_problems(model: tf.keras.Model, engine: str = "fast") -> list[str]:
    """Every reason ``model`` cannot be trained with DP-SGD on ``engine``, one line each (empty when it can).

    Each engine (``privacy.engines``) says which trainable layers it clips: "fast" those the clipping
    registry has a rule for, "vectorized" any. No engine can train a layer that mixes examples.
    """
    chosen = get_engine(engine)
    problems = list(chosen.model_problems(model))
    for layer in leaf_layers(model):
        kind = type(layer).__name__
        if _mixes_examples(layer):
            problems.append(f"layer '{layer.name}' ({kind}) mixes examples within a batch through batch "
                            "statistics; replace it with GroupNormalization (build_resnet9 uses GroupNorm(32))")
        elif layer.trainable_weights and not chosen.clips(layer):
            supported = (f" (supported: {', '.join(cls.__name__ for cls in chosen.supported_layers())})"
                         if chosen.supported_layers else "")
            problems.append(f"layer '{layer.name}' ({kind}) has trainable weights the {engine} clipping engine cannot "
                            f"clip per example{supported}; freeze it (layer.trainable = False), replace it, register "
                            "a per-example norm rule for its class (dpmedtf.register_layer), or use the vectorized "
                            "engine (training.clipping: vectorized; make_private(engine=\"vectorized\"))")
    return problems


def validate_for_dp(model: tf.keras.Model, engine: str = "fast") -> None:
    """Raises DpIncompatibleModelError listing every layer DP-SGD on ``engine`` cannot train; None if fine."""
    problems = dp_problems(model, engine)
    if problems:
        raise DpIncompatibleModelError(f"model '{model.name}' cannot be trained with DP-SGD (clipping engine: "
                                       f"{engine}):\n  - " + "\n  - ".join(problems))
