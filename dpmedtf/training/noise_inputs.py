"""What the step needs to add its noise, drawn from the run's secret by the input pipeline.

Per shard of a step: 128-bit Philox seeds, one per trainable variable (``RunSecret.noise_seeds``), or
with ``secure_rng`` the noise values themselves from the CSPRNG (made ahead of the step by tf.data).
Only replica 0 adds noise; other replicas get zeros of the same shape. The step itself never sees the
secret, so nothing in the graph or its checkpoints but the secret variable can reproduce a draw.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import tensorflow as tf

from dpmedtf.data.sampling import Shard
from dpmedtf.privacy.mechanism import DpSgdMechanism
from dpmedtf.privacy.randomness import RunSecret


def noise_inputs(shards: Iterable[Shard], secret: RunSecret, variables, mechanism: DpSgdMechanism,
                 secure_rng: bool = False) -> tf.data.Dataset:
    """One element per shard: {"noise_seeds": (variables, 2) int64} or {"noise": one vector per variable}."""
    if not secure_rng:
        count = len(variables)

        def seeds():
            for shard in shards:
                yield {"noise_seeds": secret.noise_seeds(shard.step, count) if shard.replica == 0
                       else np.zeros((count, 2), np.int64)}
        return tf.data.Dataset.from_generator(seeds, output_signature={
            "noise_seeds": tf.TensorSpec([count, 2], tf.int64)})
    sizes = [int(np.prod(v.shape)) for v in variables]
    stddev = mechanism.noise_stddev

    def noise():
        for shard in shards:
            yield {"noise": tuple(secret.secure_gaussian("noise", shard.step, sizes, stddev)
                                  if shard.replica == 0 else [np.zeros(n, np.float32) for n in sizes])}
    return tf.data.Dataset.from_generator(noise, output_signature={
        "noise": tuple(tf.TensorSpec([n], tf.float32) for n in sizes)}).prefetch(2)
