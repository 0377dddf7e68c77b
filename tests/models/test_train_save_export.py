"""Both models train a few steps, survive Keras and SavedModel round trips, and run in onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
import tf2onnx

from dpmedtf.models import build_resnet9, convert_to_acs, load_model, save_model


def trained(model, x, y, steps=3):
    model.compile(optimizer=tf.keras.optimizers.legacy.Nadam(5e-4),
                  loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=4, epochs=steps, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed), "every trainable weight should receive a gradient update"
    return model


@pytest.fixture(scope="module")
def models():
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model_2d = build_resnet9((32, 32, 3), 8)
    trained(model_2d, rng.random((8, 32, 32, 3), dtype=np.float32), rng.integers(0, 2, (8, 8)).astype(np.float32))
    model_3d = convert_to_acs(model_2d, (32, 32, 32, 1 * 3), num_outputs=1)
    trained(model_3d, rng.random((4, 32, 32, 32, 3), dtype=np.float32), rng.integers(0, 2, (4, 1)).astype(np.float32),
            steps=2)
    return {"2d": model_2d, "3d": model_3d}


@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_save_and_reload_give_identical_outputs(models, tmp_path, kind, fmt):
    model = models[kind]
    path = tmp_path / ("model.keras" if fmt == "keras" else "savedmodel")
    save_model(model, path)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, path)
    reloaded = load_model(path)
    x = np.random.default_rng(1).random((2, *model.input_shape[1:]), dtype=np.float32)
    np.testing.assert_array_equal(reloaded(x).numpy(), model(x).numpy())
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in model.layers]


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_tf2onnx_conversion_runs_in_onnxruntime(models, kind):
    model = models[kind]
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=[spec], opset=17)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((3, *model.input_shape[1:]), dtype=np.float32)
    (onnx_logits,) = session.run(None, {"image": x})
    assert np.max(np.abs(onnx_logits - model(x).numpy())) <= 1e-4
