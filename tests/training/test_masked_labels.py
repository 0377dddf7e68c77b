"""An ignored label entry (CheXpert −1 under ``uncertain: ignore``) changes nothing: not the per-example loss,
not any clipped gradient (either engine), not a class count, not a metric. Each is checked against an
independent definition — a loop over single examples that simply leaves the entry out — and against the
same data where the entry holds the other ignored value (blank under ``blank: ignore``); and each check is
shown able to fail: the entry read as 1 or 0 does change the result."""

import functools

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from dpmedtf.config import LabelsConfig, config_from_mapping
from dpmedtf.data import label_sets
from dpmedtf.data.manifests import load_manifest
from dpmedtf.evaluation.bootstrap import bootstrap_auroc
from dpmedtf.evaluation.fairness import fairness_rows
from dpmedtf.models import build_resnet9
from dpmedtf.privacy.class_counts import release_prevalences
from dpmedtf.privacy.engines import get_engine
from dpmedtf.training.losses import inverse_frequency_weights, weighted_bce_per_example

FINDINGS = label_sets.CHEXPERT_COLUMNS[:4]
POSITIVE = tf.constant([2.0, 0.5, 1.5, 3.0])
NEGATIVE = tf.constant([0.7, 1.2, 0.9, 0.6])
LOSS = functools.partial(weighted_bce_per_example, positive_weight=POSITIVE, negative_weight=NEGATIVE)


def manifest(tmp_path, entry: str, name: str) -> pd.DataFrame:
    """Eight rows in the CheXpert convention; row 2's third finding holds ``entry``."""
    rng = np.random.default_rng(0)
    values = rng.choice(["1.0", "0.0"], size=(8, len(FINDINGS))).astype(object)
    values[2, 2] = entry
    frame = pd.DataFrame(values, columns=list(FINDINGS))
    frame.insert(0, "image_path", [f"img{i}.png" for i in range(8)])
    frame.insert(1, "patient_id", [f"P{i}" for i in range(8)])
    frame.insert(2, "sex", ["F", "M"] * 4)
    frame.insert(3, "age", [30 + 5 * i for i in range(8)])
    frame["split"] = ["train"] * 8
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def label_set(uncertain="ignore", blank="ignore"):
    config = config_from_mapping({"findings": [{"name": label_sets.snake_case(c), "column": c, "rule": "chexpert"}
                                               for c in FINDINGS], "uncertain": uncertain, "blank": blank},
                                 cls=LabelsConfig)
    return label_sets.from_config(config, "radiograph")


def loaded_labels(tmp_path, entry, name, **policies):
    return load_manifest(manifest(tmp_path, entry, name), "radiograph", label_set=label_set(**policies)).labels()


def test_the_manifest_reads_uncertain_and_blank_by_their_policies(tmp_path):
    uncertain = loaded_labels(tmp_path, "-1.0", "a.csv")
    blank = loaded_labels(tmp_path, "", "b.csv")
    assert np.isnan(uncertain[2, 2]) and np.isnan(blank[2, 2])
    np.testing.assert_array_equal(uncertain, blank)  # NaN == NaN here: the same labels
    assert loaded_labels(tmp_path, "-1.0", "c.csv", uncertain="ones")[2, 2] == 1.0
    assert loaded_labels(tmp_path, "-1.0", "d.csv", uncertain="zeros")[2, 2] == 0.0
    assert loaded_labels(tmp_path, "", "e.csv", blank="zeros")[2, 2] == 0.0


def tiny_model():
    tf.keras.utils.set_random_seed(3)
    return build_resnet9((32, 32, 3), len(FINDINGS), groups=4, widths=(8, 16, 16, 32))


def loop_without_the_entry(model, images, labels, clip):
    """Independent definition: per example, the weighted BCE over the observed labels only (the ignored entry
    is simply not in the sum), divided by the number of labels; its gradient clipped by hand; summed."""
    total, losses = None, []
    for i in range(len(labels)):
        keep = np.flatnonzero(np.isfinite(labels[i]))
        with tf.GradientTape() as tape:
            logits = tf.gather(model(images[i:i + 1], training=True)[0], keep)
            y = tf.constant(labels[i, keep], tf.float32)
            weights = y * tf.gather(POSITIVE, keep) + (1 - y) * tf.gather(NEGATIVE, keep)
            terms = weights * tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf.reduce_sum(terms) / labels.shape[1]
        grads = tape.gradient(loss, model.trainable_variables)
        scale = min(1.0, clip / float(tf.linalg.global_norm(grads)))
        total = [g * scale for g in grads] if total is None else [a + g * scale for a, g in zip(total, grads)]
        losses.append(float(loss))
    return total, np.array(losses)


@pytest.mark.parametrize("engine", ["fast", "vectorized"])
def test_an_ignored_entry_changes_neither_loss_nor_clipped_gradient(tmp_path, engine):
    model = tiny_model()
    images = tf.constant(np.random.default_rng(1).random((8, 32, 32, 3), dtype=np.float32))
    labels = loaded_labels(tmp_path, "-1.0", "a.csv")
    clip = 0.5

    def run(y):
        sums, losses = get_engine(engine).clipped_gradient_sum(model, images, lambda out: LOSS(tf.constant(y), out), clip)
        return [tf.convert_to_tensor(s).numpy() for s in sums], np.asarray(losses)

    got_sums, got_losses = run(labels)
    expected_sums, expected_losses = loop_without_the_entry(model, images, labels, clip)
    np.testing.assert_allclose(got_losses, expected_losses, rtol=1e-5, atol=1e-6)
    for got, expected in zip(got_sums, expected_sums):
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5 * max(1.0, float(np.abs(expected).max())))

    blank_sums, blank_losses = run(loaded_labels(tmp_path, "", "b.csv"))  # the other ignored value
    np.testing.assert_array_equal(blank_losses, got_losses)
    for a, b in zip(blank_sums, got_sums):
        np.testing.assert_array_equal(a, b)

    for value in ("ones", "zeros"):  # the same entry read as a label does change the loss: the check can fail
        read = loaded_labels(tmp_path, "-1.0", f"{value}.csv", uncertain=value)
        _, losses = run(read)
        assert not np.isclose(losses[2], got_losses[2]) and np.allclose(np.delete(losses, 2), np.delete(got_losses, 2))


def test_an_ignored_entry_counts_in_no_class_weight_or_count(tmp_path):
    labels = loaded_labels(tmp_path, "-1.0", "a.csv")
    without_row = np.delete(labels[:, 2], 2)  # finding 3 counted without row 2, by hand
    positive, negative = inverse_frequency_weights(labels)
    n, pos = len(without_row), without_row.sum()
    assert positive[2] == pytest.approx(n / (2 * pos)) and negative[2] == pytest.approx(n / (2 * (n - pos)))
    release = release_prevalences(labels, None, noise_std=1e-9, noise=np.zeros(2 * len(FINDINGS)), observed_counts=True)
    assert release.prevalences[2] == pytest.approx(pos / n)
    with pytest.raises(ValueError, match="observed_counts"):
        release_prevalences(labels, None, 1.0, np.zeros(len(FINDINGS)))


def predictions(labels, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"sex": ["F", "M"] * (len(labels) // 2), "age_group": ["30-59"] * len(labels)})
    for j, name in enumerate(FINDINGS):
        frame[f"{name}_true"] = pd.Series(labels[:, j]).astype("Int64")
        frame[f"{name}_prob"] = rng.random(len(labels))  # uninformative scores: any filled-in entry moves the AUROC
    return frame


def test_an_ignored_entry_changes_no_metric(tmp_path):
    labels = np.tile(loaded_labels(tmp_path, "-1.0", "a.csv"), (3, 1))  # 24 rows, three ignored entries
    frame = predictions(labels)
    y = frame[[f"{n}_true" for n in FINDINGS]].to_numpy(float, na_value=np.nan)
    p = frame[[f"{n}_prob" for n in FINDINGS]].to_numpy()
    intervals, _, _ = bootstrap_auroc(y, p, redraws=50)
    keep = np.isfinite(y[:, 2])
    assert intervals[2].estimate == pytest.approx(roc_auc_score(y[keep, 2], p[keep, 2]))
    rows = fairness_rows(frame, {n: 0.5 for n in FINDINGS}, list(FINDINGS), redraws=20, attributes=("sex",))
    finding_rows = {r["group"]: r for r in rows if r["finding"] == FINDINGS[2]}
    assert sum(r["n"] for r in finding_rows.values()) == keep.sum() == len(y) - 3
    for value in (0.0, 1.0):  # filled in, the entry would move the AUROC: the comparison can fail
        filled = y.copy()
        filled[~keep, 2] = value
        assert bootstrap_auroc(filled, p, redraws=10)[0][2].estimate != pytest.approx(intervals[2].estimate)
