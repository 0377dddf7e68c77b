"""Which layer classes the fast engine clips, by which rule: one table, and ``register_layer`` to extend it.

tensorflow-privacy's ``LayerRegistry`` maps a layer class to a rule
``(layer, input_args, input_kwargs, tape, num_microbatches) -> (base_vars, outputs, sqr_norm_fn)``
(``rules`` has ours). We register Dense, Conv1D, Conv2D, Conv3D, ACSConv, GroupNormalization (and dpmedtf's
faster GroupNorm), LayerNormalization and
Embedding in that form, so the registry also plugs into tensorflow-privacy's own ``compute_gradient_norms``;
``register_layer`` adds a rule for a class of one's own (as ``LayerRegistry.insert`` or opacus'
``register_grad_sampler`` do).

This table is the one list of layers with trainable weights that the fast engine clips per example:
``models.validate`` asks ``is_supported``. Lookup is by exact class, as in tensorflow-privacy, so a
subclass (Conv2DTranspose is a Conv2D) is never taken for its parent.

"""

from __future__ import annotations

from functools import partial, wraps
from typing import TYPE_CHECKING, Callable

import tensorflow as tf

from dpmedtf.errors import DpmedtfError
from dpmedtf.privacy.clipping.rules import (NORM_METHODS, InstantiateWith, LayerGradients, NormMethod,
                                            acs_conv_layer_computation, check_instantiate_with,
                                            conv_layer_computation, dense_layer_computation,
                                            embedding_layer_computation, group_norm_layer_computation,
                                            layer_norm_layer_computation)

if TYPE_CHECKING:
    from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import LayerRegistry


class RegistrationError(DpmedtfError, TypeError, ValueError):
    """A per-example norm rule that cannot be registered (not a layer class, not callable, already taken)."""


Rule = Callable[..., tuple]
"""``(layer, input_args, input_kwargs, tape, num_microbatches) -> (base, outputs, sqr_norm_fn)``."""

# Rules that take ``method`` (ghost or instantiated norms), and those that also take ``instantiate_with``
# (loop or batched per-example conv kernel gradients): the table holds them unbound.
_NORM_METHOD_RULES = (conv_layer_computation, acs_conv_layer_computation, dense_layer_computation)
_INSTANTIATE_WITH_RULES = (conv_layer_computation, acs_conv_layer_computation)

_rule_table: dict[type, Rule] = {}
"""The one table of layer classes the fast engine clips and their rules (filled on first use)."""


def _table() -> dict[type, Rule]:
    if not _rule_table:
        # dpmedtf.models is imported on use, not with this module: models.validate asks this table, and
        # importing the models package imports models.validate, so a module-level import would be circular.
        from dpmedtf.models.acs import ACSConv
        from dpmedtf.models.layers import GroupNorm

        layers = tf.keras.layers
        _rule_table.update({
            layers.Dense: dense_layer_computation, layers.Conv1D: conv_layer_computation,
            layers.Conv2D: conv_layer_computation, layers.Conv3D: conv_layer_computation,
            ACSConv: acs_conv_layer_computation, layers.GroupNormalization: group_norm_layer_computation,
            GroupNorm: group_norm_layer_computation,  # the same function and weights, faster arithmetic
            layers.LayerNormalization: layer_norm_layer_computation, layers.Embedding: embedding_layer_computation})
    return _rule_table


def register_layer(layer_class: type, rule: Rule, *, replace: bool = False) -> Rule:
    """Registers the fast engine's per-example norm rule for ``layer_class`` (exact class, not subclasses).

    ``rule(layer, input_args, input_kwargs, tape, num_microbatches)`` is a tensorflow-privacy registry
    function. It calls the layer's computation on ``input_args`` (one batch; ``num_microbatches`` is
    always None in dpmedtf), ``tape.watch``-es a tensor ``base`` whose row i depends on example i alone
    and through which every trainable variable of the layer enters the output, and returns
    ``(base, outputs, sqr_norm_fn)``. ``sqr_norm_fn(∂L/∂base)`` is either

    - a plain function returning the (B,) per-example squared norms of the layer's weight gradients; the
      engine then gets the clipped sum by re-running the rule on the recorded input and differentiating
      ``base`` with the output-gradient rows scaled by the clip weights, so ``base`` must be computed from
      the layer's variables each time; or
    - a ``LayerGradients`` (or subclass), whose ``squared_norms64`` gives float64 norms and whose
      ``clipped_sums(clip_weights)`` gives Σᵢ cᵢ Gᵢ per variable in ``layer.trainable_variables`` order
      (or None for the re-trace above).

    The rule is then used by ``make_layer_registry`` (every norm method), ``supported_layer_types`` and
    ``is_supported`` — so by ``models.validate`` too. A registry made before this call does not see it.
    Registering a class that already has a rule (dpmedtf's own included) raises ValueError unless
    ``replace=True``. Returns ``rule``.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, tf.keras.layers.Layer)):
        raise RegistrationError(f"layer_class must be a Keras layer class, got {layer_class!r}")
    if not callable(rule):
        raise RegistrationError(f"rule must be callable, got {rule!r}")
    table = _table()
    if layer_class in table and not replace:
        raise RegistrationError(f"{layer_class.__name__} already has a fast-clipping rule ({_rule_name(table[layer_class])}); "
                         "pass replace=True to replace it")
    table[layer_class] = rule
    return rule


def _rule_name(rule: Rule) -> str:
    return getattr(rule, "__qualname__", None) or repr(rule)


def _carrying_masks(rule: Rule) -> Rule:
    """``rule`` with Keras' mask propagation, as ``Layer.__call__`` has it.

    A rule's outputs may be a fresh tensor (γ·x̂ + β, or an activation applied after the watched base),
    without the ``_keras_mask`` Keras would have set: the layers after it (pooling, say) would then not
    mask the padding that ``model(x)`` masks, and the engine would clip the gradient of another loss.
    """
    @wraps(rule)
    def with_masks(layer, input_args, input_kwargs, tape, num_microbatches=None):
        base, outputs, sqr_norm_fn = rule(layer, input_args, input_kwargs, tape, num_microbatches)
        flat_outputs = tf.nest.flatten(outputs)
        if (layer.supports_masking and input_args
                and not all(getattr(output, "_keras_mask", None) is not None for output in flat_outputs)):
            previous = input_kwargs.get("mask", getattr(input_args[0], "_keras_mask", None))
            masks = layer.compute_mask(input_args[0], previous)
            if masks is not None:
                for output, mask in zip(flat_outputs, tf.nest.flatten(masks)):
                    output._keras_mask = mask
        return base, outputs, sqr_norm_fn

    return with_masks


def _bound(rule: Rule, method: NormMethod, instantiate_with: InstantiateWith) -> Rule:
    if rule in _INSTANTIATE_WITH_RULES:
        return partial(rule, method=method, instantiate_with=instantiate_with)
    return partial(rule, method=method) if rule in _NORM_METHOD_RULES else rule


def _rules(method: NormMethod, instantiate_with: InstantiateWith = "auto") -> dict[type, Rule]:
    if method not in NORM_METHODS:
        raise ValueError(f"norm method must be one of {NORM_METHODS}, got {method!r}")
    check_instantiate_with(instantiate_with)
    return {layer_class: _carrying_masks(_bound(rule, method, instantiate_with))
            for layer_class, rule in _table().items()}


def supported_layer_types() -> tuple[type, ...]:
    """The layer classes with trainable weights that the fast engine clips per example (exact classes)."""
    return tuple(_table())


def is_supported(layer: tf.keras.layers.Layer) -> bool:
    """Whether the fast engine has a per-example norm rule for ``layer``'s class (not its parents')."""
    return type(layer) in _table()


def make_layer_registry(norm_method: NormMethod = "cost", *,
                        instantiate_with: InstantiateWith = "auto") -> LayerRegistry:
    """A tensorflow-privacy registry of every layer dpmedtf's fast engine clips (``register_layer``'s too).

    ``norm_method`` "cost" picks ghost or instantiated norms per layer by flops; "ghost" and
    "instantiate" force one (tests compare both paths with a per-example loop). ``instantiate_with``
    says how an instantiated conv kernel gradient is formed: "auto" by device and shape, "loop" or
    "batched" forced (``rules.InstantiateWith``).
    """
    # Imported here: which layers are supported is asked without tensorflow-privacy (models.validate).
    from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import LayerRegistry

    registry = LayerRegistry()
    for layer_class, rule in _rules(norm_method, instantiate_with).items():
        registry.insert(layer_class, rule)
    return registry
