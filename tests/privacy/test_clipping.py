"""The fast engine against the vectorized one (tensorflow-privacy) and against a per-example loop."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads

from dpmedtf.models import build_resnet9, convert_to_acs
from dpmedtf.privacy.clipping import (UnsupportedLayerError, check_supported, fast_clipped_gradient_sum,
                                      make_layer_registry)
from dpmedtf.privacy.clipping.norms import (conv_cost_prefers_ghost, conv_ghost_squared_norms, ghost_is_cheaper,
                                            per_example_conv_kernel_grads, squared_norms_of)
from dpmedtf.privacy.engines import vectorized_clipped_gradient_sum
from dpmedtf.training.losses import weighted_bce_per_example

ONES = tf.ones(4)


def tiny_2d(seed=0, dtype="float32"):
    tf.keras.utils.set_random_seed(seed)
    tf.keras.backend.set_floatx(dtype)
    try:
        return build_resnet9((32, 32, 3), 4, groups=4, widths=(8, 16, 16, 32))
    finally:
        tf.keras.backend.set_floatx("float32")


def data(n, shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.random((n, *shape)).astype(dtype)),
            tf.constant(rng.integers(0, 2, (n, 4)).astype(dtype)))


def loss_of(labels):
    ones = tf.ones(4, labels.dtype)
    return lambda logits: weighted_bce_per_example(labels, logits, ones, ones)


def vectorized_sum(model, images, labels, clip):
    return vectorized_clipped_gradient_sum(model, images, loss_of(labels), clip)[0]


def relative_difference(got, expected):
    flat = lambda tensors: np.concatenate([np.ravel(t) for t in tensors])  # noqa: E731
    return float(np.linalg.norm(flat(got) - flat(expected)) / np.linalg.norm(flat(expected)))


def per_example_loop(model, images, labels, clip):
    """Σ clip(∇ℓᵢ) and ‖∇ℓᵢ‖ one example at a time: the definition, with no trick at all."""
    total, norms = None, []
    for i in range(int(images.shape[0])):
        with tf.GradientTape() as tape:
            loss = loss_of(labels[i:i + 1])(model(images[i:i + 1], training=True))[0]
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads)))
        norms.append(norm)
        clipped = [g * min(1.0, clip / norm) for g in grads]
        total = clipped if total is None else [a + b for a, b in zip(total, clipped)]
    return total, np.array(norms)


@pytest.mark.parametrize("clip", [0.05, 8.0, 1e4])  # every example clipped, some, none
def test_fast_equals_vectorized_for_the_2d_model(clip):
    model = tiny_2d()
    images, labels = data(6, (32, 32, 3))
    expected = vectorized_sum(model, images, labels, clip)
    eager = fast_clipped_gradient_sum(model, images, loss_of(labels), clip)
    graph = tf.function(lambda x, y: fast_clipped_gradient_sum(model, x, loss_of(y), clip).sums)(images, labels)
    assert relative_difference(eager.sums, expected) < 1e-5
    assert relative_difference(graph, expected) < 1e-5
    _, norms = per_example_loop(model, images, labels, clip)
    np.testing.assert_allclose(eager.norms.numpy(), norms, rtol=1e-5)
    clipped = int(sum(norms > clip))  # the three regimes really occur (norms here are 6 … 13)
    assert {0.05: clipped == 6, 8.0: 0 < clipped < 6, 1e4: clipped == 0}[clip]


@pytest.mark.parametrize("clip", [0.05, 8.0])  # norms here are 7.6 … 8.7
def test_fast_equals_vectorized_for_the_acs_3d_model(clip):
    model = convert_to_acs(tiny_2d(1), (32, 32, 32, 3))
    images, labels = data(3, (32, 32, 32, 3), seed=1)
    expected = vectorized_sum(model, images, labels, clip)
    got = tf.function(lambda x, y: fast_clipped_gradient_sum(model, x, loss_of(y), clip))(images, labels)
    assert relative_difference(got.sums, expected) < 1e-5
    assert {0.05: 3, 8.0: 2}[clip] == sum(got.norms.numpy() > clip)


def test_in_float64_fast_equals_the_per_example_loop_to_1e_10():
    """In double precision the only difference left is the algorithm, so any mistake in a norm rule shows."""
    model = tiny_2d(2, dtype="float64")
    images, labels = data(5, (32, 32, 3), seed=2, dtype=np.float64)
    clip = 7.0
    expected, norms = per_example_loop(model, images, labels, clip)
    got = fast_clipped_gradient_sum(model, images, loss_of(labels), clip)
    assert relative_difference(got.sums, expected) < 1e-10
    np.testing.assert_allclose(got.norms.numpy(), norms, rtol=1e-10)
    assert 0 < sum(norms > clip) < 5


@pytest.mark.parametrize("rank, kernel, stride, padding", [
    (2, (3, 3), 1, "same"), (2, (7, 7), 2, "same"), (2, (3, 3), 2, "valid"), (2, (1, 1), 2, "same"),
    (3, (1, 3, 3), 2, "same"), (3, (3, 1, 3), 1, "same"), (3, (3, 3, 1), 2, "valid"),
    # Stride ≥ kernel + 2 with 'same' on 9 voxels: TensorFlow's volume patches drop the first voxel there
    # while its convolution drops the last (the patches are now padded explicitly).
    (3, (1, 1, 1), 3, "same"), (3, (3, 1, 3), 3, "same"), (1, (4,), 1, "same"), (1, (3,), 1, "valid"),
    (2, (2, 3), 1, "same"), (2, (3, 3), 1, "valid"), (3, (3, 3, 3), 1, "same"), (3, (2, 1, 3), 1, "valid")])
def test_ghost_norms_equal_instantiated_norms(rank, kernel, stride, padding):
    rng = np.random.default_rng(3)
    spatial = (9,) * rank
    inputs = tf.constant(rng.standard_normal((4, *spatial, 5)), tf.float64)
    conv = tf.nn.convolution(inputs, tf.zeros((*kernel, 5, 6), tf.float64), strides=stride, padding=padding.upper())
    grads = tf.constant(rng.standard_normal(conv.shape), tf.float64)
    strides = (stride,) * rank
    instantiated = per_example_conv_kernel_grads(inputs, grads, (*kernel, 5, 6), strides, padding)
    # Example 0's kernel gradient is TensorFlow's own filter gradient of that example alone (in a graph:
    # TF 2.15's eager Conv3D gradient cannot read its data_format).
    kernel_var = tf.Variable(tf.zeros((*kernel, 5, 6), tf.float64))

    @tf.function
    def reference():
        with tf.GradientTape() as tape:
            out = tf.nn.convolution(inputs[:1], kernel_var, strides=stride, padding=padding.upper())
        return tape.gradient(out, kernel_var, output_gradients=grads[:1])

    np.testing.assert_allclose(instantiated[0], reference(), rtol=1e-12)
    ghost = conv_ghost_squared_norms(inputs, grads, kernel, strides, padding)
    np.testing.assert_allclose(ghost, squared_norms_of(instantiated), rtol=1e-10)


def test_the_cost_model_picks_each_method_where_it_is_cheaper():
    assert not ghost_is_cheaper(positions=64 * 64, patch_size=7 * 7 * 3, out_channels=64)  # 128 px stem
    assert ghost_is_cheaper(positions=4 * 4, patch_size=3 * 3 * 512, out_channels=512)  # last stage
    # 512 px, stage 4 (16 × 16 positions, 3×3, 512 → 512): from patches the Gram matrix costs more than the
    # per-example gradients, from the input's own Gram matrix (stride 1) it costs less.
    assert not ghost_is_cheaper(positions=16 * 16, patch_size=3 * 3 * 512, out_channels=512)
    assert ghost_is_cheaper(positions=16 * 16, patch_size=3 * 3 * 512, out_channels=512, gram_width=512 + 9)
    grads = tf.zeros((1, 16, 16, 512))
    assert conv_cost_prefers_ghost(grads, (3, 3, 512, 512), (1, 1))
    assert not conv_cost_prefers_ghost(grads, (3, 3, 512, 512), (2, 2))
    # What each method adds is weighed, not the weight gradient both pay: 256 px, stage 3 (16 × 16 positions,
    # 3×3, 256 → 256, stride 1) keeps its 0.6M per-example values more cheaply than it forms 65,536-entry
    # float64 Gram matrices (14 against 33 ms added at B = 16); 128 px, stage 3's strided first layer
    # (8 × 8 positions, 128 → 256) is the other way round (14 against 17 ms at B = 32), as recorded in
    # benchmarks/results/per_example_norm_costs.json.
    assert not conv_cost_prefers_ghost(tf.zeros((1, 16, 16, 256)), (3, 3, 256, 256), (1, 1))
    assert conv_cost_prefers_ghost(tf.zeros((1, 8, 8, 256)), (3, 3, 128, 256), (2, 2))


def test_the_registry_plugs_into_tensorflow_privacys_own_norm_computation():
    model = tiny_2d(4)
    images, labels = data(4, (32, 32, 3), seed=4)
    ours = fast_clipped_gradient_sum(model, images, loss_of(labels), 1.0).norms
    theirs = clip_grads.compute_gradient_norms(model, make_layer_registry(), images, labels,
                                               per_example_loss_fn=lambda y, p, w: loss_of(y)(p))
    np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=1e-5)


def test_a_layer_without_a_norm_rule_is_named():
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2DTranspose(4, 3, name="upsampler")(inputs)
    outputs = tf.keras.layers.Dense(4, name="head")(tf.keras.layers.GlobalAveragePooling2D()(x))
    model = tf.keras.Model(inputs, outputs)
    with pytest.raises(UnsupportedLayerError, match=r"upsampler \(Conv2DTranspose\).*clipping: vectorized"):
        check_supported(model)
    with pytest.raises(UnsupportedLayerError, match="upsampler"):
        fast_clipped_gradient_sum(model, tf.zeros((2, 8, 8, 3)), lambda p: tf.reduce_sum(p, axis=1), 1.0)
    model.get_layer("upsampler").trainable = False
    check_supported(model)  # frozen layers need no rule
