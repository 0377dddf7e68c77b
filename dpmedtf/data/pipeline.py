"""tf.data input: the sampler's shards, gathered from the prepared array, turned into model inputs.

Per element (one replica's shard of one logical step; the whole step on a single device): ``images``
(n, S, S, 3) or (n, D, H, W, C) float32, ``labels`` (n, L) and ``step``. Decoding never happens here
(see ``cache.prepare``); gathering, channel expansion, scaling and (non-DP) augmentation run in
parallel with training.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import tensorflow as tf

from dpmedtf.data import radiograph
from dpmedtf.data.cache import PreparedData
from dpmedtf.data.manifests import require_split
from dpmedtf.data.sampling import Shard
from dpmedtf.errors import ConfigError, DataError


def training_dataset(prepared: PreparedData, split: str, shards: Iterable[Shard], augment: bool = False,
                     seed: int = 0, volume_channels: int = 1) -> tf.data.Dataset:
    """Shards index the rows of ``split`` (0 … n_split − 1), in the order the cohort lists them."""
    rows = split_rows(prepared, split)
    labels = prepared.cohort.labels(prepared.cohort.frame.loc[rows])
    item_shape = prepared.array.shape[1:]

    def source():
        for shard in shards:
            yield shard.step, shard.indices.astype(np.int64)

    dataset = tf.data.Dataset.from_generator(source, output_signature=(
        tf.TensorSpec([], tf.int64), tf.TensorSpec([None], tf.int64)))

    def gather(step, indices):
        images, batch_labels = tf.numpy_function(
            lambda idx: (np.asarray(prepared.array[rows[idx]]), labels[idx]), [indices],
            [tf.as_dtype(prepared.array.dtype), tf.float32], stateful=False)
        images = tf.ensure_shape(images, [None, *item_shape])
        batch_labels = tf.ensure_shape(batch_labels, [None, labels.shape[1]])
        images = model_inputs(images, prepared.spec.modality, volume_channels)
        if augment:
            if prepared.spec.modality != "radiograph":
                raise ConfigError("training.augment: augmentation (rotation and flip) is defined for radiographs "
                                  "only; set it false for CT volumes")
            images = radiograph.augment(images, tf.stack([tf.constant(seed, tf.int64), step]),
                                        example_ids=indices, population=len(rows))
        return {"images": images, "labels": batch_labels, "step": step}

    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(prepared: PreparedData, split: str, batch_size: int = 32,
                       volume_channels: int = 1) -> tf.data.Dataset:
    """The rows of ``split`` in cohort order, for prediction: (images, labels) batches."""
    rows = split_rows(prepared, split)
    labels = prepared.cohort.labels(prepared.cohort.frame.loc[rows])
    dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(rows)), labels)).batch(batch_size)

    def gather(indices, batch_labels):
        images = tf.numpy_function(lambda idx: np.asarray(prepared.array[rows[idx]]), [indices],
                                   tf.as_dtype(prepared.array.dtype), stateful=False)
        images = tf.ensure_shape(images, [None, *prepared.array.shape[1:]])
        return model_inputs(images, prepared.spec.modality, volume_channels), batch_labels

    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def split_rows(prepared: PreparedData, split: str) -> np.ndarray:
    """Array rows of one split, in cohort order."""
    rows = prepared.cohort.frame.index[prepared.cohort.frame["split"] == split].to_numpy(np.int64)
    if len(rows) == 0:
        quarantined = int((prepared.quarantine.get("split", pd.Series(dtype=str)) == split).sum())
        if quarantined:
            raise DataError(f"{prepared.cohort.source}: every row of the {split} split ({quarantined}) was "
                            f"quarantined as unreadable (see {prepared.directory / 'quarantine.csv'}); fix those files")
        require_split(prepared.cohort, split, "this step")
    return rows


def model_inputs(images: tf.Tensor, modality: str, volume_channels: int = 1) -> tf.Tensor:
    if modality == "radiograph":
        return radiograph.to_model_input(images)
    volumes = tf.cast(images, tf.float32)[..., None]
    return tf.repeat(volumes, volume_channels, axis=-1) if volume_channels > 1 else volumes
