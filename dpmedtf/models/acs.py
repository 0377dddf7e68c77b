"""ACS convolution (Yang et al., "Reinventing 2D convolutions for 3D images", IEEE JBHI 2021).

One 2D kernel of shape (k, k, Cin, Cout) serves a 3D volume: its output channels are split into an
axial, a coronal and a sagittal part, and each part is applied as a 3D convolution with the 2D kernel
laid in that plane. Weights therefore transfer 1:1 from a 2D network (the paper's PDAC model starts
from a 2D-pretrained ResNet9).

Layout is channels-last NDHWC with the spatial axes (depth, height, width) = (slices, rows, columns)
of an axial stack: the axial kernel is (1, k, k), the coronal (k, 1, k) and the sagittal (k, k, 1).
"""

from __future__ import annotations

import tensorflow as tf

# Where the 2D kernel's two axes go in each 3D kernel; the remaining (size-1) axis is inserted.
_PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


def acs_split(channels: int) -> tuple[int, int, int]:
    """Output channels of the (axial, coronal, sagittal) parts: thirds, the remainder going first."""
    base, remainder = divmod(channels, 3)
    return tuple(base + (1 if i < remainder else 0) for i in range(3))


def plane_kernel(kernel_2d: tf.Tensor, plane: str) -> tf.Tensor:
    """A (k, k, Cin, C) 2D kernel laid as a 3D kernel in ``plane`` (one spatial axis of size 1)."""
    return tf.expand_dims(kernel_2d, axis=_PLANE_AXIS[plane])


@tf.keras.saving.register_keras_serializable(package="dpmedtf")
class ACSConv(tf.keras.layers.Layer):
    """A 3D convolution whose weights are a 2D kernel split across the axial, coronal and sagittal planes.

    The weight is named ``kernel`` and has the 2D shape (k, k, Cin, Cout), so a 2D Conv2D's kernel can
    be assigned to it directly. Strides and 'same'/'valid' padding apply equally to the three axes.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, padding: str = "same",
                 use_bias: bool = False, kernel_initializer="he_normal", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if filters < 3:
            raise ValueError(f"ACSConv needs ≥ 3 output channels (one per plane), got {filters}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.padding = padding.lower()
        if self.padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.input_spec = tf.keras.layers.InputSpec(ndim=5)

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(self.kernel_size, self.kernel_size, in_channels, self.filters),
                                      initializer=self.kernel_initializer, trainable=True)
        self.bias = (self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer, trainable=True)
                     if self.use_bias else None)
        super().build(input_shape)

    def plane_kernels(self) -> list[tf.Tensor]:
        """The three 3D kernels (axial, coronal, sagittal) this layer applies."""
        parts = tf.split(self.kernel, acs_split(self.filters), axis=-1)
        return [plane_kernel(part, plane) for part, plane in zip(parts, _PLANE_AXIS)]

    def call(self, inputs):
        strides = (1, self.strides, self.strides, self.strides, 1)
        outputs = [tf.nn.conv3d(inputs, kernel, strides, self.padding.upper()) for kernel in self.plane_kernels()]
        outputs = tf.concat(outputs, axis=-1)
        return outputs + self.bias if self.use_bias else outputs

    def compute_output_shape(self, input_shape):
        def out(size):
            if size is None:
                return None
            return -(-size // self.strides) if self.padding == "same" else (size - self.kernel_size) // self.strides + 1
        return tf.TensorShape([input_shape[0], *(out(s) for s in input_shape[1:4]), self.filters])

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "use_bias": self.use_bias,
                "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer)}
