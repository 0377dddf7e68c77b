"""The fast DP engine: Σᵢ clip(∇ℓᵢ, C) without per-example Jacobians.

One forward pass records, for every trainable layer, its input and its pre-activation output; one
backward pass gives the gradient of Σᵢ ℓᵢ with respect to each of those outputs. Because no layer
mixes examples (GroupNorm, not BatchNorm — see ``models.validate``), row i of that gradient belongs
to example i alone, so each layer's per-example squared norm follows from its input and output
gradient (``registry``/``norms``, accumulated in float64). With the clip weights cᵢ = min(1, C/‖∇ℓᵢ‖)
(C lowered by a few units in the last place so that rounding cannot push cᵢ‖∇ℓᵢ‖ past C), the clipped sum
needs no second backward pass through the network ("book-keeping", Bu et al. 2023): where a layer's
per-example gradients Gᵢ were instantiated it is Σᵢ cᵢ Gᵢ; where the norm came from Gram matrices it
is the layer's weight gradient with the output-gradient rows scaled by cᵢ, obtained from TensorFlow's
own gradient of the layer re-traced on its recorded input (inside a ``tf.function`` the re-traced
forward op has no consumer and is pruned, leaving e.g. ``Conv2DBackpropFilter`` on the scaled rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry as tfp_registry

from dpmedtf.errors import DpmedtfError
from dpmedtf.models.validate import leaf_layers
from dpmedtf.privacy.clipping.norms import NORM_DTYPE, clip_factors, round_up_to
from dpmedtf.privacy.clipping.registry import make_layer_registry


class UnsupportedLayerError(DpmedtfError):
    """A trainable layer the fast engine has no per-example norm rule for."""


class ClippedGradients(NamedTuple):
    """What one batch gives (a named tuple, so a ``tf.function`` can return it)."""

    sums: list[tf.Tensor]
    """Σᵢ cᵢ ∇ℓᵢ for each of the network's trainable variables, in their order."""
    per_example_losses: tf.Tensor
    norms: tf.Tensor
    """‖∇ℓᵢ‖ before clipping, shape (B,), in the losses' dtype (rounded up from float64)."""


@dataclass(frozen=True)
class _LayerRecord:
    layer: tf.keras.layers.Layer
    inputs: tuple
    kwargs: Mapping[str, Any]
    computation: Callable
    base: tf.Tensor
    squared_norms: Callable[[tf.Tensor], tf.Tensor]


def unsupported_layers(network: tf.keras.Model, registry: tfp_registry.LayerRegistry | None = None) -> list[str]:
    """Names and classes of trainable layers without a rule (empty when the fast engine can run)."""
    registry = registry or make_layer_registry()
    problems = []
    for layer in leaf_layers(network):
        if layer.trainable_variables and not registry.is_elem(layer):
            problems.append(f"{layer.name} ({type(layer).__name__})")
    return problems


def check_supported(network: tf.keras.Model, registry: tfp_registry.LayerRegistry | None = None) -> None:
    problems = unsupported_layers(network, registry)
    if problems:
        raise UnsupportedLayerError(f"fast clipping has no per-example norm rule for: {', '.join(problems)}; "
                                    "use training.clipping: vectorized, or freeze those layers")


# Plain Python over the model's static layer graph: nothing for AutoGraph to convert, and converting the
# Keras internals it walks only produces warnings.
@tf.autograph.experimental.do_not_convert
def fast_clipped_gradient_sum(network: tf.keras.Model, inputs: tf.Tensor,
                              per_example_loss: Callable[[tf.Tensor], tf.Tensor], clip_norm: float,
                              registry: tfp_registry.LayerRegistry | None = None) -> ClippedGradients:
    """Σᵢ clip(∇ℓᵢ, ``clip_norm``) over the batch ``inputs`` (B ≥ 1), ℓ = ``per_example_loss(network(inputs))``."""
    registry = registry or make_layer_registry()
    records: list[_LayerRecord] = []
    tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)

    def record_layer(layer, args, kwargs):
        if not layer.trainable_variables:
            return layer(*args, **kwargs), None
        if not registry.is_elem(layer):
            check_supported(network, registry)
        computation = registry.lookup(layer)
        base, outputs, squared_norms = computation(layer, args, kwargs, tape, None)
        records.append(_LayerRecord(layer, args, kwargs, computation, base, squared_norms))
        return outputs, None

    with tape:
        outputs, _ = gradient_clipping_utils.model_forward_pass(network, inputs, generator_fn=record_layer)
        losses = per_example_loss(outputs)
        total = tf.reduce_sum(losses)
    _check_covers(network, records)
    output_grads = tape.gradient(total, [r.base for r in records],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
    del tape
    # Squared norms add up across layers in float64, and the clip factors are rounded so that no clipped
    # gradient exceeds C by a rounding error (``norms.clip_factors``).
    squared = tf.maximum(tf.add_n([_squared_norms64(r, g) for r, g in zip(records, output_grads)]), 0.0)
    clip_weights = {}

    def clip_weights_in(dtype: tf.DType) -> tf.Tensor:
        if dtype not in clip_weights:
            clip_weights[dtype] = clip_factors(squared, clip_norm, dtype)
        return clip_weights[dtype]

    sums = {}
    for record, grads in zip(records, output_grads):
        weights = clip_weights_in(grads.dtype)
        kept = getattr(record.squared_norms, "clipped_sums", None)
        layer_sums = kept(weights) if kept is not None else None
        if layer_sums is None:
            weighted = grads * tf.reshape(weights, [-1] + [1] * (grads.shape.rank - 1))
            layer_sums = _weight_gradient(record, weighted)
        for variable, total_grad in zip(record.layer.trainable_variables, layer_sums):
            sums[variable.ref()] = total_grad
    norms = round_up_to(tf.sqrt(squared), losses.dtype)
    return ClippedGradients([sums[v.ref()] for v in network.trainable_variables], losses, norms)


def _squared_norms64(record: _LayerRecord, output_grads: tf.Tensor) -> tf.Tensor:
    """A layer's (B,) squared norms in float64: dpmedtf's rules accumulate in float64 already."""
    exact = getattr(record.squared_norms, "squared_norms64", None)
    if exact is not None:
        return exact(output_grads)
    return tf.cast(record.squared_norms(output_grads), NORM_DTYPE)


def _weight_gradient(record: _LayerRecord, output_grads: tf.Tensor) -> list[tf.Tensor]:
    """∂(Σᵢ ⟨gᵢ, baseᵢ⟩)/∂W for this layer alone: its input is held fixed, so nothing flows upstream."""
    variables = record.layer.trainable_variables
    with tf.GradientTape(watch_accessed_variables=False) as layer_tape:
        layer_tape.watch(variables)
        fixed_inputs = tuple(tf.stop_gradient(x) for x in record.inputs)
        base, _, _ = record.computation(record.layer, fixed_inputs, record.kwargs, layer_tape, None)
    return layer_tape.gradient(base, variables, output_gradients=output_grads,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _check_covers(network: tf.keras.Model, records: list[_LayerRecord]) -> None:
    seen = {}
    for record in records:
        if record.layer.name in seen:
            raise UnsupportedLayerError(f"layer '{record.layer.name}' is applied more than once; its per-example "
                                        "norm is not the sum of per-call norms — use training.clipping: vectorized")
        seen[record.layer.name] = record
    covered = {v.ref() for r in records for v in r.layer.trainable_variables}
    missing = [v.name for v in network.trainable_variables if v.ref() not in covered]
    if missing:
        raise UnsupportedLayerError(f"fast clipping did not reach the variables {missing}; use "
                                    "training.clipping: vectorized")
