"""The network a CLI job trains: the paper's ResNet9 (2D, or ACS-3D for volumes), optionally from pretrained weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from dpmedtf.config import JobConfig, LabelsConfig, config_from_mapping
from dpmedtf.data import label_sets
from dpmedtf.data.label_sets import LabelSet
from dpmedtf.data.cache import PreparedData
from dpmedtf.errors import DpmedtfError
from dpmedtf.files import sha256_file
from dpmedtf.layout import ModelDir
from dpmedtf.models import build_resnet9, convert_to_acs, load_model


def check_pretraining_is_public(config: JobConfig, prepared: PreparedData) -> None:
    """Refuses pretrained weights that dpmedtf trained without DP on this job's own data: the certificate
    would claim privacy for weights that already encode the private data. (Weights from elsewhere are the
    user's statement, recorded as ``model.pretrained_on``.)"""
    weights = config.model.pretrained_weights
    record = ModelDir(Path(weights).parent).training_record if weights else None
    if not config.privacy.enabled or record is None or not record.is_file():
        return
    recorded = json.loads(record.read_text()).get("config", {})
    manifest = recorded.get("data", {}).get("manifest")
    if recorded.get("privacy", {}).get("enabled", True) or not manifest or not Path(manifest).is_file():
        return
    ours = Path(config.data.manifest or prepared.cohort.source)
    if Path(manifest).resolve() == ours.resolve() or sha256_file(Path(manifest)) == sha256_file(ours):
        raise DpmedtfError(f"model.pretrained_weights {weights} were trained without DP on this job's own manifest "
                           f"({manifest}); DP fine-tuning cannot make them private. Pretrain on public data, or "
                           "train from scratch")


HEAD_LAYER = "logits"
"""The ResNet9's linear head: one output per finding, so it is carried only between equal label sets."""


@dataclass(frozen=True, kw_only=True)
class Pretraining:
    """Where a job's starting weights came from, as the certificate states it."""

    weights: str
    data: str | None
    """The user's statement (model.pretrained_on), else the manifest the pretraining run recorded."""
    label_set: dict | None
    """The label set the weights were trained on (their run's record), None when they come from elsewhere."""
    head: str
    """'new' (a freshly initialised head for this job's findings) or 'carried' (same findings)."""


def pretraining_of(config: JobConfig, label_set: LabelSet) -> Pretraining | None:
    """The pretrained weights' origin: their training record (dpmedtf runs) says which data and label set."""
    weights = config.model.pretrained_weights
    if weights is None:
        return None
    record = ModelDir(Path(weights).parent).training_record
    recorded = {}
    if record.is_file():
        try:
            recorded = json.loads(record.read_text()).get("config", {}) or {}
        except (OSError, ValueError):
            recorded = {}
    their_labels = None
    if recorded:
        modality = recorded.get("data", {}).get("modality", "radiograph")
        labels = recorded.get("labels") or None
        their_labels = label_sets.from_config(config_from_mapping(labels, LabelsConfig) if labels else None,
                                              modality).to_json()
    same = their_labels is not None and their_labels["findings"] == label_set.to_json()["findings"]
    manifest = recorded.get("data", {}).get("manifest")
    data = config.model.pretrained_on or (f"the manifest {Path(manifest).name} of the pretraining run" if manifest else None)
    return Pretraining(weights=str(weights), data=data, label_set=their_labels, head="carried" if same else "new")


def build_network(config: JobConfig, prepared: PreparedData, num_outputs: int) -> tf.keras.Model:
    model_config = config.model
    pretrained = load_model(model_config.pretrained_weights) if model_config.pretrained_weights else None
    origin = pretraining_of(config, prepared.cohort.label_set)
    # Another label set's head holds other findings even when its shape matches: the head starts anew.
    skip = () if origin is None or origin.head == "carried" else (HEAD_LAYER,)
    if prepared.spec.modality == "radiograph":
        size = prepared.spec.image_size
        network = build_resnet9((size, size, 3), num_outputs, activation=model_config.activation,
                                groups=model_config.groups, scale_norm=model_config.scale_norm)
        if pretrained is not None:
            _copy_matching_weights(pretrained, network, skip)
        return network
    depth, height, width = prepared.spec.item_shape
    if pretrained is not None and len(pretrained.input_shape) == 4:  # 2D-pretrained: the paper's PDAC route
        return convert_to_acs(pretrained, (depth, height, width, int(pretrained.input_shape[-1])), num_outputs,
                              carry_head=not skip)
    network = build_resnet9((depth, height, width, 1), num_outputs, activation=model_config.activation,
                            groups=model_config.groups, scale_norm=model_config.scale_norm)
    if pretrained is not None:
        _copy_matching_weights(pretrained, network, skip)
    return network


def _copy_matching_weights(source: tf.keras.Model, target: tf.keras.Model, skip: tuple[str, ...] = ()) -> None:
    """Copies weights layer by layer where names and shapes match, except the layers in ``skip`` (a new head
    stays freshly initialised)."""
    copied = 0
    for layer in target.layers:
        if layer.name in skip:
            continue
        try:
            weights = source.get_layer(layer.name).get_weights()
        except ValueError:
            continue
        if weights and [w.shape for w in weights] == [w.shape for w in layer.get_weights()]:
            layer.set_weights(weights)
            copied += 1
    if copied == 0:
        raise DpmedtfError(f"pretrained model {source.name} shares no layer with the network; is it a dpmedtf ResNet9?")
