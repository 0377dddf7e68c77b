import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic cohort (radiographs and CT volumes), written once per test session."""
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_cohort(out, SyntheticCohortSpec(patients=40, image_size=64, volumes=8,
                                                           volume_shape=(40, 40, 20), seed=3))


@pytest.fixture(scope="session")
def real_cr() -> Path:
    """pydicom-data's real PA chest radiograph: CR, MONOCHROME1, 1955×1841, 15 bits stored."""
    return Path(get_testdata_file("RG1_UNCR.dcm"))


def copy_to(tmp_path: Path, source: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copy(source, target)
    return target
