"""Job configuration: frozen dataclasses, loaded from YAML, validated, resolved.

Every field carries its documentation and, where it has one, its allowed range. Loading walks the
YAML against the dataclasses and fails on the first problem with the file, the dotted key path and
what is allowed, e.g. ``pipelines/cxr.yaml: training.batch_size: must be ≥ 1, got 0``.
Resolution fills the defaults that depend on other choices (the paper's DP and non-DP regimes differ
in learning rate, activation and augmentation) so the resolved config states everything a run used.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from dpmedtf.data import attributes, label_sets
from dpmedtf.errors import ConfigError
from dpmedtf.privacy.engines import engine_names


def option(default: Any, doc: str, *, ge: float | None = None, le: float | None = None,
           gt: float | None = None, lt: float | None = None) -> Any:
    """A config field with its one-line documentation and optional numeric bounds."""
    bounds = {k: v for k, v in dict(ge=ge, le=le, gt=gt, lt=lt).items() if v is not None}
    kwargs = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"doc": doc, "bounds": bounds}, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    manifest: Optional[Path] = option(None, "manifest CSV (relative paths are relative to the config file)")
    modality: Literal["radiograph", "volume"] = option("radiograph", "chest radiographs (2D) or CT volumes (3D)")
    image_size: int = option(512, "radiographs are resized to image_size × image_size (paper: 512)", ge=32, le=4096)
    dicom_decoder: Literal["tensorflow-io", "pydicom"] = option("tensorflow-io", "library that decodes DICOMs both can read (pydicom measured 3.5–6× faster on native CRs)")
    volume_shape: tuple[int, int, int] = option((224, 224, 128), "CT volumes are resized to this (H, W, D) (paper: 224×224×128)", ge=8, le=1024)
    hu_window: tuple[float, float] = option((-150.0, 250.0), "CT intensities are clipped to this HU window (paper: −150…250)")
    split_fractions: tuple[float, float, float] = option((0.7, 0.1, 0.2), "train/validation/test fractions for a patient-wise split when the manifest has no split column", ge=0.0, le=1.0)
    split_seed: int = option(0, "seed of the patient-wise split", ge=0)
    cache_dir: Optional[Path] = option(None, "where preprocessed images are cached (default: inside the run directory)")
    skip_bad: bool = option(False, "skip unreadable inputs, listing each in a quarantine CSV, instead of stopping; the count and the CSV are reported at the end of prepare and run, on the summary page and in the certificate")
    accept_modalities: Optional[tuple[str, ...]] = option(None, "DICOM Modality codes an input may have; default by data.modality: [CR, DX] for radiographs, [CT] for volumes (a DICOM without a Modality element counts as 'unknown'). Anything else is refused: an MR series has no Hounsfield units, a CT slice or a secondary capture (OT) is no radiograph. Widen it only for archives that label their images oddly")


@dataclass(frozen=True)
class ModelConfig:
    architecture: Literal["resnet9"] = option("resnet9", "the paper's GroupNorm ResNet9 (ACS-3D for volumes)")
    activation: Optional[Literal["mish", "relu"]] = option(None, "default: mish with DP, relu without (paper)")
    groups: int = option(32, "GroupNorm groups", ge=1)
    scale_norm: bool = option(False, "GroupNorm after each residual add (Klause et al. 2022)")
    pretrained_weights: Optional[Path] = option(None, "weights to start from (e.g. non-private pretraining on a public cohort)")
    pretrained_on: Optional[str] = option(None, "the public data the pretrained weights were trained on (stated in the certificate)")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = option(True, "train with DP-SGD; false trains the non-private baseline")
    target_epsilon: Optional[float] = option(None, "ε to reach exactly at the last step; σ is calibrated to it", gt=0.0)
    noise_multiplier: Optional[float] = option(None, "σ given directly instead of a target ε", gt=0.0)
    delta: float = option(6e-6, "δ; must be < 1/N (paper: 6e-6 for 153,502 images)", gt=0.0, lt=1.0)
    clip_norm: float = option(1.5, "per-example gradient clip norm C (paper: 1.5 CXR, 1.0 PDAC)", gt=0.0)
    accountant: Literal["pld", "rdp"] = option("pld", "privacy accountant that calibrates σ and certifies ε: pld (tight; default) or rdp (looser; also reported in the certificate as a cross-check)")
    unit: Literal["image", "patient"] = option("image", "unit of privacy: one image (paper) or one patient")
    max_images_per_patient: int = option(1, "patient unit: images a sampled patient contributes per step (each clipped to C/k)", ge=1)
    epsilon_budget: Optional[float] = option(None, "ε the run may never exceed (default: target_epsilon)", gt=0.0)
    noise_seed: Optional[int] = option(None, "fixes every random draw of the mechanism (Poisson sampling and noise) for reproducible EXPERIMENTS: such a run has no DP guarantee, its certificate says so and the default release policy refuses it; leave unset for a secret from OS entropy", ge=0)
    secure_rng: bool = option(False, "draw the noise values themselves from a cryptographically secure generator, each a sum of four Gaussians (defence against floating-point attacks, as Opacus' secure_mode); costs host CPU per step, see README")
    epsilon_sweep: Optional[tuple[float, ...]] = option(None, "train one model per ε (e.g. the paper's 0.29 … 7.89) with otherwise shared settings", gt=0.0)
    sweep_non_private: bool = option(False, "with epsilon_sweep: also train the non-private baseline")
    allow_large_delta: bool = option(False, "accept δ ≥ 1/N (permits leaking a whole record; recorded in the certificate)")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: float = option(150.0, "expected passes over the training data (paper: 150)", gt=0.0)
    steps: Optional[int] = option(None, "optimizer steps; overrides epochs when given", ge=1)
    batch_size: int = option(128, "logical (expected, with Poisson sampling) batch size (paper: 128)", ge=1)
    max_physical_batch: int = option(32, "most examples a device computes at once; a larger share of a step is summed over chunks", ge=1)
    jit_compile: Literal["auto", True, False] = option("auto", "compile each physical chunk with XLA, padded to exactly max_physical_batch masked rows so that it has one shape: true, false, or auto (on where measured faster: with a GPU; off on CPUs, where XLA was measured slower — see README)")
    learning_rate: Optional[float] = option(None, "NAdam learning rate; default 5e-4 with DP, 5e-5 without (paper)", gt=0.0)
    optimizer: Literal["nadam"] = option("nadam", "optimizer (paper: NAdam)")
    clipping: str = option("fast", "DP per-example clipping engine, a name registered in dpmedtf.privacy.engines: fast (layer-wise ghost/instantiated norms, book-keeping; no Jacobians) or vectorized (per-example gradients by tape.jacobian); both give the same clipped sum")
    augment: Optional[bool] = option(None, "rotation ±10° and horizontal flip of radiographs (CT volumes are not augmented); default on without DP, off with DP (paper)")
    class_weights: Optional[Literal["dp_counts", "inverse_frequency", "public_prior", "none"]] = option(None, "BCE weighting: dp_counts (inverse class frequency from positive counts released by a Gaussian mechanism, composed into ε; the default with DP), inverse_frequency (exact counts of the training labels: a non-DP use of private data that the default release policy refuses; the default without DP), public_prior (class_prior), or none")
    class_count_noise_std: float = option(10.0, "with class_weights: dp_counts, the standard deviation of the Gaussian noise on each label's positive count (sensitivity √labels per record)", gt=0.0)
    class_prior: Optional[tuple[float, ...]] = option(None, "with class_weights: public_prior, each label's prevalence from public data", gt=0.0, lt=1.0)
    seed: int = option(0, "seed of weight initialisation, augmentation and non-private shuffling (never of DP sampling or noise: those come from the run's secret)", ge=0)
    checkpoint_every_steps: int = option(0, "also checkpoint every this many steps (0: at each epoch end only)", ge=0)
    strategy: Literal["none", "mirrored", "multi_worker"] = option("none", "tf.distribute strategy: none (one device), mirrored (MirroredStrategy over training.devices) or multi_worker (MultiWorkerMirroredStrategy over the TF_CONFIG cluster); DP noise is added once per step globally")
    devices: Optional[tuple[str, ...]] = option(None, "with strategy: mirrored, the devices to replicate on, e.g. ['/gpu:0', '/gpu:1'] (default: every GPU, else the CPU)")
    collective_timeout_seconds: int = option(600, "with strategy: multi_worker, how long a worker waits in a collective for the others before it stops, naming the lost worker (a machine that vanished from the network never resets its connection); re-launching every worker resumes from the chief's last checkpoint", ge=10)
    stop_at_budget: bool = option(False, "if the plan would exceed the ε budget, train only the steps that fit instead of refusing")


@dataclass(frozen=True)
class EvaluationConfig:
    bootstrap_redraws: int = option(1000, "bootstrap redraws for confidence intervals (paper: 1000)", ge=1)
    seed: int = option(0, "bootstrap seed", ge=0)


@dataclass(frozen=True)
class ReleaseConfig:
    member: Optional[str] = option(None, "which model of an ε sweep to release, e.g. 'epsilon-7.89' (required for sweeps)")
    model_version: str = option("1.0.0", "version of the released model (in metadata.json and the ONNX metadata)")
    policy: Optional[Path] = option(None, "release policy YAML (default: dpmedtf's release/policy.yaml)")
    private_key: Optional[Path] = option(None, "P-256 private key (PEM) that signs the bundle; create one with `dpmedtf keygen`")
    public_key: Optional[Path] = option(None, "its public key, copied into the bundle (default: private_key with suffix .pub)")
    intended_use: str = option("Decision support research: detecting the labelled findings on adult chest radiographs or "
                               "abdominal CT, to be read by a clinician.", "intended use, stated in the model card")
    owners: Optional[tuple[str, ...]] = option(None, "people or team answerable for the released model, e.g. ['Radiology AI group, UKA'] (model card: owners)")
    license: str = option("unspecified — ask the owners", "licence of the released model: an SPDX identifier such as 'CC-BY-NC-4.0', or a sentence")
    contact: Optional[str] = option(None, "where users report problems or ask questions (e-mail or URL); the card says 'not given' without it")
    citation: Optional[str] = option(None, "how to cite this model; the card always cites the method's paper (Tayebi Arasteh, Ziller et al. 2024) as well")
    limitations: Optional[tuple[str, ...]] = option(None, "limitations the release managers add to the model card's own, one line each")


@dataclass(frozen=True)
class AuditConfig:
    kind: Literal["white-box", "black-box"] = option("white-box", "canary audit: white-box (gradient canaries scored on every update; the strongest attack) or black-box (canary images scored by the final model's loss)")
    canaries: int = option(1000, "canaries m, each included in the audit twin with probability ½ (a real audit: about 1000)", ge=2)
    confidence: float = option(0.95, "confidence of the measured ε lower bound", gt=0.0, lt=1.0)


@dataclass(frozen=True)
class FindingConfig:
    name: Optional[str] = option(None, "the finding's name (required): the model output, the metrics and the bundle's label")
    column: Optional[str] = option(None, "manifest column holding it (default: name)")
    rule: Literal["graded", "binary", "chexpert"] = option("binary", "how a cell becomes a label: graded (0–4 or grade names; present from first_positive_grade), binary (0/1, yes/no, true/false) or chexpert (1, 0, −1 uncertain, blank)")
    uncertain: Optional[Literal["ones", "zeros", "ignore"]] = option(None, "an uncertain value (graded: the grade named 'uncertain'; chexpert: −1) counts as present (ones), absent (zeros) or not observed (ignore: it adds nothing to loss, class counts or metrics); default: the label set's, else zeros (chexpert rule: ignore)")
    blank: Optional[Literal["zeros", "ignore", "error"]] = option(None, "an empty cell counts as absent (zeros), not observed (ignore) or is refused (error); default: the label set's, else error (chexpert rule: zeros)")
    first_positive_grade: int = option(2, "graded: the lowest grade that counts as present (paper: 2, 'mild')", ge=1, le=4)
    grade_names: Optional[tuple[str, ...]] = option(None, "graded: the names of grades 0–4 (default: negative, uncertain, mild, moderate, severe)")


@dataclass(frozen=True)
class LabelsConfig:
    SHORTHAND: ClassVar[str] = "preset"  # `labels: chexpert` means `labels: {preset: chexpert}`
    preset: Optional[str] = option(None, "a named label set: uka-cxr (the paper's 8 graded findings; radiograph default), chexpert (the 14 CheXpert observations, CheXpert column names) or binary (one 0/1 column `label`; CT default)")
    findings: Optional[tuple[FindingConfig, ...]] = option(None, "instead of a preset, the findings one by one, each with name, column and rule")
    uncertain: Optional[Literal["ones", "zeros", "ignore"]] = option(None, "policy for uncertain values of every finding that does not set its own")
    blank: Optional[Literal["zeros", "ignore", "error"]] = option(None, "policy for empty cells of every finding that does not set its own")


@dataclass(frozen=True)
class AttributeConfig:
    SHORTHAND: ClassVar[str] = "column"  # `- race` means `- {column: race}`
    column: Optional[str] = option(None, "manifest column of the sensitive attribute (required): sex, age, site, race, view_position, …")
    name: Optional[str] = option(None, "name of the attribute in the report (default: the column; a binned column: <column>_group, so age → age_group)")
    bins: Optional[tuple[float, ...]] = option(None, "numeric column: bin edges, e.g. [0, 30, 60, 70, 80] → 0-29, 30-59, …, 80+ (age's default for radiographs: these paper bins)")
    quantiles: Optional[int] = option(None, "numeric column: bin into this many quantile groups of the cohort (age's default for CT: 4)", ge=2, le=20)
    required: bool = option(False, "refuse rows whose value is missing, instead of reporting them as the group 'unknown'")


@dataclass(frozen=True)
class FairnessConfig:
    attributes: tuple[AttributeConfig, ...] = option(
        (AttributeConfig(column="sex"), AttributeConfig(column="age")),
        "sensitive attributes audited: manifest columns, categorical as they are, numeric binned (a plain name, or a mapping with column, bins/quantiles, required)")
    intersections: tuple[tuple[str, str], ...] = option(
        (("sex", "age_group"),), "pairs of attributes audited jointly, e.g. [race, sex]; [sex, age_group] is reported as sex_x_age")


STAGES = ("prepare", "train", "audit", "evaluate", "release")
DEFAULT_STAGES = ("prepare", "train", "evaluate", "release")
"""The audit stage trains a second (twin) model: a job asks for it in pipeline.stages."""
# The network's shape rules (models/resnet9.py), checked here so a job fails when loaded, not mid-run.
RESNET9_WIDTHS = (64, 128, 256, 512)
MIN_MODEL_INPUT = 32


@dataclass(frozen=True)
class PipelineConfig:
    stages: tuple[Literal["prepare", "train", "audit", "evaluate", "release"], ...] = option(
        DEFAULT_STAGES, "stages `dpmedtf run` performs, in this order (a pipeline may stop early, e.g. without "
        "release); add audit (after train) for the canary audit of the DP model")


@dataclass(frozen=True)
class JobConfig:
    name: str = option("job", "name of the job, used in reports")
    data: DataConfig = option(DataConfig(), "input data")
    model: ModelConfig = option(ModelConfig(), "network")
    privacy: PrivacyConfig = option(PrivacyConfig(), "differential privacy")
    training: TrainingConfig = option(TrainingConfig(), "optimisation")
    evaluation: EvaluationConfig = option(EvaluationConfig(), "evaluation")
    audit: AuditConfig = option(AuditConfig(), "canary audit (`dpmedtf audit`, or the audit stage)")
    release: ReleaseConfig = option(ReleaseConfig(), "release bundle")
    labels: LabelsConfig = option(LabelsConfig(), "which findings the model learns and how manifest values become labels")
    fairness: FairnessConfig = option(FairnessConfig(), "the subgroups the fairness audit reports")
    pipeline: PipelineConfig = option(PipelineConfig(), "stages of `dpmedtf run`")


# --- loading -----------------------------------------------------------------------------------------

def load_config(path: str | Path, cls: type = JobConfig) -> Any:
    """Reads, validates and resolves a YAML job file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc}); give the path of a "
                          "job YAML file") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not a YAML job file; give the path of the job's .yaml "
                          "file (see `dpmedtf config keys` for its settings)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return config_from_mapping(raw if raw is not None else {}, cls, source=str(path), base_dir=path.parent)


def config_from_mapping(raw: Any, cls: type = JobConfig, source: str = "<config>",
                        base_dir: Path | None = None) -> Any:
    loaded = _convert(raw, cls, "", _Context(source, base_dir))
    return resolve(loaded, source) if isinstance(loaded, JobConfig) else loaded


@dataclass(frozen=True)
class _Context:
    source: str
    base_dir: Path | None

    def fail(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key_path or '<top level>'}: {message}")


def _convert(value: Any, tp: Any, key_path: str, ctx: _Context, bounds: dict | None = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key_path, ctx, bounds)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, key_path, ctx)
    if origin is Literal:
        if value not in args:
            raise ctx.fail(key_path, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)) or not value:
            raise ctx.fail(key_path, f"must be a non-empty list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key_path}[{i}]", ctx, bounds) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ctx.fail(key_path, f"must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key_path}[{i}]", ctx, bounds) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.fail(key_path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(key_path, f"must be a whole number, got {value!r}")
        return _check_bounds(value, bounds, key_path, ctx)
    if tp is float:
        if isinstance(value, str):  # YAML reads 6e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ctx.fail(key_path, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ctx.fail(key_path, f"must be a finite number, got {value!r}")
        return _check_bounds(float(value), bounds, key_path, ctx)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ctx.fail(key_path, f"must be a non-empty string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ctx.fail(key_path, f"must be a path, got {value!r}")
        p = Path(value).expanduser()
        return (ctx.base_dir / p).resolve() if ctx.base_dir is not None and not p.is_absolute() else p
    raise TypeError(f"config type {tp!r} at {key_path} is not supported")  # a bug in this module


def _convert_dataclass(value: Any, cls: type, key_path: str, ctx: _Context) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and hasattr(cls, "SHORTHAND"):
        value = {cls.SHORTHAND: value}
    if not isinstance(value, dict):
        raise ctx.fail(key_path, f"must be a mapping of settings, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in value:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ctx.fail(_join(key_path, str(key)), f"unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {name: _convert(value[name], hints[name], _join(key_path, name), ctx, f.metadata.get("bounds"))
              for name, f in fields.items() if name in value}
    return cls(**kwargs)


def _check_bounds(value: float, bounds: dict | None, key_path: str, ctx: _Context) -> float:
    checks = {"ge": (lambda v, b: v >= b, "≥"), "le": (lambda v, b: v <= b, "≤"),
              "gt": (lambda v, b: v > b, ">"), "lt": (lambda v, b: v < b, "<")}
    for name, bound in (bounds or {}).items():
        ok, sign = checks[name]
        if not ok(value, bound):
            raise ctx.fail(key_path, f"must be {sign} {bound:g}, got {value!r}")
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# --- resolution --------------------------------------------------------------------------------------

def resolve(job: JobConfig, source: str = "<config>") -> JobConfig:
    """Fills regime-dependent defaults (paper: DP vs non-DP) and checks cross-field rules."""
    ctx = _Context(source, None)
    dp = job.privacy.enabled
    if job.privacy.epsilon_sweep:
        if job.privacy.target_epsilon is not None or job.privacy.noise_multiplier is not None or not dp:
            raise ctx.fail("privacy", "epsilon_sweep sets each run's target_epsilon: remove target_epsilon/"
                                      "noise_multiplier and keep enabled: true")
    elif dp and (job.privacy.target_epsilon is None) == (job.privacy.noise_multiplier is None):
        raise ctx.fail("privacy", "give exactly one of target_epsilon (σ is calibrated to it) or "
                                  "noise_multiplier, or set enabled: false for a non-private run")
    if not dp and (job.privacy.target_epsilon is not None or job.privacy.noise_multiplier is not None):
        raise ctx.fail("privacy", "target_epsilon/noise_multiplier are set but enabled is false: "
                                  "remove them or enable DP, so the run is not mistaken for a private one")
    if job.training.clipping not in engine_names():
        raise ctx.fail("training.clipping", f"must be one of {', '.join(map(repr, engine_names()))}, "
                                            f"got {job.training.clipping!r}")
    if abs(sum(job.data.split_fractions) - 1.0) > 1e-6:
        raise ctx.fail("data.split_fractions", f"must sum to 1, got {job.data.split_fractions}")
    if job.data.hu_window[0] >= job.data.hu_window[1]:
        raise ctx.fail("data.hu_window", f"low must be below high, got {job.data.hu_window}")
    if any(width % job.model.groups for width in RESNET9_WIDTHS):
        raise ctx.fail("model.groups", f"must divide every ResNet9 stage width {RESNET9_WIDTHS} (e.g. 32, 16 or 8), "
                                       f"got {job.model.groups}")
    if job.data.modality == "volume" and job.training.augment:
        raise ctx.fail("training.augment", "augmentation (rotation and flip) is defined for radiographs only; "
                                           "remove it or set it false for CT volumes")
    if job.data.modality == "volume" and "train" in job.pipeline.stages and min(job.data.volume_shape) < MIN_MODEL_INPUT:
        raise ctx.fail("data.volume_shape", f"every size must be ≥ {MIN_MODEL_INPUT} for the network (it halves the "
                                            f"input five times), got {list(job.data.volume_shape)}")
    if job.training.class_weights == "dp_counts" and not dp:
        raise ctx.fail("training.class_weights", "dp_counts releases counts with DP noise for a DP run; a non-private "
                                                 "run uses inverse_frequency (exact counts)")
    if (job.training.class_weights == "public_prior") != (job.training.class_prior is not None):
        raise ctx.fail("training.class_prior", "give class_prior (one prevalence per label) exactly when "
                                               "class_weights is public_prior")
    _check_labels(job.labels, ctx)
    _check_fairness(job, ctx)
    stages = job.pipeline.stages
    if not stages or list(stages) != [s for s in STAGES if s in stages]:
        raise ctx.fail("pipeline.stages", f"must be distinct stages in the order {list(STAGES)}, got {list(stages)}")
    if job.labels.preset is None and not job.labels.findings:  # the resolved job names its label set
        job = dataclasses.replace(job, labels=dataclasses.replace(
            job.labels, preset=label_sets.default_preset(job.data.modality)))
    if job.privacy.epsilon_sweep:
        return job  # each run of the sweep is resolved for its own regime (training.job.sweep_members)
    return dataclasses.replace(
        job,
        model=dataclasses.replace(job.model, activation=job.model.activation or ("mish" if dp else "relu")),
        training=dataclasses.replace(
            job.training,
            learning_rate=job.training.learning_rate or (5e-4 if dp else 5e-5),
            class_weights=job.training.class_weights or ("dp_counts" if dp else "inverse_frequency"),
            augment=(not dp and job.data.modality == "radiograph") if job.training.augment is None
            else job.training.augment))


def _check_labels(labels: LabelsConfig, ctx: _Context) -> None:
    if labels.preset is not None and labels.findings:
        raise ctx.fail("labels", "give either preset or findings, not both")
    if labels.preset is not None and labels.preset not in label_sets.preset_names():
        raise ctx.fail("labels.preset", f"must be one of {', '.join(map(repr, label_sets.preset_names()))}, "
                                        f"got {labels.preset!r} (or list the findings under labels.findings)")
    for i, finding in enumerate(labels.findings or ()):
        if finding.name is None:
            raise ctx.fail(f"labels.findings[{i}]", "needs a name (and, if the manifest column is named otherwise, a column)")
    for kind, values in (("name", [f.name for f in labels.findings or ()]),
                         ("column", [f.column or f.name for f in labels.findings or ()])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ctx.fail("labels.findings", f"each finding needs its own {kind}; {', '.join(repeated)} is repeated")
    for i, finding in enumerate(labels.findings or ()):
        where = f"labels.findings[{i}]"
        if finding.name in FRAME_COLUMNS:
            raise ctx.fail(f"{where}.name", f"{finding.name!r} is a column dpmedtf keeps for every row; name the "
                                            "finding otherwise (its column may keep its name)")
        names = finding.grade_names or label_sets.L.GRADE_NAMES
        if finding.rule == "graded" and (len(names) < 2 or finding.first_positive_grade >= len(names)):
            raise ctx.fail(f"{where}.first_positive_grade", f"must name one of the grades 1–{len(names) - 1}")
        if finding.rule != "graded" and finding.grade_names is not None:
            raise ctx.fail(f"{where}.grade_names", "applies to graded findings only")


# Columns every cohort frame holds (manifests.Cohort); a finding or attribute may not take these names.
FRAME_COLUMNS = frozenset({"path", "manifest_path", "patient_id", "age", "split", "line", "synthetic", "image_id"})


def _check_fairness(job: JobConfig, ctx: _Context) -> None:
    for i, item in enumerate(job.fairness.attributes):
        if item.column is None:
            raise ctx.fail(f"fairness.attributes[{i}]", "needs a column (the manifest column to group by)")
    spec = attributes.from_config(job.fairness, job.data.modality)
    finding_names = set(label_sets.from_config(job.labels, job.data.modality).names)
    for i, (item, attribute_) in enumerate(zip(job.fairness.attributes, spec.attributes)):
        where = f"fairness.attributes[{i}]"
        if item.bins is not None and item.quantiles is not None:
            raise ctx.fail(where, "give bins or quantiles, not both")
        if item.bins is not None and list(item.bins) != sorted(set(item.bins)):
            raise ctx.fail(f"{where}.bins", f"must be increasing, got {list(item.bins)}")
        if attribute_.name in FRAME_COLUMNS | finding_names:
            raise ctx.fail(f"{where}.name", f"{attribute_.name!r} is taken (a column dpmedtf keeps, or a finding); "
                                            "give the attribute another name")
        if item.column == "sex" and attribute_.numeric:
            raise ctx.fail(where, "sex is categorical: remove bins/quantiles")
    names = [a.name for a in spec.attributes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ctx.fail("fairness.attributes", f"each attribute needs its own name; {', '.join(repeated)} is repeated")
    for i, pair in enumerate(job.fairness.intersections):
        unknown = [n for n in pair if n not in names]
        if unknown or pair[0] == pair[1]:
            raise ctx.fail(f"fairness.intersections[{i}]", f"must pair two of the attributes {names}, got {list(pair)}"
                           + (f" (a binned column is named <column>_group, e.g. age_group)" if unknown else ""))


def config_to_dict(config: Any) -> Any:
    """Plain data (for YAML/JSON) of a config, paths as strings: what a run records as 'resolved'."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [config_to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def describe(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, doc) for every setting: the reference the README and `config keys` show."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, repr(config_to_dict(default)), f.metadata.get("doc", "")))
            item = _list_item_dataclass(hints[f.name])
            if item is not None:  # a list of settings blocks (labels.findings, fairness.attributes): their keys too
                rows.extend(describe(item, f"{key}[]"))
    return rows


def _list_item_dataclass(tp: Any) -> type | None:
    """The dataclass of a ``tuple[Dataclass, ...]`` (or Optional of it) field, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (Union, types.UnionType) else [tp]
    for arg in args:
        inner = typing.get_args(arg)
        if typing.get_origin(arg) is tuple and len(inner) == 2 and inner[1] is Ellipsis and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None
