"""ACSConv is exactly three plane-wise 3D convolutions of one shared 2D kernel."""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.models import ACSConv, acs_split


def built_layer(filters, kernel_size, strides, in_channels, use_bias=False, seed=0):
    tf.keras.utils.set_random_seed(seed)
    layer = ACSConv(filters, kernel_size, strides, use_bias=use_bias,
                    bias_initializer="random_normal" if use_bias else "zeros")
    layer.build((None, 9, 10, 11, in_channels))
    return layer


def test_split_gives_thirds_with_the_remainder_first():
    assert acs_split(64) == (22, 21, 21)
    assert acs_split(512) == (171, 171, 170)
    assert acs_split(9) == (3, 3, 3)
    assert sum(acs_split(128)) == 128


@pytest.mark.parametrize("strides, use_bias", [(1, False), (2, False), (2, True)])
def test_equals_three_explicit_conv3d_on_the_channel_splits(strides, use_bias):
    layer = built_layer(filters=8, kernel_size=3, strides=strides, in_channels=2, use_bias=use_bias)
    x = tf.random.stateless_normal((2, 9, 10, 11, 2), seed=(1, 2))
    kernel = layer.kernel.numpy()
    a, c, _ = acs_split(8)  # (3, 3, 2)
    parts = [kernel[..., :a], kernel[..., a:a + c], kernel[..., a + c:]]
    # The same 2D kernel laid in the axial (1,k,k), coronal (k,1,k) and sagittal (k,k,1) planes, by hand.
    kernels_3d = [parts[0][None], parts[1][:, None], parts[2][:, :, None]]
    expected = []
    for kernel_3d in kernels_3d:
        conv = tf.keras.layers.Conv3D(kernel_3d.shape[-1], kernel_3d.shape[:3], strides=strides, padding="same",
                                      use_bias=False)
        conv.build(x.shape)
        conv.set_weights([kernel_3d])
        expected.append(conv(x).numpy())
    expected = np.concatenate(expected, axis=-1)
    if use_bias:
        expected = expected + layer.bias.numpy()
    got = layer(x).numpy()
    assert got.shape == expected.shape == (2, *(-(-s // strides) for s in (9, 10, 11)), 8)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_axial_part_on_a_depth_constant_volume_is_the_2d_convolution_of_each_slice():
    layer = built_layer(filters=9, kernel_size=3, strides=1, in_channels=3)
    image = tf.random.stateless_normal((2, 10, 11, 3), seed=(3, 4))
    volume = tf.repeat(image[:, None], 9, axis=1)  # (N, D=9, H, W, C), every slice the same image
    axial = layer(volume)[..., :acs_split(9)[0]]
    slice_2d = tf.nn.conv2d(image, layer.kernel[..., :acs_split(9)[0]], 1, "SAME")
    for depth in range(9):
        np.testing.assert_allclose(axial[:, depth].numpy(), slice_2d.numpy(), rtol=1e-5, atol=1e-5)


def test_coronal_part_on_a_height_constant_volume_is_the_2d_convolution_of_each_coronal_plane():
    layer = built_layer(filters=9, kernel_size=3, strides=1, in_channels=3)
    plane = tf.random.stateless_normal((2, 9, 11, 3), seed=(5, 6))  # (N, D, W, C)
    volume = tf.repeat(plane[:, :, None], 10, axis=2)  # constant along H
    a, c, _ = acs_split(9)
    coronal = layer(volume)[..., a:a + c]
    plane_2d = tf.nn.conv2d(plane, layer.kernel[..., a:a + c], 1, "SAME")
    # Rows at the H borders see zero padding across H only for kernels extending along H; coronal does not.
    for height in range(10):
        np.testing.assert_allclose(coronal[:, :, height].numpy(), plane_2d.numpy(), rtol=1e-5, atol=1e-5)


def test_kernel_has_the_2d_shape_and_config_round_trips():
    layer = built_layer(filters=6, kernel_size=5, strides=2, in_channels=4)
    assert layer.kernel.shape == (5, 5, 4, 6)
    clone = ACSConv.from_config(layer.get_config())
    assert (clone.filters, clone.kernel_size, clone.strides, clone.padding) == (6, 5, 2, "same")
    assert layer.compute_output_shape((None, 9, 10, 11, 4)).as_list() == [None, 5, 5, 6, 6]
    with pytest.raises(ValueError, match="≥ 3 output channels"):
        ACSConv(2, 3)
