"""``preprocess.onnx``: the radiograph preprocessing as an ONNX graph, so any ONNX runtime needs no Python.

Input ``pixels``: float32 (H, W), any H and W, the decoded image (``preprocessing.decode_radiograph``:
modality LUT applied, MONOCHROME1 inverted, as training's decoder gave it). Output ``image``: float32
(1, S, S, 3), the model's input. Feed ``image`` to ``model.onnx``.

The graph repeats training's float32 arithmetic operation for operation, as ``preprocessing.py`` does in
numpy, so its output is bit-identical wherever elementwise float32 operations are IEEE (every ONNX
runtime on a CPU). It does not use ONNX ``Resize`` (opset 18 for ``antialias=1``): measured in
onnxruntime 1.32 against TensorFlow, its antialiased linear filter differs at the borders (up to 10 % of
the intensity range at 32 px, so up to 24 grey levels after equalisation); with ``exclude_outside=1`` it
is TensorFlow's filter but sums in another order, and equalisation still turns those last-bit
differences into up to 3 grey levels (12 of 262,144 pixels of RG1_UNCR at 512). Instead the graph computes
TensorFlow's ScaleAndTranslate weights from H and W inside the graph (the same float32 steps as
scale_and_translate_op.cc) and accumulates the weighted source rows with ``CumSum``, which adds left to
right like TensorFlow's loop. Histogram equalisation: bincount by ``ScatterElements(reduction="add")``,
``CumSum``, the same cdf_min rule and a ``Gather`` through the LUT.

Opset policy: the model's opset (``onnx_model.OPSET``, 17), so that any runtime that runs ``model.onnx``
runs this graph too; the newest operator feature it needs is ScatterElements' ``reduction`` (opset 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dpmedtf.errors import ConfigError
from dpmedtf.release.layout import PREPROCESS_FILE
from dpmedtf.release.onnx_model import OPSET

INPUT_NAME = "pixels"
OUTPUT_NAME = "image"
PRODUCER = "dpmedtf preprocess_graph"


@dataclass
class _Builder:
    """Nodes and constants of one graph, with unique names."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attributes) -> str:
        output = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output, **attributes))
        return output


def _spans(b: _Builder, length: str, size: int) -> tuple[str, str, str]:
    """(source indices (size, span) int64, weights (size, span) float32, span − 1 as a scalar int64) for
    resizing an axis of ``length`` (int64 scalar) to ``size``: TensorFlow's ComputeSpansCore, triangle kernel."""
    f32, one = np.float32, b.const(1.0, np.float32)
    scale = b.op("Div", b.const(size, f32), b.op("Cast", length, to=TensorProto.FLOAT), hint="scale")
    # `1.0 / scale` is a double division in TensorFlow's C++; the result is stored as float.
    inverse = b.op("Div", b.const(1.0, np.float64), b.op("Cast", scale, to=TensorProto.DOUBLE))
    inv_scale = b.op("Cast", inverse, to=TensorProto.FLOAT, hint="inv_scale")
    kernel_scale = b.op("Max", inv_scale, one, hint="kernel_scale")  # widen the kernel when downsampling only
    span = b.op("Min", b.op("Add", b.op("Mul", b.const(2, np.int64), b.op("Cast", b.op("Ceil", kernel_scale),
                                                                         to=TensorProto.INT64)),
                            b.const(1, np.int64)), length, hint="span")
    last = b.op("Sub", length, b.const(1, np.int64))
    sample = b.op("Mul", b.const(np.arange(size, dtype=f32) + f32(0.5), f32, "centres"), inv_scale, hint="sample")
    half = b.const(0.5, f32)
    start = b.op("Cast", b.op("Ceil", b.op("Sub", b.op("Sub", sample, kernel_scale), half)), to=TensorProto.INT64)
    end = b.op("Cast", b.op("Floor", b.op("Sub", b.op("Add", sample, kernel_scale), half)), to=TensorProto.INT64)
    zero = b.const(0, np.int64)
    start = b.op("Min", b.op("Max", start, zero), last, hint="start")
    end = b.op("Add", b.op("Min", b.op("Max", end, zero), last), b.const(1, np.int64), hint="end")
    offsets = b.op("Range", zero, span, b.const(1, np.int64))
    source = b.op("Add", b.op("Unsqueeze", start, b.const([1], np.int64)),
                  b.op("Unsqueeze", offsets, b.const([0], np.int64)), hint="source")
    inside = b.op("Less", source, b.op("Unsqueeze", end, b.const([1], np.int64)))
    position = b.op("Sub", b.op("Add", b.op("Cast", source, to=TensorProto.FLOAT), half),
                    b.op("Unsqueeze", sample, b.const([1], np.int64)))
    distance = b.op("Abs", _times(b, position, b.op("Div", one, kernel_scale)))
    weights = b.op("Where", b.op("And", inside, b.op("Less", distance, one)), b.op("Sub", one, distance),
                   b.const(0.0, f32), hint="raw_weights")
    span_last = b.op("Sub", span, b.const(1, np.int64), hint="span_last")
    total = b.op("Gather", b.op("CumSum", weights, b.const(1, np.int64)), span_last, axis=1, hint="total")
    weights = _times(b, weights, b.op("Unsqueeze", b.op("Div", one, total), b.const([1], np.int64)))
    return b.op("Min", source, last, hint="index"), weights, span_last


def _times(b: _Builder, x: str, reciprocal: str) -> str:
    """float32 x · reciprocal, where reciprocal = 1 / something.

    onnxruntime fuses ``Mul(x, Div(1, y))`` into ``Div(x, y)`` (DivMulFusion), which rounds differently
    from TensorFlow's multiplication by a stored reciprocal. A product of two float32 values is exact
    in double, so casting it back rounds once, as a float32 multiplication does, and nothing fuses."""
    product = b.op("Mul", b.op("Cast", x, to=TensorProto.DOUBLE), b.op("Cast", reciprocal, to=TensorProto.DOUBLE))
    return b.op("Cast", product, to=TensorProto.FLOAT)


def _resize(b: _Builder, pixels: str, size: int) -> str:
    """(H, W) → (size, size): rows first, then columns, each Σ_j w_j · x_j summed left to right."""
    shape = b.op("Shape", pixels)
    height = b.op("Gather", shape, b.const(0, np.int64), axis=0, hint="height")
    width = b.op("Gather", shape, b.const(1, np.int64), axis=0, hint="width")
    index, weights, last = _spans(b, height, size)
    rows = b.op("Gather", pixels, index, axis=0)                              # (size, span, W)
    rows = b.op("Mul", rows, b.op("Unsqueeze", weights, b.const([2], np.int64)))
    rows = b.op("Gather", b.op("CumSum", rows, b.const(1, np.int64)), last, axis=1, hint="rows")  # (size, W)
    index, weights, last = _spans(b, width, size)
    columns = b.op("Gather", rows, index, axis=1)                             # (size, size, span)
    columns = b.op("Mul", columns, b.op("Unsqueeze", weights, b.const([0], np.int64)))
    return b.op("Gather", b.op("CumSum", columns, b.const(2, np.int64)), last, axis=2, hint="resized")


def _divide_no_nan(b: _Builder, numerator: str, denominator: str) -> str:
    """TensorFlow's divide_no_nan: 0 where the denominator is 0 (dividing by 1 there keeps NaN out of the graph)."""
    zero = b.op("Equal", denominator, b.const(0.0, np.float32))
    safe = b.op("Where", zero, b.const(1.0, np.float32), denominator)
    return b.op("Where", zero, b.const(0.0, np.float32), b.op("Div", numerator, safe))


def _minmax_levels(b: _Builder, image: str) -> str:
    """Grey levels 0…255 (float32, integral) as ``radiograph.minmax_to_uint8``: round half to even."""
    low = b.op("ReduceMin", image, keepdims=0, hint="low")
    spread = b.op("Sub", b.op("ReduceMax", image, keepdims=0), low, hint="spread")
    scaled = b.op("Mul", _divide_no_nan(b, b.op("Sub", image, low), spread), b.const(255.0, np.float32))
    return b.op("Round", scaled, hint="levels")


def _equalize(b: _Builder, levels: str, size: int) -> str:
    """``radiograph.equalize_histogram`` on integral float levels; returns the equalised levels (float32)."""
    flat = b.op("Cast", b.op("Reshape", levels, b.const([-1], np.int64)), to=TensorProto.INT64, hint="flat")
    ones = b.op("ConstantOfShape", b.op("Shape", flat), value=numpy_helper.from_array(np.ones(1, np.int64)))
    counts = b.op("ScatterElements", b.const(np.zeros(256, np.int64), np.int64), flat, ones, axis=0,
                  reduction="add", hint="histogram")
    cdf = b.op("CumSum", counts, b.const(0, np.int64), hint="cdf")
    cdf_min = b.op("ReduceMin", b.op("Where", b.op("Greater", cdf, b.const(0, np.int64)), cdf,
                                     b.op("ReduceMax", cdf, keepdims=0)), keepdims=0, hint="cdf_min")
    denominator = b.op("Cast", b.op("Sub", b.const(size * size, np.int64), cdf_min), to=TensorProto.FLOAT)
    numerator = b.op("Mul", b.op("Cast", b.op("Sub", cdf, cdf_min), to=TensorProto.FLOAT),
                     b.const(255.0, np.float32))
    lut = b.op("Round", _divide_no_nan(b, numerator, denominator))
    lut = b.op("Clip", lut, b.const(0.0, np.float32), b.const(255.0, np.float32), hint="lut")
    return b.op("Gather", lut, b.op("Cast", levels, to=TensorProto.INT64), axis=0, hint="equalised")


def build_preprocess_graph(image_size: int) -> onnx.ModelProto:
    """The ONNX graph ``pixels`` (H, W) float32 → ``image`` (1, S, S, 3) float32 for ``S = image_size``."""
    if int(image_size) < 1:
        raise ConfigError(f"image size (data.image_size) must be a positive number of pixels, got {image_size}")
    size = int(image_size)
    b = _Builder()
    levels = _minmax_levels(b, _resize(b, INPUT_NAME, size))
    scaled = b.op("Div", _equalize(b, levels, size), b.const(255.0, np.float32))
    batched = b.op("Unsqueeze", scaled, b.const([0, 3], np.int64))
    b.nodes.append(helper.make_node("Expand", [batched, b.const([1, size, size, 3], np.int64)], [OUTPUT_NAME],
                                    name="three_channels"))
    graph = helper.make_graph(
        b.nodes, "dpmedtf_preprocess",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["height", "width"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, size, size, 3])],
        initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER,
                              doc_string=f"Radiograph preprocessing of dpmedtf: decoded pixels (H, W) → model input "
                                         f"(1, {size}, {size}, 3): antialiased bilinear resize as TensorFlow, min-max "
                                         "to 0…255, histogram equalisation, /255, three channels.")
    model.ir_version = 8  # onnxruntime ≥ 1.14 (and onnxruntime-node) read IR 8 with opset 17
    onnx.checker.check_model(model, full_check=True)
    return model


def describe(image_size: int) -> dict:
    """What ``metadata.json`` records about the graph under ``preprocessing.graph``."""
    return {"file": PREPROCESS_FILE, "input": INPUT_NAME, "input_dtype": "float32", "input_shape": ["height", "width"],
            "input_meaning": "decoded pixels: modality LUT applied, MONOCHROME1 inverted, as training's decoder gave "
                             "them (dpmedtf.release.preprocessing.decode_radiograph)",
            "output": OUTPUT_NAME, "output_shape": [1, int(image_size), int(image_size), 3], "opset": OPSET}
