"""Faster GroupNorm and Mish for the ResNet9: the same functions as Keras', fewer and cheaper passes.

Keras 2.15's ``GroupNormalization.call`` builds a tensor of ones the size of its input as a mask and
takes weighted moments with it, and autodiff of its arithmetic keeps several full-size intermediates;
Keras' ``mish`` is ``x·tanh(softplus(x))``, two transcendental functions forward and two more backward.
On a CPU these element-wise passes are memory- and transcendental-bound, so here:

- ``GroupNorm``: two-pass moments on the (B, positions, G, C/G) view, γ and β folded into one
  per-(example, channel) scale s and offset o (y = x·s + o: two passes over the big tensor), and a
  hand-derived backward (two reductions, then dx = dy·s + x·b + c with b, c per (example, group)).
- ``Mish``: tanh(softplus(x)) = n/(n + 2) with n = eˣ(eˣ + 2) (one exp instead of softplus and tanh;
  for x ≥ 20 it is 1 in float32 and float64, so x is clamped there and eˣ cannot overflow), and the
  derivative t + x·σ(x)·(1 − t²) from the kept t in one backward expression. Called with
  ``training=False`` the layer uses Keras' formula instead: with no gradient to keep t for, Grappler
  fuses it into one op, faster than either.

Both are registered with Keras' serialisation ("dpmedtf>GroupNorm", "dpmedtf>Mish"), so a saved model
loads without custom_objects once ``dpmedtf.models`` is imported; models saved with Keras' own
GroupNormalization and Activation("mish") load and run as before. Numbers: ``benchmarks/base_layers.py``.
"""

from __future__ import annotations

import tensorflow as tf

# Above this tanh(softplus(x)) rounds to 1 in float32 and float64 (1 − 2e⁻⁴⁰ = 1 − 8.5e-18), and
# x·σ(x)·(1 − t²) ≈ 4x·e⁻²ˣ is below 1e-15: clamping here changes no result, and e²⁰·(e²⁰ + 2) < 1e18.
_MISH_CLAMP = 20.0
_HALF_TYPES = (tf.float16, tf.bfloat16)


def mish(x: tf.Tensor) -> tf.Tensor:
    """x·tanh(softplus(x)) with a cheaper forward and backward than Keras' ``mish`` (same values).

    Half-precision inputs are computed in float32 (eˣ(eˣ + 2) overflows float16 beyond x ≈ 5.5).
    """
    x = tf.convert_to_tensor(x)
    if x.dtype in _HALF_TYPES:
        return tf.cast(_mish(tf.cast(x, tf.float32)), x.dtype)
    return _mish(x)


@tf.custom_gradient
def _mish(x):
    e = tf.exp(tf.minimum(x, _MISH_CLAMP))
    n = e * (e + 2.0)
    t = n / (n + 2.0)  # tanh(softplus(x)): ((1 + eˣ)² − 1) / ((1 + eˣ)² + 1), no cancellation for x ≪ 0

    def grad(dy):
        # d/dx x·t = t + x·t′ with t′ = σ(x)(1 − t²) (softplus′ = σ, tanh′ = 1 − tanh²). Keeps x and t only,
        # as autodiff of Keras' mish does, with σ (a cheap rational approximation in Eigen) where
        # SoftplusGrad takes an exp and a division.
        return dy * (t + tf.raw_ops.TanhGrad(y=t, dy=x * tf.sigmoid(x)))

    return x * t, grad


def group_norm(inputs: tf.Tensor, gamma: tf.Tensor | None, beta: tf.Tensor | None, groups: int,
               epsilon: float) -> tf.Tensor:
    """GroupNormalization over the last axis of (B, …, C): γ·(x − μ)/√(σ² + ε) + β per (example, group).

    The moments are two-pass (the mean, then the mean squared deviation from it), as Keras'; γ and β may
    be None (scale or center off). Half-precision inputs are normalised in float32.

    γ and β are (C,), or (B, C): one row per example, all equal to the layer's, which the fast DP engine
    watches. The backward then returns each example's own ∂γ = Σ dy·x̂ and ∂β = Σ dy over positions, (B, C),
    as the by-products of the input gradient they are (the sums dx needs anyway), instead of their sum
    over the batch: per-example GroupNorm gradients at no extra pass over the activations.
    """
    inputs = tf.convert_to_tensor(inputs)
    dtype = tf.float32 if inputs.dtype in _HALF_TYPES else inputs.dtype
    channels = int(inputs.shape[-1])
    # Constants where the layer has no γ or β: their gradient is computed and dropped (2·C numbers). A
    # variable is read here, outside the custom gradient, so that its gradient reaches it through the read.
    gamma = tf.ones([channels], dtype) if gamma is None else tf.cast(tf.convert_to_tensor(gamma), dtype)
    beta = tf.zeros([channels], dtype) if beta is None else tf.cast(tf.convert_to_tensor(beta), dtype)
    return tf.cast(_group_norm_fn(groups, epsilon)(tf.cast(inputs, dtype), gamma, beta), inputs.dtype)


def _group_norm_fn(groups: int, epsilon: float):
    """The custom-gradient GroupNorm for fixed ``groups`` and ``epsilon`` (keyword arguments cannot pass
    through ``tf.custom_gradient`` in graph mode)."""

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        channels = int(x.shape[-1])
        per_group = channels // groups
        # (B, positions, G, C/G): a view, whatever the number of spatial axes (2D or 3D).
        grouped = tf.reshape(x, [tf.shape(x)[0], -1, groups, per_group])
        mean = _mean_over_positions_and_group(grouped)  # (B, 1, G, 1)
        variance = _mean_over_positions_and_group(tf.math.squared_difference(grouped, mean))  # two-pass
        inv_std = tf.math.rsqrt(variance + epsilon)
        # (1, 1, G, C/G) for the layer's γ and β, (B, 1, G, C/G) for per-example rows of them.
        gamma_g, beta_g = (tf.reshape(p, [-1, 1, groups, per_group]) for p in (gamma, beta))
        scale = gamma_g * inv_std  # (B, 1, G, C/G): γ/σ per example and channel
        offset = beta_g - mean * scale
        outputs = tf.reshape(grouped * scale + offset, tf.shape(x))

        def parameter_gradient(per_example: tf.Tensor, parameter: tf.Tensor) -> tf.Tensor:
            """(B, 1, G, C/G) per-example sums → the parameter's shape: summed over the batch for (C,)."""
            if parameter.shape.rank == 2:
                return tf.reshape(per_example, [-1, channels])
            return tf.reshape(tf.reduce_sum(per_example, axis=[0, 1]), [channels])

        def grad(dy):
            dy = tf.reshape(dy, tf.shape(grouped))
            count = tf.cast(tf.shape(grouped)[1] * per_group, x.dtype)  # elements per (example, group)
            dy_sum = tf.reduce_sum(dy, axis=1, keepdims=True)  # Σ dy per (example, channel)
            # Σ dy·x̂ = (Σ dy·x − μ Σ dy)/σ: the arithmetic Keras' autodiff does for ∂γ, so ∂γ and ∂β agree.
            dy_xhat_sum = inv_std * (tf.reduce_sum(dy * grouped, axis=1, keepdims=True) - mean * dy_sum)
            d_gamma, d_beta = parameter_gradient(dy_xhat_sum, gamma), parameter_gradient(dy_sum, beta)
            # dx = (g − mean(g) − x̂·mean(g·x̂))/σ with g = γ·dy, means over each (example, group); linear in
            # dy and x: dx = dy·s + x·b + c with b = −mean(g·x̂)/σ² and c = −mean(g)/σ − μ·b.
            mean_g = tf.reduce_sum(gamma_g * dy_sum, axis=3, keepdims=True) / count
            mean_g_xhat = tf.reduce_sum(gamma_g * dy_xhat_sum, axis=3, keepdims=True) / count
            x_coefficient = -inv_std * inv_std * mean_g_xhat
            constant = -inv_std * mean_g - mean * x_coefficient
            # Broadcast over channels first: (B, 1, G, C/G) operands broadcast over the big tensor 2× faster
            # than (B, 1, G, 1) ones (measured).
            x_coefficient = tf.broadcast_to(x_coefficient, tf.shape(scale))
            constant = tf.broadcast_to(constant, tf.shape(scale))
            dx = dy * scale + (grouped * x_coefficient + constant)
            return tf.reshape(dx, tf.shape(x)), d_gamma, d_beta

        return outputs, grad

    return normalize


def _mean_over_positions_and_group(grouped: tf.Tensor) -> tf.Tensor:
    """(B, 1, G, 1) mean of (B, P, G, C/G) over positions, then over each group's channels (equal counts, so
    the mean of the means): TensorFlow's CPU reduction over both non-adjacent axes at once (``tf.nn.moments``
    on axes 1 and 3) is 2–3× slower at the ResNet9's shapes."""
    return tf.reduce_mean(tf.reduce_mean(grouped, axis=1, keepdims=True), axis=3, keepdims=True)


@tf.keras.utils.register_keras_serializable(package="dpmedtf")
class GroupNorm(tf.keras.layers.GroupNormalization):
    """Keras' GroupNormalization (same weights, names and config) with ``group_norm``'s arithmetic.

    Without a mask and over the last axis, ``call`` is ``group_norm``; with a mask, or another axis, it
    is Keras' own. The fast DP engine clips it by the GroupNormalization rule (``privacy.clipping``).
    """

    def call(self, inputs, mask=None):
        if mask is not None or self.axis not in (-1, inputs.shape.rank - 1):
            return super().call(inputs, mask=mask)
        return group_norm(inputs, self.gamma, self.beta, self.groups, self.epsilon)


@tf.keras.utils.register_keras_serializable(package="dpmedtf")
class Mish(tf.keras.layers.Layer):
    """The Mish activation x·tanh(softplus(x)) as a layer (``mish``); no weights, passes masks on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, training=None):
        if training is not None and not tf.is_tensor(training) and not training:
            # Inference (evaluation, export): Keras' formula, which Grappler fuses into one oneDNN op
            # (_MklFusedMish) when nothing keeps its intermediates — 2–3× faster than ``mish``'s forward.
            return inputs * tf.tanh(tf.math.softplus(inputs))
        return mish(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape
