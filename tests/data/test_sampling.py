"""Sampling: Poisson inclusion at exactly q, resumable by step, shards per replica; the tf.data input."""

import numpy as np
import pytest
from scipy import stats

from dpmedtf.data.cache import PreprocessSpec, prepare
from dpmedtf.data.manifests import load_manifest
from dpmedtf.data.pipeline import evaluation_dataset, split_rows, training_dataset
from dpmedtf.data.sampling import PoissonSampler, ShuffledBatches, split_among_replicas
from dpmedtf.privacy.accounting import DpSgdSchedule
from dpmedtf.privacy.randomness import RunSecret

SECRET = RunSecret.from_experiment_seed(3)


def test_poisson_inclusion_rate_matches_q():
    sampler = PoissonSampler(dataset_size=1000, batch_size=50, steps=2000, randomness=SECRET)
    assert sampler.sampling_rate == 0.05
    counts = np.zeros(1000)
    sizes = []
    for step in range(sampler.steps):
        batch = sampler.indices(step)
        assert len(np.unique(batch)) == len(batch)  # no example twice in one step
        counts[batch] += 1
        sizes.append(len(batch))
    # Each example's inclusions over 2000 steps ~ Binomial(2000, 0.05): mean 100, sd 9.7.
    assert counts.mean() == pytest.approx(100, rel=0.01)
    # Goodness of fit by χ² over bins (a KS test is not valid for a discrete law: it rejects true binomials).
    edges = np.array([-1, 84, 89, 94, 99, 104, 109, 114, 2000])
    expected = np.diff(stats.binom(2000, 0.05).cdf(edges)) * len(counts)
    observed = np.histogram(counts, bins=edges + 0.5)[0]
    assert stats.chisquare(observed, expected).pvalue > 0.001
    # Batch sizes vary like Binomial(1000, 0.05), not fixed at 50.
    assert np.std(sizes) == pytest.approx(np.sqrt(1000 * 0.05 * 0.95), rel=0.1)
    assert len(set(sizes)) > 10


def test_poisson_batches_are_a_function_of_the_secret_and_step():
    key = RunSecret.fresh()
    a, b = PoissonSampler(500, 20, 30, key), PoissonSampler(500, 20, 30, RunSecret(key.key))
    assert all(np.array_equal(a.indices(s), b.indices(s)) for s in range(30))
    assert not np.array_equal(a.indices(5), PoissonSampler(500, 20, 30, RunSecret.fresh()).indices(5))
    # Resuming at step 17 yields exactly the rest of an uninterrupted run.
    full = [(c.step, tuple(c.indices)) for c in a.shards()]
    resumed = [(c.step, tuple(c.indices)) for c in a.shards(start_step=17)]
    assert resumed == [item for item in full if item[0] >= 17]


def test_sampler_uses_the_accountants_sampling_rate():
    sampler = PoissonSampler(153_502, 128, 10, SECRET)
    assert sampler.sampling_rate == DpSgdSchedule(153_502, 128, 10, 1.0).sampling_rate


def test_replica_shards_partition_each_step():
    indices = np.arange(0, 70, 2)
    parts = split_among_replicas(indices, 4)
    assert [len(p) for p in parts] == [9, 9, 9, 8]
    assert np.array_equal(np.concatenate(parts), indices)
    assert [len(p) for p in split_among_replicas(np.array([3]), 2)] == [1, 0]  # a replica may get nothing
    sampler = PoissonSampler(500, 20, 6, SECRET)
    # Two workers of two replicas each, each feeding its own replicas: together, every step exactly once.
    worker_0 = list(sampler.shards(2, 5, replicas=(0, 1), num_replicas=4))
    worker_1 = list(sampler.shards(2, 5, replicas=(2, 3), num_replicas=4))
    assert [(s.step, s.replica) for s in worker_0] == [(2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    for step in range(2, 5):
        parts = sorted([s for s in worker_0 + worker_1 if s.step == step], key=lambda s: s.replica)
        assert np.array_equal(np.concatenate([s.indices for s in parts]), sampler.indices(step))


def test_empty_poisson_steps_are_kept():
    sampler = PoissonSampler(dataset_size=200, batch_size=1, steps=300, randomness=SECRET)
    shards = list(sampler.shards())
    assert [s.step for s in shards] == list(range(300))
    assert any(len(s.indices) == 0 for s in shards)


def test_shuffled_batches_see_every_example_once_per_epoch():
    batches = ShuffledBatches(dataset_size=50, batch_size=16, steps=8, seed=0)
    assert batches.steps_per_epoch == 4
    for epoch in range(2):
        seen = np.concatenate([batches.indices(epoch * 4 + s) for s in range(4)])
        assert sorted(seen) == list(range(50))
    assert not np.array_equal(batches.indices(0), batches.indices(4))


@pytest.fixture(scope="module")
def prepared(synthetic_cohort, tmp_path_factory):
    cohort = load_manifest(synthetic_cohort["radiograph"], "radiograph")
    return prepare(cohort, PreprocessSpec("radiograph", image_size=32), tmp_path_factory.mktemp("cache"))


def test_training_dataset_gathers_the_sampled_examples(prepared):
    rows = split_rows(prepared, "train")
    sampler = PoissonSampler(len(rows), 8, 6, SECRET)
    shards = list(sampler.shards(replicas=(0, 1), num_replicas=2))
    elements = list(training_dataset(prepared, "train", shards))
    assert [int(e["step"]) for e in elements] == [s.step for s in shards]
    labels = prepared.cohort.labels(prepared.cohort.frame.loc[rows])
    for element, shard in zip(elements, shards):
        images = element["images"].numpy()
        assert images.shape == (len(shard.indices), 32, 32, 3) and images.dtype == np.float32
        np.testing.assert_array_equal(images[..., 0], prepared.array[rows[shard.indices]] / np.float32(255))
        np.testing.assert_array_equal(element["labels"].numpy(), labels[shard.indices])


def test_augmented_training_dataset_is_reproducible(prepared):
    sampler = ShuffledBatches(len(split_rows(prepared, "train")), 8, 3, seed=0)
    shards = list(sampler.shards())
    a = [e["images"].numpy() for e in training_dataset(prepared, "train", shards, augment=True, seed=5)]
    b = [e["images"].numpy() for e in training_dataset(prepared, "train", shards, augment=True, seed=5)]
    plain = [e["images"].numpy() for e in training_dataset(prepared, "train", shards)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, plain))
    # Sharded over 3 replicas, each example is augmented exactly as in the whole step.
    sharded = [e["images"].numpy() for e in training_dataset(
        prepared, "train", list(sampler.shards(replicas=(0, 1, 2), num_replicas=3)), augment=True, seed=5)]
    for step, whole in enumerate(a):
        np.testing.assert_allclose(np.concatenate(sharded[3 * step:3 * step + 3]), whole, atol=1e-5)  # SIMD rounding


def test_evaluation_dataset_yields_the_split_in_order(prepared):
    rows = split_rows(prepared, "test")
    images = np.concatenate([x.numpy() for x, _ in evaluation_dataset(prepared, "test", batch_size=4)])
    np.testing.assert_array_equal(images[..., 1], prepared.array[rows] / np.float32(255))
