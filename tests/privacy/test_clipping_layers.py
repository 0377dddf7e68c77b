"""LayerNormalization, Embedding and a user-registered layer in the fast engine, against the definition.

The definition: each example's gradient from a tape over that example alone, clipped to C by hand,
summed. In float64 only the algorithm differs, so the sums and norms must agree to 1e-10. C is put
between the 2nd and 3rd smallest norm, so that some examples are clipped and some are not.
"""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.privacy.clipping import (LayerGradients, fast_clipped_gradient_sum, is_supported, make_layer_registry,
                                      register_layer, supported_layer_types, unsupported_layers)
from dpmedtf.privacy.clipping import norms as norms_module
from dpmedtf.privacy.clipping import registry as registry_module
from tests.privacy.test_clipping_reference import build_in, squared_error

L = tf.keras.layers
RANDOM = {"gamma_initializer": "random_normal", "beta_initializer": "random_normal"}


def per_example_gradients(model, inputs, targets):
    """Each example's gradient (dense, float64), from a tape over that example alone."""
    gradients = []
    for i in range(int(inputs.shape[0])):
        with tf.GradientTape() as tape:
            loss = squared_error(targets[i:i + 1])(model(inputs[i:i + 1]))[0]
        grads = tape.gradient(loss, model.trainable_variables)
        gradients.append([np.asarray(tf.convert_to_tensor(g), np.float64) for g in grads])
    return gradients


def clipped_sum_by_hand(gradients, clip):
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in grads)) for grads in gradients])
    factors = np.minimum(1.0, clip / norms)
    return [sum(f * grads[k] for f, grads in zip(factors, gradients)) for k in range(len(gradients[0]))], norms


def relative_difference(got, expected):
    flat = lambda tensors: np.concatenate([np.ravel(t) for t in tensors])  # noqa: E731
    return float(np.linalg.norm(flat(got) - flat(expected)) / np.linalg.norm(flat(expected)))


def assert_fast_equals_the_loop(model, inputs, targets, norm_method="cost", tolerance=1e-10):
    """The fast engine (in a graph, as training runs it) against the per-example loop."""
    gradients = per_example_gradients(model, inputs, targets)
    _, norms = clipped_sum_by_hand(gradients, np.inf)
    assert np.all(norms > 0)
    low, high = np.sort(norms)[1:3]
    clip = float((low + high) / 2)
    expected, norms = clipped_sum_by_hand(gradients, clip)
    assert 0 < sum(norms > clip) < len(norms)

    registry = make_layer_registry(norm_method)
    got = tf.function(lambda x, y: fast_clipped_gradient_sum(model, x, squared_error(y), clip, registry))(inputs, targets)

    for total, variable in zip(got.sums, model.trainable_variables):
        assert isinstance(total, tf.Tensor) and total.shape == variable.shape, variable.name  # dense, as the variable
    assert relative_difference(got.sums, expected) < tolerance
    np.testing.assert_allclose(got.norms.numpy(), norms, rtol=tolerance)
    np.testing.assert_allclose(got.per_example_losses.numpy(), squared_error(targets)(model(inputs)).numpy(),
                               rtol=tolerance)
    return got


def random_data(input_shape, outputs=2, examples=6, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.standard_normal((examples, *input_shape)).astype(dtype)),
            tf.constant(rng.standard_normal((examples, outputs)).astype(dtype)))


# ------------------------------------------------------------------------------------------ LayerNormalization

LAYER_NORM_CASES = {  # input shape, axis, scale, center
    "2d": ((6,), -1, True, True),
    "2d_no_scale": ((6,), -1, False, True),
    "2d_no_center": ((6,), [1], True, False),
    "4d_channels": ((4, 5, 3), -1, True, True),
    "4d_all": ((4, 5, 3), [1, 2, 3], True, True),
    "4d_spatial": ((4, 5, 3), [-3, -2], True, True),
    "4d_unsorted": ((4, 5, 3), [2, 1], True, True),  # γ (5, 4) is reshaped, not transposed, to (1, 4, 5, 1)
    "4d_height_and_channels": ((4, 5, 3), [3, 1], True, False),
}


def layer_norm_model(shape, axis, scale, center):
    inputs = tf.keras.Input(shape)
    if len(shape) == 1:
        x = L.Dense(shape[0], activation="tanh")(inputs)
        x = L.LayerNormalization(axis=axis, scale=scale, center=center, **RANDOM)(x)
    else:
        x = L.Conv2D(shape[-1], 3, padding="same", activation="tanh")(inputs)
        x = L.LayerNormalization(axis=axis, scale=scale, center=center, **RANDOM)(x)
        x = L.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, L.Dense(2)(x))


@pytest.mark.parametrize("case", sorted(LAYER_NORM_CASES))
def test_layer_normalization_equals_the_per_example_loop(case):
    shape, axis, scale, center = LAYER_NORM_CASES[case]
    model = build_in("float64", lambda: layer_norm_model(shape, axis, scale, center), seed=len(case))
    norm = next(layer for layer in model.layers if isinstance(layer, L.LayerNormalization))
    assert [v.name.split("/")[-1].split(":")[0] for v in norm.trainable_variables] == (
        ["gamma"] * scale + ["beta"] * center)
    assert_fast_equals_the_loop(model, *random_data(shape, seed=len(case)))


# ------------------------------------------------------------------------------------------ GroupNormalization

GROUP_NORM_CASES = {  # input shape (2D or 3D), layer class name, scale, center
    "2d_keras": ((4, 5, 4), "GroupNormalization", True, True),
    "2d_dpmedtf": ((4, 5, 4), "GroupNorm", True, True),
    "2d_dpmedtf_no_scale": ((4, 5, 4), "GroupNorm", False, True),
    "2d_dpmedtf_no_center": ((4, 5, 4), "GroupNorm", True, False),
    "3d_dpmedtf": ((3, 4, 5, 4), "GroupNorm", True, True),
}


def group_norm_model(shape, class_name, scale, center):
    from dpmedtf.models.layers import GroupNorm

    norm_class = GroupNorm if class_name == "GroupNorm" else L.GroupNormalization
    conv, pool = (L.Conv2D, L.GlobalAveragePooling2D) if len(shape) == 3 else (L.Conv3D, L.GlobalAveragePooling3D)
    inputs = tf.keras.Input(shape)
    x = conv(shape[-1], 3, padding="same", activation="tanh")(inputs)
    x = norm_class(2, scale=scale, center=center, **RANDOM)(x)
    x = conv(4, 3, padding="same")(L.Activation("tanh")(x))
    return tf.keras.Model(inputs, L.Dense(2)(pool()(x)))


@pytest.mark.parametrize("case", sorted(GROUP_NORM_CASES))
def test_group_normalization_equals_the_per_example_loop(case):
    """The rule reads each example's (∂γ, ∂β) off the layer's own backward, fed per-example rows of γ and β."""
    shape, class_name, scale, center = GROUP_NORM_CASES[case]
    model = build_in("float64", lambda: group_norm_model(shape, class_name, scale, center), seed=len(case))
    norm = next(layer for layer in model.layers if isinstance(layer, L.GroupNormalization))
    assert type(norm).__name__ == class_name
    assert [v.name.split("/")[-1].split(":")[0] for v in norm.trainable_variables] == (
        ["gamma"] * scale + ["beta"] * center)
    assert_fast_equals_the_loop(model, *random_data(shape, seed=len(case)))


def test_layer_normalization_in_float32_matches_keras_fused_arithmetic():
    """float32 with epsilon ≥ 1.001e-5 over trailing axes: Keras takes its fused kernel, the rule does not."""
    model = build_in("float32", lambda: layer_norm_model((4, 5, 3), [1, 2, 3], True, True), seed=4)
    norm = next(layer for layer in model.layers if isinstance(layer, L.LayerNormalization))
    assert norm._fused
    assert_fast_equals_the_loop(model, *random_data((4, 5, 3), seed=4, dtype=np.float32), tolerance=2e-5)


def test_layer_normalization_over_the_batch_axis_is_refused():
    inputs = tf.keras.Input((4,), batch_size=3)
    model = tf.keras.Model(inputs, L.Dense(1)(L.LayerNormalization(axis=[0, 1], name="batchwise")(inputs)))
    with pytest.raises(NotImplementedError, match="'batchwise'.*mixes examples"):
        fast_clipped_gradient_sum(model, tf.ones((3, 4)), lambda out: tf.reduce_sum(out, axis=1), 1.0)


@pytest.mark.parametrize("norm_method", ["ghost", "instantiate", "cost"])
def test_conv_layer_norm_conv_model_equals_the_per_example_loop(norm_method):
    def build():
        inputs = tf.keras.Input((8, 7, 2))
        x = L.Conv2D(4, 3, strides=2, padding="same", activation="tanh", bias_initializer="random_normal")(inputs)
        x = L.LayerNormalization(axis=[1, 2, 3], **RANDOM)(x)
        x = L.Conv2D(3, 3, padding="same", bias_initializer="random_normal")(x)
        return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))

    model = build_in("float64", build, seed=12)
    assert_fast_equals_the_loop(model, *random_data((8, 7, 2), seed=12), norm_method)


# ------------------------------------------------------------------------------------------------- Embedding


def ids_with_repeats(examples, length, vocabulary, seed):
    """Each example draws from a few ids only, so most ids repeat within it (and across examples)."""
    rng = np.random.default_rng(seed)
    few = rng.integers(0, vocabulary, (examples, 3))
    ids = np.take_along_axis(few, rng.integers(0, 3, (examples, length)), axis=1)
    assert all(len(set(row)) < length for row in ids)
    return tf.constant(ids.astype(np.int32))


def test_embedding_norms_are_the_id_matched_gram_sum_and_ignore_ids_outside_the_table():
    """‖Gᵢ‖² = Σ_{t,s} [idₜ = idₛ] ⟨gₜ, gₛ⟩ in float64; an id outside [0, V) (a GPU lookup reads zeros for it)
    adds nothing, and cannot alias the key (example, id) of a neighbouring example."""
    rng = np.random.default_rng(3)
    ids = np.array([[2, 0, 2, 3], [1, 1, 1, 1], [3, -1, 4, 0]])  # V = 4: -1 and 4 are outside the table
    grads = rng.standard_normal((3, 4, 5)).astype(np.float32)
    valid = (ids >= 0) & (ids < 4)
    g = grads.astype(np.float64)
    expected = [sum(float(g[i, t] @ g[i, u]) for t in range(4) for u in range(4)
                    if valid[i, t] and valid[i, u] and ids[i, t] == ids[i, u]) for i in range(3)]
    got = norms_module.embedding_squared_norms(tf.constant(ids), tf.constant(grads), 4)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    table = norms_module.embedding_clipped_sum(tf.constant(ids), tf.constant(grads), tf.constant([1.0, 0.5, 2.0]), 4,
                                               tf.float32)
    by_hand = np.zeros((4, 5))
    for i, weight in enumerate([1.0, 0.5, 2.0]):
        for t in range(4):
            if valid[i, t]:
                by_hand[ids[i, t]] += weight * g[i, t]
    np.testing.assert_allclose(table.numpy(), by_hand, rtol=1e-6)


def test_embedding_of_single_ids_equals_the_per_example_loop():
    """(B,) ids, vocabulary smaller than the batch: several examples share an id (a table row)."""
    def build():
        inputs = tf.keras.Input((), dtype="int32")
        return tf.keras.Model(inputs, L.Dense(2)(L.Embedding(4, 3, embeddings_initializer="random_normal")(inputs)))

    model = build_in("float64", build, seed=1)
    ids = tf.constant([0, 3, 1, 3, 3, 2], tf.int32)
    _, targets = random_data((), seed=1)
    assert_fast_equals_the_loop(model, ids, targets)


@pytest.mark.parametrize("vocabulary", [5, 6, 1000])  # below, at and far above the batch size (6)
def test_embedding_of_sequences_with_repeated_ids_equals_the_per_example_loop(vocabulary):
    def build():
        inputs = tf.keras.Input((7,), dtype="int32")
        x = L.Embedding(vocabulary, 4, embeddings_initializer="random_normal")(inputs)
        x = L.Dense(3, activation="tanh")(x)
        return tf.keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))

    model = build_in("float64", build, seed=vocabulary)
    ids = ids_with_repeats(6, 7, vocabulary, seed=vocabulary)
    _, targets = random_data((), seed=vocabulary)
    got = assert_fast_equals_the_loop(model, ids, targets)
    assert got.sums[0].shape == (vocabulary, 4)


def test_embedding_dense_text_model_equals_the_per_example_loop():
    """Embedding → Dense over the sequence → average → Dense, ids repeated within each example."""
    def build():
        inputs = tf.keras.Input((9,), dtype="int32")
        x = L.Embedding(11, 5, embeddings_initializer="random_normal")(inputs)
        x = L.Dense(4, activation="tanh")(x)
        return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling1D()(x)))

    model = build_in("float64", build, seed=9)
    _, targets = random_data((), seed=9)
    assert_fast_equals_the_loop(model, ids_with_repeats(6, 9, 11, seed=9), targets)


def test_embedding_with_mask_zero_keeps_the_models_masking():
    """mask_zero: the padding mask must reach the pooling through the rules' outputs (an activation applied
    after the watched base, LayerNormalization's γ·x̂ + β), or the engine clips another loss's gradient."""
    def build(mask_zero):
        inputs = tf.keras.Input((6,), dtype="int32")
        x = L.Embedding(8, 4, mask_zero=mask_zero, embeddings_initializer="random_normal")(inputs)
        x = L.Dense(4, activation="tanh")(x)
        x = L.LayerNormalization(**RANDOM)(x)
        return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling1D()(x)))

    model = build_in("float64", lambda: build(True), seed=8)
    unmasked = build_in("float64", lambda: build(False), seed=8)
    unmasked.set_weights(model.get_weights())
    ids = tf.constant([[3, 5, 3, 0, 0, 0], [1, 1, 1, 1, 2, 0], [7, 0, 0, 0, 0, 0],
                       [2, 6, 2, 6, 2, 6], [4, 4, 0, 0, 0, 0], [5, 3, 7, 1, 0, 0]], tf.int32)
    outputs = model(ids).numpy()
    assert np.allclose(outputs[3], unmasked(ids)[3]) and not np.allclose(outputs, unmasked(ids))  # the mask matters
    _, targets = random_data((), seed=8)
    assert_fast_equals_the_loop(model, ids, targets)  # per-example losses included: the model's masked ones


# -------------------------------------------------------------------------------------- a user-registered layer


class Scale(L.Layer):
    """y = x·w with one trainable weight per feature."""

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(input_shape[-1],), initializer="random_normal")

    def call(self, inputs):
        return inputs * self.w


def scale_rule_plain(layer, input_args, input_kwargs, tape, num_microbatches=None):
    """A tensorflow-privacy style rule: a plain sqr_norm_fn; the engine re-traces the layer for the sum."""
    (inputs,) = input_args
    outputs = layer(inputs)
    tape.watch(outputs)

    def sqr_norm_fn(output_grads):
        return tf.reduce_sum(tf.square(output_grads * inputs), axis=1)  # ∂ℓᵢ/∂w = gᵢ·xᵢ

    return outputs, outputs, sqr_norm_fn


def scale_rule_instantiated(layer, input_args, input_kwargs, tape, num_microbatches=None):
    """The same through LayerGradients: float64 norms, and the clipped sum Σᵢ cᵢ Gᵢ from kept gradients."""
    (inputs,) = input_args
    outputs = layer(inputs)
    tape.watch(outputs)

    def compute(output_grads):
        per_example = output_grads * inputs
        return tf.reduce_sum(tf.square(tf.cast(per_example, tf.float64)), axis=1), [per_example]

    return outputs, outputs, LayerGradients(compute)


@pytest.fixture
def own_table(monkeypatch):
    """Registrations made in a test are undone after it."""
    monkeypatch.setattr(registry_module, "_rule_table", dict(registry_module._table()))


def scale_model():
    inputs = tf.keras.Input((5,))
    x = L.Dense(4, activation="tanh", bias_initializer="random_normal")(inputs)
    return tf.keras.Model(inputs, L.Dense(2)(Scale(name="scale")(x)))


@pytest.mark.parametrize("rule", [scale_rule_plain, scale_rule_instantiated])
def test_a_registered_layer_equals_the_per_example_loop(rule, own_table):
    model = build_in("float64", scale_model, seed=5)
    assert unsupported_layers(model) == ["scale (Scale)"]
    assert register_layer(Scale, rule) is rule
    assert unsupported_layers(model) == []
    assert_fast_equals_the_loop(model, *random_data((5,), seed=5))


def test_registration_is_one_table_with_is_supported_and_supported_layer_types(own_table):
    assert {L.LayerNormalization, L.Embedding} <= set(supported_layer_types())
    assert is_supported(L.LayerNormalization()) and is_supported(L.Embedding(5, 2))
    assert not is_supported(Scale()) and Scale not in supported_layer_types()
    assert not make_layer_registry().is_elem(Scale())

    register_layer(Scale, scale_rule_plain)
    assert is_supported(Scale()) and Scale in supported_layer_types()
    for method in ("cost", "ghost", "instantiate"):
        assert make_layer_registry(method).is_elem(Scale())

    with pytest.raises(ValueError, match="Scale already has a fast-clipping rule.*replace=True"):
        register_layer(Scale, scale_rule_instantiated)
    with pytest.raises(ValueError, match="Dense already has a fast-clipping rule"):
        register_layer(L.Dense, scale_rule_plain)
    register_layer(Scale, scale_rule_instantiated, replace=True)
    assert registry_module._table()[Scale] is scale_rule_instantiated
    assert list(supported_layer_types()).count(Scale) == 1


def test_registration_checks_its_arguments(own_table):
    with pytest.raises(TypeError, match="Keras layer class"):
        register_layer(Scale(), scale_rule_plain)
    with pytest.raises(TypeError, match="Keras layer class"):
        register_layer(int, scale_rule_plain)
    with pytest.raises(TypeError, match="callable"):
        register_layer(Scale, "scale_rule")
    assert Scale not in supported_layer_types()
