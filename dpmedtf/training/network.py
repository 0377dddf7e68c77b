"""The network a CLI job trains: the paper's ResNet9 (2D, or ACS-3D for volumes), optionally from pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from dpmedtf.config import JobConfig
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


def build_network(config: JobConfig, prepared: PreparedData, num_outputs: int) -> tf.keras.Model:
    model_config = config.model
    pretrained = load_model(model_config.pretrained_weights) if model_config.pretrained_weights else None
    if prepared.spec.modality == "radiograph":
        size = prepared.spec.image_size
        network = build_resnet9((size, size, 3), num_outputs, activation=model_config.activation,
                                groups=model_config.groups, scale_norm=model_config.scale_norm)
        if pretrained is not None:
            _copy_matching_weights(pretrained, network)
        return network
    depth, height, width = prepared.spec.item_shape
    if pretrained is not None and len(pretrained.input_shape) == 4:  # 2D-pretrained: the paper's PDAC route
        return convert_to_acs(pretrained, (depth, height, width, int(pretrained.input_shape[-1])), num_outputs)
    network = build_resnet9((depth, height, width, 1), num_outputs, activation=model_config.activation,
                            groups=model_config.groups, scale_norm=model_config.scale_norm)
    if pretrained is not None:
        _copy_matching_weights(pretrained, network)
    return network


def _copy_matching_weights(source: tf.keras.Model, target: tf.keras.Model) -> None:
    """Copies weights layer by layer where names and shapes match (a new head stays freshly initialised)."""
    copied = 0
    for layer in target.layers:
        try:
            weights = source.get_layer(layer.name).get_weights()
        except ValueError:
            continue
        if weights and [w.shape for w in weights] == [w.shape for w in layer.get_weights()]:
            layer.set_weights(weights)
            copied += 1
    if copied == 0:
        raise DpmedtfError(f"pretrained model {source.name} shares no layer with the network; is it a dpmedtf ResNet9?")
