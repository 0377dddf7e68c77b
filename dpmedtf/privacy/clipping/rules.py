"""The fast engine's per-example norm rules, one per layer family, in tensorflow-privacy's registry form.

A rule is ``(layer, input_args, input_kwargs, tape, num_microbatches) -> (base, outputs, sqr_norm_fn)``:
``base`` is a tensor the tape watches (the layer's pre-activation output) and ``sqr_norm_fn(∂L/∂base)``
returns each example's squared gradient norm for the layer's weights. Ours return a ``LayerGradients``,
which also gives the clipped sum where it kept per-example gradients. ``registry`` says which layer
class takes which rule.

Embedding: tensorflow-privacy's own rule watches the table itself, whose rows are vocabulary entries
and not examples, so the engine's book-keeping clipped sum could not weight them per example (it
crashed when the vocabulary size differed from the batch size, and was wrong when equal). Ours watches
the layer's output, whose row i is example i's, like every other rule here; the norm comes from each
example's distinct ids (``norms.embedding_squared_norms``) and the clipped sum is formed here as a
dense (vocabulary × dim) tensor, never by the engine's re-trace (whose gradient would be IndexedSlices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import tensorflow as tf

from dpmedtf.errors import DpmedtfError
from dpmedtf.privacy.clipping.norms import (batched_conv_kernel_grads, batched_is_preferred,
                                            conv_cost_prefers_ghost, conv_ghost_squared_norms, embedding_clipped_sum,
                                            embedding_squared_norms, flatten_positions, ghost_is_cheaper,
                                            gram_squared_norms, layer_normalize, per_example_conv_kernel_grads,
                                            round_up_to, squared_norms_of, summed_over_axes, summed_over_positions)

if TYPE_CHECKING:
    from dpmedtf.models.acs import ACSConv


class UnsupportedCallError(DpmedtfError, ValueError):
    """A layer called in a way the fast engine's rules do not handle (several inputs, keyword arguments)."""


NormMethod = Literal["cost", "ghost", "instantiate"]
"""How a convolution's (or a sequence Dense's) norm is had: cheaper by the cost model, or forced."""

NORM_METHODS: tuple[str, ...] = ("cost", "ghost", "instantiate")

InstantiateWith = Literal["auto", "loop", "batched"]
"""How an instantiated conv kernel gradient is formed: per example ("loop"), for all examples in one
matrix product ("batched"), or by device and shape ("auto", ``norms.batched_is_preferred``)."""

INSTANTIATE_WITH: tuple[str, ...] = ("auto", "loop", "batched")

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
        raise UnsupportedCallError(f"layer '{layer.name}' must be called on one tensor without keyword arguments")
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


def check_instantiate_with(instantiate_with: str) -> None:
    if instantiate_with not in INSTANTIATE_WITH:
        raise ValueError(f"instantiate_with must be one of {INSTANTIATE_WITH}, got {instantiate_with!r}")


def _conv_kernel_grads(inputs: tf.Tensor, output_grads: tf.Tensor, kernel_shape: tuple[int, ...],
                       strides: tuple[int, ...], padding: str, instantiate_with: InstantiateWith) -> tf.Tensor:
    """(B, *kernel_shape) per-example kernel gradients, by the loop or the batched contraction."""
    check_instantiate_with(instantiate_with)
    batched = (batched_is_preferred(output_grads, kernel_shape) if instantiate_with == "auto"
               else instantiate_with == "batched")
    kernel_grads = batched_conv_kernel_grads if batched else per_example_conv_kernel_grads
    return kernel_grads(inputs, output_grads, kernel_shape, strides, padding)


def conv_layer_computation(layer, input_args, input_kwargs, tape: tf.GradientTape, num_microbatches=None, *,
                           method: NormMethod = "cost", instantiate_with: InstantiateWith = "auto"):
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
        if _use_ghost(method, lambda: conv_cost_prefers_ghost(base_grads, kernel_shape, strides)):
            squared = conv_ghost_squared_norms(inputs, base_grads, tuple(layer.kernel_size), strides, layer.padding)
            if layer.use_bias:
                squared += squared_norms_of(summed_over_positions(base_grads))
            return squared, None
        per_example = [_conv_kernel_grads(inputs, base_grads, kernel_shape, strides, layer.padding, instantiate_with)]
        if layer.use_bias:
            per_example.append(summed_over_positions(base_grads))
        return _instantiated(per_example)

    return base, outputs, LayerGradients(compute)


def acs_conv_layer_computation(layer: ACSConv, input_args, input_kwargs, tape: tf.GradientTape,
                               num_microbatches=None, *, method: NormMethod = "cost",
                               instantiate_with: InstantiateWith = "auto"):
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
        if _use_ghost(method, lambda: conv_cost_prefers_ghost(base_grads, (k, k, in_channels, max(splits)),
                                                                  (s, s, s))):
            squared = tf.add_n([conv_ghost_squared_norms(inputs, part, size, (s, s, s), layer.padding)
                                for part, size in zip(parts, plane_sizes)])
            if layer.use_bias:
                squared += squared_norms_of(summed_over_positions(base_grads))
            return squared, None
        kernels = [tf.squeeze(_conv_kernel_grads(inputs, part, (*size, in_channels, channels), (s, s, s),
                                                 layer.padding, instantiate_with), axis=1 + plane)
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
    """GroupNormalization over the channel (last) axis, with γ and β given one row per example.

    Per example, ∂ℓ/∂γ = Σ_positions g·x̂ and ∂ℓ/∂β = Σ_positions g: 2C numbers, always instantiated. The
    forward is ``models.layers.group_norm`` (two-pass moments, γ and β folded into one scale and offset, a
    hand-derived backward) fed (B, C) rows equal to the layer's γ and β; the watched base is those rows.
    Its gradient is then each example's (∂γ, ∂β) exactly as the layer's own backward forms them on the way
    to the input gradient — the per-(example, channel) sums dx needs anyway — so no pass over the
    activations is added for them. The norms are of exactly these per-example gradients, which are the
    ones summed.
    """
    # Imported on use: dpmedtf.models imports models.validate, which asks this package's registry.
    from dpmedtf.models.layers import group_norm

    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    if layer.axis not in (-1, inputs.shape.rank - 1):
        raise NotImplementedError(f"layer '{layer.name}': fast clipping supports GroupNormalization over the last "
                                  f"axis only (got axis={layer.axis})")
    # Only trainable layers are recorded, so at least one of γ and β is there.
    parameters = [variable for variable, used in ((layer.gamma, layer.scale), (layer.beta, layer.center)) if used]
    batch, channels = tf.shape(inputs)[0], int(inputs.shape[-1])
    rows = tf.concat([tf.broadcast_to(p, [batch, channels]) for p in parameters], axis=1)  # row i: example i's (γ, β)
    tape.watch(rows)
    split = tf.split(rows, len(parameters), axis=1)
    outputs = group_norm(inputs, split[0] if layer.scale else None, split[-1] if layer.center else None,
                         layer.groups, layer.epsilon)

    def compute(row_grads):
        return _instantiated(tf.split(row_grads, len(parameters), axis=1))

    return rows, outputs, LayerGradients(compute)


def layer_norm_layer_computation(layer: tf.keras.layers.LayerNormalization, input_args, input_kwargs,
                                 tape: tf.GradientTape, num_microbatches=None):
    """LayerNormalization over any non-batch axes, computed here so that x̂ is at hand.

    The forward is the layer's own arithmetic: moments over ``layer.axis`` with ``layer.epsilon``, then
    γ·x̂ + β with γ and β broadcast as Keras does (reshaped to the input's rank with the normalised axes'
    sizes in place, in ``layer.axis`` order — the same row-major reshape Keras applies). Per example,
    ∂ℓ/∂γ = Σ g·x̂ and ∂ℓ/∂β = Σ g over the non-batch axes that are not normalised, reshaped back to the
    parameters' shape: always instantiated (they are as large as γ).
    """
    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    rank = inputs.shape.rank
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    axes = [axis + rank if axis < 0 else axis for axis in axes]
    if 0 in axes:
        raise NotImplementedError(f"layer '{layer.name}': LayerNormalization over the batch axis (axis={layer.axis}) "
                                  "mixes examples; no per-example gradient exists")
    # As Keras: inputs in the compute dtype, normalised in float32 when that is a half type.
    inputs = tf.cast(inputs, layer.compute_dtype)
    input_dtype = inputs.dtype
    if input_dtype in (tf.float16, tf.bfloat16) and layer.dtype == "float32":
        inputs = tf.cast(inputs, tf.float32)
    broadcast_shape = [1] * rank
    for axis in axes:
        broadcast_shape[axis] = inputs.shape[axis]
    normalized = layer_normalize(inputs, axes, layer.epsilon)
    base = normalized
    if layer.scale:
        base = base * tf.cast(tf.reshape(layer.gamma, broadcast_shape), base.dtype)
    if layer.center:
        base = base + tf.cast(tf.reshape(layer.beta, broadcast_shape), base.dtype)
    tape.watch(base)
    outputs = tf.cast(base, input_dtype)
    summed_axes = [axis for axis in range(1, rank) if axis not in axes]

    def per_parameter(grads: tf.Tensor, variable: tf.Variable) -> tf.Tensor:
        return tf.cast(tf.reshape(summed_over_axes(grads, summed_axes), [-1, *variable.shape]), variable.dtype)

    def compute(output_grads):
        per_example = []
        if layer.scale:
            per_example.append(per_parameter(output_grads * normalized, layer.gamma))
        if layer.center:
            per_example.append(per_parameter(output_grads, layer.beta))
        return _instantiated(per_example)

    return base, outputs, LayerGradients(compute)


class EmbeddingGradients(LayerGradients):
    """An Embedding's norms and clipped sum, from its ids and the gradient of its output.

    Each example's table gradient Σₜ onehot(idₜ) gₜᵀ is never stacked (it would be B × vocabulary × dim);
    ``clipped_sums`` returns the dense table gradient Σᵢ,ₜ cᵢ onehot(idᵢₜ) gᵢₜᵀ directly.
    """

    def __init__(self, ids: tf.Tensor, vocabulary: int, table_dtype: tf.DType):
        super().__init__(self._norms)
        self.ids, self.vocabulary, self.table_dtype = ids, vocabulary, table_dtype
        self.output_grads: tf.Tensor | None = None

    def _norms(self, output_grads: tf.Tensor):
        self.output_grads = output_grads
        return embedding_squared_norms(self.ids, output_grads, self.vocabulary), None

    def clipped_sums(self, clip_weights: tf.Tensor) -> list[tf.Tensor]:
        if self.output_grads is None:
            raise RuntimeError("EmbeddingGradients.clipped_sums needs the squared norms computed first")
        return [embedding_clipped_sum(self.ids, self.output_grads, clip_weights, self.vocabulary, self.table_dtype)]


def embedding_layer_computation(layer: tf.keras.layers.Embedding, input_args, input_kwargs, tape: tf.GradientTape,
                                num_microbatches=None):
    """Embedding on integer ids of shape (B,) or (B, T, …): the layer's own output is the watched base.

    Its row i is example i's (unlike tensorflow-privacy's rule, which watches the table). With
    ``mask_zero`` the layer's output carries its padding mask on, as Keras' own call does; id 0 still
    reads (and its gradient reaches) row 0 of the table, exactly as the model's own gradient has it.
    """
    ids = _single_input(layer, input_args, input_kwargs, num_microbatches)
    if getattr(layer, "sparse", False) or isinstance(ids, (tf.SparseTensor, tf.RaggedTensor)):
        raise NotImplementedError(f"layer '{layer.name}': fast clipping supports dense ids and dense Embedding "
                                  "outputs only; use training.clipping: vectorized")
    outputs = layer(ids)  # Keras' lookup (and its mask, with mask_zero)
    tape.watch(outputs)
    if ids.dtype not in (tf.int32, tf.int64):  # as Embedding.call
        ids = tf.cast(ids, tf.int32)
    return outputs, outputs, EmbeddingGradients(ids, int(layer.input_dim), layer.embeddings.dtype)
