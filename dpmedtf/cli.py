"""The ``dpmedtf`` command line. It parses arguments and calls the library; it holds no logic.

Heavy imports (TensorFlow, dp_accounting) happen inside the commands that need them, so
``dpmedtf --help`` and the privacy calculator start fast.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

# typer 0.29 carries its own copy of click: its exceptions are not the installed click's.
from typer._click.exceptions import ClickException, UsageError

from dpmedtf import __version__
from dpmedtf.errors import ConfigError, DpmedtfError

app = typer.Typer(name="dpmedtf", no_args_is_help=True, add_completion=False,
                  help="Differentially private diagnostic models for medical imaging.")
privacy_app = typer.Typer(no_args_is_help=True, help="Privacy accountant calculator (DP-SGD, Poisson sampling).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and validate job configuration files.")
preprocess_app = typer.Typer(no_args_is_help=True, help="Write exactly what the model sees for one input.")
app.add_typer(privacy_app, name="privacy")
app.add_typer(config_app, name="config")
app.add_typer(preprocess_app, name="preprocess")
trust_app = typer.Typer(no_args_is_help=True, help="Publishers' public keys you trust: `verify` and `predict` check "
                                                  "bundles against them and name the signer.")
app.add_typer(trust_app, name="trust")
data_app = typer.Typer(no_args_is_help=True, help="Manifests from a hospital archive (DICOMweb) or from public data sets "
                                                  "(MIMIC-CXR-JPG, CheXpert).")
app.add_typer(data_app, name="data")
import_app = typer.Typer(no_args_is_help=True, help="Manifests from public chest radiograph datasets (MIMIC-CXR-JPG, "
                                                    "CheXpert) with the 14 CheXpert labels (`labels: chexpert`).")
data_app.add_typer(import_app, name="import")


class Convention(str, Enum):
    uka_cxr = "uka-cxr"
    chexpert = "chexpert"


class AccountantChoice(str, Enum):
    pld = "pld"
    rdp = "rdp"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dpmedtf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Differentially private diagnostic models for medical imaging."""


# --- privacy -----------------------------------------------------------------------------------------

_DATASET = typer.Option(..., "--dataset-size", help="N: records in the training set (images, or patients).")
_BATCH = typer.Option(..., "--batch-size", help="B: expected batch size; sampling rate q = B/N (Poisson).")
_EPOCHS = typer.Option(None, "--epochs", help="Expected passes over the data; steps = ceil(E·N/B).")
_STEPS = typer.Option(None, "--steps", help="Optimizer steps (instead of --epochs).")
_DELTA = typer.Option(..., "--delta", help="δ; must be below 1/N.")
_ACCOUNTANT = typer.Option(AccountantChoice.pld, "--accountant", help="Privacy accountant: pld (tight, default) or rdp.")
_LARGE_DELTA = typer.Option(False, "--allow-large-delta",
                            help="Accept δ ≥ 1/N, which permits leaking a whole record.")


def _steps(dataset_size: int, batch_size: int, epochs: Optional[float], steps: Optional[int]) -> int:
    from dpmedtf.privacy import accounting

    if (epochs is None) == (steps is None):
        raise UsageError("give exactly one of --epochs or --steps")
    return steps if steps is not None else accounting.steps_for_epochs(dataset_size, batch_size, epochs)


@privacy_app.command("epsilon")
def privacy_epsilon(dataset_size: int = _DATASET, batch_size: int = _BATCH,
                    epochs: Optional[float] = _EPOCHS, steps: Optional[int] = _STEPS,
                    noise_multiplier: float = typer.Option(..., "--noise-multiplier", help="σ: noise std / clip norm."),
                    delta: float = _DELTA, accountant: AccountantChoice = _ACCOUNTANT,
                    allow_large_delta: bool = _LARGE_DELTA) -> None:
    """ε spent by a DP-SGD run, printed as one JSON object."""
    from dpmedtf.privacy import accounting

    schedule = accounting.DpSgdSchedule(dataset_size, batch_size,
                                        _steps(dataset_size, batch_size, epochs, steps), noise_multiplier)
    result = accounting.compute_epsilon(schedule, delta, accountant.value, allow_large_delta)
    typer.echo(json.dumps(result.to_json_dict(), indent=2))


@privacy_app.command("noise")
def privacy_noise(dataset_size: int = _DATASET, batch_size: int = _BATCH,
                  epochs: Optional[float] = _EPOCHS, steps: Optional[int] = _STEPS,
                  target_epsilon: float = typer.Option(..., "--target-epsilon", help="ε to reach at the last step."),
                  delta: float = _DELTA, accountant: AccountantChoice = _ACCOUNTANT,
                  sigma_tolerance: float = typer.Option(1e-5, "--sigma-tolerance",
                                                        help="σ is within this of the smallest that reaches the target."),
                  allow_large_delta: bool = _LARGE_DELTA) -> None:
    """The smallest noise multiplier σ that reaches a target ε, printed as one JSON object."""
    from dpmedtf.privacy import accounting

    calibration = accounting.calibrate_noise_multiplier(
        target_epsilon, delta, dataset_size, batch_size, _steps(dataset_size, batch_size, epochs, steps),
        accountant.value, sigma_tolerance, allow_large_delta)
    typer.echo(json.dumps(calibration.to_json_dict(), indent=2))


# --- config ------------------------------------------------------------------------------------------

@config_app.command("show")
def config_show(path: Path = typer.Argument(..., help="A job YAML file.")) -> None:
    """Validate a job file and print it resolved (every default filled in)."""
    import yaml

    from dpmedtf.config import config_to_dict, load_config

    typer.echo(yaml.safe_dump(config_to_dict(load_config(path)), sort_keys=False).rstrip())


@config_app.command("keys")
def config_keys() -> None:
    """List every setting with its default and meaning."""
    from dpmedtf.config import describe

    for key, default, doc in describe():
        typer.echo(f"{key} = {default}\n    {doc}")


# --- data --------------------------------------------------------------------------------------------

class DicomDecoder(str, Enum):
    tensorflow_io = "tensorflow-io"
    pydicom = "pydicom"


_DICOM_DECODER = typer.Option(DicomDecoder.tensorflow_io, "--dicom-decoder",
                              help="Library for DICOMs both can read; pydicom is faster on native CRs.")


def _refuse_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; choose another --out or pass --force to replace it")


@preprocess_app.command("radiograph")
def preprocess_radiograph(source: Path = typer.Argument(..., help="PNG, JPEG or DICOM radiograph."),
                          out: Path = typer.Option(..., "--out", help="Output PNG (3-channel uint8)."),
                          image_size: int = typer.Option(512, "--image-size", min=32, help="Output side in pixels."),
                          dicom_decoder: DicomDecoder = _DICOM_DECODER,
                          force: bool = typer.Option(False, "--force", help="Replace an existing output.")) -> None:
    """Decode, resize, min-max to uint8, equalise, expand to 3 channels; write the PNG the model sees."""
    import numpy as np

    from dpmedtf.data import radiograph

    _refuse_overwrite(out, force)
    image = radiograph.preprocess_file(source, image_size, dicom_decoder.value)
    radiograph.save_png(np.repeat(image[..., None], 3, axis=-1), out)
    typer.echo(f"wrote {out} ({image_size}×{image_size}×3 uint8; the model input is this / 255)")


@preprocess_app.command("volume")
def preprocess_volume(source: Path = typer.Argument(..., help="NIfTI file or folder of DICOM slices."),
                      out: Path = typer.Option(..., "--out", help="Output .nii.gz/.nii or .npy."),
                      shape: tuple[int, int, int] = typer.Option((224, 224, 128), "--shape", help="H W D after resizing."),
                      hu_window: tuple[float, float] = typer.Option((-150.0, 250.0), "--hu-window", help="HU clip window."),
                      force: bool = typer.Option(False, "--force", help="Replace an existing output.")) -> None:
    """HU, canonical orientation, clip, scale to [0, 1], trilinear resize; write the volume the model sees."""
    from dpmedtf.data import volume

    _refuse_overwrite(out, force)
    volume.check_output_path(out)
    data = volume.preprocess_file(source, shape, hu_window)
    if out.suffix == ".npy":
        volume.save_npy(data, out)
    else:
        volume.save_nifti(data, out)
    typer.echo(f"wrote {out} (D×H×W = {'×'.join(map(str, data.shape))} float32 in [0, 1])")


_LABELS = typer.Option(None, "--labels", help="Label preset the manifest follows: uka-cxr (radiograph default), "
                       "chexpert (the 14 CheXpert columns, -1 uncertain → ignored, blank → 0) or binary (CT default); "
                       "a job's labels: section says more.")


def _label_set(name: Optional[str], modality: str):
    from dpmedtf.data import label_sets

    if name is None:
        return None
    try:
        return label_sets.preset(name)
    except ValueError as exc:
        raise ConfigError(f"--labels: {exc}") from None


@app.command("cohort")
def cohort(manifest: Path = typer.Argument(..., help="Radiograph or CT manifest CSV."),
           split_seed: int = typer.Option(0, "--split-seed", help="Seed of the patient-wise split (no split column)."),
           labels: Optional[str] = _LABELS,
           out: Optional[Path] = typer.Option(None, "--out", help="Also write the table as CSV.")) -> None:
    """Validate a manifest and print its cohort table (counts per split, sex, age group, finding)."""
    from dpmedtf.data import manifests

    modality = manifests.detect_modality(manifest)
    loaded = manifests.load_manifest(manifest, modality, split_seed=split_seed, label_set=_label_set(labels, modality))
    _print_cohort(loaded, manifests.cohort_table(loaded), out)


@app.command("prepare")
def prepare(manifest: Path = typer.Argument(..., help="Radiograph or CT manifest CSV."),
            cache: Path = typer.Option(..., "--cache", help="Cache directory for the preprocessed array."),
            image_size: int = typer.Option(512, "--image-size", min=32, help="Radiograph side in pixels."),
            shape: tuple[int, int, int] = typer.Option((224, 224, 128), "--shape", help="CT H W D."),
            split_seed: int = typer.Option(0, "--split-seed", help="Seed of the patient-wise split."),
            dicom_decoder: DicomDecoder = _DICOM_DECODER,
            labels: Optional[str] = _LABELS,
            skip_bad: bool = typer.Option(False, "--skip-bad", help="Quarantine unreadable files instead of stopping.")) -> None:
    """Check, decode and preprocess every file of a manifest into the cache; print the cohort table."""
    from dpmedtf.data import cache as data_cache
    from dpmedtf.data import manifests
    from dpmedtf.progress import progress_bar

    modality = manifests.detect_modality(manifest)
    loaded = manifests.load_manifest(manifest, modality, split_seed=split_seed, label_set=_label_set(labels, modality))
    spec = data_cache.PreprocessSpec(modality, image_size=image_size, volume_shape=shape,
                                     dicom_decoder=dicom_decoder.value)
    with progress_bar("preparing", len(loaded.frame)) as advance:
        prepared = data_cache.prepare(loaded, spec, cache, skip_bad=skip_bad, progress=advance)
    _print_cohort(prepared.cohort, manifests.cohort_table(prepared.cohort, prepared.quarantine), None)
    typer.echo(f"cache: {prepared.directory}")
    if len(prepared.quarantine):
        typer.echo(f"quarantined {len(prepared.quarantine)} file(s), listed with reasons in "
                   f"{prepared.directory / 'quarantine.csv'}", err=True)


@app.command("synthetic")
def synthetic(out: Path = typer.Option(..., "--out", help="Directory for the synthetic cohort."),
              patients: int = typer.Option(120, "--patients", min=1),
              volumes: int = typer.Option(0, "--volumes", min=0, help="Also write this many CT-like volumes."),
              seed: int = typer.Option(0, "--seed"),
              convention: Convention = typer.Option(Convention.uka_cxr, "--convention", help="Radiograph labels: "
                                                    "uka-cxr (8 findings graded 0–4) or chexpert (14 observations with "
                                                    "uncertain -1.0 and blank entries; train with labels: chexpert).")) -> None:
    """Write the SYNTHETIC demo cohort (generated images, not patients) with its manifests."""
    from dpmedtf.data.synthetic import NOTICE, SyntheticCohortSpec, write_synthetic_cohort

    written = write_synthetic_cohort(out, SyntheticCohortSpec(patients=patients, volumes=volumes, seed=seed,
                                                              convention=convention.value))
    for kind, path in written.items():
        typer.echo(f"{kind} manifest: {path}")
    typer.echo(NOTICE)


# --- training ----------------------------------------------------------------------------------------

@app.command("train")
def train(config: Path = typer.Argument(..., help="Job YAML (see `dpmedtf config keys`)."),
          out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<job name>)."),
          force: bool = typer.Option(False, "--force", help="Train again even if a finished model exists.")) -> None:
    """Train one job (DP-SGD or non-private, or an ε sweep); resumes from its last checkpoint."""
    from dpmedtf.config import load_config
    from dpmedtf.data.cache import quarantine_note
    from dpmedtf.progress import progress_bar
    from dpmedtf.run_lock import training_lock
    from dpmedtf.training.job import prepare_data, train_members

    job = load_config(config)
    out = out or Path("runs") / job.name
    with training_lock(out, job.training):
        with progress_bar("preparing data", 1) as advance:
            prepared = prepare_data(job, out, progress=advance)
        note = quarantine_note(prepared)
        if note:
            typer.echo(f"WARNING: {note}", err=True)
        for result in train_members(job, prepared, out, force=force):
            privacy = (f"ε = {result.ledger.epsilon():.4g} at δ = {result.plan.delta:g}" if result.ledger is not None
                       else "non-private")
            written = "" if result.chief else ", written by the chief worker"
            typer.echo(f"{result.model_path} ({result.steps} steps, {privacy}{written})")


@app.command("evaluate")
def evaluate(config: Path = typer.Argument(..., help="The job YAML the model was trained with."),
             run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: runs/<job name>)."),
             force: bool = typer.Option(False, "--force", help="Evaluate again over an existing evaluation.")) -> None:
    """Predictions, validation-chosen thresholds, test metrics with bootstrap CIs, fairness report."""
    from dpmedtf.config import load_config
    from dpmedtf.evaluation.job import evaluate_job

    from dpmedtf.evaluation.canary_audit import read_audit

    from dpmedtf.run_lock import RunLock

    job = load_config(config)
    run = run or Path("runs") / job.name
    with RunLock(run, "dpmedtf evaluate", create=False):
        members, report = evaluate_job(job, run, force)
    audit = read_audit(run)
    for member in members:
        mean = member.metrics["mean"]
        privacy = "non-private" if member.epsilon is None else f"certified ε = {member.epsilon:.4g}"
        if audit and audit.get("member") == member.name:
            privacy += f", measured ε ≥ {audit['epsilon_lower_bound']:.3g} (canary audit, {audit['confidence']:.0%})"
        typer.echo(f"{member.name}: mean test AUROC {mean['auroc']:.3f} [{mean['auroc_ci_low']:.3f}, "
                   f"{mean['auroc_ci_high']:.3f}], {privacy}"
                   + (" — SYNTHETIC DATA" if member.metrics["synthetic_data"] else ""))
    typer.echo(f"report: {report}")


# --- pipelines ---------------------------------------------------------------------------------------

_FORCE_STAGES = typer.Option([], "--force", metavar="STAGE",
                             help="Redo a finished stage (prepare, train, audit, evaluate, release); repeatable. Recorded.")


class AuditKind(str, Enum):
    white_box = "white-box"
    black_box = "black-box"


@app.command("audit")
def audit(config: Path = typer.Argument(..., help="The DP job YAML whose mechanism to audit."),
          out: Path = typer.Option(..., "--out", help="Directory for audit.json, the figure and the twin's ledger."),
          kind: Optional[AuditKind] = typer.Option(None, "--kind",
                                                   help="white-box: gradient canaries scored on the updates "
                                                        "(strongest); black-box: canary images scored by the final "
                                                        "model's loss. Default: the job's audit.kind (white-box)."),
          canaries: Optional[int] = typer.Option(None, "--canaries", help="Canaries m, each included with "
                                                 "probability ½. Default: the job's audit.canaries (1000)."),
          confidence: Optional[float] = typer.Option(None, "--confidence", help="Confidence of the lower bound. "
                                                     "Default: the job's audit.confidence (0.95)."),
          member: Optional[str] = typer.Option(None, "--member",
                                               help="For an ε sweep: which model to audit (default release.member)."),
          force: bool = typer.Option(False, "--force", help="Audit again over an existing audit.json.")) -> None:
    """Canary audit: train a twin of the job's DP model with secret canaries → a measured ε lower bound."""
    from dpmedtf.config import load_config
    from dpmedtf.evaluation.canary_audit import run_canary_audit
    from dpmedtf.progress import progress_bar

    from dpmedtf.run_lock import RunLock

    job = load_config(config)
    with RunLock(out, "dpmedtf audit"), progress_bar("preparing data", 1) as advance:
        result = run_canary_audit(job, out, kind=kind.value if kind else job.audit.kind,
                                  canaries=job.audit.canaries if canaries is None else canaries,
                                  confidence=job.audit.confidence if confidence is None else confidence,
                                  member=member, force=force, progress=advance)
    r = result.record
    synthetic = " — SYNTHETIC DATA" if r["synthetic_data"] else ""
    typer.echo(f"measured ε ≥ {r['epsilon_lower_bound']:.3g} ({r['confidence']:.0%} confidence, δ = {r['delta']:g}, "
               f"{r['kind']}, {r['correct_guesses']}/{r['guesses']} guesses right, {r['canaries']} canaries); "
               f"certified ε = {r['certified_epsilon']:.4g}{synthetic}")
    if not r["can_refute_certificate"]:
        typer.echo(f"note: with {r['canaries']} canaries even a perfect attacker shows at most ε ≥ "
                   f"{r['epsilon_lower_bound_ceiling']:.3g}, below the certified ε, so this audit could not refute it; "
                   "more canaries raise that ceiling (about log m)", err=True)
    if r["epsilon_lower_bound"] > r["certified_epsilon"]:
        typer.echo("WARNING: the measured lower bound exceeds the certified ε: the implementation does less than "
                   "its certificate claims (or this was the 1 − confidence chance); do not release", err=True)
    typer.echo(f"{result.directory.record}")
    if r["epsilon_lower_bound"] > r["certified_epsilon"]:
        raise typer.Exit(code=1)


@app.command("run")
def run(pipeline: Path = typer.Argument(..., help="Pipeline YAML (a job with a `pipeline.stages` list)."),
        out: Path = typer.Option(..., "--out", help="Run directory; re-running resumes or skips finished stages."),
        force: list[str] = _FORCE_STAGES) -> None:
    """Run a pipeline's stages: prepare → train → (audit) → evaluate → release."""
    from dpmedtf.config import load_config
    from dpmedtf.runner import Pipeline

    runner = Pipeline(load_config(pipeline), out, force)
    outcomes = runner.run()
    for outcome in outcomes:
        typer.echo(f"{outcome.stage}: {outcome.status}")
    typer.echo(f"summary: {out / 'index.html'}")
    if runner.quarantine_note:
        typer.echo(f"WARNING: {runner.quarantine_note}", err=True)


@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for the demo run."),
         force: list[str] = _FORCE_STAGES) -> None:
    """The whole pipeline on the embedded SYNTHETIC cohort: train DP and non-private, evaluate, release, predict."""
    import time

    from dpmedtf.demo import run_demo

    started = time.monotonic()
    result = run_demo(out, tuple(force))
    typer.echo(f"\ndemo finished in {time.monotonic() - started:.0f} s — SYNTHETIC DATA, no clinical claim\n"
               f"  summary page:  {result.summary}\n  report:        {result.report}\n"
               f"  bundle:        {result.bundle} (verified: {'yes' if result.verified else 'NO'})\n"
               f"  verify it:     dpmedtf verify {result.bundle} --public-key {out / 'keys' / 'demo_signing.pub'}")
    if result.predictions is not None:
        typer.echo(f"  predictions:   {result.predictions} (the released model on pydicom-data's real RG1_UNCR.dcm)")


# --- release and consumers ---------------------------------------------------------------------------

@app.command("keygen")
def keygen(private_key: Path = typer.Option(Path("signing_key.pem"), "--private-key", help="Where to write the private key (PEM, mode 600)."),
           public_key: Optional[Path] = typer.Option(None, "--public-key", help="Where to write the public key (default: private key with suffix .pub)."),
           password_env: Optional[str] = typer.Option(None, "--password-env", help="Encrypt the private key with the password in this environment variable.")) -> None:
    """Create a P-256 key pair for signing release bundles offline."""
    from dpmedtf.release.signing import generate_keypair

    public_key = public_key or private_key.with_suffix(".pub")
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            raise UsageError(f"environment variable {password_env} is empty or not set")
    fingerprint = generate_keypair(private_key, public_key, password)
    typer.echo(f"private key: {private_key} (keep it secret; it signs releases)\npublic key:  {public_key} "
               f"(give it to consumers)\nfingerprint: {fingerprint}")


@app.command("release")
def release(config: Path = typer.Argument(..., help="The job YAML the model was trained and evaluated with."),
            run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: runs/<job name>)."),
            out: Optional[Path] = typer.Option(None, "--out", help="Bundle directory to create (default: <run>/bundle)."),
            member: Optional[str] = typer.Option(None, "--member", help="Sweep model to release (release.member)."),
            private_key: Optional[Path] = typer.Option(None, "--private-key", help="Signing key (release.private_key)."),
            public_key: Optional[Path] = typer.Option(None, "--public-key", help="Its public key (release.public_key)."),
            policy: Optional[Path] = typer.Option(None, "--policy", help="Release policy YAML (release.policy)."),
            override_policy: Optional[str] = typer.Option(None, "--override-policy", metavar="REASON",
                                                          help="Release despite broken policy rules; the reason is recorded in the bundle.")) -> None:
    """Export to ONNX, certify, check the release policy, write and sign the bundle."""
    from dpmedtf.config import load_config
    from dpmedtf.release.job import release_job, with_release_overrides
    from dpmedtf.run_lock import RunLock

    job = with_release_overrides(load_config(config), member=member, private_key=private_key, public_key=public_key,
                                 policy=policy)
    run = run or Path("runs") / job.name
    with RunLock(run, "dpmedtf release", create=False):
        bundle = release_job(job, run, out, override_policy)
    typer.echo(f"bundle: {bundle}")
    _print_verification(_verify(bundle, job.release.public_key or job.release.private_key.with_suffix(".pub")))


def _verify(bundle: Path, public_key: Optional[Path], integrity_only: bool = False):
    from dpmedtf.release.verify import verify_bundle

    return verify_bundle(bundle, public_key, integrity_only=integrity_only)


def _print_verification(report) -> None:
    for line in report.passed:
        typer.echo(f"  ok    {line}")
    for line in report.failures:
        typer.echo(f"  FAIL  {line}", err=True)
    for line in report.warnings:
        typer.echo(f"  note  {line}", err=True)


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


EXIT_INTEGRITY_ONLY = 3
"""verify/predict: everything passed, but the signature was only checked against the key inside the bundle."""
_PUBLIC_KEY = typer.Option(None, "--public-key", help="The publisher's public key, obtained apart from the bundle "
                           "(or set DPMEDTF_PUBLIC_KEY, or add it once with `dpmedtf trust add`).")
_INTEGRITY_ONLY = typer.Option(False, "--integrity-only",
                               help="Check the signature against the key inside the bundle instead: proves the bundle "
                                    f"is intact as signed, NOT who signed it; exits {EXIT_INTEGRITY_ONLY}.")
_FORMAT = typer.Option(OutputFormat.text, "--format",
                       help="text, or json: one JSON document on stdout and nothing else there (notes go to stderr).")


def _refuse_key_and_integrity_only(public_key: Optional[Path], integrity_only: bool) -> None:
    if public_key is not None and integrity_only:
        raise UsageError("give --public-key (the signer is checked) or --integrity-only (it is not), not both")


@app.command("verify")
def verify(bundle: Path = typer.Argument(..., help="Release bundle directory."),
           public_key: Optional[Path] = _PUBLIC_KEY, integrity_only: bool = _INTEGRITY_ONLY,
           output_format: OutputFormat = _FORMAT) -> None:
    """Check a bundle's sums, signature (naming who signed), schemas, certificate arithmetic and model.

    The signature must verify with the publisher's key: --public-key, else DPMEDTF_PUBLIC_KEY, else a trusted key.

    Exit status:
    0  verified, signed by the publisher's key
    1  a check failed, or no publisher key was given
    2  usage error
    3  intact, but checked only against the key inside the bundle (--integrity-only): signer NOT verified
    """
    from dpmedtf.release.verify import INTEGRITY_ONLY_NOTICE

    _refuse_key_and_integrity_only(public_key, integrity_only)
    report = _verify(bundle, public_key, integrity_only)
    if output_format is OutputFormat.json:
        typer.echo(json.dumps(report.to_json_dict(), indent=2))
    else:
        _print_verification(report)
    if not report.ok:
        typer.echo(f"dpmedtf: {bundle} FAILED verification ({len(report.failures)} problem(s))", err=True)
        raise typer.Exit(1)
    if report.integrity_only:
        if output_format is OutputFormat.text:
            typer.echo(f"{bundle}: intact as signed by the key inside the bundle ({report.key_fingerprint}); "
                       f"{INTEGRITY_ONLY_NOTICE}")
        raise typer.Exit(EXIT_INTEGRITY_ONLY)
    if output_format is OutputFormat.text:
        typer.echo(f"{bundle}: verified, signed by {report.signer.describe()}")


_DICOMWEB = typer.Option(None, "--dicomweb", help="The archive's DICOMweb root, e.g. https://pacs.example.org/dicom-web.")
_STUDY_DATE = typer.Option(None, "--study-date", help="Query: StudyDate or range as DICOM writes it, e.g. 20240101-20240131.")
_MODALITY_QUERY = typer.Option(None, "--modality", help="Query: a modality in the study, e.g. CR or DX.")
_CA_BUNDLE = typer.Option(None, "--ca-bundle", help="PEM file of the hospital's certificate authority, if the archive's "
                                                    "TLS certificate is not publicly trusted (or DPMEDTF_DICOMWEB_CA_BUNDLE).")


@app.command("predict")
def predict(bundle: Path = typer.Argument(..., help="Release bundle directory."),
            inputs: Optional[list[Path]] = typer.Argument(None, help="DICOM/PNG/JPEG radiographs or folders of them "
                                                                     "(walked recursively), or NIfTI files / DICOM series "
                                                                     "folders for CT. Not with --dicomweb."),
            out: Optional[Path] = typer.Option(None, "--out", help="CSV of probabilities and thresholded labels "
                                                                   "(required unless --format json or --sr-out)."),
            public_key: Optional[Path] = _PUBLIC_KEY, integrity_only: bool = _INTEGRITY_ONLY,
            allow_modality_mismatch: bool = typer.Option(
                False, "--allow-modality-mismatch",
                help="Predict on inputs whose DICOM/NIfTI header says they are not what the model was trained on "
                     "(e.g. a CT slice for a radiograph model); recorded per input in modality_check."),
            output_format: OutputFormat = _FORMAT,
            save_inputs: Optional[Path] = typer.Option(None, "--save-inputs", help="Also write each preprocessed input as raw float32 here."),
            force: bool = typer.Option(False, "--force", help="Replace an existing --out file (and --sr-out reports)."),
            dicomweb: Optional[str] = _DICOMWEB,
            study: Optional[list[str]] = typer.Option(None, "--study", help="StudyInstanceUID to predict on (repeat for several)."),
            series: Optional[list[str]] = typer.Option(None, "--series", help="SeriesInstanceUID to predict on (repeat for several)."),
            study_date: Optional[str] = _STUDY_DATE, modality: Optional[str] = _MODALITY_QUERY,
            sr_out: Optional[Path] = typer.Option(None, "--sr-out", help="Write one DICOM Comprehensive SR (TID 1500) "
                                                                        "per study here (with --dicomweb)."),
            store: bool = typer.Option(False, "--store", help="Store the SRs back into the archive (STOW-RS), once "
                                                              "every study's results were produced."),
            download_dir: Optional[Path] = typer.Option(None, "--download-dir", help="Keep the retrieved instances here "
                                                                                    "(default: a temporary folder, removed)."),
            ca_bundle: Optional[Path] = _CA_BUNDLE) -> None:
    """Verify the bundle, check the inputs' headers, preprocess as in training, run the model; CSV and/or JSON.

    The bundle must verify with the publisher's key, as for `verify`.

    Inputs whose DICOM/NIfTI header does not match the model's training data are refused (--allow-modality-mismatch).

    From a hospital archive: --dicomweb URL with --study/--series UIDs or a query (--study-date, --modality);
    credentials from DPMEDTF_DICOMWEB_TOKEN, or DPMEDTF_DICOMWEB_USER and DPMEDTF_DICOMWEB_PASSWORD.
    --sr-out writes the results as DICOM SR, --store sends them to the archive.

    Exit status:
    0  done
    1  an error: verification failed or no publisher key, an input refused or unreadable, an archive failure
    2  usage error
    3  done, but the bundle was checked only against the key inside it (--integrity-only): signer NOT verified
    """
    from dpmedtf.progress import progress_bar
    from dpmedtf.release.predict import (check_inputs_exist, expand_inputs, load, predict_files,
                                         predictions_document, write_predictions)
    from dpmedtf.release.verify import INTEGRITY_ONLY_NOTICE

    as_json = output_format is OutputFormat.json
    from_archive = dicomweb is not None
    if from_archive and inputs:
        raise UsageError("give either local INPUTS or --dicomweb with --study/--series/a query, not both")
    if not from_archive:
        if not inputs:
            raise UsageError("name the inputs to predict on (files or folders), or an archive with --dicomweb URL --study UID")
        used = [flag for flag, value in (("--study", study), ("--series", series), ("--study-date", study_date),
                                         ("--modality", modality), ("--sr-out", sr_out), ("--store", store),
                                         ("--download-dir", download_dir), ("--ca-bundle", ca_bundle)) if value]
        if used:
            raise UsageError(f"{', '.join(used)} need(s) --dicomweb URL (the archive's DICOMweb root)")
    if out is None and not as_json and sr_out is None:
        raise UsageError("--out is required (the CSV to write), unless --format json prints the predictions on stdout "
                         "or --sr-out writes DICOM reports")
    if from_archive and save_inputs is not None:
        raise UsageError("--save-inputs works on local inputs; with --dicomweb keep the instances with --download-dir "
                         "and predict on them locally")
    _refuse_key_and_integrity_only(public_key, integrity_only)
    if out is not None and out.exists() and not force:
        raise UsageError(f"{out} already exists; choose another --out or pass --force to replace it")
    if from_archive:
        from dpmedtf.data.dicomweb import DicomwebArchive
        from dpmedtf.release.archive_predict import ArchiveSelection

        selection = ArchiveSelection(studies=study or (), series=series or (), study_date=study_date, modality=modality)
        archive = DicomwebArchive.from_environment(dicomweb, ca_bundle=ca_bundle)  # bad URL/credentials: before verifying
        _warn_if_credentials_in_clear(archive)
    else:
        check_inputs_exist(inputs)  # before the bundle's verification, which takes seconds
    loaded = load(bundle, public_key, integrity_only=integrity_only)
    for line in loaded.verification.warnings:
        typer.echo(f"note: {line}", err=True)
    if from_archive:
        from dpmedtf.release.archive_predict import predict_archive

        with _staged_progress(quiet=as_json) as progress:
            result = predict_archive(loaded, archive, selection, download_dir=download_dir, sr_out=sr_out, store=store,
                                     force=force, allow_modality_mismatch=allow_modality_mismatch, progress=progress)
        frame = result.frame
        if result.skipped:
            kinds = ", ".join(sorted({ref.modality or "?" for ref in result.skipped}))
            typer.echo(f"note: skipped {len(result.skipped)} instance(s) that are not images ({kinds})", err=True)
    else:
        files = expand_inputs(loaded, inputs)
        if as_json:  # the progress bar of a terminal draws on stdout, which belongs to the JSON document
            frame = predict_files(loaded, files, None, save_inputs, allow_modality_mismatch=allow_modality_mismatch)
        else:
            with progress_bar("preprocessing", len(files)) as advance:
                frame = predict_files(loaded, files, advance, save_inputs, allow_modality_mismatch=allow_modality_mismatch)
    if out is not None:
        write_predictions(frame, out, force)
    overridden = int(frame["modality_check"].str.startswith("overridden").sum())
    if overridden:
        typer.echo(f"note: {overridden} input(s) predicted despite a header that does not match what the model was "
                   "trained on (--allow-modality-mismatch); each is marked in modality_check", err=True)
    positives = {name: int(frame[f"{name}_label"].sum()) for name in loaded.labels}
    summary = (f"wrote {out}: " if out is not None else "") + f"{len(frame)} input(s); positive calls per label " \
        f"{positives}; model signed by {loaded.signer.describe()}"
    if from_archive:
        summary += (f"\nwrote {len(result.written)} DICOM SR(s) to {sr_out}" if sr_out is not None else "") + \
            (f"\nstored {len(result.stored)} DICOM SR(s) in {dicomweb}" if store else "")
    if as_json:
        typer.echo(json.dumps(predictions_document(loaded, frame), indent=2))
        typer.echo(summary, err=True)
    else:
        typer.echo(summary)
    if loaded.verification.integrity_only:
        typer.echo(f"{bundle}: {INTEGRITY_ONLY_NOTICE}", err=as_json)
        raise typer.Exit(EXIT_INTEGRITY_ONLY)


def _warn_if_credentials_in_clear(archive) -> None:
    if archive.sends_credentials_in_clear:
        typer.echo(f"warning: {archive.url} is plain http://: the archive credentials cross the network unencrypted; "
                   "use its https:// address if it has one", err=True)


@contextmanager
def _staged_progress(quiet: bool = False):
    """``progress(stage, done, total)`` with one bar (or a few lines) per stage, opened as each starts."""
    from dpmedtf.progress import progress_bar

    with ExitStack() as stack:
        bars: dict = {}

        def progress(stage: str, done: int, total: int) -> None:
            if quiet:
                return
            if stage not in bars:
                bars[stage] = stack.enter_context(progress_bar(stage, total))
            bars[stage](done, total)

        yield progress


# --- cohorts from an archive --------------------------------------------------------------------------

@data_app.command("export-manifest")
def data_export_manifest(dicomweb: str = typer.Option(..., "--dicomweb", help="The archive's DICOMweb root, e.g. "
                                                                              "https://pacs.example.org/dicom-web."),
                         out: Path = typer.Option(..., "--out", help="Folder for the images and manifest.csv."),
                         studies: Optional[Path] = typer.Option(None, "--studies", help="CSV with a study_uid column: the "
                                                                                         "studies to export."),
                         study_date: Optional[str] = _STUDY_DATE, modality: Optional[str] = _MODALITY_QUERY,
                         labels: Optional[Path] = typer.Option(None, "--labels", help="CSV of the findings per study, "
                                                                                       "joined on --join-on."),
                         join_on: str = typer.Option("study_uid", "--join-on", help="Key of --labels: study_uid or "
                                                                                     "accession_number."),
                         accept_modality: Optional[list[str]] = typer.Option(
                             None, "--accept-modality", help="Modalities to export (repeat; default CR and DX)."),
                         ca_bundle: Optional[Path] = _CA_BUNDLE,
                         force: bool = typer.Option(False, "--force", help="Replace an existing manifest.csv.")) -> None:
    """Retrieve studies' radiographs and write a manifest that `dpmedtf prepare` accepts.

    patient_id, sex and age come from the DICOM headers; the finding columns from --labels, else empty
    for you to fill in. Credentials as for `predict --dicomweb`."""
    from dpmedtf.data.archive_export import DEFAULT_MODALITIES, SKIPPED_FILE, export_manifest, read_study_list
    from dpmedtf.data.dicomweb import DicomwebArchive

    if studies is None and not (study_date or modality):
        raise UsageError("name the studies: --studies UIDS.csv, or a query with --study-date and/or --modality")
    archive = DicomwebArchive.from_environment(dicomweb, ca_bundle=ca_bundle)
    _warn_if_credentials_in_clear(archive)
    uids = read_study_list(studies) if studies is not None else []
    if study_date or modality:
        uids += [uid for uid in archive.find_studies(study_date=study_date, modality=modality) if uid not in uids]
    with _staged_progress() as progress:
        exported = export_manifest(archive, uids, out, labels_csv=labels, join_on=join_on,
                                   accept_modalities=tuple(accept_modality or DEFAULT_MODALITIES), force=force,
                                   progress=progress)
    typer.echo(f"wrote {exported.manifest}: {exported.images} image(s) from {exported.studies} stud(ies)")
    if exported.skipped:
        typer.echo(f"note: {len(exported.skipped)} instance(s) not exported (other modality or not an image), "
                   f"listed in {out / SKIPPED_FILE}", err=True)
    if exported.incomplete_demographics:
        typer.echo(f"note: {len(exported.incomplete_demographics)} row(s) have no sex or age in their header; fill "
                   "them in before `dpmedtf prepare`", err=True)
    if labels is None:
        typer.echo("note: the finding columns are empty; fill them in (or pass --labels) before `dpmedtf prepare`",
                   err=True)
    elif exported.unlabelled_studies:
        typer.echo(f"note: {len(exported.unlabelled_studies)} stud(ies) have no row in {labels} (their finding columns "
                   f"are empty), e.g. {exported.unlabelled_studies[0]}", err=True)
    if exported.unused_label_rows:
        typer.echo(f"note: {exported.unused_label_rows} row(s) of {labels} match no exported study", err=True)


# --- manifests from public data -----------------------------------------------------------------------

_IMPORT_OUT = typer.Option(..., "--out", help="The manifest CSV to write.")
_IMPORT_VIEWS = typer.Option(None, "--views", help="Views to keep (repeat, or separate by commas): frontal (the "
                             "default), lateral, all, or a view as the dataset writes it (PA, AP, LL, ...).")
_IMPORT_FORCE = typer.Option(False, "--force", help="Replace an existing --out.")


def _report_import(imported) -> None:
    typer.echo(f"wrote {imported.manifest}: {imported.images} image(s) of {imported.patients} patient(s)")
    typer.echo(imported.summary(), err=True)


@import_app.command("mimic-cxr")
def data_import_mimic_cxr(labels: Path = typer.Option(..., "--labels", help="mimic-cxr-2.0.0-chexpert.csv (or "
                                                                            "-negbio.csv; .csv.gz is read too)."),
                          metadata: Path = typer.Option(..., "--metadata", help="mimic-cxr-2.0.0-metadata.csv."),
                          patients: Path = typer.Option(..., "--patients", help="MIMIC-IV hosp/patients.csv: sex and "
                                                                                "age."),
                          images_root: Path = typer.Option(..., "--images-root", help="The MIMIC-CXR-JPG folder that "
                                                                                      "holds files/p10/..."),
                          out: Path = _IMPORT_OUT,
                          split: Optional[Path] = typer.Option(None, "--split", help="mimic-cxr-2.0.0-split.csv: "
                                                                                     "the official split."),
                          admissions: Optional[Path] = typer.Option(None, "--admissions", help="MIMIC-IV hosp/"
                                                                    "admissions.csv: race and insurance columns."),
                          views: Optional[list[str]] = _IMPORT_VIEWS, force: bool = _IMPORT_FORCE) -> None:
    """A manifest of MIMIC-CXR-JPG: one row per image of a labelled study; every image left out is counted."""
    from dpmedtf.data.public_import import DEFAULT_VIEWS, import_mimic_cxr

    _report_import(import_mimic_cxr(labels=labels, metadata=metadata, patients=patients, images_root=images_root,
                                    out=out, split=split, admissions=admissions, views=views or DEFAULT_VIEWS,
                                    force=force))


@import_app.command("chexpert")
def data_import_chexpert(table: Path = typer.Argument(..., help="CheXpert's train.csv or valid.csv."),
                         images_root: Path = typer.Option(..., "--images-root", help="The folder that holds "
                                                          "CheXpert-v1.0(-small)/, where the Path column starts."),
                         out: Path = _IMPORT_OUT, views: Optional[list[str]] = _IMPORT_VIEWS,
                         force: bool = _IMPORT_FORCE) -> None:
    """A manifest of CheXpert: one row per image; every image left out is counted."""
    from dpmedtf.data.public_import import DEFAULT_VIEWS, import_chexpert

    _report_import(import_chexpert(table, images_root=images_root, out=out, views=views or DEFAULT_VIEWS,
                                   force=force))


# --- trust store -------------------------------------------------------------------------------------

@trust_app.command("add")
def trust_add(key: Path = typer.Argument(..., help="The publisher's public key (PEM), obtained from them directly."),
              name: Optional[str] = typer.Option(None, "--name", help="What to call the publisher (default: the key "
                                                                      "file's name).")) -> None:
    """Trust a publisher's key: `verify` and `predict` then accept bundles it signed, and name it."""
    from dpmedtf.release.trust import add_key

    trusted = add_key(key, name)
    typer.echo(f"trusted {trusted.name}: {trusted.fingerprint}\n  stored as {trusted.path}")
    typer.echo("compare this fingerprint with the one the publisher announced", err=True)


@trust_app.command("list")
def trust_list(output_format: OutputFormat = _FORMAT) -> None:
    """The trusted publishers' keys: fingerprint and name."""
    from dpmedtf.release.trust import list_keys, trust_dir

    keys = list_keys()
    if output_format is OutputFormat.json:
        typer.echo(json.dumps({"trust_dir": str(trust_dir()), "keys": [
            {"fingerprint": k.fingerprint, "name": k.name, "path": str(k.path)} for k in keys]}, indent=2))
        return
    if not keys:
        typer.echo(f"no trusted keys in {trust_dir()}; add one with `dpmedtf trust add KEY --name PUBLISHER`")
    for key in keys:
        typer.echo(f"{key.fingerprint}  {key.name}")


@trust_app.command("remove")
def trust_remove(fingerprint: str = typer.Argument(..., help="The key's fingerprint as `dpmedtf trust list` shows it "
                                                              "(or its first 8+ hex digits).")) -> None:
    """Stop trusting a key."""
    from dpmedtf.release.trust import remove_key

    removed = remove_key(fingerprint)
    typer.echo(f"removed {removed.name} ({removed.fingerprint})")


def _print_cohort(loaded, table, out: Optional[Path]) -> None:
    title = f"cohort {loaded.source} ({loaded.modality})"
    if loaded.synthetic:
        title += " — SYNTHETIC DATA, not patients"
    typer.echo(title)
    typer.echo(table.to_string())
    if out is not None:
        from dpmedtf.errors import OutputError

        try:
            table.to_csv(out)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the cohort table ({exc.strerror or exc}); choose another --out") \
                from None


def _training_stack_message(command, args: list[str], exc: ImportError) -> str | None:
    """The one-line error for a command run without the ``[train]`` extra, or None when ``exc`` is about
    something else. Decided by the missing module, not by a list of commands, so new commands are covered."""
    from dpmedtf import TrainingStackMissing, missing_training_module

    module = missing_training_module(exc)
    if module is None:
        return None
    words = ["dpmedtf"]
    for arg in args:  # the command path: groups and commands take no options before their subcommand
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            if arg.startswith("-"):
                continue
            break
        words.append(arg)
        command = sub
    return str(TrainingStackMissing(f"'{' '.join(words)}'", module))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error becomes one line on stderr and a non-zero exit."""
    # TensorFlow's C++ start-up chatter (CUDA probing, CPU features) buries the CLI's own output;
    # real failures still surface as Python exceptions. TF_CPP_MIN_LOG_LEVEL=0 brings it back.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="dpmedtf", standalone_mode=False)
    except typer.Abort:
        typer.echo("dpmedtf: aborted", err=True)
        sys.exit(130)
    except ClickException as exc:
        message = " ".join(exc.format_message().split())
        if message:  # empty when the usage text was already shown (no command given)
            typer.echo(f"dpmedtf: error: {message}", err=True)
        sys.exit(exc.exit_code)
    except DpmedtfError as exc:
        typer.echo(f"dpmedtf: error: {exc}", err=True)
        sys.exit(1)
    except ImportError as exc:  # the consumer install (`pip install dpmedtf`) has no training stack
        message = _training_stack_message(command, sys.argv[1:] if argv is None else argv, exc)
        if message is None:
            raise
        typer.echo(f"dpmedtf: error: {message}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
