"""tensorflow-privacy fast-clipping registry functions for the layers of our models.

tensorflow-privacy's ``LayerRegistry`` maps a layer class to a function
``(layer, input_args, input_kwargs, tape, num_microbatches) -> (base_vars, outputs, sqr_norm_fn)``:
``base_vars`` is a tensor the tape watches (the layer's pre-activation output), and
``sqr_norm_fn(∂L/∂base_vars)`` returns each example's squared gradient norm for the layer's weights.
We register Dense, Conv1D, Conv2D, Conv3D, ACSConv and GroupNormalization in that form, so the
registry also plugs into tensorflow-privacy's own ``compute_gradient_norms``.

This table is the one list of layers with trainable weights that the fast engine clips per example:
``models.validate`` asks ``is_supported``. Lookup is by exact class, as in tensorflow-privacy, so a
subclass (Conv2DTranspose is a Conv2D) is never taken for its parent. tensorflow-privacy's Embedding
rule is left out: its ``base_vars`` is the table itself, whose rows are vocabulary entries and not
examples, so the engine's book-keeping clipped sum cannot weight them per example.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import tensorflow as tf

from dpmedtf.privacy.clipping.norms import (conv_cost_prefers_ghost, conv_ghost_squared_norms,
                                            flatten_positions, ghost_is_cheaper, gram_squared_norms, group_normalize,
                                            per_example_conv_kernel_grads, round_up_to, squared_norms_of,
                                            summed_over_positions)

if TYPE_CHECKING:
    from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import LayerRegistry

    from dpmedtf.models.acs import ACSConv

NormMethod = Literal["cost", "ghost", "instantiate"]
"""How a convolution's (or a sequence Dense's) norm is had: cheaper by the cost model, or forced."""

NORM_METHODS: tuple[str, ...] = ("cost", "ghost", "instantiate")

_ACS_PLANES = ("axial", "coronal", "sagittal")


class LayerGradients:
    """A tensorflow-privacy ``sqr_norm_fn`` that keeps the per-example gradients it instantiated.

    ``compute(∂L/∂base)`` returns (float64 squared norms (B,), per-example gradients per trainable
    variable, or None when the norms came from Gram matrices). Kept gradients give the clipped sum as
    Σᵢ cᵢ Gᵢ. Called as tensorflow-privacy calls it, the norms come back in the layer's dtype, rounded up.
    """

    def __init__(self, compute: Callable[[tf.Tensor], tuple[tf.Tensor, list[tf.Tensor] | None]]):
        self._compute = compute
        self.per_example: list[tf.Tensor] | None = None

    def squared_norms64(self, base_grads: tf.Tensor) -> tf.Tensor:
        squared, self.per_example = self._compute(base_grads)
        return squared

    def __call__(self, base_grads: tf.Tensor) -> tf.Tensor:
        return round_up_to(self.squared_norms64(base_grads), base_grads.dtype)

    def clipped_sums(self, clip_weights: tf.Tensor) -> list[tf.Tensor] | None:
        """Σᵢ cᵢ Gᵢ per variable, or None when the gradients were never instantiated."""
        if self.per_example is None:
            return None
        return [tf.tensordot(tf.cast(clip_weights, grads.dtype), grads, axes=1) for grads in self.per_example]


def _instantiated(per_example: list[tf.Tensor]):
    """The norms of exactly the gradients that will be summed (so cᵢ bounds what is added)."""
    return tf.add_n([squared_norms_of(grads) for grads in per_example]), per_example


def _single_input(layer, input_args: Sequence[Any], input_kwargs: Mapping[str, Any], num_microbatches) -> tf.Tensor:
    if num_microbatches is not None:
        raise NotImplementedError(f"{type(layer).__name__}: microbatching is not supported by dpmedtf's registry")
    if len(input_args) != 1 or input_kwargs:
        raise ValueError(f"layer '{layer.name}' must be called on one tensor without keyword arguments")
    return input_args[0]


def _pre_activation(layer, inputs: tf.Tensor, tape: tf.GradientTape) -> tuple[tf.Tensor, tf.Tensor]:
    """(output before the activation, output), the first watched BEFORE the activation is applied.

    The norms need the gradient before a non-linearity. The engine's tape watches no variable, so an
    activation applied before ``tape.watch`` is not recorded when nothing upstream is watched (the
    network's first layer): its base would get no gradient at all.
    """
    activation = layer.activation
    if activation is None or activation is tf.keras.activations.linear:
        outputs = layer(inputs)
        tape.watch(outputs)
        return outputs, outputs
    layer.activation = None
    try:
        base = layer(inputs)
    finally:
        layer.activation = activation
    tape.watch(base)
    return base, activation(base)


def _use_ghost(method: NormMethod, prefers_ghost: Callable[[], bool]) -> bool:
    return prefers_ghost() if method == "cost" else method == "ghost"


def conv_layer_computation(layer, input_args, input_kwargs, tape: tf.GradientTape, num_microbatches=None, *,
                           method: NormMethod = "cost"):
    """Conv1D / Conv2D / Conv3D (channels last, dilation 1, groups 1): ghost or instantiated kernel norms."""
    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    unsupported = [what for what, bad in (("channels_first", layer.data_format != "channels_last"),
                                          ("dilation", any(d != 1 for d in layer.dilation_rate)),
                                          ("groups", layer.groups != 1), ("causal padding", layer.padding == "causal"))
                   if bad]
    if unsupported:
        raise NotImplementedError(f"layer '{layer.name}': fast clipping does not support {', '.join(unsupported)}; "
                                  "use training.clipping: vectorized")
    base, outputs = _pre_activation(layer, inputs, tape)
    kernel_shape, strides = tuple(layer.kernel.shape), tuple(layer.strides)

    def compute(base_grads):
        if _use_ghost(method, lambda: conv_cost_prefers_ghost(base_grads, kernel_shape)):
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
                               num_microbatches=None, *, method: NormMethod = "cost"):
    """ACSConv: each plane's output channels come from its own 3D kernel, so the squared norms add up."""
    from dpmedtf.models.acs import acs_split  # see _rules

    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    base = layer(inputs)
    tape.watch(base)
    k, s, in_channels = layer.kernel_size, layer.strides, int(inputs.shape[-1])
    splits = acs_split(layer.filters)
    plane_sizes = [tuple(1 if axis == plane else k for axis in range(3)) for plane in range(len(_ACS_PLANES))]

    def compute(base_grads):
        parts = tf.split(base_grads, splits, axis=-1)
        if _use_ghost(method, lambda: conv_cost_prefers_ghost(base_grads, (k, k, in_channels, max(splits)))):
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


def dense_layer_computation(layer: tf.keras.layers.Dense, input_args, input_kwargs, tape: tf.GradientTape,
                            num_microbatches=None, *, method: NormMethod = "cost"):
    """Dense on (B, d) — kernel gradient x gᵀ, ‖x gᵀ‖² = ‖x‖²‖g‖², a product nothing cancels in — or on
    (B, …, d), where the kernel gradient Σₜ xₜ gₜᵀ is normed as a convolution of kernel size 1."""
    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    base, outputs = _pre_activation(layer, inputs, tape)

    def compute(base_grads):
        bias_grads = summed_over_positions(base_grads) if inputs.shape.rank > 2 else base_grads
        if inputs.shape.rank == 2:
            squared = squared_norms_of(inputs) * squared_norms_of(base_grads)
        else:
            positions, patch = flatten_positions(inputs), flatten_positions(base_grads)
            features, units = int(positions.shape[-1]), int(patch.shape[-1])
            if not _use_ghost(method, lambda: ghost_is_cheaper(int(positions.shape[1]), features, units)):
                kernel = tf.einsum("btd,btp->bdp", positions, patch)
                return _instantiated([kernel, bias_grads] if layer.use_bias else [kernel])
            squared = gram_squared_norms(positions, patch)
        if layer.use_bias:
            squared += squared_norms_of(bias_grads)
        return squared, None

    return base, outputs, LayerGradients(compute)


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


def _rules(method: NormMethod) -> dict[type, Callable]:
    # dpmedtf.models is imported on use, not with this module: models.validate asks this table, and
    # importing the models package imports models.validate, so a module-level import would be circular.
    from dpmedtf.models.acs import ACSConv

    if method not in NORM_METHODS:
        raise ValueError(f"norm method must be one of {NORM_METHODS}, got {method!r}")
    conv = partial(conv_layer_computation, method=method)
    return {tf.keras.layers.Dense: partial(dense_layer_computation, method=method),
            tf.keras.layers.Conv1D: conv, tf.keras.layers.Conv2D: conv, tf.keras.layers.Conv3D: conv,
            ACSConv: partial(acs_conv_layer_computation, method=method),
            tf.keras.layers.GroupNormalization: group_norm_layer_computation}


def supported_layer_types() -> tuple[type, ...]:
    """The layer classes with trainable weights that the fast engine clips per example (exact classes)."""
    return tuple(_rules("cost"))


def is_supported(layer: tf.keras.layers.Layer) -> bool:
    """Whether the fast engine has a per-example norm rule for ``layer``'s class (not its parents')."""
    return type(layer) in supported_layer_types()


def make_layer_registry(norm_method: NormMethod = "cost") -> LayerRegistry:
    """A tensorflow-privacy registry of every layer dpmedtf's fast engine clips.

    ``norm_method`` "cost" picks ghost or instantiated norms per layer by flops; "ghost" and
    "instantiate" force one (tests compare both paths with a per-example loop).
    """
    # Imported here: which layers are supported is asked without tensorflow-privacy (models.validate).
    from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import LayerRegistry

    registry = LayerRegistry()
    for layer_class, rule in _rules(norm_method).items():
        registry.insert(layer_class, rule)
    return registry

