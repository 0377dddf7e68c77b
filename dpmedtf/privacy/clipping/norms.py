"""Per-example squared gradient norms of one layer from its inputs and its output gradients.

For a convolution the gradient of example i is Pᵢᵀ Gᵢ, with Pᵢ (T × D) the example's input patches
(T output positions, D = kernel volume · input channels) and Gᵢ (T × p) the gradient of the loss with
respect to the layer's output. Its squared Frobenius norm can be had two ways (Bu et al., "mixed ghost
clipping"):

- instantiate: form Pᵢᵀ Gᵢ (D × p) and square it — cost T·D·p, memory D·p per example. It is formed
  by TensorFlow's own filter-gradient kernel run per example, which on CPU is 2–4× faster than
  extracting patches, and the result is kept: the clipped sum is then Σᵢ cᵢ Gᵢ with no further pass;
- ghost: ‖Pᵢᵀ Gᵢ‖² = ⟨Pᵢ Pᵢᵀ, Gᵢ Gᵢᵀ⟩ — cost T²·(D + p), memory T² per example, never forming the
  gradient.

Early layers of a CNN have many positions and few weights (instantiate); late ones few positions and
many weights (ghost). The choice is made per layer from its static shapes.
"""

from __future__ import annotations

import tensorflow as tf


def ghost_is_cheaper(positions: int, patch_size: int, out_channels: int) -> bool:
    """Whether the Gram-matrix (ghost) norm costs fewer flops than instantiating the per-example gradient."""
    return positions * positions * (patch_size + out_channels) < positions * patch_size * out_channels


def extract_patches(inputs: tf.Tensor, kernel_size: tuple[int, ...], strides: tuple[int, ...],
                    padding: str) -> tf.Tensor:
    """(B, T, D) patches of a channels-last 2D or 3D input, laid out as the convolution reads them."""
    rank = inputs.shape.rank
    if rank == 4:
        patches = tf.image.extract_patches(inputs, sizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
                                           rates=[1, 1, 1, 1], padding=padding.upper())
    elif rank == 5:
        patches = tf.extract_volume_patches(inputs, ksizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
                                            padding=padding.upper())
    else:
        raise ValueError(f"convolution inputs must be 4-D or 5-D (channels last), got rank {rank}")
    return _flatten_positions(patches)


def _flatten_positions(tensor: tf.Tensor) -> tf.Tensor:
    """(B, *spatial, C) → (B, T, C) with static T and C (the model's spatial shapes are static)."""
    spatial = tensor.shape[1:-1]
    if not spatial.is_fully_defined() or tensor.shape[-1] is None:
        raise ValueError(f"fast clipping needs static spatial shapes, got {tensor.shape}; build the model with a "
                         "fixed input size")
    return tf.reshape(tensor, [-1, spatial.num_elements(), tensor.shape[-1]])


def conv_ghost_squared_norms(inputs: tf.Tensor, output_grads: tf.Tensor, kernel_size: tuple[int, ...],
                             strides: tuple[int, ...], padding: str) -> tf.Tensor:
    """(B,) squared norms of each example's kernel gradient from Gram matrices (2D or 3D, dilation 1)."""
    grads = _flatten_positions(output_grads)
    patches = extract_patches(inputs, kernel_size, strides, padding)
    if patches.shape[1] != grads.shape[1]:
        raise ValueError(f"patches give {patches.shape[1]} positions but the output has {grads.shape[1]}; "
                         "kernel, strides or padding do not match the layer")
    patch_gram = tf.matmul(patches, patches, transpose_b=True)
    grad_gram = tf.matmul(grads, grads, transpose_b=True)
    return tf.reduce_sum(patch_gram * grad_gram, axis=[1, 2])


def per_example_conv_kernel_grads(inputs: tf.Tensor, output_grads: tf.Tensor, kernel_shape: tuple[int, ...],
                                  strides: tuple[int, ...], padding: str) -> tf.Tensor:
    """(B, *kernel_shape): each example's kernel gradient of a 2D or 3D convolution (dilation 1)."""
    rank = inputs.shape.rank
    if rank not in (4, 5):
        raise ValueError(f"convolution inputs must be 4-D or 5-D (channels last), got rank {rank}")
    backprop_filter = tf.raw_ops.Conv2DBackpropFilter if rank == 4 else tf.raw_ops.Conv3DBackpropFilterV2
    filter_sizes = tf.constant(kernel_shape, tf.int32)

    def one_example(example):
        example_inputs, example_grads = example
        return backprop_filter(input=example_inputs[None], filter_sizes=filter_sizes, out_backprop=example_grads[None],
                               strides=[1, *strides, 1], padding=padding.upper())

    return tf.map_fn(one_example, (inputs, output_grads), parallel_iterations=4,
                     fn_output_signature=tf.TensorSpec(kernel_shape, inputs.dtype))


def conv_cost_prefers_ghost(output_grads: tf.Tensor, kernel_shape: tuple[int, ...]) -> bool:
    """The per-layer choice, from static shapes: positions T, patch size D, output channels p."""
    positions = output_grads.shape[1:-1].num_elements()
    if positions is None:
        raise ValueError(f"fast clipping needs static spatial shapes, got {output_grads.shape}; build the model "
                         "with a fixed input size")
    patch_size = 1
    for size in kernel_shape[:-1]:
        patch_size *= int(size)
    return ghost_is_cheaper(positions, patch_size, int(kernel_shape[-1]))


def squared_norms_of(per_example: tf.Tensor) -> tf.Tensor:
    """(B,) squared norms of per-example gradients stacked on the first axis."""
    return tf.reduce_sum(tf.square(tf.reshape(per_example, [tf.shape(per_example)[0], -1])), axis=1)


def summed_over_positions(output_grads: tf.Tensor) -> tf.Tensor:
    """(B, C) per-example bias gradients: the output gradient summed over positions."""
    return tf.reduce_sum(_flatten_positions(output_grads), axis=1)


def group_normalize(inputs: tf.Tensor, groups: int, epsilon: float) -> tf.Tensor:
    """x̂ of GroupNormalization over the last axis (before scale γ and shift β): Keras' two-pass moments."""
    channels = inputs.shape[-1]
    grouped = tf.reshape(inputs, [-1, inputs.shape[1:-1].num_elements(), groups, channels // groups])
    mean, variance = tf.nn.moments(grouped, axes=[1, 3], keepdims=True)
    normalized = (grouped - mean) * tf.math.rsqrt(variance + epsilon)
    return tf.reshape(normalized, tf.shape(inputs))
