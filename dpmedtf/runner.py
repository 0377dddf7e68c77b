"""`dpmedtf run`: a job's stages — prepare → train → (audit) → evaluate → release — resumable and on record.

Each finished stage leaves ``<out>/stages/<stage>.json`` with the resolved config and the SHA-256 of
its inputs. Re-running skips a stage whose record matches; re-runs one whose inputs changed because an
earlier stage ran again; refuses, naming the changed keys, when the config itself changed (``--force
STAGE`` redoes it, and the record says so). Training that was interrupted resumes from its last
checkpoint with its ledger intact. A finished release is never overwritten. One process writes a run
directory at a time (``dpmedtf.run_lock``): a second ``run`` on the same ``--out`` is refused.

Everything a run could fail on in its configuration — unknown keys, a missing manifest, a bad manifest
row, a missing signing key or policy — is checked before the first stage starts.
"""

from __future__ import annotations

import dataclasses
import datetime as _datetime
import hashlib
import html
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from dpmedtf.config import STAGES, JobConfig, config_to_dict
from dpmedtf.errors import ConfigError, DpmedtfError, OutputError, PrivacyParameterError, RecordError
from dpmedtf.files import read_json_object, sha256_file, write_json_atomic
from dpmedtf.layout import ModelDir, RunDir

RECORD_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str
    """'ran', 'skipped' (already finished with the same config and inputs) or 'forced'."""
    seconds: float
    outputs: dict


def _config_digest(job: JobConfig) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(job), sort_keys=True).encode()).hexdigest()


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_changed_keys(a, b, path))
        elif a != b:
            keys.append(path)
    return keys


def check_before_running(job: JobConfig) -> None:
    """Fails on anything in the job that would stop a later stage, before any stage runs."""
    from dpmedtf.data.manifests import check_files_exist, require_split
    from dpmedtf.training.job import load_job_cohort, sweep_members

    data = job.data
    if job.training.strategy == "multi_worker" and "train" in job.pipeline.stages:
        raise ConfigError("training.strategy: multi_worker: start `dpmedtf train` on every worker (see README, "
                          "'Training on several machines'), then run the evaluate and release stages here")
    if data.manifest is None:
        raise ConfigError("data.manifest is required: give the path of the manifest CSV")
    if not Path(data.manifest).is_file():
        raise ConfigError(f"data.manifest: file not found: {data.manifest}")
    cohort = load_job_cohort(job)  # every row checked
    if not data.skip_bad:
        check_files_exist(cohort)
    stages = job.pipeline.stages
    needed = (("train", "validation", "test") if "evaluate" in stages  # evaluation's audit also reads train
              else ("train",) if "train" in stages else ())
    for split in needed:
        require_split(cohort, split, "training" if split == "train" and "train" in stages else "evaluation")
    for _, member in sweep_members(job):  # each member's config resolves
        if "train" in stages:
            _check_sizes(member, cohort)
    if job.model.pretrained_weights is not None and not Path(job.model.pretrained_weights).exists():
        raise ConfigError(f"model.pretrained_weights: not found: {job.model.pretrained_weights}")
    if "audit" in stages:
        from dpmedtf.evaluation.canary_audit import audited_member

        _, audited = audited_member(job, None)
        if not audited.privacy.enabled:
            raise ConfigError("the audit stage audits a DP model; set release.member to a DP member of the sweep, or "
                              "remove audit from pipeline.stages")
    if "release" in job.pipeline.stages:
        from dpmedtf.release.job import release_member
        from dpmedtf.release.policy import load_policy

        settings = job.release
        _, released = release_member(job)
        if not released.privacy.enabled:
            raise ConfigError("the release stage needs a DP-trained model; release.member names a non-private one")
        if settings.private_key is None or not Path(settings.private_key).is_file():
            raise ConfigError(f"release.private_key: signing key not found ({settings.private_key}); create one "
                              "with `dpmedtf keygen` or remove release from pipeline.stages")
        public_key = settings.public_key or Path(settings.private_key).with_suffix(".pub")
        if not Path(public_key).is_file():
            raise ConfigError(f"release.public_key: not found: {public_key}")
        load_policy(settings.policy)


def _check_sizes(job: JobConfig, cohort) -> None:
    """The batch and δ against the training set the manifest gives (quarantined files can only shrink it)."""
    train = cohort.frame[cohort.frame["split"] == "train"]
    patient_unit = job.privacy.enabled and job.privacy.unit == "patient"
    records = train["patient_id"].nunique() if patient_unit else len(train)
    unit = "patients" if patient_unit else "images"
    if job.training.batch_size > records:
        raise ConfigError(f"training.batch_size {job.training.batch_size} exceeds the {records} training {unit} of "
                          f"{cohort.source}; lower training.batch_size (to at most {records})")
    delta = job.privacy.delta
    if job.privacy.enabled and delta >= 1.0 / records and not job.privacy.allow_large_delta:
        raise PrivacyParameterError(
            f"privacy.delta {delta:g} ≥ 1/N = {1.0 / records:.3g} (N = {records} training {unit} of "
            f"{cohort.source}): such a δ permits publishing a whole record; choose privacy.delta below "
            f"{1.0 / records:.3g}, or set privacy.allow_large_delta: true to accept it (recorded in the certificate)")


class Pipeline:
    """Runs the stages of one job into ``out``."""

    def __init__(self, job: JobConfig, out: str | os.PathLike, force: Iterable[str] = (),
                 log: Callable[[str], None] | None = None):
        unknown = set(force) - set(STAGES)
        if unknown:
            raise ConfigError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        self.job, self.out, self.force = job, Path(out), set(force)
        self.run_dir = RunDir(self.out)
        self.records = self.run_dir.stage_records
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._prepared = None

    # --- records ------------------------------------------------------------------------------------

    def _record_path(self, stage: str) -> Path:
        return self.records / f"{stage}.json"

    def _record(self, stage: str) -> dict | None:
        path = self._record_path(stage)
        if not path.is_file():
            return None
        record = read_json_object(path, f"the record of stage {stage}")
        missing = [k for k in ("status", "config_sha256", "config", "inputs", "outputs") if k not in record]
        if missing:
            raise RecordError(f"{path}: the record of stage {stage} lacks {', '.join(missing)} (edited by hand?); "
                              f"delete it to redo the stage, or pass --force {stage}")
        return record

    def _decide(self, stage: str, inputs: dict, upstream_redone: bool) -> str:
        """'skip', 'run' (fresh, or resuming an unfinished stage) or 'force' (redo a finished one)."""
        record = self._record(stage)
        if stage in self.force:
            return "force"
        if record is None or record.get("status") != "finished":
            return "run"
        if record["config_sha256"] != _config_digest(self.job):
            changed = _changed_keys(record["config"], config_to_dict(self.job))
            raise DpmedtfError(f"stage {stage} in {self.out} finished with a different configuration (changed: "
                               f"{', '.join(changed) or 'unknown'}); pass --force {stage} to redo it (and the stages "
                               "after it), or use a new --out")
        if record["inputs"] == inputs:
            return "skip"
        if upstream_redone:  # an earlier stage was redone in this run: its consumers follow
            return "force"
        changed = sorted(k for k in set(record["inputs"]) | set(inputs) if record["inputs"].get(k) != inputs.get(k))
        raise DpmedtfError(f"the inputs of stage {stage} changed since it finished ({', '.join(changed)}); pass "
                           f"--force {stage} to redo it, or use a new --out")

    def _write_record(self, stage: str, inputs: dict, outputs: dict, seconds: float, decision: str) -> None:
        previous = self._record(stage)
        history = (previous or {}).get("history", [])
        if previous and previous.get("status") == "finished":
            history = [*history, {k: previous[k] for k in ("finished_at", "inputs") if k in previous}]
        write_json_atomic(self._record_path(stage), {
            "format": RECORD_FORMAT, "stage": stage, "status": "finished", "forced": decision == "force",
            "config_sha256": _config_digest(self.job), "config": config_to_dict(self.job), "inputs": inputs,
            "outputs": outputs, "seconds": seconds,
            "finished_at": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
            "history": history})

    # --- stages -------------------------------------------------------------------------------------

    def run(self) -> list[StageOutcome]:
        from dpmedtf.run_lock import RunLock

        check_before_running(self.job)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot create the run directory ({exc.strerror or exc}); choose "
                              "another --out") from None
        with RunLock(self.out, "dpmedtf run", log=self.log):
            return self._run_stages()

    @property
    def quarantine_note(self) -> str | None:
        """What ``skip_bad`` left out of this run (count and quarantine file), once the data were prepared."""
        from dpmedtf.data.cache import quarantine_note

        return quarantine_note(self._prepared) if self._prepared is not None else None

    def _run_stages(self) -> list[StageOutcome]:
        stages = self.job.pipeline.stages
        outcomes, redone = [], False
        for number, stage in enumerate(stages, 1):
            started = time.monotonic()
            inputs = getattr(self, f"_{stage}_inputs")()
            decision = self._decide(stage, inputs, redone)
            redone = redone or decision == "force"
            if decision == "skip":
                self.log(f"[{number}/{len(stages)}] {stage}: already finished with the same config and inputs, skipped")
                outcomes.append(StageOutcome(stage, "skipped", 0.0, self._record(stage)["outputs"]))
                continue
            self.log(f"[{number}/{len(stages)}] {stage}" + (" (forced)" if decision == "force" else "") + " …")
            outputs = getattr(self, f"_{stage}")(decision == "force")
            seconds = time.monotonic() - started
            self._write_record(stage, inputs, outputs, seconds, decision)
            self.log(f"[{number}/{len(stages)}] {stage}: done in {seconds:.0f} s")
            outcomes.append(StageOutcome(stage, "forced" if decision == "force" else "ran", seconds, outputs))
        prepared = self._prepare_data()
        write_summary_page(self.out, self.job, outcomes, prepared.cohort.synthetic, quarantine=self.quarantine_note)
        return outcomes

    def _prepare_data(self):
        if self._prepared is None:
            from dpmedtf.progress import progress_bar
            from dpmedtf.training.job import prepare_data

            with progress_bar("preparing images", 1) as advance:
                self._prepared = prepare_data(self.job, self.out, progress=advance)
        return self._prepared

    def _members(self) -> list[tuple[str, ModelDir, JobConfig]]:
        from dpmedtf.training.job import sweep_members

        return [(name or self.job.name, self.run_dir.member(name), member) for name, member in sweep_members(self.job)]

    def _prepare_inputs(self) -> dict:
        return {"manifest": sha256_file(Path(self.job.data.manifest))}

    def _prepare(self, force: bool) -> dict:
        prepared = self._prepare_data()
        if self.quarantine_note:
            self.log(f"  WARNING: {self.quarantine_note}")
        return {"cache": str(prepared.directory), "images": len(prepared.cohort.frame),
                "quarantined": len(prepared.quarantine), "synthetic_data": prepared.cohort.synthetic}

    def _train_inputs(self) -> dict:
        return {"prepared": self._prepare_data().directory.name}

    def _train(self, force: bool) -> dict:
        from dpmedtf.training.trainer import train, training_finished

        prepared = self._prepare_data()
        outputs = {}
        for name, directory, member in self._members():
            summary = directory.training_record
            if training_finished(directory) and not force:
                self.log(f"  {name}: finished earlier, kept")
            else:
                self.log(f"  training {name}")
                train(member, prepared, directory.root, force=force)
            outputs[name] = {"model": str(directory.model),
                             "epsilon": read_json_object(summary, "the training summary").get("epsilon")}
        return outputs

    def _audit_inputs(self) -> dict:
        return {"prepared": self._prepare_data().directory.name}

    def _audit(self, force: bool) -> dict:
        from dpmedtf.evaluation.canary_audit import run_canary_audit

        settings = self.job.audit
        # An unfinished audit left no record (audit.json is written last); the twin is never resumed.
        result = run_canary_audit(self.job, self.out, audit_dir=self.run_dir.audit.root, kind=settings.kind,
                                  canaries=settings.canaries, confidence=settings.confidence, force=True,
                                  log=self.log)
        record = result.record
        self.log(f"  measured ε ≥ {record['epsilon_lower_bound']:.3g} ({record['confidence']:.0%} confidence, "
                 f"{record['kind']}) vs certified ε = {record['certified_epsilon']:.4g}")
        return {"audit": str(result.directory.record), "epsilon_lower_bound": record["epsilon_lower_bound"],
                "certified_epsilon": record["certified_epsilon"]}

    def _model_hashes(self) -> dict:
        return {name: sha256_file(directory.model) if directory.model.is_file() else None
                for name, directory, _ in self._members()}

    def _audit_hash(self) -> str | None:
        record = self.run_dir.audit.record
        return sha256_file(record) if record.is_file() else None

    def _evaluate_inputs(self) -> dict:
        inputs = {"models": self._model_hashes()}
        if "audit" in self.job.pipeline.stages:  # the report shows the audit's bound
            inputs["audit"] = self._audit_hash()
        return inputs

    def _evaluate(self, force: bool) -> dict:
        from dpmedtf.evaluation.job import evaluate_job

        # Evaluation is a pure function of model and data: redoing an unfinished one is always safe.
        members, report = evaluate_job(self.job, self.out, force=True)
        return {"report": str(report), **{m.name: {"mean_auroc": m.metrics["mean"]["auroc"]} for m in members}}

    def _release_inputs(self) -> dict:
        inputs = {"models": self._model_hashes()}
        if "audit" in self.job.pipeline.stages:  # the certificate references the audit by hash
            inputs["audit"] = self._audit_hash()
        for name, directory, _ in self._members():
            for path in (directory.metrics, directory.fairness_report, directory.thresholds):
                inputs[f"{name}/{path.name}"] = sha256_file(path) if path.is_file() else None
        return inputs

    def _release(self, force: bool) -> dict:
        from dpmedtf.release.job import release_job

        bundle = self.run_dir.bundle
        if bundle.exists():
            raise DpmedtfError(f"{bundle} already exists and dpmedtf never overwrites a release; move it away "
                               "yourself if you mean to replace it, then run again")
        release_job(self.job, self.out, bundle)
        return {"bundle": str(bundle)}


def _model_row(name: str, trained: dict, evaluated: dict) -> str:
    epsilon = "non-private" if trained.get("epsilon") is None else f"{trained['epsilon']:.3g}"
    auroc = evaluated.get("mean_auroc")
    return (f"<tr><td>{html.escape(name)}</td><td>{epsilon}</td>"
            f"<td>{'not evaluated' if auroc is None else f'{auroc:.3f}'}</td></tr>")


def write_summary_page(out: Path, job: JobConfig, outcomes: list[StageOutcome], synthetic: bool,
                       quarantine: str | None = None) -> Path:
    """``<out>/index.html``: what ran, and links to the report, plots, certificate and bundle; ``quarantine``
    is what ``skip_bad`` left out (``data.cache.quarantine_note``), shown as a warning at the top."""
    links = []
    for label, relative in (("Evaluation report", "report.html"), ("Privacy–utility plot", "privacy_utility.png"),
                            ("AUROC per finding", "auroc_per_finding.png"), ("Subgroups by sex", "subgroups_sex.png"),
                            ("Subgroups by age", "subgroups_age_group.png"),
                            ("Canary audit (measured ε lower bound)", "audit/audit.json"),
                            ("Canary audit figure", "audit/audit_bound.png"), ("Release bundle", "bundle/"),
                            ("Privacy certificate", "bundle/privacy_certificate.json"),
                            ("Model card", "bundle/model_card.html"), ("Fairness report", "bundle/fairness_report.md"),
                            ("Predictions on the real radiograph", "predictions_RG1_UNCR.csv")):
        if (out / relative).exists():
            links.append(f'<li><a href="{html.escape(relative)}">{html.escape(label)}</a></li>')
    rows = "".join(f"<tr><td>{o.stage}</td><td>{'done earlier, skipped' if o.status == 'skipped' else o.status}</td>"
                   f"<td>{'—' if o.status == 'skipped' else f'{o.seconds:.0f} s'}</td></tr>" for o in outcomes)
    by_stage = {o.stage: o.outputs for o in outcomes}
    models = "".join(_model_row(name, trained, by_stage.get("evaluate", {}).get(name, {}))
                     for name, trained in by_stage.get("train", {}).items())
    models_table = (f"<h2>Models</h2><table><tr><th>model</th><th>ε spent</th><th>mean test AUROC</th></tr>{models}</table>"
                    if models else "")
    banner = ('<p class="synthetic">SYNTHETIC DATA: generated images, not patients; no clinical claim rests on '
              'these results.</p>') if synthetic else ""
    if quarantine:
        banner += (f'<p class="synthetic" id="quarantine"><strong>Data left out (data.skip_bad):</strong> '
                   f'{html.escape(quarantine)}</p>')
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>dpmedtf run: {html.escape(job.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .7rem;text-align:left}}
.synthetic{{background:#fff3cd;border:1px solid #e0b000;padding:.6rem}}</style></head><body>
<h1>dpmedtf run: {html.escape(job.name)}</h1>{banner}
<h2>Stages</h2><table><tr><th>stage</th><th>this run</th><th>time</th></tr>{rows}</table>{models_table}
<h2>Results</h2><ul>{''.join(links) or '<li>nothing yet</li>'}</ul>
<p>Stage records with resolved configuration and input hashes: <code>stages/*.json</code>.
TensorBoard logs: <code>tensorboard --logdir {html.escape(str(out))}</code>.</p></body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path
