"""tensorflow-privacy fast-clipping registry functions for the layers of our models.

tensorflow-privacy's ``LayerRegistry`` maps a layer class to a function
``(layer, input_args, input_kwargs, tape, num_microbatches) -> (base_vars, outputs, sqr_norm_fn)``:
``base_vars`` is a tensor the tape watches (the layer's pre-activation output), and
``sqr_norm_fn(∂L/∂base_vars)`` returns each example's squared gradient norm for the layer's weights.
It ships Dense and Embedding; we add Conv2D, Conv3D, ACSConv and GroupNormalization in the same form,
so the registry also plugs into tensorflow-privacy's own ``compute_gradient_norms``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry as tfp_registry

from dpmedtf.models.acs import ACSConv, acs_split
from dpmedtf.privacy.clipping.norms import (conv_cost_prefers_ghost, conv_ghost_squared_norms, group_normalize,
                                            per_example_conv_kernel_grads, squared_norms_of, summed_over_positions)

_ACS_PLANES = ("axial", "coronal", "sagittal")


class LayerGradients:
    """A tensorflow-privacy ``sqr_norm_fn`` that keeps the per-example gradients it instantiated.

    ``compute(∂L/∂base)`` returns (squared norms (B,), per-example gradients per trainable variable, or
    None when the norms came from Gram matrices). Kept gradients give the clipped sum as Σᵢ cᵢ Gᵢ.
    """

    def __init__(self, compute):
        self._compute = compute
        self.per_example: list[tf.Tensor] | None = None

    def __call__(self, base_grads: tf.Tensor) -> tf.Tensor:
        squared, self.per_example = self._compute(base_grads)
        return squared

    def clipped_sums(self, clip_weights: tf.Tensor) -> list[tf.Tensor] | None:
        """Σᵢ cᵢ Gᵢ per variable, or None when the gradients were never instantiated."""
        if self.per_example is None:
            return None
        return [tf.tensordot(clip_weights, grads, axes=1) for grads in self.per_example]


def _instantiated(per_example: list[tf.Tensor]):
    return tf.add_n([squared_norms_of(grads) for grads in per_example]), per_example


def _single_input(layer, input_args: Sequence[Any], input_kwargs: Mapping[str, Any], num_microbatches) -> tf.Tensor:
    if num_microbatches is not None:
        raise NotImplementedError(f"{type(layer).__name__}: microbatching is not supported by dpmedtf's registry")
    if len(input_args) != 1 or input_kwargs:
        raise ValueError(f"layer '{layer.name}' must be called on one tensor without keyword arguments")
    return input_args[0]


def _pre_activation(layer, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(output before the activation, output): the norms need the gradient before a non-linearity."""
    activation = layer.activation
    if activation is None or activation is tf.keras.activations.linear:
        outputs = layer(inputs)
        return outputs, outputs
    layer.activation = None
    try:
        base = layer(inputs)
    finally:
        layer.activation = activation
    return base, activation(base)


def conv_layer_computation(layer, input_args, input_kwargs, tape: tf.GradientTape, num_microbatches=None):
    """Conv2D / Conv3D (channels last, dilation 1, groups 1): ghost or instantiated kernel norms by cost."""
    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    unsupported = [what for what, bad in (("channels_first", layer.data_format != "channels_last"),
                                          ("dilation", any(d != 1 for d in layer.dilation_rate)),
                                          ("groups", layer.groups != 1), ("causal padding", layer.padding == "causal"))
                   if bad]
    if unsupported:
        raise NotImplementedError(f"layer '{layer.name}': fast clipping does not support {', '.join(unsupported)}; "
                                  "use training.clipping: vectorized")
    base, outputs = _pre_activation(layer, inputs)
    tape.watch(base)
    kernel_shape, strides = tuple(layer.kernel.shape), tuple(layer.strides)

    def compute(base_grads):
        if conv_cost_prefers_ghost(base_grads, kernel_shape):
            squared = conv_ghost_squared_norms(inputs, base_grads, tuple(layer.kernel_size), strides, layer.padding)
            if layer.use_bias:
                squared += squared_norms_of(summed_over_positions(base_grads))
            return squared, None
        per_example = [per_example_conv_kernel_grads(inputs, base_grads, kernel_shape, strides, layer.padding)]
        if layer.use_bias:
            per_example.append(summed_over_positions(base_grads))
        return _instantiated(per_example)

    return base, outputs, LayerGradients(compute)


def acs_conv_layer_computation(layer: ACSConv, input_args, input_kwargs, tape: tf.GradientTape,
                               num_microbatches=None):
    """ACSConv: each plane's output channels come from its own 3D kernel, so the squared norms add up."""
    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    base = layer(inputs)
    tape.watch(base)
    k, s, in_channels = layer.kernel_size, layer.strides, int(inputs.shape[-1])
    splits = acs_split(layer.filters)
    plane_sizes = [tuple(1 if axis == plane else k for axis in range(3)) for plane in range(len(_ACS_PLANES))]

    def compute(base_grads):
        parts = tf.split(base_grads, splits, axis=-1)
        if conv_cost_prefers_ghost(base_grads, (k, k, in_channels, max(splits))):
            squared = tf.add_n([conv_ghost_squared_norms(inputs, part, size, (s, s, s), layer.padding)
                                for part, size in zip(parts, plane_sizes)])
            if layer.use_bias:
                squared += squared_norms_of(summed_over_positions(base_grads))
            return squared, None
        kernels = [tf.squeeze(per_example_conv_kernel_grads(inputs, part, (*size, in_channels, channels), (s, s, s),
                                                            layer.padding), axis=1 + plane)
                   for plane, (part, size, channels) in enumerate(zip(parts, plane_sizes, splits))]
        per_example = [tf.concat(kernels, axis=-1)]  # (B, k, k, Cin, Cout): the layer's 2D kernel layout
        if layer.use_bias:
            per_example.append(summed_over_positions(base_grads))
        return _instantiated(per_example)

    return base, base, LayerGradients(compute)


def group_norm_layer_computation(layer: tf.keras.layers.GroupNormalization, input_args, input_kwargs,
                                 tape: tf.GradientTape, num_microbatches=None):
    """GroupNormalization over the channel (last) axis, computed here so that x̂ is at hand.

    Per example, ∂ℓ/∂γ = Σ_positions g·x̂ and ∂ℓ/∂β = Σ_positions g: 2C numbers, always instantiated.
    The forward is the layer's own arithmetic (two-pass moments, then γ·x̂ + β).
    """
    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    if layer.axis not in (-1, inputs.shape.rank - 1):
        raise NotImplementedError(f"layer '{layer.name}': fast clipping supports GroupNormalization over the last "
                                  f"axis only (got axis={layer.axis})")
    normalized = group_normalize(inputs, layer.groups, layer.epsilon)
    outputs = normalized
    if layer.scale:
        outputs = outputs * layer.gamma
    if layer.center:
        outputs = outputs + layer.beta
    tape.watch(outputs)

    def compute(output_grads):
        per_example = []
        if layer.scale:
            per_example.append(summed_over_positions(output_grads * normalized))
        if layer.center:
            per_example.append(summed_over_positions(output_grads))
        return _instantiated(per_example)

    return outputs, outputs, LayerGradients(compute)


def make_layer_registry() -> tfp_registry.LayerRegistry:
    """tensorflow-privacy's default registry (Dense, Embedding) plus every layer of dpmedtf's models."""
    registry = tfp_registry.make_default_layer_registry()
    registry.insert(tf.keras.layers.Conv2D, conv_layer_computation)
    registry.insert(tf.keras.layers.Conv3D, conv_layer_computation)
    registry.insert(ACSConv, acs_conv_layer_computation)
    registry.insert(tf.keras.layers.GroupNormalization, group_norm_layer_computation)
    return registry
