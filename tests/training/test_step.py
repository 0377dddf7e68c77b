"""DP-SGD mechanics checked against brute force: clipping, summing across chunks, noise, scaling."""

import numpy as np
import pytest
import tensorflow as tf
import functools

from dpmedtf.models import build_resnet9
from dpmedtf.privacy.engines import vectorized_clipped_gradient_sum
from dpmedtf.privacy.mechanism import DpSgdMechanism
from dpmedtf.privacy.noise import noised_mean
from dpmedtf.privacy.randomness import RunSecret, effective_noise_multiplier, noise_stddev_float32
from dpmedtf.training.losses import weighted_bce_per_example
from dpmedtf.training.step import GradientStep, StepModel

ONES = tf.ones(4)
SECRET = RunSecret.from_experiment_seed(0)
UNWEIGHTED_BCE = functools.partial(weighted_bce_per_example, positive_weight=ONES, negative_weight=ONES)


def step_model(network, optimizer, engine, clip=1.0, sigma=1.0, expected_batch=10, max_physical_batch=32,
               jit_compile=False):
    """The trainer's step model; ``engine`` None is the non-private step."""
    step = gradient_step(engine, clip, sigma, expected_batch, max_physical_batch, jit_compile)
    return StepModel(network, step=step, optimizer=optimizer, per_example_loss=UNWEIGHTED_BCE, secret=SECRET)


def gradient_step(engine, clip=1.0, sigma=1.0, expected_batch=10, max_physical_batch=32, jit_compile=False):
    mechanism = None if engine is None else DpSgdMechanism(
        dataset_size=100, expected_batch_size=expected_batch, clip_norm=clip, noise_multiplier=sigma, delta=1e-5,
        accountant="rdp")
    return GradientStep(mechanism=mechanism, engine=engine or "fast", max_physical_batch=max_physical_batch,
                        jit_compile=jit_compile)


def seeds(model, dp):
    """What the input pipeline hands replica 0 of a DP step: one 128-bit noise seed per variable."""
    return {"noise_seeds": SECRET.noise_seeds(0, len(model.trainable_variables))} if dp else {}


def tiny_model(seed=0):
    tf.keras.utils.set_random_seed(seed)
    return build_resnet9((32, 32, 3), 4, groups=4, widths=(8, 16, 16, 32))


def batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.random((n, 32, 32, 3), dtype=np.float32)),
            tf.constant(rng.integers(0, 2, (n, 4)).astype(np.float32)))


def brute_force_clipped_sum(model, images, labels, clip):
    total, norms = None, []
    for i in range(int(images.shape[0])):
        with tf.GradientTape() as tape:
            loss = weighted_bce_per_example(labels[i:i + 1], model(images[i:i + 1], training=True), ONES, ONES)[0]
        grads = tape.gradient(loss, model.trainable_variables)
        norm = float(tf.linalg.global_norm(grads))
        norms.append(norm)
        clipped = [g * min(1.0, clip / norm) for g in grads]
        total = clipped if total is None else [a + b for a, b in zip(total, clipped)]
    return total, norms


def engine_clipped_sum(model, images, labels, clip):
    return vectorized_clipped_gradient_sum(model, images, lambda logits: UNWEIGHTED_BCE(labels, logits), clip)[0]


@pytest.mark.parametrize("clip", [0.05, 8.0, 1e4])  # all clipped, some clipped, none clipped
def test_clipped_sum_equals_a_brute_force_loop_over_single_examples(clip):
    model = tiny_model()
    images, labels = batch(6)
    expected, norms = brute_force_clipped_sum(model, images, labels, clip)
    got = engine_clipped_sum(model, images, labels, clip)
    for g, e in zip(got, expected):
        # Relative to the tensor's size: float32 sums in another order differ in the last digits.
        assert float(tf.norm(g - e) / tf.norm(e)) < 1e-5
    clipped = sum(norm > clip for norm in norms)
    assert clipped == {0.05: 6, 8.0: 4, 1e4: 0}[clip]  # per-example norms here are 6.8 … 8.9


def test_every_per_example_contribution_has_norm_at_most_c():
    model = tiny_model(1)
    images, labels = batch(8, seed=1)
    clip = 0.1
    _, norms = brute_force_clipped_sum(model, images, labels, clip)
    assert min(norms) > clip  # every example needs clipping here, so the bound is active
    for i in range(8):
        single = engine_clipped_sum(model, images[i:i + 1], labels[i:i + 1], clip)
        assert float(tf.linalg.global_norm(single)) == pytest.approx(clip, rel=1e-4)
    total = engine_clipped_sum(model, images, labels, clip)
    assert float(tf.linalg.global_norm(total)) <= 8 * clip * (1 + 1e-5)


def test_noise_standard_deviation_is_sigma_times_c():
    sigma, clip, expected_batch = 1.3, 1.5, 16.0
    zeros = [tf.zeros((200_000,)), tf.zeros((300, 300))]
    key = RunSecret.fresh()
    draws = noised_mean(zeros, sigma * clip, expected_batch, key.noise_seeds(0, 2))
    for draw in draws:
        values = draw.numpy().ravel() * expected_batch  # undo the 1/B scaling: the noise on the sum
        assert values.std() == pytest.approx(sigma * clip, rel=0.05)
        assert abs(values.mean()) < 0.05 * sigma * clip
    next_step = noised_mean(zeros, sigma * clip, expected_batch, key.noise_seeds(1, 2))
    assert not np.array_equal(next_step[0].numpy(), draws[0].numpy())  # fresh noise every step
    other_key = noised_mean(zeros, sigma * clip, expected_batch, RunSecret.fresh().noise_seeds(0, 2))
    assert not np.array_equal(other_key[0].numpy(), draws[0].numpy())  # the key, not the step alone, decides
    assert not np.array_equal(draws[0].numpy().ravel()[:1000], draws[1].numpy().ravel()[:1000])  # per-variable streams
    same = noised_mean(zeros, sigma * clip, expected_batch, RunSecret(key.key).noise_seeds(0, 2))
    np.testing.assert_array_equal(same[0].numpy(), draws[0].numpy())  # a resumed step redraws its own noise


@pytest.mark.parametrize("engine", ["fast", "vectorized", None])  # None: the non-private step
@pytest.mark.parametrize("graph", [True, False])
def test_one_logical_step_over_two_chunks_is_the_clipped_sum_over_expected_b(engine, graph):
    """The trainer's step with noise 0 and plain SGD, eagerly and as Keras fit runs it (graph), on 7
    examples in physical chunks of at most 4: DP updates by −lr·(Σ clipped)/B over both chunks;
    non-private by −lr·(mean gradient). A large lr keeps the weight differences well above float32
    rounding of the weights themselves."""
    lr = 1000.0
    dp = engine is not None
    model = tiny_model(2)
    images, labels = batch(7, seed=2)
    clip, expected_b = 0.2, 10
    if dp:
        expected, _ = brute_force_clipped_sum(model, images, labels, clip)
        expected = [e / expected_b for e in expected]
    else:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(weighted_bce_per_example(labels, model(images, training=True), ONES, ONES))
        expected = tape.gradient(loss, model.trainable_variables)
    optimizer = tf.keras.optimizers.legacy.SGD(lr)
    before = [v.numpy().copy() for v in model.trainable_variables]
    stepper = step_model(model, optimizer, engine, clip, 0.0, expected_b, max_physical_batch=4)
    train_step = tf.function(stepper.train_step) if graph else stepper.train_step
    train_step({"images": images, "labels": labels, "step": tf.constant(0, tf.int64), **seeds(model, dp)})
    for b, v, e in zip(before, model.trainable_variables, expected):
        assert float(np.linalg.norm((b - v.numpy()) / lr - e.numpy()) / np.linalg.norm(e.numpy())) < 1e-4
    assert int(optimizer.iterations) == 1  # one update for the step
    with pytest.raises(tf.errors.InvalidArgumentError, match="input step is not the optimizer step"):  # a shard of another step
        train_step({"images": images, "labels": labels, "step": tf.constant(0, tf.int64), **seeds(model, dp)})


@pytest.mark.parametrize("engine", ["fast", "vectorized"])
def test_an_empty_poisson_step_still_adds_noise(engine):
    model = tiny_model(3)
    before = [v.numpy().copy() for v in model.trainable_variables]
    stepper = step_model(model, tf.keras.optimizers.legacy.SGD(1.0), engine)
    tf.function(stepper.train_step)({"images": tf.zeros((0, 32, 32, 3)), "labels": tf.zeros((0, 4)),
                                     "step": tf.constant(0, tf.int64), **seeds(model, True)})
    update = np.concatenate([(b - v.numpy()).ravel() for b, v in zip(before, model.trainable_variables)])
    assert update.std() == pytest.approx(1.0 / 10, rel=0.05)  # pure noise N(0, (σC)²) / B


def test_noise_streams_use_the_whole_key_not_an_int32_fold():
    """The old derivation folded the variable index in with stateless_fold_in on a Python int, which
    keeps only a random int32 of the (key, step) seed: steps whose int32 fold collides drew identical
    noise. Search that old derivation for two steps that collide (a birthday search over int32 values),
    then show the run secret's seeds for the same two steps differ in all 128 bits and draw different noise."""
    def old_seed(key, step):
        return tuple(tf.random.experimental.stateless_fold_in(tf.constant([key, step], tf.int64), 0).numpy())

    # Birthday search on the 32-bit part: fold_in(seed, 0) = [uniform_int32(seed), 0]. Restrict to the low
    # 12 bits of that int32 so a collision appears in ~100 steps; the full 32 bits collide the same way at
    # ~80k steps (the paper trains 179,886).
    seen, pair = {}, None
    for step in range(2000):
        low_bits = old_seed(7, step)[0] & 0xFFF
        if low_bits in seen:
            pair = (seen[low_bits], step)
            break
        seen[low_bits] = step
    assert pair is not None
    assert old_seed(7, pair[0])[1] == old_seed(7, pair[1])[1] == 0  # the old seed's second half carried nothing
    key = RunSecret.fresh()
    first, second = key.noise_seeds(pair[0], 3), key.noise_seeds(pair[1], 3)
    assert first.shape == (3, 2) and first.dtype == np.int64
    assert len({tuple(row) for row in np.concatenate([first, second])}) == 6  # every (step, variable) its own seed
    assert all(row[0] != 0 and row[1] != 0 for row in first)  # both 64-bit halves carry key material
    zeros = [tf.zeros((1000,))]
    a = noised_mean(zeros, 1.0, 1.0, first[:1])[0].numpy()
    b = noised_mean(zeros, 1.0, 1.0, second[:1])[0].numpy()
    assert not np.array_equal(a, b)
    # Each seed depends on the whole key: flipping one bit of the secret changes every seed.
    flipped = RunSecret(bytes([key.key[0] ^ 1]) + key.key[1:])
    assert not np.any(flipped.noise_seeds(pair[0], 3) == first)


def test_noise_stddev_is_rounded_up_to_float32_and_accounted():
    for sigma, clip in ((1.1, 1.5), (0.7031, 1.0), (3.3333333, 0.1)):
        stddev = noise_stddev_float32(sigma, clip)
        assert np.float32(stddev) == stddev  # exactly representable: what the graph adds
        assert stddev >= sigma * clip
        assert float(np.nextafter(np.float32(stddev), np.float32(0))) < sigma * clip  # the next float32 up, no more
        assert effective_noise_multiplier(sigma, clip) >= sigma


def test_secure_noise_is_gaussian_with_the_requested_stddev_and_reproducible():
    key = RunSecret.fresh()
    a, b = key.secure_gaussian("noise", 4, [200_000, 10], 1.5)
    assert a.dtype == np.float32 and a.shape == (200_000,) and b.shape == (10,)
    assert a.std() == pytest.approx(1.5, rel=0.01) and abs(a.mean()) < 0.02
    from scipy import stats
    assert stats.kstest(a[:20_000] / 1.5, "norm").pvalue > 1e-3
    np.testing.assert_array_equal(RunSecret(key.key).secure_gaussian("noise", 4, [200_000, 10], 1.5)[0], a)
    assert not np.array_equal(key.secure_gaussian("noise", 5, [10], 1.5)[0], a[:10])


def test_the_trainer_step_adds_the_given_secure_noise():
    """With privacy.secure_rng the input pipeline hands replica 0 the noise itself: the update is exactly
    (Σ clipped + noise) / B, nothing drawn in the graph."""
    model = tiny_model(4)
    before = [v.numpy().copy() for v in model.trainable_variables]
    stepper = step_model(model, tf.keras.optimizers.legacy.SGD(1.0), "fast")
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    noise = SECRET.secure_gaussian("noise", 0, sizes, noise_stddev_float32(1.0, 1.0))
    tf.function(stepper.train_step)({"images": tf.zeros((0, 32, 32, 3)), "labels": tf.zeros((0, 4)),
                                     "step": tf.constant(0, tf.int64), "noise": tuple(noise)})
    for b, v, n in zip(before, model.trainable_variables, noise):
        np.testing.assert_allclose((b - v.numpy()).ravel(), n / 10, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("engine", ["fast", "vectorized", None])
def test_the_padded_compiled_step_gives_todays_sums_and_update(engine):
    """training.jit_compile: 7 examples in chunks of exactly 4 (the second padded with one masked row),
    each chunk compiled by XLA, against today's uncompiled step of chunks of at most 4: the same clipped
    sums, loss, count and update (noise 0) within 1e-5."""
    images, labels = batch(7, seed=5)
    results = []
    for jit_compile in (False, True):
        model = tiny_model(5)
        step = gradient_step(engine, clip=0.2, sigma=0.0, max_physical_batch=4, jit_compile=jit_compile)
        sums, loss_sum, count = tf.function(step.clipped_sums)(model, images, labels, UNWEIGHTED_BCE)
        before = [v.numpy().copy() for v in model.trainable_variables]
        stepper = StepModel(model, step=step, optimizer=tf.keras.optimizers.legacy.SGD(1000.0),
                            per_example_loss=UNWEIGHTED_BCE, secret=SECRET)
        tf.function(stepper.train_step)({"images": images, "labels": labels, "step": tf.constant(0, tf.int64),
                                         **seeds(model, engine is not None)})
        update = [b - v.numpy() for b, v in zip(before, model.trainable_variables)]
        results.append(([s.numpy() for s in sums], float(loss_sum), int(count), update))
    (sums, loss_sum, count, update), (padded_sums, padded_loss, padded_count, padded_update) = results
    assert padded_count == count == 7  # the real count: the divisor and the noise do not see the padding
    assert padded_loss == pytest.approx(loss_sum, rel=1e-5)
    for today, padded in [*zip(sums, padded_sums), *zip(update, padded_update)]:
        assert float(np.linalg.norm(padded - today) / np.linalg.norm(today)) < 1e-5


@pytest.mark.parametrize("engine", ["fast", "vectorized", None])
def test_padding_rows_contribute_exactly_nothing(engine):
    """A masked row adds exactly zero: the compiled chunk with real, even extreme, images in its masked rows
    gives bit for bit the sums of the chunk with zeros there. The fast engine's norms of masked rows are 0."""
    step = gradient_step(engine, clip=0.2, sigma=0.0, max_physical_batch=4, jit_compile=True)
    model = tiny_model(6)
    images, labels = batch(4, seed=6)
    mask = tf.constant([1.0, 1.0, 0.0, 0.0])
    zeroed = tf.concat([images[:2], tf.zeros_like(images[2:])], axis=0), tf.concat([labels[:2], tf.zeros_like(labels[2:])], axis=0)
    filled = tf.concat([images[:2], 50.0 * images[2:]], axis=0), labels
    chunk = step._compiled_chunk(model, UNWEIGHTED_BCE)
    zero_sums, zero_loss = chunk(*zeroed, mask)
    filled_sums, filled_loss = chunk(*filled, mask)
    assert float(zero_loss) == float(filled_loss)
    for a, b in zip(zero_sums, filled_sums):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    unmasked_sums, _ = chunk(*filled, tf.ones(4))
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(filled_sums, unmasked_sums))  # can fail
    if engine == "fast":
        from dpmedtf.privacy.clipping import fast_clipped_gradient_sum

        clipped = fast_clipped_gradient_sum(model, filled[0], lambda out: UNWEIGHTED_BCE(filled[1], out) * mask, 0.2)
        np.testing.assert_array_equal(clipped.norms.numpy()[2:], [0.0, 0.0])
        assert np.all(clipped.norms.numpy()[:2] > 0)


def test_jit_compile_auto_compiles_only_with_a_gpu():
    from dpmedtf.errors import ConfigError
    from dpmedtf.training.step import jit_compile_for

    assert jit_compile_for("auto") == bool(tf.config.list_logical_devices("GPU"))
    assert jit_compile_for(True) is True and jit_compile_for(False) is False
    with pytest.raises(ConfigError, match="auto, true or false"):
        jit_compile_for("yes")
