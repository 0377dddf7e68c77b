"""A model's results for one study as a DICOM Comprehensive SR: the TID 1500 measurement report.

What a PACS and a reading workstation show next to the images: per image (per series for CT) one
measurement group holding, for each of the bundle's findings, the probability (a measurement, unit "no
units") and the thresholded call (a qualitative evaluation, SNOMED CT Present/Absent), with references
to the source images. The algorithm (TID 4019) is the bundle's name and model version; its parameters
carry what a reader of the result must know about the model: ε, δ and the unit of privacy from the
certificate, the fingerprint of the key its signature verified with, each threshold, and whether the
model was trained on synthetic data. A model trained on synthetic data says so in the series
description too, where every archive browser shows it.

Findings are coded in the local scheme ``99DPMEDTF`` (DICOM's convention for codes of one's own: a
"99" prefix); their meanings are the bundle's label names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from dpmedtf.errors import OutputExistsError
from dpmedtf.files import write_beside_and_rename

CODING_SCHEME = "99DPMEDTF"
SERIES_NUMBER = 9701  # far from scanners' own series numbers, so the SR sorts after the images
SYNTHETIC_NOTICE = "trained on SYNTHETIC data - not for clinical use"
PROCEDURES = {  # what the SR reports on, by the bundle's modality (SNOMED CT)
    "radiograph": ("399208008", "Plain chest X-ray"),
    "volume": ("77477000", "Computerized axial tomography"),
}


@dataclass(frozen=True)
class ImageResult:
    """The model's output for one input: a radiograph (one source) or a CT series (its slices)."""

    sources: Sequence  # pydicom Datasets (headers suffice) of the images the input was made from
    probabilities: Mapping[str, float]
    calls: Mapping[str, int]


def finding_code(label: str, what: str = "call"):
    import highdicom as hd

    if what == "probability":
        return hd.sr.CodedConcept(f"{label}-probability", CODING_SCHEME, f"Probability of {label}")
    return hd.sr.CodedConcept(label, CODING_SCHEME, label)


def algorithm_parameters(metadata: Mapping, certificate: Mapping, signer) -> list[str]:
    """TID 4019's parameters: ``key=value`` text a reader (or a program) can take apart."""
    parameters = [f"epsilon={certificate['epsilon']!r}", f"delta={certificate['delta']!r}",
                  f"unit_of_privacy={certificate['unit_of_privacy']}",
                  f"signature_key_fingerprint={signer.fingerprint if signer else 'none'}",
                  f"signature_verified={'true' if signer and signer.verified else 'false'}",
                  f"trained_on_synthetic_data={'true' if metadata.get('synthetic_data') else 'false'}"]
    parameters += [f"threshold {label}={float(metadata['thresholds'][label])!r}" for label in metadata["labels"]]
    return parameters


def build_report(*, metadata: Mapping, certificate: Mapping, signer, results: Sequence[ImageResult],
                 sop_instance_uid: str | None = None):
    """One study's results as a highdicom ComprehensiveSR (validated by highdicom as it is built)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from dpmedtf import __version__

    if not results:
        raise ValueError("a report needs at least one result")
    name = str(metadata.get("name") or "dpmedtf model")
    version = str(metadata["model_version"])
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version, manufacturer="dpmedtf",
                                              parameters=algorithm_parameters(metadata, certificate, signer))
    groups = []
    for result in results:
        first = result.sources[0]
        measurements = [hd.sr.Measurement(name=finding_code(label, "probability"),
                                          value=float(result.probabilities[label]),
                                          unit=hd.sr.CodedConcept("1", "UCUM", "no units"), algorithm_id=algorithm)
                        for label in metadata["labels"]]
        evaluations = [hd.sr.QualitativeEvaluation(name=finding_code(label),
                                                   value=codes.SCT.Present if result.calls[label] else codes.SCT.Absent)
                       for label in metadata["labels"]]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=f"series {first.SeriesInstanceUID}" if len(result.sources) > 1
                else f"image {first.SOPInstanceUID}"),
            algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
                           for source in result.sources]))
    device = hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                   observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                                       uid=generate_uid(entropy_srcs=[name, version]), name=name[:64],
                                       manufacturer_name="dpmedtf", model_name=version[:64]))
    procedure = PROCEDURES.get(metadata["preprocessing"]["modality"], PROCEDURES["radiograph"])
    content = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                      procedure_reported=hd.sr.CodedConcept(procedure[0], "SCT", procedure[1]),
                                      imaging_measurements=groups)
    evidence = [_with_patient_and_study_modules(source) for result in results for source in result.sources]
    report = hd.sr.ComprehensiveSR(evidence=evidence, content=content, series_instance_uid=generate_uid(),
                                   series_number=SERIES_NUMBER, sop_instance_uid=sop_instance_uid or generate_uid(),
                                   instance_number=1, manufacturer="dpmedtf", is_complete=True)
    report.SoftwareVersions = f"dpmedtf {__version__}"
    description = f"{name} {version}"
    if metadata.get("synthetic_data"):
        description = f"{description} {SYNTHETIC_NOTICE}"
    report.SeriesDescription = description[:64]
    return report


# Type 2 attributes of the Patient and General Study modules: an SR must carry them, possibly empty. An
# archive's images do not always have them all (pydicom-data's RG1_UNCR has no birth date), and the SR is
# then written with them empty, as the standard allows, rather than refused.
_PATIENT_AND_STUDY_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                             "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_patient_and_study_modules(header):
    if all(keyword in header for keyword in _PATIENT_AND_STUDY_TYPE_2):
        return header
    completed = header.copy()
    for keyword in _PATIENT_AND_STUDY_TYPE_2:
        if keyword not in completed:
            setattr(completed, keyword, "")
    return completed


def write_report(report, directory: str | Path, force: bool = False) -> Path:
    """``DIR/<StudyInstanceUID>.sr.dcm``, written beside and renamed; an existing file only with ``force``."""
    directory = Path(directory)
    path = directory / f"{report.StudyInstanceUID}.sr.dcm"
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists (a report for study {report.StudyInstanceUID}); choose "
                                "another --sr-out or pass --force to replace it")
    return write_beside_and_rename(path, lambda partial: report.save_as(partial, enforce_file_format=True), lambda exc: (
        f"{path}: cannot write the report ({exc.strerror or exc}); choose another --sr-out"))


def read_report(dataset) -> dict:
    """A dpmedtf SR (a pydicom Dataset) back to plain values: the algorithm and, per referenced image,
    each finding's probability and call. Parsing goes through highdicom, which checks the template."""
    import highdicom as hd

    report = hd.sr.ComprehensiveSR.from_dataset(dataset, copy=True).content
    images = {}
    for group in report.get_image_measurement_groups():
        probabilities = {m.name.meaning.removeprefix("Probability of "): float(m.value)
                         for m in group.get_measurements()}
        calls = {q.name.meaning: q.value.meaning == "Present" for q in group.get_qualitative_evaluations()}
        for source in group.source_images:
            images[source.referenced_sop_instance_uid] = {"probabilities": probabilities, "calls": calls}
    return {"series_description": str(dataset.get("SeriesDescription", "")),
            "algorithm_parameters": _algorithm_parameters(dataset), "images": images}


def _algorithm_parameters(dataset) -> dict[str, str]:
    """Every ``key=value`` TID 4019 parameter anywhere in the content tree (they repeat per group)."""
    found: dict[str, str] = {}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if name == "Algorithm Parameters" and "TextValue" in item and "=" in item.TextValue:
                key, value = item.TextValue.split("=", 1)
                found[key] = value
            walk(item.get("ContentSequence", []))

    walk(dataset.get("ContentSequence", []))
    return found
