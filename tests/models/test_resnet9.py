"""The paper's GroupNorm ResNet9 (2D) and its ACS-3D twin."""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.models import ACSConv, build_resnet9, convert_to_acs, describe_resnet9


def trainable_parameters(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_paper_parameter_count():
    model = build_resnet9((512, 512, 3), 8)
    assert trainable_parameters(model) == 4_909_896
    assert model.get_layer("features").output_shape == (None, 512)
    assert model.get_layer("logits").get_config()["activation"] == "linear"  # logits, not probabilities
    assert not any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in model.layers)
    groupnorms = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.GroupNormalization)]
    assert len(groupnorms) == 12 and all(layer.groups == 32 for layer in groupnorms)


def test_scale_norm_adds_one_groupnorm_per_stage():
    plain = build_resnet9((32, 32, 3), 8)
    scaled = build_resnet9((32, 32, 3), 8, scale_norm=True)
    assert trainable_parameters(scaled) - trainable_parameters(plain) == 2 * (64 + 128 + 256 + 512)
    assert describe_resnet9(scaled)["scale_norm"] and not describe_resnet9(plain)["scale_norm"]


@pytest.mark.parametrize("shape", [(32, 32, 1), (32, 32, 3), (48, 40, 3), (64, 64, 1)])
def test_any_input_of_at_least_32_px_and_1_or_3_channels(shape):
    model = build_resnet9(shape, 8, activation="relu")
    out = model(np.zeros((2, *shape), np.float32))
    assert out.shape == (2, 8)
    assert describe_resnet9(model)["input_channels"] == shape[-1]


def test_too_small_inputs_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="≥ 32"):
        build_resnet9((31, 64, 3), 8)
    with pytest.raises(ValueError, match="divisible by groups"):
        build_resnet9((32, 32, 3), 8, widths=(48, 96, 192, 384))
    with pytest.raises(ValueError, match="'mish' or 'relu'"):
        build_resnet9((32, 32, 3), 8, activation="gelu")


def test_activation_choice_is_used():
    assert describe_resnet9(build_resnet9((32, 32, 3), 8))["activation"] == "mish"
    assert describe_resnet9(build_resnet9((32, 32, 3), 8, activation="relu"))["activation"] == "relu"


def test_convert_to_acs_shares_the_2d_weights():
    tf.keras.utils.set_random_seed(0)
    model_2d = build_resnet9((32, 32, 1), 8, scale_norm=True)
    model_3d = convert_to_acs(model_2d, (32, 32, 32, 1))
    assert isinstance(model_3d.get_layer("stem_conv"), ACSConv)
    assert isinstance(model_3d.get_layer("stem_pool"), tf.keras.layers.MaxPool3D)
    assert trainable_parameters(model_3d) == trainable_parameters(model_2d)
    for layer in model_2d.layers:
        for w2, w3 in zip(layer.get_weights(), model_3d.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(w2, w3)
    assert describe_resnet9(model_3d) == {**describe_resnet9(model_2d), "volumetric": True}
    assert model_3d(np.zeros((1, 32, 32, 32, 1), np.float32)).shape == (1, 8)


def test_convert_to_acs_gives_a_new_head_for_a_new_task():
    model_2d = build_resnet9((32, 32, 3), 8)
    model_3d = convert_to_acs(model_2d, (32, 40, 48, 3), num_outputs=1)
    assert model_3d.get_layer("logits").get_weights()[0].shape == (512, 1)
    np.testing.assert_array_equal(model_3d.get_layer("stage4_conv2").get_weights()[0],
                                  model_2d.get_layer("stage4_conv2").get_weights()[0])
    with pytest.raises(ValueError, match="takes 3 channel"):
        convert_to_acs(model_2d, (32, 32, 32, 1))
    with pytest.raises(ValueError, match="already a 3D model"):
        convert_to_acs(model_3d, (32, 32, 32, 3))
