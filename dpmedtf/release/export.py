"""Keras → ONNX with tf2onnx, checked until nothing is left to trust blindly.

tf2onnx "succeeds" even when it leaves TensorFlow ops it could not convert in the graph, so a
conversion is accepted only when (1) ``onnx.checker.check_model(full_check=True)`` passes, (2) every
node is an op that the ONNX opset defines, (3) onnxruntime loads and runs it, and (4) its
probabilities agree with Keras on ordinary and extreme inputs at batch 1 and 5. The exported model
outputs probabilities (the sigmoid is part of the graph) and its batch dimension is named ``batch``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
import tensorflow as tf

from dpmedtf.release.onnx_model import (BATCH_DIM, INPUT_NAME, OPSET, OUTPUT_NAME, ExportError, check_graph,  # noqa: F401
                                        metadata_of, session, set_metadata)

PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 5)


@dataclass(frozen=True)
class ParityCase:
    name: str
    batch_size: int
    max_abs_difference: float
    labels_identical: bool


@dataclass(frozen=True)
class ParityReport:
    tolerance: float
    cases: tuple[ParityCase, ...]

    @property
    def max_abs_difference(self) -> float:
        return max(case.max_abs_difference for case in self.cases)

    @property
    def passed(self) -> bool:
        return self.max_abs_difference <= self.tolerance and all(case.labels_identical for case in self.cases)

    def to_json_dict(self) -> dict:
        return {"tolerance": self.tolerance, "max_abs_difference": self.max_abs_difference, "passed": self.passed,
                "cases": [asdict(case) for case in self.cases]}


def to_onnx(model: tf.keras.Model, opset: int = OPSET) -> onnx.ModelProto:
    """The model with a sigmoid head as an ONNX graph: input ``image`` (batch, …), output ``probabilities``."""
    import tf2onnx

    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def probabilities(image):
        return {OUTPUT_NAME: tf.sigmoid(model(image, training=False))}

    proto, _ = tf2onnx.convert.from_function(probabilities, input_signature=[spec], opset=opset)
    _name_batch_dimension(proto)
    check_graph(proto)
    return proto


def _name_batch_dimension(proto: onnx.ModelProto) -> None:
    """tf2onnx names the unknown batch dimension ``unk__N``; consumers should see one shared name."""
    for value in (*proto.graph.input, *proto.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        first.ClearField("dim_value")
        first.dim_param = BATCH_DIM




def parity_inputs(input_shape: Sequence[int], batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Ordinary inputs in the model's [0, 1] range and the extremes a broken export shows first."""
    shape = (batch_size, *input_shape)
    rng = np.random.default_rng(seed + batch_size)
    return {"uniform": rng.random(shape, dtype=np.float32),
            "zeros": np.zeros(shape, np.float32),
            "ones": np.ones(shape, np.float32),
            "large": np.full(shape, 1e3, np.float32) * rng.choice([-1.0, 1.0], size=shape).astype(np.float32)}


def check_parity(model: tf.keras.Model, proto: onnx.ModelProto, thresholds: Mapping[str, float] | Sequence[float],
                 tolerance: float = PARITY_TOLERANCE) -> ParityReport:
    """Keras (with sigmoid) against onnxruntime at batch 1 and 5 on ordinary and extreme inputs."""
    runtime = session(proto.SerializeToString())
    cut = np.asarray(list(thresholds.values()) if isinstance(thresholds, Mapping) else thresholds, np.float64)
    cases = []
    for batch_size in PARITY_BATCH_SIZES:
        for name, x in parity_inputs(model.input_shape[1:], batch_size).items():
            expected = tf.sigmoid(model(x, training=False)).numpy().astype(np.float64)
            (actual,) = runtime.run([OUTPUT_NAME], {INPUT_NAME: x})
            actual = actual.astype(np.float64)
            if actual.shape != expected.shape:
                raise ExportError(f"ONNX output shape {actual.shape} differs from Keras {expected.shape}")
            cases.append(ParityCase(name, batch_size, float(np.max(np.abs(actual - expected))),
                                    bool(np.array_equal(actual >= cut, expected >= cut))))
    return ParityReport(tolerance, tuple(cases))
