"""The pinned stack really works together, in one process: the foundation everything else stands on."""

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"
PINNED = ["tensorflow", "keras", "tensorflow-privacy", "tensorflow-io", "tf2onnx", "onnx", "onnxruntime",
          "numpy", "fairlearn", "scikit-learn", "pandas", "dp-accounting", "PyYAML", "typer", "rich",
          "pydicom", "pydicom-data", "nibabel", "pillow", "model-signing"]


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def test_installed_versions_are_the_locked_ones():
    pins = locked_versions()
    for name in PINNED:
        key = name.lower().replace("_", "-")
        assert key in pins, f"{name} missing from constraints.txt"
        assert metadata.version(name) == pins[key], f"{name}: installed {metadata.version(name)}, locked {pins[key]}"
    assert pins["tensorflow"] == "2.15.1" and pins["tensorflow-privacy"] == "0.9.0"
    assert pins["tensorflow-io"] == "0.36.0" and pins["tf2onnx"] == "1.17.0"
    assert pins["onnx"].startswith("1.17.") and int(pins["numpy"].split(".")[0]) < 2


def test_every_pinned_package_imports_and_runs_together(tmp_path):
    import dp_accounting  # noqa: F401
    import fairlearn
    import model_signing  # noqa: F401
    import nibabel  # noqa: F401
    import onnx
    import onnxruntime as ort
    import pandas as pd  # noqa: F401
    import PIL  # noqa: F401
    import pydicom
    import sklearn.metrics
    import tensorflow as tf
    import tensorflow_io as tfio
    import tensorflow_privacy  # noqa: F401
    import tf2onnx
    from fairlearn.metrics import MetricFrame
    from pydicom.data import get_testdata_file

    assert tf.__version__ == "2.15.1" and tf.keras.optimizers.legacy.Nadam  # Keras 2, not Keras 3

    # tensorflow-io's DICOM op on pydicom-data's real chest radiograph.
    path = get_testdata_file("RG1_UNCR.dcm")
    image = tfio.image.decode_dicom_image(tf.io.read_file(path), dtype=tf.uint16, on_error="strict")
    reference = pydicom.dcmread(path)
    assert image.shape == (1, reference.Rows, reference.Columns, 1) == (1, 1955, 1841, 1)
    assert int(tf.reduce_max(image)) > 0

    # tf2onnx conversion of a small conv net, run in onnxruntime.
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.layers.Input((16, 16, 3)),
        tf.keras.layers.Conv2D(4, 3, padding="same"),
        tf.keras.layers.GroupNormalization(2),
        tf.keras.layers.Activation("mish"),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(2, activation="sigmoid"),
    ])
    proto, _ = tf2onnx.convert.from_keras(
        model, input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")], opset=17)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    (onnx_out,) = session.run(None, {"image": x})
    np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=1e-5)

    # fairlearn MetricFrame, checked against a direct computation.
    y_true = np.array([0, 1, 1, 0, 1, 0])
    y_pred = np.array([0, 1, 0, 0, 1, 1])
    sex = np.array(["F", "F", "F", "M", "M", "M"])
    frame = MetricFrame(metrics=sklearn.metrics.accuracy_score, y_true=y_true, y_pred=y_pred, sensitive_features=sex)
    assert frame.by_group["F"] == pytest.approx(2 / 3) and frame.by_group["M"] == pytest.approx(2 / 3)
    assert fairlearn.__version__.startswith("0.15")
