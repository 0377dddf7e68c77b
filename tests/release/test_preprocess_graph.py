"""preprocess.onnx: decoded pixels → the model's input in any ONNX runtime, equal to training's input.

Checked in onnxruntime (Python) against dpmedtf's TensorFlow preprocessing on the real RG1_UNCR CR and
synthetic images, inside the released bundle (signed, summed, described in metadata.json), and from
Node.js with nothing but the DICOM file (examples/node).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import tensorflow as tf
from pydicom.data import get_testdata_file

from dpmedtf.cli import main
from dpmedtf.data import radiograph
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
from dpmedtf.release import onnx_model, preprocessing
from dpmedtf.release.layout import MODEL_FILE, PREPROCESS_FILE, SUMS_FILE
from dpmedtf.release.preprocess_graph import INPUT_NAME, OUTPUT_NAME, build_preprocess_graph

REAL_RADIOGRAPH = get_testdata_file("RG1_UNCR.dcm")
NODE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


def run_graph(proto: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    (image,) = onnx_model.session(proto.SerializeToString()).run([OUTPUT_NAME], {INPUT_NAME: pixels})
    return image


def training_input(path, size: int, dicom_decoder: str = "tensorflow-io") -> np.ndarray:
    return radiograph.to_model_input(radiograph.preprocess_file(path, size, dicom_decoder)).numpy()[None]


def test_the_graph_is_valid_onnx_at_the_models_opset_with_dynamic_height_and_width():
    proto = build_preprocess_graph(48)
    onnx.checker.check_model(proto, full_check=True)
    assert {entry.domain or "": entry.version for entry in proto.opset_import} == {"": onnx_model.OPSET}
    (source,), (target,) = proto.graph.input, proto.graph.output
    assert source.name == INPUT_NAME and [d.dim_param for d in source.type.tensor_type.shape.dim] == ["height", "width"]
    assert target.name == OUTPUT_NAME and [d.dim_value for d in target.type.tensor_type.shape.dim] == [1, 48, 48, 3]
    onnx_model.check_graph(proto, (INPUT_NAME,), (OUTPUT_NAME,))  # every op defined at the opset


@pytest.mark.parametrize("decoder,size", [("tensorflow-io", 32), ("tensorflow-io", 512), ("pydicom", 64)])
def test_on_the_real_cr_it_gives_trainings_input_to_the_bit(decoder, size):
    pixels = preprocessing.decode_radiograph(REAL_RADIOGRAPH, decoder)
    image = run_graph(build_preprocess_graph(size), pixels)
    expected = training_input(REAL_RADIOGRAPH, size, decoder)
    difference = np.abs(image - expected)
    # One grey level is the contract; the graph repeats TensorFlow's float32 steps, so nothing differs.
    assert difference.max() <= 1 / 255 and int((difference > 0).sum()) == 0, (difference.max() * 255,
                                                                                 int((difference > 0).sum()))


def test_on_synthetic_images_it_gives_trainings_input_to_the_bit(tmp_path):
    cohort = write_synthetic_cohort(tmp_path, SyntheticCohortSpec(patients=8, image_size=72, dicom_fraction=0.5,
                                                                  seed=2))["radiograph"]
    paths = sorted((tmp_path / "images").iterdir())
    assert {p.suffix for p in paths} == {".png", ".dcm"} and cohort.is_file()
    for size in (32, 64):
        proto = build_preprocess_graph(size)
        for path in paths:
            np.testing.assert_array_equal(run_graph(proto, preprocessing.decode_radiograph(path)),
                                          training_input(path, size), err_msg=f"{path} at {size}")


@pytest.mark.parametrize("shape", [(40, 33), (64, 64), (300, 41)])
def test_upsampling_equal_sizes_and_constant_images_match_tensorflow(shape):
    # Upsampling keeps the unscaled kernel; 64 → 64 is an identity; a constant image has no range to
    # stretch (divide_no_nan → 0) and one histogram bin (a zero denominator → all 0).
    size = 64
    rng = np.random.default_rng(sum(shape))
    for pixels in (rng.normal(1000, 300, shape).astype(np.float32), np.full(shape, 517.0, np.float32)):
        expected = radiograph.to_model_input(radiograph.preprocess(tf.constant(pixels), size)).numpy()[None]
        np.testing.assert_array_equal(run_graph(build_preprocess_graph(size), pixels), expected)


def test_the_bundle_carries_the_graph_summed_signed_and_described(bundle, keys):
    metadata = json.loads((bundle / "metadata.json").read_text())
    size = metadata["preprocessing"]["image_size"]
    graph = metadata["preprocessing"]["graph"]
    assert graph["file"] == PREPROCESS_FILE and (graph["input"], graph["output"]) == (INPUT_NAME, OUTPUT_NAME)
    assert graph["output_shape"] == [1, size, size, 3] == [1, *metadata["input"]["shape"][1:]]
    assert PREPROCESS_FILE in (bundle / SUMS_FILE).read_text()  # so SHA256SUMS and the signature cover it
    proto = onnx.load(bundle / PREPROCESS_FILE)
    assert onnx_model.metadata_of(proto)["image_size"] == str(size)
    assert onnx_model.metadata_of(proto)["model_version"] == metadata["model_version"]
    # decoded pixels → preprocess.onnx → model.onnx gives what dpmedtf predicts from the file.
    pixels = preprocessing.decode_radiograph(REAL_RADIOGRAPH, metadata["preprocessing"]["dicom_decoder"])
    image = run_graph(proto, pixels)
    model = onnx_model.session((bundle / MODEL_FILE).read_bytes())
    (from_graph,) = model.run([metadata["output"]["name"]], {metadata["input"]["name"]: image})
    (from_python,) = model.run([metadata["output"]["name"]],
                               {metadata["input"]["name"]: preprocessing.model_input(REAL_RADIOGRAPH, metadata)[None]})
    np.testing.assert_array_equal(from_graph, from_python)


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="Node.js is not installed")
def test_node_goes_from_the_dicom_alone_to_dpmedtf_predicts_probabilities(bundle, keys, tmp_path):
    out = tmp_path / "preds.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(bundle), REAL_RADIOGRAPH, "--out", str(out), "--public-key", str(keys / "publisher.pub")])
    assert exit_info.value.code == 0
    example = tmp_path / "node"
    shutil.copytree(NODE_EXAMPLE, example, ignore=shutil.ignore_patterns("node_modules"))
    environment = {"ONNXRUNTIME_NODE_INSTALL": "skip", "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=example, env=environment, check=True,
                   capture_output=True, timeout=600)
    result = subprocess.run(["node", "predict.mjs", str(bundle), REAL_RADIOGRAPH], cwd=example, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (node,) = json.loads(result.stdout)["rows"]
    python = pd.read_csv(out).iloc[0]
    assert node["input"] == REAL_RADIOGRAPH
    for name, probability in node["probabilities"].items():
        assert abs(probability - python[f"{name}_prob"]) <= 1e-4, name
        assert node["labels"][name] == python[f"{name}_label"], name
    # The example's own checker (what check.sh runs) agrees, and refuses a probability moved by 1e-3.
    (tmp_path / "node.json").write_text(result.stdout)
    compare = [sys.executable, str(example / "compare.py"), str(out), str(tmp_path / "node.json")]
    assert subprocess.run(compare, capture_output=True, text=True).returncode == 0
    moved = json.loads(result.stdout)
    first = moved["labels"][0]
    moved["rows"][0]["probabilities"][first] += 1e-3
    (tmp_path / "node.json").write_text(json.dumps(moved))
    assert subprocess.run(compare, capture_output=True, text=True).returncode == 1


def test_verify_runs_the_graph_and_refuses_one_that_is_not_the_training_preprocessing(bundle_copy, keys):
    """Re-summed and re-signed by the publisher, so only the semantic check can catch it."""
    from dpmedtf.release.bundle import write_sums
    from dpmedtf.release.signing import SIGNATURE_FILE, sign_bundle
    from dpmedtf.release.verify import verify_bundle

    size = json.loads((bundle_copy / "metadata.json").read_text())["preprocessing"]["image_size"]
    wrong = build_preprocess_graph(size)
    onnx_model.set_metadata(wrong, onnx_model.metadata_of(onnx.load(str(bundle_copy / PREPROCESS_FILE))))
    # The graph's last step divides by 255; make it 254, a plausible-looking mistake in a hand-made graph.
    divisor = next(node.input[1] for node in reversed(wrong.graph.node) if node.op_type == "Div")
    initializer = next(t for t in wrong.graph.initializer if t.name == divisor)
    assert float(onnx.numpy_helper.to_array(initializer)) == 255.0
    initializer.CopyFrom(onnx.numpy_helper.from_array(np.array(254.0, np.float32), divisor))
    (bundle_copy / PREPROCESS_FILE).write_bytes(wrong.SerializeToString())
    (bundle_copy / SUMS_FILE).unlink()
    (bundle_copy / SIGNATURE_FILE).unlink()
    write_sums(bundle_copy)
    sign_bundle(bundle_copy, keys / "publisher.pem")
    report = verify_bundle(bundle_copy, keys / "publisher.pub")
    assert not report.ok
    assert [f for f in report.failures if f.startswith(f"{PREPROCESS_FILE}: on a test image it does not give")]
