"""Refuse models DP-SGD cannot train correctly, naming each offending layer and the fix.

Two things break per-example privacy: a layer that mixes examples within a batch (BatchNorm's batch
statistics make one example's output depend on the others, so no per-example gradient exists), and
trainable weights the DP engine cannot clip per example. Like opacus' ModuleValidator, every problem
is collected and reported at once rather than one per attempt.
"""

from __future__ import annotations

import tensorflow as tf

from dpmedtf.errors import DpmedtfError
from dpmedtf.models.acs import ACSConv

# Layers whose per-example gradient norms the DP engines compute (see the fast-DP engine issue).
CLIPPABLE_LAYERS: tuple[type, ...] = (tf.keras.layers.Conv2D, tf.keras.layers.Conv3D, ACSConv,
                                      tf.keras.layers.GroupNormalization, tf.keras.layers.Dense)


class DpIncompatibleModelError(DpmedtfError):
    """The model has layers that DP-SGD cannot train with a per-example guarantee."""


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


def dp_problems(model: tf.keras.Model) -> list[str]:
    """Every reason ``model`` cannot be trained with DP-SGD, one line each (empty when it can)."""
    problems = []
    supported = ", ".join(cls.__name__ for cls in CLIPPABLE_LAYERS)
    for layer in leaf_layers(model):
        kind = type(layer).__name__
        if _mixes_examples(layer):
            problems.append(f"layer '{layer.name}' ({kind}) mixes examples within a batch through batch "
                            "statistics; replace it with GroupNormalization (build_resnet9 uses GroupNorm(32))")
        elif layer.trainable_weights and not isinstance(layer, CLIPPABLE_LAYERS):
            problems.append(f"layer '{layer.name}' ({kind}) has trainable weights the DP engine cannot clip per "
                            f"example (supported: {supported}); freeze it (layer.trainable = False) or replace it")
    return problems


def validate_for_dp(model: tf.keras.Model) -> None:
    """Raises DpIncompatibleModelError listing every layer DP-SGD cannot train; returns None if fine."""
    problems = dp_problems(model)
    if problems:
        raise DpIncompatibleModelError(f"model '{model.name}' cannot be trained with DP-SGD:\n  - "
                                       + "\n  - ".join(problems))
