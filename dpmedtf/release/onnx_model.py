"""The released ONNX model as consumers meet it: names, opset, graph checks and an onnxruntime session.

Nothing here imports TensorFlow: ``dpmedtf verify``, ``dpmedtf predict`` and ``dpmedtf.release.load``
run in the light install (onnxruntime, numpy, pydicom …). ``export.py`` (tf2onnx, training side)
builds on these names.
"""

from __future__ import annotations

from typing import Mapping

import onnx

from dpmedtf.errors import DpmedtfError

OPSET = 17
"""Pinned: recorded in the bundle; onnxruntime ≥ 1.14 and onnxruntime-node run it."""
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"


class ExportError(DpmedtfError):
    """The ONNX model is not a faithful, runnable copy of the Keras model."""


def check_graph(proto: onnx.ModelProto, inputs: tuple[str, ...] = (INPUT_NAME,),
                outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> None:
    """Raises ExportError unless the graph is valid ONNX made only of ops the opset defines.

    The op scan comes first: tf2onnx keeps an op it cannot convert under its TensorFlow name, and
    saying which ops those are is more use than the checker's generic complaint about the first."""
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    unconverted = sorted({f"{node.op_type} ({node.name})" for node in proto.graph.node
                          if not onnx.defs.has(node.op_type, node.domain or "")})
    if unconverted:
        raise ExportError(f"tf2onnx left {len(unconverted)} TensorFlow op(s) unconverted at opset "
                          f"{opsets.get('ai.onnx')}: {', '.join(unconverted[:10])}")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the ONNX graph is invalid: {str(exc).splitlines()[0]}") from None
    names = (tuple(i.name for i in proto.graph.input), tuple(o.name for o in proto.graph.output))
    if names != (tuple(inputs), tuple(outputs)):
        raise ExportError(f"expected input(s) {list(inputs)} and output(s) {list(outputs)}, got "
                          f"{list(names[0])} and {list(names[1])}")


def session(model_bytes: bytes):
    """An onnxruntime session on the CPU (the consumer's lowest common denominator)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def set_metadata(proto: onnx.ModelProto, properties: Mapping[str, str]) -> None:
    """ONNX metadata_props (string → string), replacing any of the same key."""
    keep = [p for p in proto.metadata_props if p.key not in properties]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def metadata_of(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}
