"""The registry is the one list of layers the fast engine clips, matched by exact class."""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.models import ACSConv, GroupNorm
from dpmedtf.privacy.clipping import (UnsupportedLayerError, check_supported, fast_clipped_gradient_sum, is_supported,
                                      make_layer_registry, supported_layer_types, unsupported_layers)

L = tf.keras.layers


class MyDense(L.Dense):
    """A subclass may change the computation: it needs its own rule."""


def test_the_supported_layers():
    assert set(supported_layer_types()) == {L.Dense, L.Conv1D, L.Conv2D, L.Conv3D, ACSConv, L.GroupNormalization,
                                            GroupNorm, L.LayerNormalization, L.Embedding}


@pytest.mark.parametrize("layer, supported", [
    (L.Dense(2), True), (L.Conv1D(2, 3), True), (L.Conv2D(2, 3), True), (L.Conv3D(2, 3), True),
    (ACSConv(3, 3), True), (L.GroupNormalization(1), True), (GroupNorm(1), True),
    (L.Conv2DTranspose(2, 3), False), (L.DepthwiseConv2D(3), False), (L.SeparableConv2D(2, 3), False),
    (L.LayerNormalization(), True), (L.Embedding(5, 2), True), (L.PReLU(), False), (MyDense(2), False)])
def test_lookup_is_by_exact_class_and_agrees_with_the_registry_object(layer, supported):
    assert is_supported(layer) is supported
    for method in ("cost", "ghost", "instantiate"):
        assert make_layer_registry(method).is_elem(layer) is supported


def test_an_unknown_norm_method_is_refused():
    with pytest.raises(ValueError, match="norm method must be one of"):
        make_layer_registry("exact")


def test_embedding_is_clipped_with_a_dense_table_gradient_whatever_the_vocabulary():
    """tensorflow-privacy's Embedding rule watched the table, whose rows are not examples: the engine's
    clipped sum crashed when the vocabulary size differed from the batch size, and was wrong when equal.
    dpmedtf's rule watches the layer's output (test_clipping_layers checks its values)."""
    inputs = tf.keras.Input((3,), dtype="int32")
    model = tf.keras.Model(inputs, L.Dense(1)(L.Flatten()(L.Embedding(4, 2, name="words")(inputs))))
    assert unsupported_layers(model) == []
    check_supported(model)
    for batch in (2, 4, 7):
        ids = tf.constant(np.arange(3 * batch).reshape(batch, 3) % 4, tf.int32)
        got = fast_clipped_gradient_sum(model, ids, lambda out: tf.reduce_sum(out, axis=1), 0.5)
        table = got.sums[[v.ref() for v in model.trainable_variables].index(model.get_layer("words").embeddings.ref())]
        assert isinstance(table, tf.Tensor) and table.shape == (4, 2)
        assert got.norms.shape == (batch,)


def test_a_layer_without_a_rule_is_still_refused():
    inputs = tf.keras.Input((4,))
    model = tf.keras.Model(inputs, L.Dense(1)(L.PReLU(name="prelu")(inputs)))
    assert unsupported_layers(model) == ["prelu (PReLU)"]
    with pytest.raises(UnsupportedLayerError, match=r"prelu \(PReLU\)"):
        check_supported(model)
