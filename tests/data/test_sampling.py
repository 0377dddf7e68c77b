"""Sampling: Poisson inclusion at exactly q, resumable by step, physical chunks; the tf.data input."""

import numpy as np
import pytest
from scipy import stats

from dpmedtf.data.cache import PreprocessSpec, prepare
from dpmedtf.data.manifests import load_manifest
from dpmedtf.data.pipeline import evaluation_dataset, split_rows, training_dataset
from dpmedtf.data.sampling import PoissonSampler, ShuffledBatches, split_into_chunks
from dpmedtf.privacy.accounting import DpSgdSchedule


def test_poisson_inclusion_rate_matches_q():
    sampler = PoissonSampler(dataset_size=1000, batch_size=50, steps=2000, seed=3)
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
    assert stats.kstest(counts, stats.binom(2000, 0.05).cdf).pvalue > 0.001
    # Batch sizes vary like Binomial(1000, 0.05), not fixed at 50.
    assert np.std(sizes) == pytest.approx(np.sqrt(1000 * 0.05 * 0.95), rel=0.1)
    assert len(set(sizes)) > 10


def test_poisson_batches_are_a_function_of_seed_and_step():
    a, b = PoissonSampler(500, 20, 30, seed=1), PoissonSampler(500, 20, 30, seed=1)
    assert all(np.array_equal(a.indices(s), b.indices(s)) for s in range(30))
    assert not np.array_equal(a.indices(5), PoissonSampler(500, 20, 30, seed=2).indices(5))
    # Resuming at step 17 yields exactly the rest of an uninterrupted run.
    full = [(c.step, tuple(c.indices)) for c in a.chunks(8)]
    resumed = [(c.step, tuple(c.indices)) for c in a.chunks(8, start_step=17)]
    assert resumed == [item for item in full if item[0] >= 17]


def test_sampler_uses_the_accountants_sampling_rate():
    sampler = PoissonSampler(153_502, 128, 10)
    assert sampler.sampling_rate == DpSgdSchedule(153_502, 128, 10, 1.0).sampling_rate


def test_chunks_respect_the_cap_and_cover_the_step():
    indices = np.arange(0, 70, 2)
    chunks = split_into_chunks(4, indices, 8)
    assert [len(c.indices) for c in chunks] == [7, 7, 7, 7, 7] and chunks[-1].last_in_step
    assert np.array_equal(np.concatenate([c.indices for c in chunks]), indices)
    assert all(c.logical_batch_size == 35 and c.chunks_in_step == 5 for c in chunks)
    empty = split_into_chunks(9, np.array([], int), 8)
    assert len(empty) == 1 and len(empty[0].indices) == 0 and empty[0].last_in_step  # the step still happens


def test_empty_poisson_steps_are_kept():
    sampler = PoissonSampler(dataset_size=200, batch_size=1, steps=300, seed=0)
    chunks = list(sampler.chunks(4))
    assert sorted({c.step for c in chunks}) == list(range(300))
    assert any(len(c.indices) == 0 for c in chunks)


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
    sampler = PoissonSampler(len(rows), 8, 6, seed=4)
    elements = list(training_dataset(prepared, "train", sampler.chunks(3)))
    assert [(int(e["step"]), int(e["chunk"])) for e in elements] == [(c.step, c.chunk) for c in sampler.chunks(3)]
    labels = prepared.cohort.labels(prepared.cohort.frame.loc[rows])
    for element, chunk in zip(elements, sampler.chunks(3)):
        images = element["images"].numpy()
        assert images.shape == (len(chunk.indices), 32, 32, 3) and images.dtype == np.float32
        np.testing.assert_array_equal(images[..., 0], prepared.array[rows[chunk.indices]] / np.float32(255))
        np.testing.assert_array_equal(element["labels"].numpy(), labels[chunk.indices])
        assert int(element["logical_batch_size"]) == chunk.logical_batch_size


def test_augmented_training_dataset_is_reproducible(prepared):
    sampler = ShuffledBatches(len(split_rows(prepared, "train")), 8, 3, seed=0)
    a = [e["images"].numpy() for e in training_dataset(prepared, "train", sampler.chunks(8), augment=True, seed=5)]
    b = [e["images"].numpy() for e in training_dataset(prepared, "train", sampler.chunks(8), augment=True, seed=5)]
    plain = [e["images"].numpy() for e in training_dataset(prepared, "train", sampler.chunks(8))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, plain))


def test_evaluation_dataset_yields_the_split_in_order(prepared):
    rows = split_rows(prepared, "test")
    images = np.concatenate([x.numpy() for x, _ in evaluation_dataset(prepared, "test", batch_size=4)])
    np.testing.assert_array_equal(images[..., 1], prepared.array[rows] / np.float32(255))
