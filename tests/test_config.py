"""Job config: YAML in, every mistake named with file and key path, regime defaults resolved."""

from pathlib import Path

import numpy as np

import pytest

from dpmedtf.config import JobConfig, config_to_dict, describe, load_config
from dpmedtf.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_dp_job_resolves_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, """
name: cxr
data: {manifest: data/manifest.csv, image_size: 64}
privacy: {target_epsilon: 7.89, delta: 6e-6}
training: {epochs: 2, batch_size: 16}
"""))
    assert isinstance(cfg, JobConfig)
    assert cfg.data.manifest == (tmp_path / "data" / "manifest.csv").resolve()
    assert cfg.data.image_size == 64 and cfg.data.volume_shape == (224, 224, 128)
    assert cfg.privacy.delta == 6e-6 and cfg.privacy.clip_norm == 1.5
    # The paper's DP regime: Mish, NAdam 5e-4, no augmentation.
    assert (cfg.model.activation, cfg.training.learning_rate, cfg.training.augment) == ("mish", 5e-4, False)


def test_non_private_job_resolves_the_other_regime(tmp_path):
    cfg = load_config(write(tmp_path, "privacy: {enabled: false}\n"))
    assert (cfg.model.activation, cfg.training.learning_rate, cfg.training.augment) == ("relu", 5e-5, True)


def test_explicit_choices_are_kept(tmp_path):
    cfg = load_config(write(tmp_path, "privacy: {noise_multiplier: 1.1}\nmodel: {activation: relu}\n"
                                      "training: {learning_rate: 0.001, augment: true}\n"))
    assert (cfg.model.activation, cfg.training.learning_rate, cfg.training.augment) == ("relu", 0.001, True)


@pytest.mark.parametrize("text, fragment", [
    ("traning: {epochs: 3}\n", "traning: unknown key (did you mean 'training'?); allowed: name, data,"),
    ("privacy: {target_epsilon: 8, clipnorm: 1}\n", "privacy.clipnorm: unknown key (did you mean 'clip_norm'?)"),
    ("privacy: {target_epsilon: 8}\ntraining: {batch_size: 0}\n", "training.batch_size: must be ≥ 1, got 0"),
    ("privacy: {target_epsilon: 8}\ntraining: {batch_size: 12.5}\n", "training.batch_size: must be a whole number, got 12.5"),
    ("privacy: {target_epsilon: 8}\ntraining: {batch_size: true}\n", "training.batch_size: must be a whole number, got True"),
    ("privacy: {target_epsilon: -1}\n", "privacy.target_epsilon: must be > 0, got -1.0"),
    ("privacy: {target_epsilon: eight}\n", "privacy.target_epsilon: must be a number, got 'eight'"),
    ("privacy: {target_epsilon: 8, delta: 1.5}\n", "privacy.delta: must be < 1, got 1.5"),
    ("privacy: {target_epsilon: 8, accountant: moments}\n", "privacy.accountant: must be one of 'pld', 'rdp', got 'moments'"),
    ("privacy: {target_epsilon: 8}\ndata: {volume_shape: [224, 224]}\n", "data.volume_shape: must be a list of 3 values"),
    ("privacy: {target_epsilon: 8}\ndata: {volume_shape: [224, 4, 128]}\n", "data.volume_shape[1]: must be ≥ 8, got 4"),
    ("privacy: {target_epsilon: 8}\ndata: {split_fractions: [0.5, 0.2, 0.2]}\n", "data.split_fractions: must sum to 1"),
    ("privacy: {target_epsilon: 8}\ndata: {hu_window: [250, -150]}\n", "data.hu_window: low must be below high"),
    ("privacy: {target_epsilon: 8}\ndata: 5\n", "data: must be a mapping of settings, got 5"),
    ("privacy: {target_epsilon: 8, noise_multiplier: 1.0}\n", "privacy: give exactly one of target_epsilon"),
    ("privacy: {delta: 1e-6}\n", "privacy: give exactly one of target_epsilon"),
    ("privacy: {enabled: false, target_epsilon: 8}\n", "privacy: target_epsilon/noise_multiplier are set but enabled is false"),
    ("- just\n- a list\n", "<top level>: must be a mapping of settings"),
    ("privacy: {target_epsilon: 8\n", "not valid YAML"),
])
def test_every_mistake_names_file_key_and_what_is_allowed(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert fragment in message, message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read the config file"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "privacy: {target_epsilon: 4.71}\ndata: {manifest: /abs/m.csv}\n"))
    plain = config_to_dict(cfg)
    assert plain["data"]["manifest"] == "/abs/m.csv" and plain["data"]["volume_shape"] == [224, 224, 128]
    import yaml
    again = load_config(write(tmp_path, yaml.safe_dump(plain)))
    assert again == cfg


def test_configs_are_frozen(tmp_path):
    cfg = load_config(write(tmp_path, "privacy: {target_epsilon: 8}\n"))
    with pytest.raises(Exception):
        cfg.training.epochs = 3  # type: ignore[misc]


def test_every_setting_is_documented():
    rows = describe()
    assert ("privacy.delta", "6e-06", "δ; must be < 1/N (paper: 6e-6 for 153,502 images)") in rows
    assert all(doc for _, _, doc in rows)


def test_labels_and_fairness_sections_resolve_to_label_sets_and_groupings(tmp_path):
    from dpmedtf.data import attributes, label_sets

    cfg = load_config(write(tmp_path, """
privacy: {enabled: false}
labels:
  findings:
    - {name: effusion, column: Pleural Effusion, rule: chexpert, uncertain: ones}
    - {name: nodule, rule: binary, blank: ignore}
    - {name: oedema, column: edema_grade, rule: graded, first_positive_grade: 3}
  uncertain: zeros
fairness:
  attributes: [sex, age, site, {column: bmi, bins: [0, 18.5, 25, 30]}, {column: race, required: true}]
  intersections: [[race, sex], [sex, age_group]]
"""))
    labels = label_sets.from_config(cfg.labels, "radiograph")
    assert labels.names == ("effusion", "nodule", "oedema") and labels.columns[0] == "Pleural Effusion"
    effusion, nodule, oedema = labels.findings
    assert (effusion.parse("-1"), effusion.parse(""), nodule.parse("yes"), oedema.parse("uncertain")) == (1.0, 0.0, 1.0, 0.0)
    assert np.isnan(nodule.parse("")) and oedema.parse("2") == 0.0 and oedema.parse("moderate") == 1.0
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        nodule.parse("maybe")
    spec = attributes.from_config(cfg.fairness, "radiograph")
    assert spec.names == ("sex", "age_group", "site", "bmi_group", "race", "race_x_sex", "sex_x_age")
    assert attributes.bin_label(spec.attributes[3].bins, 24.9) == "18.5-<25"
    assert attributes.bin_label(spec.attributes[1].bins, 85) == "80+" and spec.attributes[4].required
    shorthand = load_config(write(tmp_path, "privacy: {enabled: false}\nlabels: chexpert\n"))
    assert label_sets.from_config(shorthand.labels, "radiograph").names[0] == "no_finding"
    default = load_config(write(tmp_path, "privacy: {enabled: false}\n"))
    assert label_sets.from_config(default.labels, "radiograph").names == label_sets.preset("uka-cxr").names
    assert default.labels.preset == "uka-cxr"  # the resolved job names its label set
    ct = load_config(write(tmp_path, "privacy: {enabled: false}\ndata: {modality: volume}\n"))
    assert ct.labels.preset == "binary" and label_sets.from_config(ct.labels, "volume").names == ("label",)
    assert label_sets.from_config(None, "volume").names == ("label",)
    assert attributes.from_config(default.fairness, "radiograph") == attributes.default_spec("radiograph")


@pytest.mark.parametrize("text, fragment", [
    ("labels: {preset: mimic}", "labels.preset: must be one of 'uka-cxr', 'chexpert', 'binary'"),
    ("labels: {preset: chexpert, findings: [{name: a}]}", "labels: give either preset or findings"),
    ("labels: {findings: [{name: a}, {name: a}]}", "a is repeated"),
    ("labels: {findings: [{name: a, rule: chexpert, uncertain: maybe}]}", "uncertain: must be one of"),
    ("labels: {findings: [{name: split}]}", "'split' is a column dpmedtf keeps"),
    ("fairness: {intersections: [[race, sex]]}", "must pair two of the attributes ['sex', 'age_group']"),
    ("fairness: {attributes: [{column: bmi, bins: [30, 20]}]}", "bins: must be increasing"),
    ("fairness: {attributes: [{column: sex, bins: [1, 2]}]}", "sex is categorical"),
    ("fairness: {attributes: [{column: age, name: split}]}", "is taken"),
    ("fairness: {attributes: [site, site]}", "site is repeated"),
    ("labels: {findings: [{column: ptx}]}", "labels.findings[0]: needs a name"),
    ("fairness: {attributes: [{bins: [1, 2]}]}", "fairness.attributes[0]: needs a column"),
])
def test_labels_and_fairness_mistakes_are_named(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "privacy: {enabled: false}\n" + text + "\n"))
    assert fragment in str(info.value)
