"""Release: ONNX export with parity, privacy certificate, signed bundle, verification and prediction.

``dpmedtf.release.load(path)`` is the consumer's entry point: a verified onnxruntime session plus the
bundle's metadata (see ``predict.LoadedBundle``). It is imported lazily so that light commands
(``dpmedtf keygen``) do not pay for TensorFlow.
"""

__all__ = ["load"]


def __getattr__(name):
    if name == "load":
        from dpmedtf.release.predict import load

        return load
    raise AttributeError(f"module 'dpmedtf.release' has no attribute {name!r}")
