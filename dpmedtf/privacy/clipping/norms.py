"""Per-example squared gradient norms of one layer from its inputs and its output gradients.

For a convolution the gradient of example i is Pᵢᵀ Gᵢ, with Pᵢ (T × D) the example's input patches
(T output positions, D = kernel volume · input channels) and Gᵢ (T × p) the gradient of the loss with
respect to the layer's output. Its squared Frobenius norm can be had two ways (Bu et al., "mixed ghost
clipping"):

- instantiate: form Pᵢᵀ Gᵢ (D × p) and square it — cost T·D·p, memory D·p per example — and keep it:
  the clipped sum is then Σᵢ cᵢ Gᵢ with no further pass. It is formed either by TensorFlow's own
  filter-gradient kernel run per example ("loop"; on CPU faster than extracting patches) or for all
  examples at once as one batched matrix product of the patches and the output gradients ("batched";
  one large kernel instead of B small sequential ones on a GPU, at the price of B·T·D patch memory);
- ghost: ‖Pᵢᵀ Gᵢ‖² = ⟨Pᵢ Pᵢᵀ, Gᵢ Gᵢᵀ⟩ — cost T²·(D + p), memory T² per example, never forming the
  gradient. For a stride-1 convolution the patch Gram matrix Pᵢ Pᵢᵀ is not formed from patches at all: entry
  (s, t) is Σₖ ⟨x[s+k], x[t+k]⟩ over the kernel offsets k, a sum of shifted windows of the input's own
  Gram matrix Xᵢ Xᵢᵀ, which costs T²·C_in instead of T²·k·C_in (``patch_gram``).

Early layers of a CNN have many positions and few weights (instantiate); late ones few positions and
many weights (ghost). The choice is made per layer from its static shapes, by what each adds to the
non-private step's work (``ghost_is_cheaper``): the T·D·p flops of the weight gradient are spent either way.

Every squared norm here is accumulated in float64 and returned in float64. The ghost form is a sum of
signed Gram products: in float32 an adversarially chosen example whose per-position gradients nearly
cancel would see that sum (and each Gram entry) lose all its digits, so its norm could come out too
small — it would be clipped too little, breaking the sensitivity bound DP rests on. In float64 the
Gram matrices carry 29 more bits; the result is clamped at 0 as well. Sums of squares cannot cancel:
those of float32 gradients are formed in float32 over runs of 16 values and the run sums added in
float64, and the result is then raised by a bound on all that rounding, so that it is never below the
exact squared norm (``squared_norms_of``) — without a float64 copy of every per-example gradient.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import tensorflow as tf

NORM_DTYPE = tf.float64

# The per-layer choice weighs what each method ADDS to the step, for the weight gradient itself is paid
# either way: ghost layers form it as the non-private step does (one batched filter gradient of rows scaled
# by cᵢ), and instantiated layers' per-example gradients replace that kernel at about its cost.
# - ghost adds its float64 Gram matrices: T²·(w + p) multiply-adds per example, w the Gram width (patch
#   size D, or C_in + kernel offsets for stride 1);
# - instantiation adds D·p kept values per example, each written by the loop, squared, weighted and
#   summed — 1.3–1.8 ns a value on this CPU (2 cores, AVX-512), whatever T is.
# There the Gram matrices ran at 8–34 float64 multiply-adds per ns (median 17), so one kept value costs what
# 24–28 of them do (``benchmarks/per_example_conv.py --norm-costs``: the ResNet9 at 128 px, B = 32; 256 px,
# B = 16; 512 px, B = 8). 32 leans a near-tie towards ghost, whose memory is T² rather than D·p per example:
# the one layer within 20% of it (512 px, stage 4's 3×3, 512 → 512) measured cheaper either way from run to
# run. Not tuned on a GPU (none here), where float64 runs at 1/2 to 1/64 of float32 depending on the card.
GHOST_GRAM_MACS_PER_KEPT_VALUE = 32


def ghost_is_cheaper(positions: int, patch_size: int, out_channels: int, gram_width: int | None = None) -> bool:
    """Whether the float64 Gram-matrix (ghost) norm adds less to the step than instantiating the per-example
    gradient does (``GHOST_GRAM_MACS_PER_KEPT_VALUE``).

    ``gram_width`` is what one Gram entry of the inputs costs, when not ``patch_size`` (a stride-1
    convolution's patch Gram comes from its input channels plus one add per kernel offset: ``patch_gram``).
    """
    width = patch_size if gram_width is None else gram_width
    gram_macs = positions * positions * (width + out_channels)
    return gram_macs < GHOST_GRAM_MACS_PER_KEPT_VALUE * patch_size * out_channels


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Zeros TensorFlow's 'same' convolution puts before and after an axis of ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _explicitly_padded(inputs: tf.Tensor, kernel_size: tuple[int, ...], strides: tuple[int, ...],
                       padding: str) -> tf.Tensor:
    """``inputs`` with the zeros a 'same' convolution adds, so that it reads them as 'valid'.

    TensorFlow's patch extraction does not pad as its convolution does when the stride exceeds the kernel by 2
    or more (3D, 'same', e.g. a 1×1×1 kernel with stride 3 on 9 voxels: it drops the first voxel, the
    convolution the last): explicit padding makes both read the same voxels.
    """
    if padding.lower() != "same":
        return inputs
    pads = [[0, 0], *(list(same_padding(int(size), kernel, stride))
                      for size, kernel, stride in zip(inputs.shape[1:-1], kernel_size, strides)), [0, 0]]
    return tf.pad(inputs, pads) if any(lo or hi for lo, hi in pads) else inputs


def extract_patches(inputs: tf.Tensor, kernel_size: tuple[int, ...], strides: tuple[int, ...],
                    padding: str) -> tf.Tensor:
    """(B, T, D) patches of a channels-last 1D, 2D or 3D input, laid out as the convolution reads them."""
    rank = inputs.shape.rank
    if rank == 3:  # a 1D convolution is the 2D one on a height-1 image (as tf.nn.conv1d computes it)
        inputs, kernel_size, strides, rank = inputs[:, None], (1, *kernel_size), (1, *strides), 4
    if rank not in (4, 5):
        raise ValueError(f"convolution inputs must be 3-D, 4-D or 5-D (channels last), got rank {rank}")
    inputs = _explicitly_padded(inputs, kernel_size, strides, padding)
    if rank == 4:
        patches = tf.image.extract_patches(inputs, sizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
                                           rates=[1, 1, 1, 1], padding="VALID")
    else:
        patches = tf.extract_volume_patches(inputs, ksizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
                                            padding="VALID")
    return flatten_positions(patches)


def flatten_positions(tensor: tf.Tensor) -> tf.Tensor:
    """(B, *spatial, C) → (B, T, C) with static T and C (the model's spatial shapes are static)."""
    spatial = tensor.shape[1:-1]
    if not spatial.is_fully_defined() or tensor.shape[-1] is None:
        raise ValueError(f"fast clipping needs static spatial shapes, got {tensor.shape}; build the model with a "
                         "fixed input size")
    return tf.reshape(tensor, [-1, spatial.num_elements(), tensor.shape[-1]])


def gram_squared_norms(left: tf.Tensor, right: tf.Tensor) -> tf.Tensor:
    """(B,) ‖Lᵢᵀ Rᵢ‖² = ⟨Lᵢ Lᵢᵀ, Rᵢ Rᵢᵀ⟩ for (B, T, ·) factors, in float64 and never negative."""
    left, right = tf.cast(left, NORM_DTYPE), tf.cast(right, NORM_DTYPE)
    products = tf.matmul(left, left, transpose_b=True) * tf.matmul(right, right, transpose_b=True)
    return tf.maximum(tf.reduce_sum(products, axis=[1, 2]), 0.0)


def conv_ghost_squared_norms(inputs: tf.Tensor, output_grads: tf.Tensor, kernel_size: tuple[int, ...],
                             strides: tuple[int, ...], padding: str) -> tf.Tensor:
    """(B,) float64 squared norms of each example's kernel gradient from Gram matrices (1D–3D, dilation 1)."""
    grads = flatten_positions(output_grads)
    if all(stride == 1 for stride in strides):
        # The input side costs C_in per Gram entry instead of k·C_in, and no patches are extracted (ResNet9,
        # B = 32, 3×3 layers: 4–5× faster). With strides the input splits into strided phases: no faster.
        patches_gram = patch_gram(inputs, kernel_size, padding, tuple(int(n) for n in output_grads.shape[1:-1]))
        grads = tf.cast(grads, NORM_DTYPE)
        products = patches_gram * tf.matmul(grads, grads, transpose_b=True)
        return tf.maximum(tf.reduce_sum(products, axis=[1, 2]), 0.0)
    patches = extract_patches(inputs, kernel_size, strides, padding)
    if patches.shape[1] != grads.shape[1]:
        raise ValueError(f"patches give {patches.shape[1]} positions but the output has {grads.shape[1]}; "
                         "kernel, strides or padding do not match the layer")
    return gram_squared_norms(patches, grads)


def patch_gram(inputs: tf.Tensor, kernel_size: tuple[int, ...], padding: str,
               out_spatial: tuple[int, ...]) -> tf.Tensor:
    """(B, T, T) float64 Pᵢ Pᵢᵀ of a stride-1 convolution's patches, from the input's own Gram matrix.

    The patch at output position s reads x̄[s + k] for each kernel offset k (x̄: the input with its padding
    zeros), so (Pᵢ Pᵢᵀ)[s, t] = Σₖ ⟨x̄[s+k], x̄[t+k]⟩: the sum over k of a window of the padded input's Gram
    matrix. Only the unpadded input's Gram matrix is computed (padding adds rows of zeros) and then
    zero-padded. The result is the same float64 numbers, summed in another order, as from the patches.
    """
    spatial = tuple(int(n) for n in inputs.shape[1:-1])
    if len(spatial) != len(kernel_size) or None in out_spatial:
        raise ValueError(f"convolution inputs {inputs.shape} do not match kernel {kernel_size}")
    before = [same_padding(n, k, 1)[0] if padding.lower() == "same" else 0 for n, k in zip(spatial, kernel_size)]
    grid = [out + k - 1 for out, k in zip(out_spatial, kernel_size)]  # the padded extent the patches read
    kept = [min(n, g - b) for n, g, b in zip(spatial, grid, before)]  # 'valid' may leave input unread
    region = inputs[(slice(None), *(slice(0, k) for k in kept))]
    flat = tf.cast(tf.reshape(region, [-1, math.prod(kept), inputs.shape[-1]]), NORM_DTYPE)
    gram = tf.reshape(tf.matmul(flat, flat, transpose_b=True), [-1, *kept, *kept])
    gram = _zero_padded(gram, [[0, 0]] + [[b, g - b - k] for b, g, k in zip(before, grid, kept)] * 2)
    windows = [gram[(slice(None), *[slice(o, o + n) for o, n in zip(offset, out_spatial)] * 2)]
               for offset in itertools.product(*(range(k) for k in kernel_size))]
    positions = math.prod(out_spatial)
    return tf.reshape(tf.add_n(windows), [-1, positions, positions])


def _zero_padded(tensor: tf.Tensor, pads: list[list[int]]) -> tf.Tensor:
    """``tf.pad`` with zeros, also past rank 6, where TensorFlow's Pad stops (a 3D Gram matrix has rank 7)."""
    if not any(lo or hi for lo, hi in pads):
        return tensor
    if tensor.shape.rank <= 6:
        return tf.pad(tensor, pads)
    for axis, (lo, hi) in enumerate(pads):
        if lo or hi:
            shape = tensor.shape.as_list()
            zeros = [tf.zeros([tf.shape(tensor)[0], *shape[1:axis], width, *shape[axis + 1:]], tensor.dtype)
                     for width in (lo, hi)]
            tensor = tf.concat([zeros[0], tensor, zeros[1]], axis)
    return tensor


# Examples whose filter gradients may run at once (each op also splits over the intra-op threads).
PER_EXAMPLE_PARALLEL_ITERATIONS = 4


def per_example_conv_kernel_grads(inputs: tf.Tensor, output_grads: tf.Tensor, kernel_shape: tuple[int, ...],
                                  strides: tuple[int, ...], padding: str) -> tf.Tensor:
    """(B, *kernel_shape): each example's kernel gradient of a 1D, 2D or 3D convolution (dilation 1)."""
    rank = inputs.shape.rank
    if rank == 3:  # as tf.nn.conv1d: a height-1 2D convolution with a (1, k, Cin, Cout) kernel
        grads = per_example_conv_kernel_grads(inputs[:, None], output_grads[:, None], (1, *kernel_shape),
                                              (1, *strides), padding)
        return tf.squeeze(grads, axis=1)
    if rank not in (4, 5):
        raise ValueError(f"convolution inputs must be 3-D, 4-D or 5-D (channels last), got rank {rank}")
    backprop_filter = tf.raw_ops.Conv2DBackpropFilter if rank == 4 else tf.raw_ops.Conv3DBackpropFilterV2
    filter_sizes = tf.constant(kernel_shape, tf.int32)

    def filter_gradient(example_inputs, example_grads):
        kernel = backprop_filter(input=example_inputs, filter_sizes=filter_sizes, out_backprop=example_grads,
                                 strides=[1, *strides, 1], padding=padding.upper())
        return tf.reshape(kernel, kernel_shape)

    if _in_xla_context():
        # Compiled, XLA slices without copying and map_fn's loop was 5× faster than the while loop below.
        return tf.map_fn(lambda example: filter_gradient(example[0][None], example[1][None]), (inputs, output_grads),
                         parallel_iterations=PER_EXAMPLE_PARALLEL_ITERATIONS,
                         fn_output_signature=tf.TensorSpec(kernel_shape, inputs.dtype))

    # Uncompiled, a while loop over leading-axis slices rather than tf.map_fn: a slice [i:i+1] of the batch
    # is a view of it, whereas map_fn first copies both (B, …) operands into tensor lists, which at 512 px
    # cost as much as a third of the filter gradients themselves.
    batch = tf.shape(inputs)[0]
    _, kernels = tf.while_loop(
        lambda i, _: i < batch,
        lambda i, kernels: (i + 1, kernels.write(i, filter_gradient(inputs[i:i + 1], output_grads[i:i + 1]))),
        (tf.constant(0), tf.TensorArray(inputs.dtype, size=batch, element_shape=kernel_shape)),
        parallel_iterations=PER_EXAMPLE_PARALLEL_ITERATIONS)
    return kernels.stack()


def _in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (``tf.function(jit_compile=True)``, or inside one)."""
    from tensorflow.python.ops import control_flow_util  # TensorFlow's internal check; no public API for it in 2.15

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def batched_conv_kernel_grads(inputs: tf.Tensor, output_grads: tf.Tensor, kernel_shape: tuple[int, ...],
                              strides: tuple[int, ...], padding: str) -> tf.Tensor:
    """(B, *kernel_shape): every example's kernel gradient Pᵢᵀ Gᵢ at once, as one batched matrix product.

    The same values as ``per_example_conv_kernel_grads`` (1D–3D, dilation 1): the patches' D axis is laid
    out (kernel position, input channel) row-major, as the kernel's leading axes are.
    """
    grads = flatten_positions(output_grads)
    patches = extract_patches(inputs, tuple(kernel_shape[:-2]), strides, padding)
    if patches.shape[1] != grads.shape[1]:
        raise ValueError(f"patches give {patches.shape[1]} positions but the output has {grads.shape[1]}; "
                         "kernel, strides or padding do not match the layer")
    return tf.reshape(tf.matmul(patches, grads, transpose_a=True), [-1, *kernel_shape])


# On a GPU the loop is B small sequential kernels, so the batched contraction is preferred. Its one extra
# cost is its patch tensor, B·T·D values, against the B·D·p kernel gradients that instantiation keeps
# anyway: T/p times as many. Above this ratio the loop is used even on a GPU. There T is large, so each
# example's own filter gradient (T·D·p flops) is big enough to fill the device and the loop loses little,
# while the patches would be large: at 512 px and B = 32 the ResNet9 stem's (T/p = 1024) would take
# 1.2 GB, a 3D stem's far more. Not tuned on a GPU (none here).
BATCHED_MAX_PATCH_RATIO = 64


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU (where a per-example loop is B small sequential kernels)."""
    return bool(tf.config.list_logical_devices("GPU"))


def batched_is_preferred(output_grads: tf.Tensor, kernel_shape: tuple[int, ...]) -> bool:
    """Instantiate by the batched contraction rather than the loop: for a 1×1 kernel, or on a GPU when
    its patches are not much larger than the kernel gradients.

    On a CPU, extracting k×k patches costs more than the loop's whole filter gradient: for the ResNet9 at
    128 px the loop was 1.6–5.6× faster on the stem and stage 1, about even on stage 2's 3×3 layers
    (benchmarks/per_example_conv.py, 2 cores). A 1×1 kernel's patches are its strided input — nothing to
    extract, no more memory than the input — and there the batched product was 2–3× faster than the loop.
    """
    positions = output_grads.shape[1:-1].num_elements()
    if positions is None:
        raise ValueError(f"fast clipping needs static spatial shapes, got {output_grads.shape}; build the model "
                         "with a fixed input size")
    if all(int(size) == 1 for size in kernel_shape[:-2]):
        return True
    return gpu_visible() and positions <= BATCHED_MAX_PATCH_RATIO * int(kernel_shape[-1])


def conv_cost_prefers_ghost(output_grads: tf.Tensor, kernel_shape: tuple[int, ...],
                            strides: tuple[int, ...] | None = None) -> bool:
    """The per-layer choice, from static shapes: positions T, patch size D, output channels p (and, for a
    stride-1 convolution, the cheaper Gram matrix of ``patch_gram``: C_in plus one add per kernel offset)."""
    positions = output_grads.shape[1:-1].num_elements()
    if positions is None:
        raise ValueError(f"fast clipping needs static spatial shapes, got {output_grads.shape}; build the model "
                         "with a fixed input size")
    patch_size = math.prod(int(size) for size in kernel_shape[:-1])
    gram_width = None
    if strides is not None and all(stride == 1 for stride in strides):
        gram_width = int(kernel_shape[-2]) + math.prod(int(size) for size in kernel_shape[:-2])
    return ghost_is_cheaper(positions, patch_size, int(kernel_shape[-1]), gram_width)


# Float32 squares are summed in float32 over runs of this many values, the run sums in float64.
SQUARES_RUN = 16
# A run sum of float32 squares (u = 2⁻²⁴, round to nearest, all terms ≥ 0, any order or FMA) is at least
# (1 − u)(1 − γ₁₅) ≥ 1 − 16.001u = 1 − 9.6e-7 times its exact value; adding up to 10⁸ run sums in float64 loses
# under 1.2e-8 more. Raising the float64 total by 2⁻¹⁹ = 1.9e-6 therefore never leaves it below the exact sum.
FLOAT32_SQUARES_MARGIN = 2.0 ** -19
# A square or partial sum below float32's normal range may be flushed to zero (oneDNN and XLA set
# flush-to-zero): at most 2⁻¹²⁶ lost per square and per addition, 2⁻¹²⁵ per value. It is added only to a
# non-zero sum, so that a gradient of exact zeros (a padded row) keeps its norm of exactly 0. A sum flushed
# to exactly 0 misses at most values·2⁻¹²⁵ (< 10⁻²⁶ for 10¹² parameters): alone, a norm below 10⁻¹³ that a
# clip factor of 1 keeps below C; added to other layers' squares, a shortfall that ``clip_factors``' margin
# (4.8e-7·C²) covers for any clip norm above 10⁻⁹. A square that overflows float32 (|g| > 1.8e19) gives an
# infinite norm and a clip factor of 0: more clipping, never less.
FLOAT32_SQUARES_UNDERFLOW = 2.0 ** -125


def squared_norms_of(per_example: tf.Tensor) -> tf.Tensor:
    """(B,) float64 squared norms of per-example gradients stacked on the first axis, never below the exact ones.

    Float64 (and other) values are squared and summed in float64. Float32 values — the per-example gradients
    of a float32 model, B × parameters — are squared and summed in float32 over runs of ``SQUARES_RUN``, the
    run sums added in float64, and the total raised by ``FLOAT32_SQUARES_MARGIN`` and the underflow bound:
    ResNet9 at 128 px, B = 32, a fast DP gradient of 1.16× the non-private one became 1.09× against casting
    every gradient to float64 first. The bound adds ≤ 2·10⁻⁶ to a squared norm, so ≤ 10⁻⁶ to a clip factor.
    """
    size = per_example.shape[1:].num_elements()
    if per_example.dtype != tf.float32 or size is None:
        flat = tf.cast(tf.reshape(per_example, [tf.shape(per_example)[0], -1]), NORM_DTYPE)
        return tf.reduce_sum(tf.square(flat), axis=1)
    flat = tf.reshape(per_example, [-1, size])
    if size % SQUARES_RUN:
        flat = tf.pad(flat, [[0, 0], [0, SQUARES_RUN - size % SQUARES_RUN]])  # zeros add nothing
    runs = tf.reduce_sum(tf.square(tf.reshape(flat, [tf.shape(flat)[0], -1, SQUARES_RUN])), axis=2)
    total = tf.reduce_sum(tf.cast(runs, NORM_DTYPE), axis=1)
    underflow = tf.where(total > 0, tf.constant(size * FLOAT32_SQUARES_UNDERFLOW, NORM_DTYPE), 0.0)
    return (total + underflow) * (1.0 + FLOAT32_SQUARES_MARGIN)


def summed_over_positions(output_grads: tf.Tensor) -> tf.Tensor:
    """(B, C) per-example bias gradients: the output gradient summed over positions (accumulated in float64)."""
    return tf.cast(tf.reduce_sum(tf.cast(flatten_positions(output_grads), NORM_DTYPE), axis=1), output_grads.dtype)


def round_up_to(values: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``values`` cast to ``dtype`` rounding towards +∞ (a norm handed on must not shrink by rounding)."""
    cast = tf.cast(values, dtype)
    return tf.where(tf.cast(cast, values.dtype) < values, tf.math.nextafter(cast, tf.constant(np.inf, dtype)), cast)


def round_down_to(values: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``values`` cast to ``dtype`` rounding towards −∞ (a clip factor must not grow by rounding)."""
    cast = tf.cast(values, dtype)
    return tf.where(tf.cast(cast, values.dtype) > values, tf.math.nextafter(cast, tf.constant(-np.inf, dtype)), cast)


def clip_factors(squared_norms: tf.Tensor, clip_norm, dtype: tf.DType) -> tf.Tensor:
    """(B,) cᵢ = min(1, C/‖gᵢ‖) in ``dtype``, from float64 squared norms, with cᵢ·‖gᵢ‖ ≤ C after rounding.

    C is lowered by 4 units in the last place of ``dtype`` (4.8e-7 relative in float32, 8.9e-16 in
    float64) and the factor rounded down into ``dtype``: that margin absorbs the rounding of the norm
    itself and of the product cᵢ·gᵢ in ``dtype``, so no clipped gradient exceeds C by a rounding error.
    """
    squared_norms = tf.cast(squared_norms, NORM_DTYPE)
    # A Python float goes straight to float64: tf.cast would round it to float32 first.
    clip_norm = tf.cast(clip_norm, NORM_DTYPE) if tf.is_tensor(clip_norm) else tf.constant(clip_norm, NORM_DTYPE)
    target = clip_norm * (1.0 - 4.0 * float(np.finfo(dtype.as_numpy_dtype).eps))
    factors = tf.minimum(target / tf.sqrt(tf.maximum(squared_norms, 0.0)), 1.0)  # ‖g‖ = 0: C/0 = ∞ → 1
    return round_down_to(factors, dtype)


def layer_normalize(inputs: tf.Tensor, axes: list[int], epsilon: float) -> tf.Tensor:
    """x̂ of LayerNormalization over ``axes`` (before scale γ and shift β): Keras' moments, keepdims."""
    mean, variance = tf.nn.moments(inputs, axes, keepdims=True)
    return (inputs - mean) * tf.math.rsqrt(variance + epsilon)


def summed_over_axes(values: tf.Tensor, axes: list[int]) -> tf.Tensor:
    """``values`` summed over ``axes`` (kept as size 1), accumulated in float64, in ``values``' dtype."""
    if not axes:
        return values
    return tf.cast(tf.reduce_sum(tf.cast(values, NORM_DTYPE), axis=axes, keepdims=True), values.dtype)


def _ids_and_rows(ids: tf.Tensor, output_grads: tf.Tensor, vocabulary: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, T) int64 ids and (B, T, D) output-gradient rows of an embedding lookup of any id shape (B, …).

    An id outside [0, vocabulary) reads no table row (a GPU lookup returns zeros for it; a CPU one has
    already failed): its row is zeroed and its id set to 0, so it can neither alias another example's
    (example, id) key in the norm nor be dropped silently from one sum but not the other.
    """
    batch = tf.shape(ids, out_type=tf.int64)[0]
    flat_ids = tf.reshape(tf.cast(ids, tf.int64), tf.stack([batch, -1]))
    rows = tf.reshape(output_grads, tf.stack([batch, tf.shape(flat_ids, out_type=tf.int64)[1],
                                              tf.cast(output_grads.shape[-1], tf.int64)]))
    valid = (flat_ids >= 0) & (flat_ids < vocabulary)
    return tf.where(valid, flat_ids, 0), tf.where(valid[..., None], rows, tf.zeros_like(rows))


def embedding_squared_norms(ids: tf.Tensor, output_grads: tf.Tensor, vocabulary: int) -> tf.Tensor:
    """(B,) float64 squared norms of each example's embedding-table gradient Gᵢ = Σₜ onehot(idₜ) gₜᵀ.

    ‖Gᵢ‖² = Σ_{t,s} [idₜ = idₛ] ⟨gₜ, gₛ⟩. Rather than the T×T Gram matrix, the rows gₜ of each example
    that share an id are summed first (one segment per distinct (example, id) pair, in float64): those
    sums are Gᵢ's non-zero rows, and ‖Gᵢ‖² is the sum of their squares — O(B·T·D), never negative.
    """
    flat_ids, rows = _ids_and_rows(ids, output_grads, vocabulary)
    batch = tf.shape(flat_ids, out_type=tf.int64)[0]
    examples = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(flat_ids, out_type=tf.int64))
    keys = tf.reshape(examples * vocabulary + flat_ids, [-1])  # one key per (example, id) pair
    pairs, segment = tf.unique(keys, out_idx=tf.int64)
    table_rows = tf.math.unsorted_segment_sum(tf.cast(tf.reshape(rows, [-1, output_grads.shape[-1]]), NORM_DTYPE),
                                              segment, tf.size(pairs, out_type=tf.int64))
    return tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(table_rows), axis=1), pairs // vocabulary, batch)


def embedding_clipped_sum(ids: tf.Tensor, output_grads: tf.Tensor, clip_weights: tf.Tensor, vocabulary: int,
                          dtype: tf.DType) -> tf.Tensor:
    """The dense (vocabulary, D) table gradient Σᵢ cᵢ Gᵢ = Σᵢ,ₜ cᵢ onehot(idᵢₜ) gᵢₜᵀ, in ``dtype``."""
    flat_ids, rows = _ids_and_rows(ids, output_grads, vocabulary)
    weighted = tf.cast(rows, dtype) * tf.cast(clip_weights, dtype)[:, None, None]
    return tf.math.unsorted_segment_sum(tf.reshape(weighted, [-1, output_grads.shape[-1]]),
                                        tf.reshape(flat_ids, [-1]), vocabulary)
