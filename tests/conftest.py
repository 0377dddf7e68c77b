import os

# Quiet TensorFlow's C++ start-up chatter in test logs; real errors still surface as exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort  # noqa: E402


@pytest.fixture(scope="session")
def cohort_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("training-cohort")
    return write_synthetic_cohort(out, SyntheticCohortSpec(patients=30, image_size=48, seed=5))["radiograph"]
