"""dpmedtf's GroupNorm and Mish: Keras' functions and weights, in the ResNet9, its DP engines and its export."""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.models import GroupNorm, Mish, build_resnet9, convert_to_acs, describe_resnet9, mish, validate_for_dp
from dpmedtf.privacy.clipping import fast_clipped_gradient_sum, is_supported
from dpmedtf.release.export import check_parity, to_onnx
from tests.privacy.test_clipping import data, loss_of, per_example_loop, relative_difference, vectorized_sum

L = tf.keras.layers


def tiny_resnet9(seed=0, dtype="float32", fast_layers=True, outputs=4):
    tf.keras.utils.set_random_seed(seed)
    tf.keras.backend.set_floatx(dtype)
    try:
        return build_resnet9((32, 32, 3), outputs, groups=4, widths=(8, 16, 16, 32), fast_layers=fast_layers)
    finally:
        tf.keras.backend.set_floatx("float32")


def values_and_gradients(layer, x, weights):
    """The layer's output and the gradients of Σ output·weights w.r.t. the input and its variables."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * weights)
    return [y.numpy(), *(g.numpy() for g in tape.gradient(loss, [x, *layer.trainable_variables]))]


@pytest.mark.parametrize("shape, groups, scale, center", [
    ((3, 6, 5, 8), 4, True, True),  # 2D
    ((2, 4, 3, 5, 8), 2, True, True),  # 3D (ACS)
    ((2, 7, 6), 3, True, False), ((2, 5, 4, 6), 6, False, True)])
def test_group_norm_equals_keras_group_normalization(shape, groups, scale, center):
    rng = np.random.default_rng(0)
    # An offset mean and a wide spread, so the moments' arithmetic matters.
    x = tf.constant((rng.standard_normal(shape) * 3 + 2).astype(np.float32))
    weights = tf.constant(rng.standard_normal(shape).astype(np.float32))
    keras_layer = L.GroupNormalization(groups, epsilon=1e-5, scale=scale, center=center)
    ours = GroupNorm(groups, epsilon=1e-5, scale=scale, center=center)
    keras_layer.build(shape)
    ours.build(shape)
    keras_layer.set_weights([rng.standard_normal(shape[-1]).astype(np.float32) for _ in keras_layer.weights])
    ours.set_weights(keras_layer.get_weights())
    assert [w.name for w in ours.weights] == [w.name for w in keras_layer.weights]
    expected, got = values_and_gradients(keras_layer, x, weights), values_and_gradients(ours, x, weights)
    assert len(got) == len(expected) == 2 + scale + center
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.max(np.abs(e)))


def test_group_norm_with_a_mask_is_keras_own():
    x = tf.constant(np.random.default_rng(1).standard_normal((2, 5, 4)).astype(np.float32))
    mask = tf.constant([[True] * 3 + [False] * 2, [True] * 5])[..., None]
    keras_layer, ours = L.GroupNormalization(2), GroupNorm(2)
    np.testing.assert_array_equal(ours(x, mask=mask).numpy(), keras_layer(x, mask=mask).numpy())


def test_group_norm_keeps_keras_config():
    layer = GroupNorm(4, epsilon=1e-5, name="gn")
    assert layer.get_config() == L.GroupNormalization(4, epsilon=1e-5, name="gn").get_config()
    assert isinstance(layer, L.GroupNormalization)


def mish_inputs(dtype):
    ramp = np.linspace(-50.0, 50.0, 4001)
    return tf.constant(np.concatenate([ramp, [0.0, -0.0, 1e-30, -1e-30, -100.0, 100.0, 1e30, -1e30]]), dtype)


@pytest.mark.parametrize("dtype, tolerance", [(tf.float32, 2e-6), (tf.float64, 1e-13)])
def test_mish_equals_keras_mish_and_its_gradient(dtype, tolerance):
    x = mish_inputs(dtype)
    got, expected = [], []
    for function, out in ((mish, got), (tf.keras.activations.mish, expected)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
        out.extend([y.numpy(), tape.gradient(y, x).numpy()])
    for g, e in zip(got, expected):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, e, rtol=tolerance, atol=tolerance)
    zero = 4001  # the appended 0.0: mish(0) = 0, mish′(0) = tanh(log 2)
    assert got[0][zero] == 0.0 and np.isclose(got[1][zero], np.tanh(np.log(2.0)), rtol=tolerance)


def test_the_mish_layer_in_inference_is_keras_formula_and_in_training_the_custom_gradient():
    x = mish_inputs(tf.float32)
    layer = Mish()
    np.testing.assert_array_equal(layer(x, training=False).numpy(), tf.keras.activations.mish(x).numpy())
    np.testing.assert_array_equal(layer(x, training=True).numpy(), mish(x).numpy())
    np.testing.assert_array_equal(layer(x).numpy(), mish(x).numpy())  # as the fast DP engine calls it


def test_mish_in_half_precision_is_computed_in_float32():
    x = tf.constant([-30.0, -1.0, 0.0, 3.0, 12.0, 60000.0], tf.float16)
    y = Mish(dtype="mixed_float16")(x)
    assert y.dtype == tf.float16 and np.all(np.isfinite(y.numpy()))
    np.testing.assert_allclose(y.numpy(), tf.keras.activations.mish(tf.cast(x, tf.float32)).numpy(), rtol=1e-3,
                               atol=1e-6)


def test_the_resnet9_uses_the_fast_layers_with_the_same_weights_as_keras_own():
    fast, keras_layers = tiny_resnet9(), tiny_resnet9(fast_layers=False)
    assert {type(layer) for layer in fast.layers} >= {GroupNorm, Mish}
    assert not any(isinstance(layer, (GroupNorm, Mish)) for layer in keras_layers.layers)
    assert [(w.name, w.shape) for w in fast.weights] == [(w.name, w.shape) for w in keras_layers.weights]
    assert describe_resnet9(fast) == describe_resnet9(keras_layers)
    keras_layers.set_weights(fast.get_weights())
    x = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(fast(x).numpy(), keras_layers(x).numpy(), rtol=1e-4, atol=1e-5)
    relu = build_resnet9((32, 32, 3), 4, activation="relu", groups=4, widths=(8, 16, 16, 32))
    assert isinstance(relu.get_layer("stem_act"), L.Activation) and describe_resnet9(relu)["activation"] == "relu"


def test_a_saved_model_loads_without_custom_objects(tmp_path):
    model = tiny_resnet9()
    model.save(tmp_path / "model.keras")
    reloaded = tf.keras.models.load_model(tmp_path / "model.keras", compile=False)
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in model.layers]
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(reloaded(x).numpy(), model(x).numpy())


def test_a_model_saved_with_keras_own_layers_still_loads_and_converts(tmp_path):
    old = tiny_resnet9(fast_layers=False)
    old.save(tmp_path / "old.keras")
    reloaded = tf.keras.models.load_model(tmp_path / "old.keras", compile=False)
    assert type(reloaded.get_layer("stem_gn")) is L.GroupNormalization
    assert type(reloaded.get_layer("stem_act")) is L.Activation
    x = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(reloaded(x).numpy(), old(x).numpy())
    assert describe_resnet9(reloaded)["activation"] == "mish"
    validate_for_dp(reloaded)
    volume = convert_to_acs(reloaded, (32, 32, 32, 3))
    assert type(volume.get_layer("stem_gn")) is GroupNorm
    np.testing.assert_array_equal(volume.get_layer("stage4_gn2").get_weights()[0],
                                  reloaded.get_layer("stage4_gn2").get_weights()[0])


def test_the_fast_engine_clips_the_new_layers_as_the_per_example_loop_in_float64():
    model = tiny_resnet9(2, dtype="float64")
    assert is_supported(model.get_layer("stem_gn")) and not model.get_layer("stem_act").trainable_weights
    validate_for_dp(model)
    images, labels = data(5, (32, 32, 3), seed=2, dtype=np.float64)
    clip = 7.0
    expected, norms = per_example_loop(model, images, labels, clip)
    got = tf.function(lambda x, y: fast_clipped_gradient_sum(model, x, loss_of(y), clip))(images, labels)
    assert relative_difference(got.sums, expected) < 1e-10
    np.testing.assert_allclose(got.norms.numpy(), norms, rtol=1e-10)
    assert 0 < sum(norms > clip) < 5


def test_the_vectorized_engine_differentiates_through_the_custom_gradients():
    model = tiny_resnet9(3)
    images, labels = data(3, (32, 32, 3), seed=3)
    expected = fast_clipped_gradient_sum(model, images, loss_of(labels), 8.0).sums
    assert relative_difference(vectorized_sum(model, images, labels, 8.0), expected) < 1e-5


def test_the_onnx_export_agrees_and_has_no_tensorflow_ops_left():
    model = tiny_resnet9(outputs=3)
    proto = to_onnx(model)  # refuses any op ONNX does not define (IdentityN of the custom gradients included)
    assert "IdentityN" not in {node.op_type for node in proto.graph.node}
    report = check_parity(model, proto, [0.5] * 3)
    assert report.passed and report.max_abs_difference <= 1e-4
