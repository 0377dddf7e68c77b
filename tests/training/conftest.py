from pathlib import Path

import pytest
import yaml

from dpmedtf.data.cache import PreprocessSpec, prepare
from dpmedtf.data.manifests import load_manifest


@pytest.fixture(scope="session")
def prepared(cohort_manifest, tmp_path_factory):
    cohort = load_manifest(cohort_manifest, "radiograph")
    return prepare(cohort, PreprocessSpec("radiograph", image_size=32), tmp_path_factory.mktemp("cache"))


def job_file(tmp_path: Path, manifest: Path, privacy: dict, training: dict, name="job", model=None) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": {"manifest": str(manifest), "image_size": 32},
                                    "model": model or {}, "privacy": privacy, "training": training}))
    return path
