"""`dpmedtf demo`: the whole product on the embedded SYNTHETIC cohort, end to end.

Generates the cohort and a demo signing key inside the output directory, runs pipelines/demo.yaml
(DP at ε = 1, 3 and 8 and the non-private baseline, all evaluated, a canary audit of the ε = 8 model's
mechanism, the ε = 8 model released), verifies the bundle
and predicts with it on pydicom-data's real chest radiograph. Re-running resumes or skips what is done.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dpmedtf.config import load_config
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
from dpmedtf.errors import DpmedtfError
from dpmedtf.resources import pipeline_file, release_file
from dpmedtf.runner import Pipeline, write_summary_page

DEMO_PATIENTS = 320
REAL_RADIOGRAPH = "RG1_UNCR.dcm"


@dataclasses.dataclass(frozen=True)
class DemoResult:
    out: Path
    summary: Path
    report: Path
    bundle: Path
    predictions: Path | None
    verified: bool


def run_demo(out: str | os.PathLike, force: tuple[str, ...] = (), patients: int = DEMO_PATIENTS, log=None) -> DemoResult:
    from dpmedtf.release.signing import generate_keypair

    out = Path(out)
    manifest = out / "cohort" / "radiographs.csv"
    if not manifest.is_file():
        write_synthetic_cohort(out / "cohort", SyntheticCohortSpec(patients=patients, image_size=64, seed=0))
    key = out / "keys" / "demo_signing.pem"
    if not key.is_file():
        generate_keypair(key, key.with_suffix(".pub"))  # a throw-away key: the demo has no publisher
    job = load_config(pipeline_file("demo.yaml"))
    # The demo's release manager holds groups under 30 test images to no fairness limit (demo_policy.yaml).
    job = dataclasses.replace(job, data=dataclasses.replace(job.data, manifest=manifest),
                              release=dataclasses.replace(job.release, private_key=key,
                                                          policy=job.release.policy or release_file("demo_policy.yaml")))
    pipeline = Pipeline(job, out, force, log)
    outcomes = pipeline.run()

    from dpmedtf.release.predict import load, predict_files, write_predictions
    from dpmedtf.release.verify import verify_bundle

    bundle = out / "bundle"
    verified = verify_bundle(bundle, key.with_suffix(".pub")).ok
    if not verified:
        raise DpmedtfError(f"the demo bundle {bundle} failed verification; run `dpmedtf verify {bundle}` for details")
    predictions = out / "predictions_RG1_UNCR.csv"
    radiograph = _real_radiograph()
    if radiograph is not None and not predictions.exists():
        loaded = load(bundle, key.with_suffix(".pub"))
        write_predictions(predict_files(loaded, [radiograph]), predictions)
    summary = write_summary_page(out, job, outcomes, synthetic=True)
    return DemoResult(out, summary, out / "report.html", bundle, predictions if predictions.exists() else None, verified)


def _real_radiograph() -> str | None:
    """pydicom-data's real PA chest CR, when installed (it is with `make demo`)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return None
    try:
        return get_testdata_file(REAL_RADIOGRAPH)
    except Exception:  # pydicom-data missing: pydicom would try to download, which we never do
        return None
