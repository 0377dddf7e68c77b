"""dpmedtf.make_private: DP-SGD for a user's own Keras model through compile + fit.

Claims are checked against independent definitions: ε against dp_accounting composed by hand for the
steps actually taken, the clipped sum against a loop over single examples, and one whole fit step
against the DP-SGD update written out from its definition.
"""

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

import dpmedtf
from dpmedtf.data.sampling import PoissonSampler
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.release.certificate import build_certificate
from dpmedtf.resources import schema_problems
from dpmedtf.training.make_private import PrivateTrainingError
from tests.privacy.test_clipping_layers import Scale, own_table, scale_rule_plain  # noqa: F401 (a fixture)

L = tf.keras.layers
N, B = 48, 8


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((N, 12, 12, 2), dtype=np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0.5).astype(np.float32)[:, None]
    return x, y


def user_cnn(seed=0):
    """Not ResNet9: Conv2D → LayerNormalization → Conv2D → pooling → Dense."""
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([L.Input((12, 12, 2)), L.Conv2D(4, 3, activation="relu"), L.LayerNormalization(),
                                L.Conv2D(6, 3, strides=2), L.GlobalAveragePooling2D(), L.Dense(1)], name="user_cnn")


def bce():
    return tf.keras.losses.BinaryCrossentropy(from_logits=True)


def independent_epsilon(steps, sigma, delta):
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(B / N, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


class StopAfter(tf.keras.callbacks.Callback):
    """A user's own callback: stops after ``epochs`` epochs (EarlyStopping may stop at any time)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs, self.seen = epochs, 0

    def on_epoch_end(self, epoch, logs=None):
        self.seen += 1
        self.model.stop_training = self.seen >= self.epochs


def test_fit_with_early_stopping_records_exactly_the_steps_taken_and_their_epsilon(tmp_path):
    x, y = data()
    model = dpmedtf.make_private(user_cnn(), dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3,
                                 noise_multiplier=1.1, epochs=10, accountant="rdp")
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss=bce(), metrics=["accuracy"])
    early = tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops at epoch 2
    history = model.fit(x, y, validation_data=(x[:16], y[:16]), verbose=0,
                        callbacks=[early, tf.keras.callbacks.TensorBoard(str(tmp_path / "tb"))])
    epochs_run = len(history.history["loss"])
    assert epochs_run == 2 < 10 and "val_accuracy" in history.history
    steps = epochs_run * round(N / B)
    ledger = model.privacy_ledger()
    assert ledger.steps == steps and ledger.segments[0].sampling_rate == B / N
    sigma = ledger.segments[0].noise_multiplier
    assert sigma >= 1.1 and np.float32(sigma * 1.0) >= 1.1  # σ·C as applied: rounded up to float32
    epsilon, delta = model.privacy_spent()
    assert delta == 1e-3 and epsilon == pytest.approx(independent_epsilon(steps, sigma, 1e-3), rel=1e-9)
    # The ledger is a release input: saved, it makes a certificate that passes the schema.
    ledger.save(tmp_path / "ledger.json")
    certificate = build_certificate(dpmedtf.Ledger.load(tmp_path / "ledger.json"))
    assert schema_problems(certificate, "privacy_certificate.schema.json") == []
    assert certificate["steps"] == steps and certificate["unit_of_privacy"] == "example"
    assert certificate["randomness"]["secret"] is True


def test_fit_continues_where_it_stopped_and_never_passes_the_planned_steps():
    x, y = data(1)
    model = dpmedtf.make_private(user_cnn(1), dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3,
                                 noise_multiplier=2.0, steps=9, accountant="rdp")
    model.compile(optimizer="sgd", loss=bce())
    model.fit(x, y, verbose=0, callbacks=[StopAfter(1)])
    assert model.privacy_ledger().steps == 6  # one epoch of N/B steps
    model.fit(x, y, verbose=0)
    assert model.privacy_ledger().steps == 9  # the plan ends inside the second epoch
    with pytest.raises(PrivateTrainingError, match="taken all 9 planned DP-SGD steps"):
        model.fit(x, y, verbose=0)


def test_one_fit_step_is_the_dp_sgd_update_by_its_definition():
    """With a known (experiment) key: one step of SGD(lr=1) moves the weights by exactly
    −(Σ over the Poisson batch of clip(∇ℓᵢ, C) + N(0, σ²C²) from the step's seeds) / B."""
    x, y = data(2)
    clip, sigma = 0.05, 0.5
    network = user_cnn(2)
    before = [v.numpy().astype(np.float64) for v in network.trainable_variables]
    model = dpmedtf.make_private(network, dataset_size=N, batch_size=B, clip_norm=clip, delta=1e-3,
                                 noise_multiplier=sigma, steps=1, accountant="rdp", experiment_seed=11)
    model.compile(optimizer=tf.keras.optimizers.SGD(1.0), loss=bce())
    model.fit(x, y, verbose=0)
    secret = RunSecret.from_experiment_seed(11)
    batch = PoissonSampler(N, B, 1, secret).indices(0)
    assert len(batch) > 1
    reference = user_cnn(2)  # same initial weights, never trained
    clipped = [np.zeros_like(w) for w in before]
    for i in batch:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(bce()(y[i:i + 1], reference(x[i:i + 1], training=True)))
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, reference.trainable_variables)]
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        assert norm > clip  # every example is clipped: the bound is what is checked
        clipped = [c + g * min(1.0, clip / norm) for c, g in zip(clipped, grads)]
    stddev = model.privacy_ledger().segments[0].noise_multiplier * clip
    seeds = secret.noise_seeds(0, len(before))
    noise = [tf.random.stateless_normal(w.shape, seeds[k], stddev=np.float32(stddev)).numpy()
             for k, w in enumerate(before)]
    for w0, w1, c, n in zip(before, model.trainable_variables, clipped, noise):
        np.testing.assert_allclose(w0 - w1.numpy(), (c + n) / B, rtol=2e-4, atol=2e-6)


def test_the_user_optimizer_and_a_registered_layer_of_their_own_train(own_table):
    x, y = data(3)

    def scale_model():
        return tf.keras.Sequential([L.Input((12, 12, 2)), L.Flatten(), Scale(name="scale"), L.Dense(1)])

    with pytest.raises(dpmedtf.DpmedtfError, match=r"'scale' \(Scale\).*register_layer"):
        dpmedtf.make_private(scale_model(), dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3,
                             noise_multiplier=1.0, steps=2)
    dpmedtf.register_layer(Scale, scale_rule_plain)
    model = dpmedtf.make_private(scale_model(), dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3,
                                 noise_multiplier=1.0, steps=2, accountant="rdp")
    model.compile(optimizer=tf.keras.optimizers.RMSprop(1e-2), loss=bce())
    before = model.get_layer("scale").w.numpy().copy()
    model.fit(x, y, verbose=0)
    assert model.privacy_ledger().steps == 2 and not np.array_equal(before, model.get_layer("scale").w.numpy())


@pytest.mark.parametrize("mistake, message", [
    (dict(unit="patient"), "patient-level privacy is in `dpmedtf train`"),
    (dict(steps=None), "exactly one of epochs= or steps="),
    (dict(noise_multiplier=None), "exactly one of target_epsilon="),
    (dict(noise_multiplier=0.0), "σ = 0 is no privacy"),
    (dict(delta=0.5), "delta 0.5 ≥ 1/N"),
    (dict(batch_size=N + 1), "exceeds dataset size"),
    (dict(engine="jacobian"), "no clipping engine 'jacobian'"),
])
def test_make_private_refuses_what_would_misstate_the_guarantee(mistake, message):
    settings = dict(dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3, noise_multiplier=1.0, steps=4)
    with pytest.raises(dpmedtf.DpmedtfError, match=message):
        dpmedtf.make_private(user_cnn(), **{**settings, **mistake})


def test_fit_refuses_data_and_arguments_that_break_the_plan():
    x, y = data()
    model = dpmedtf.make_private(user_cnn(), dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3,
                                 noise_multiplier=1.0, steps=4, accountant="rdp")
    with pytest.raises(PrivateTrainingError, match="compile model 'user_cnn' with one loss"):
        model.fit(x, y)
    model.compile(optimizer="sgd", loss=bce())
    with pytest.raises(PrivateTrainingError, match=f"planned for dataset_size={N} examples but fit got {N - 1}"):
        model.fit(x[1:], y[1:])
    with pytest.raises(PrivateTrainingError, match="class_weight"):
        model.fit(x, y, class_weight={0: 1.0, 1: 3.0})
    with pytest.raises(PrivateTrainingError, match="not a tf.data.Dataset"):
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    with pytest.raises(PrivateTrainingError, match="goes past the 4 planned steps"):
        model.fit(x, y, epochs=3)
    assert model.privacy_ledger().steps == 0 and model.privacy_spent()[0] == 0.0
    unbuilt = tf.keras.Sequential([L.Dense(1)])
    with pytest.raises(PrivateTrainingError, match="is not built"):
        dpmedtf.make_private(unbuilt, dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3, noise_multiplier=1.0,
                             steps=4)


def test_the_saved_model_holds_no_secret_or_dp_state(tmp_path):
    x, y = data()
    model = dpmedtf.make_private(user_cnn(), dataset_size=N, batch_size=B, clip_norm=1.0, delta=1e-3,
                                 noise_multiplier=1.0, steps=2, accountant="rdp", experiment_seed=5)
    model.compile(optimizer="adam", loss=bce())
    model.fit(x, y, verbose=0, callbacks=[tf.keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"))])
    saved = tf.keras.models.load_model(tmp_path / "best.keras")
    assert [v.name for v in saved.weights] == [v.name for v in model.weights]
    assert not any("dp_steps" in v.name or "secret" in v.name for v in model.weights)
    np.testing.assert_allclose(saved.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0), rtol=1e-6)
