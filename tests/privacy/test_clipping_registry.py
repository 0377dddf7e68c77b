"""The registry is the one list of layers the fast engine clips, matched by exact class."""

import pytest
import tensorflow as tf

from dpmedtf.models import ACSConv
from dpmedtf.privacy.clipping import (UnsupportedLayerError, check_supported, is_supported, make_layer_registry,
                                      supported_layer_types, unsupported_layers)

L = tf.keras.layers


class MyDense(L.Dense):
    """A subclass may change the computation: it needs its own rule."""


def test_the_supported_layers():
    assert set(supported_layer_types()) == {L.Dense, L.Conv1D, L.Conv2D, L.Conv3D, ACSConv, L.GroupNormalization}


@pytest.mark.parametrize("layer, supported", [
    (L.Dense(2), True), (L.Conv1D(2, 3), True), (L.Conv2D(2, 3), True), (L.Conv3D(2, 3), True),
    (ACSConv(3, 3), True), (L.GroupNormalization(1), True),
    (L.Conv2DTranspose(2, 3), False), (L.DepthwiseConv2D(3), False), (L.SeparableConv2D(2, 3), False),
    (L.LayerNormalization(), False), (L.Embedding(5, 2), False), (L.PReLU(), False), (MyDense(2), False)])
def test_lookup_is_by_exact_class_and_agrees_with_the_registry_object(layer, supported):
    assert is_supported(layer) is supported
    for method in ("cost", "ghost", "instantiate"):
        assert make_layer_registry(method).is_elem(layer) is supported


def test_an_unknown_norm_method_is_refused():
    with pytest.raises(ValueError, match="norm method must be one of"):
        make_layer_registry("exact")


def test_embedding_is_not_taken_for_a_clippable_layer():
    """tensorflow-privacy's Embedding rule watches the table, whose rows are not examples: the engine's
    clipped sum crashed when the vocabulary size differed from the batch size, and was wrong when equal."""
    inputs = tf.keras.Input((3,), dtype="int32")
    model = tf.keras.Model(inputs, L.Dense(1)(L.Flatten()(L.Embedding(4, 2, name="words")(inputs))))
    assert unsupported_layers(model) == ["words (Embedding)"]
    with pytest.raises(UnsupportedLayerError, match=r"words \(Embedding\)"):
        check_supported(model)
