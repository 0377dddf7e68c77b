"""The batched per-example conv kernel gradient (one matrix product Pᵢᵀ Gᵢ for all examples) against the loop.

Each layer's per-example gradients come three ways: the map_fn loop of TensorFlow's filter gradient, the
batched contraction, and a tape over each example alone on the real layer. In float32 they must agree to
1e-5 relative; so must the whole fast engine's clipped sums and norms on a tiny ResNet9 with either.
"""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.models import ACSConv, build_resnet9
from dpmedtf.privacy.clipping import fast_clipped_gradient_sum, make_layer_registry
from dpmedtf.privacy.clipping import norms as norms_module
from dpmedtf.privacy.clipping import rules as rules_module
from dpmedtf.privacy.clipping.norms import (BATCHED_MAX_PATCH_RATIO, batched_conv_kernel_grads, batched_is_preferred,
                                            per_example_conv_kernel_grads)
from tests.privacy.test_clipping_reference import squared_error

L = tf.keras.layers
TOLERANCE = 1e-5
EXAMPLES = 3

LAYERS = {  # layer factory, input shape (without the batch)
    "conv1d_k3_s2_same": (lambda: L.Conv1D(4, 3, strides=2, padding="same"), (11, 3)),
    "conv1d_k5_s1_valid": (lambda: L.Conv1D(4, 5, padding="valid", use_bias=False), (11, 3)),
    **{f"conv2d_k{k}_s{s}_{padding}": ((lambda k=k, s=s, padding=padding: L.Conv2D(5, k, strides=s, padding=padding)),
                                       (9, 10, 3))
       for k in (1, 3, 7) for s in (1, 2) for padding in ("same", "valid")},
    "conv2d_k2x3_s2_same": (lambda: L.Conv2D(5, (2, 3), strides=2, padding="same"), (9, 10, 3)),
    "conv3d_k3_s2_same": (lambda: L.Conv3D(4, 3, strides=2, padding="same"), (6, 7, 5, 2)),
    "conv3d_k133_s1_valid": (lambda: L.Conv3D(4, (1, 3, 3), padding="valid", use_bias=False), (6, 7, 5, 2)),
    "conv3d_k311_s121_same": (lambda: L.Conv3D(3, (3, 1, 1), strides=(1, 2, 1), padding="same"), (6, 7, 5, 2)),
    "conv3d_k1_s3_same": (lambda: L.Conv3D(3, 1, strides=3, padding="same"), (9, 6, 9, 2)),  # TF's patches mispad this
    "acs_k3_s1_same": (lambda: ACSConv(6, 3, 1, padding="same", use_bias=True), (6, 5, 7, 2)),
    "acs_k3_s2_same": (lambda: ACSConv(5, 3, 2, padding="same"), (6, 5, 7, 2)),
    "acs_k1_s1_valid": (lambda: ACSConv(4, 1, 1, padding="valid"), (6, 5, 7, 2)),  # valid: only k = 1 (planes' shapes differ)
    "acs_k1_s2_same": (lambda: ACSConv(4, 1, 2, padding="same", use_bias=True), (6, 5, 7, 2)),
}


def relative_errors(got, expected):
    """Per example and variable: ‖got − expected‖ / ‖expected‖."""
    return [np.linalg.norm(np.ravel(g[i]) - np.ravel(e[i])) / np.linalg.norm(np.ravel(e[i]))
            for g, e in zip(got, expected) for i in range(len(e))]


def layer_case(name):
    build, shape = LAYERS[name]
    tf.keras.utils.set_random_seed(len(name))
    layer = build()
    rng = np.random.default_rng(len(name))
    inputs = tf.constant(rng.standard_normal((EXAMPLES, *shape)), tf.float32)
    output_grads = tf.constant(rng.standard_normal(layer(inputs).shape), tf.float32)
    return layer, inputs, output_grads


def tape_per_example(layer, inputs, output_grads):
    """Each example's gradient of ⟨output, g⟩ for every trainable variable, from a tape over that example
    alone (3D in a graph: TF 2.15's eager Conv3D gradient cannot read its data_format)."""
    def one(i):
        with tf.GradientTape() as tape:
            outputs = layer(inputs[i:i + 1])
        return tape.gradient(outputs, layer.trainable_variables, output_gradients=output_grads[i:i + 1])

    one = tf.function(one) if inputs.shape.rank == 5 else one  # eager where it can: tracing dominates here
    per_example = [one(tf.constant(i)) for i in range(EXAMPLES)]
    return [np.stack([grads[k].numpy() for grads in per_example]) for k in range(len(layer.trainable_variables))]


def rule_per_example(layer, inputs, output_grads, instantiate_with):
    """(float64 squared norms, per-example gradients) of the layer's fast-engine rule, instantiated."""
    rule = (rules_module.acs_conv_layer_computation if isinstance(layer, ACSConv)
            else rules_module.conv_layer_computation)
    with tf.GradientTape() as tape:
        _, _, gradients = rule(layer, (inputs,), {}, tape, method="instantiate", instantiate_with=instantiate_with)
    squared = gradients.squared_norms64(output_grads)
    return squared.numpy(), [grads.numpy() for grads in gradients.per_example]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_batched_equals_the_loop_and_a_tape_per_example(name):
    layer, inputs, output_grads = layer_case(name)
    expected = tape_per_example(layer, inputs, output_grads)
    expected_norms = sum(np.sum(g.reshape(EXAMPLES, -1).astype(np.float64) ** 2, axis=1) for g in expected)
    got = {with_: rule_per_example(layer, inputs, output_grads, with_) for with_ in ("loop", "batched")}
    for with_, (squared, per_example) in got.items():
        assert [g.shape for g in per_example] == [e.shape for e in expected], with_
        assert max(relative_errors(per_example, expected)) < TOLERANCE, with_
        np.testing.assert_allclose(squared, expected_norms, rtol=TOLERANCE)
    assert max(relative_errors(got["batched"][1], got["loop"][1])) < TOLERANCE

    if not isinstance(layer, ACSConv):  # the two functions themselves, outside the rule
        args = (inputs, output_grads, tuple(layer.kernel.shape), tuple(layer.strides), layer.padding)
        loop = per_example_conv_kernel_grads(*args)
        batched = batched_conv_kernel_grads(*args)
        assert batched.shape == loop.shape and batched.dtype == loop.dtype == tf.float32
        assert max(relative_errors([batched.numpy()], [loop.numpy()])) < TOLERANCE


def test_the_batched_function_rejects_a_kernel_that_does_not_match_the_output():
    inputs, grads = tf.zeros((2, 9, 9, 3)), tf.zeros((2, 5, 5, 4))
    with pytest.raises(ValueError, match="positions"):
        batched_conv_kernel_grads(inputs, grads, (3, 3, 3, 4), (1, 1), "same")


class KernelSpy:
    """Records the kernel shape of each instantiated conv kernel gradient, by how it was formed."""

    def __init__(self, monkeypatch):
        self.calls = {"loop": [], "batched": []}
        for name, key in (("per_example_conv_kernel_grads", "loop"), ("batched_conv_kernel_grads", "batched")):
            monkeypatch.setattr(rules_module, name, self._recording(getattr(rules_module, name), key))

    def _recording(self, function, key):
        def recorded(inputs, output_grads, kernel_shape, *args):
            self.calls[key].append(tuple(kernel_shape))
            return function(inputs, output_grads, kernel_shape, *args)
        return recorded


def test_the_fast_engine_on_a_resnet9_gives_the_same_clipped_sums_with_either(monkeypatch):
    tf.keras.utils.set_random_seed(5)
    # groups=8: with one channel per group the 1×1 stage-4 maps normalise to 0, and no gradient reaches
    # anything before them (every sum would be 0 and trivially equal)
    model = build_resnet9((32, 32, 3), 3, groups=8, widths=(32, 32, 32, 32))
    rng = np.random.default_rng(5)
    images = tf.constant(rng.standard_normal((4, 32, 32, 3)), tf.float32)
    targets = tf.constant(rng.standard_normal((4, 3)), tf.float32)
    spy = KernelSpy(monkeypatch)
    steps = {with_: tf.function(lambda x, y, clip, registry=make_layer_registry("instantiate", instantiate_with=with_):
                                fast_clipped_gradient_sum(model, x, squared_error(y), clip, registry))
             for with_ in ("loop", "batched")}

    norms = steps["loop"](images, targets, tf.constant(np.inf, tf.float64)).norms.numpy()
    low, high = np.sort(norms)[1:3]
    clip = tf.constant((low + high) / 2, tf.float64)  # two examples are clipped, two are not
    loop, batched = (step(images, targets, clip) for step in steps.values())

    kernels = sorted(tuple(v.shape) for v in model.trainable_variables if "conv" in v.name)
    assert sorted(spy.calls["loop"]) == kernels and sorted(spy.calls["batched"]) == kernels  # each traced once
    assert 0 < np.sum(loop.norms.numpy() > clip.numpy()) < 4
    np.testing.assert_allclose(batched.norms.numpy(), loop.norms.numpy(), rtol=TOLERANCE)
    for total, reference, variable in zip(batched.sums, loop.sums, model.trainable_variables):
        assert total.shape == variable.shape and np.linalg.norm(reference) > 0, variable.name
        assert np.linalg.norm(total - reference) <= TOLERANCE * np.linalg.norm(reference), variable.name


@pytest.mark.parametrize("name, batched", [("conv2d_k3_s1_same", False), ("conv2d_k1_s2_valid", True),
                                           ("acs_k3_s1_same", False), ("acs_k1_s2_same", True)])
def test_auto_on_a_cpu_is_the_loop_but_for_1x1_kernels(name, batched, monkeypatch):
    monkeypatch.setattr(norms_module, "gpu_visible", lambda: False)
    spy = KernelSpy(monkeypatch)
    auto = rule_per_example(*layer_case(name), "auto")
    assert bool(spy.calls["batched"]) == batched and bool(spy.calls["loop"]) != batched
    assert max(relative_errors(auto[1], rule_per_example(*layer_case(name), "loop")[1])) < TOLERANCE


def test_auto_is_batched_on_a_gpu_unless_the_patches_are_large_and_for_1x1_kernels_anywhere(monkeypatch):
    channels = 8
    small = tf.zeros((2, BATCHED_MAX_PATCH_RATIO * channels // 16, 16, channels))  # T = ratio · p
    large = tf.zeros((2, BATCHED_MAX_PATCH_RATIO * channels // 16 + 1, 16, channels))
    three, one = (3, 3, 4, channels), (1, 1, 4, channels)
    monkeypatch.setattr(norms_module, "gpu_visible", lambda: True)
    assert batched_is_preferred(small, three) and not batched_is_preferred(large, three)
    assert batched_is_preferred(large, one)
    monkeypatch.setattr(norms_module, "gpu_visible", lambda: False)
    assert not batched_is_preferred(small, three)
    assert batched_is_preferred(large, one) and batched_is_preferred(small, (1, 1, 1, 4, channels))


def test_an_unknown_instantiate_with_is_refused():
    with pytest.raises(ValueError, match="instantiate_with"):
        make_layer_registry("instantiate", instantiate_with="vectorized")
    assert make_layer_registry("cost").is_elem(L.Conv2D(2, 3))  # the positional signature still works
