"""From Python: your own Keras CNN, trained with DP-SGD by ``dpmedtf.make_private`` + ``fit``, then
evaluated, certified and released as a signed bundle that ``dpmedtf verify`` and ``dpmedtf predict`` accept.

    .venv/bin/python examples/keras_api.py --out runs/keras_api

It runs on dpmedtf's SYNTHETIC demo cohort (generated images, not patients), preprocessed as
``dpmedtf train`` would, so the bundle can state the preprocessing that consumers must apply. With
your own data, start from your own arrays: everything from "the user's part" on is unchanged.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dpmedtf  # noqa: E402
from dpmedtf.data.cache import PreprocessSpec, prepare  # noqa: E402
from dpmedtf.data.manifests import load_manifest  # noqa: E402
from dpmedtf.data.pipeline import split_rows  # noqa: E402
from dpmedtf.data.radiograph import to_model_input  # noqa: E402
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort  # noqa: E402
from dpmedtf.evaluation.evaluate import evaluate  # noqa: E402
from dpmedtf.release.bundle import build_bundle, load_candidate  # noqa: E402
from dpmedtf.release.policy import load_policy  # noqa: E402
from dpmedtf.release.signing import generate_keypair  # noqa: E402
from dpmedtf.release.verify import verify_bundle  # noqa: E402
from dpmedtf.training.make_private import save_trained_model  # noqa: E402


def arrays(prepared, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images as the model takes them, labels) of one split."""
    rows = split_rows(prepared, split)
    images = to_model_input(np.asarray(prepared.array[rows])).numpy()
    return images, prepared.cohort.labels(prepared.cohort.frame.loc[rows])


def my_cnn(image_size: int, labels: int) -> tf.keras.Model:
    """The user's own network: nothing dpmedtf-specific, only layers the fast engine clips."""
    layers = tf.keras.layers
    inputs = tf.keras.Input((image_size, image_size, 3))
    x = layers.Conv2D(16, 3, strides=2, activation="relu")(inputs)
    x = layers.GroupNormalization(4)(x)
    x = layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = layers.LayerNormalization()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, layers.Dense(labels)(x), name="my_cnn")  # logits


def main(out: Path, *, patients: int = 160, image_size: int = 32, epochs: float = 8.0,
         target_epsilon: float = 8.0, bootstrap: int = 200) -> Path:
    out = Path(out)
    cohort_dir = out / "cohort"
    if not (cohort_dir / "radiographs.csv").exists():
        write_synthetic_cohort(cohort_dir, SyntheticCohortSpec(patients=patients, image_size=64, seed=0))
    cohort = load_manifest(cohort_dir / "radiographs.csv", "radiograph")
    prepared = prepare(cohort, PreprocessSpec("radiograph", image_size=image_size), out / "cache")
    x, y = arrays(prepared, "train")
    validation = arrays(prepared, "validation")
    images_per_patient = int(cohort.frame.loc[split_rows(prepared, "train")].groupby("patient_id").size().max())

    # --- the user's part: a Keras model, made private, compiled and fitted as usual -----------------
    tf.keras.utils.set_random_seed(0)
    model = dpmedtf.make_private(my_cnn(image_size, y.shape[1]), dataset_size=len(x), batch_size=32, clip_norm=1.0,
                                 delta=1.0 / (10 * len(x)), target_epsilon=target_epsilon, epochs=epochs,
                                 max_examples_per_person=images_per_patient)
    model.compile(optimizer=tf.keras.optimizers.Adam(2e-3),
                  loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[tf.keras.metrics.AUC(multi_label=True, from_logits=True, name="auroc")])
    model.fit(x, y, validation_data=validation, verbose=2,
              callbacks=[tf.keras.callbacks.EarlyStopping(monitor="val_auroc", mode="max", patience=3)])
    epsilon, delta = model.privacy_spent()
    print(f"DP-SGD: {model.privacy_ledger().steps} steps, ε = {epsilon:.3f} at δ = {delta:.2g}")

    # --- certified release: the ledger becomes the bundle's privacy certificate ---------------------
    trained = save_trained_model(model, out / "model", preprocessing=prepared.spec.as_dict(), synthetic_data=True)
    evaluate(model, prepared, trained.evaluation, redraws=bootstrap)
    key = out / "keys" / "signing.pem"
    if not key.exists():
        generate_keypair(key, key.with_suffix(".pub"))
    bundle = build_bundle(load_candidate(trained.root), out / "bundle", load_policy(), key,
                          intended_use="example of dpmedtf.make_private on SYNTHETIC data; not for clinical use",
                          override_reason="SYNTHETIC example data: the cohort is generated, so its fairness and "
                                          "accuracy figures say nothing about patients",
                          job_name="keras_api example")
    report = verify_bundle(bundle, key.with_suffix(".pub"))
    print(f"bundle {bundle}: {'verified' if report.ok else 'FAILED verification'}")
    return bundle


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/keras_api"))
    parser.add_argument("--epochs", type=float, default=8.0)
    main(parser.parse_args().out, epochs=parser.parse_args().epochs)
