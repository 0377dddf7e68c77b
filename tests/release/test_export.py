"""ONNX export: probabilities out, batch named, graph checked, parity with Keras on extreme inputs."""

import copy

import numpy as np
import onnx
import pytest
import tensorflow as tf
import tf2onnx

from dpmedtf.models import build_resnet9, convert_to_acs
from dpmedtf.release import export


@pytest.fixture(scope="module", params=["2d", "acs-3d"])
def model(request):
    tf.keras.utils.set_random_seed(1)
    network = build_resnet9((32, 32, 3), 8, activation="mish")
    if request.param == "acs-3d":
        network = convert_to_acs(network, (32, 32, 32, 3), num_outputs=1)
    return network


@pytest.fixture(scope="module")
def proto(model):
    return export.to_onnx(model)


def test_export_outputs_probabilities_with_a_dynamic_batch_named_batch(model, proto):
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["probabilities"]
    for value in (proto.graph.input[0], proto.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == export.OPSET
    onnx.checker.check_model(proto, full_check=True)

    x = np.random.default_rng(0).random((3, *model.input_shape[1:]), dtype=np.float32)
    (probabilities,) = export.session(proto.SerializeToString()).run(["probabilities"], {"image": x})
    np.testing.assert_allclose(probabilities, tf.sigmoid(model(x)).numpy(), atol=1e-4)
    assert probabilities.min() >= 0 and probabilities.max() <= 1


def test_parity_at_batch_1_and_5_including_extreme_inputs(model, proto):
    report = export.check_parity(model, proto, [0.5] * model.output_shape[-1])
    assert {(c.name, c.batch_size) for c in report.cases} == {
        (name, b) for b in (1, 5) for name in ("uniform", "zeros", "ones", "large")}
    assert report.passed and report.max_abs_difference <= 1e-4
    assert report.to_json_dict()["max_abs_difference"] == report.max_abs_difference


def test_parity_detects_a_model_that_is_not_the_exported_one(model, proto):
    other = tf.keras.models.clone_model(model)  # same architecture, fresh weights
    report = export.check_parity(other, proto, [0.5] * model.output_shape[-1])
    assert not report.passed and report.max_abs_difference > 1e-3


def test_an_op_tf2onnx_cannot_convert_is_refused_by_name():
    spec = tf.TensorSpec((None, 4), tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def unsupported(image):
        return {"probabilities": tf.math.igamma(image, image)}

    proto, _ = tf2onnx.convert.from_function(unsupported, input_signature=[spec], opset=export.OPSET)
    with pytest.raises(export.ExportError, match="unconverted.*Igamma"):
        export.check_graph(proto)


def test_metadata_props_are_replaced_not_duplicated(proto):
    proto = copy.deepcopy(proto)
    export.set_metadata(proto, {"epsilon": "1.0", "labels": "[]"})
    export.set_metadata(proto, {"epsilon": "2.0"})
    assert export.metadata_of(proto) == {"epsilon": "2.0", "labels": "[]"}
    assert [p.key for p in proto.metadata_props].count("epsilon") == 1
