"""Files kept at the top of the repository for the people who own them: `release/` (policy, schemas,
model-card template; release managers) and `pipelines/` (job definitions; ML engineers).

An installed wheel carries them as ``dpmedtf.release_files`` and ``dpmedtf.pipeline_files`` (see
pyproject.toml); a source checkout or editable install reads them straight from the repository.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jsonschema

from dpmedtf.errors import DpmedtfError

_REPOSITORY = Path(__file__).resolve().parents[1]


def _repository_file(folder: str, package: str, name: str) -> Path:
    try:
        packaged = Path(str(resources.files(package) / name))
        if packaged.is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    if (_REPOSITORY / folder / name).is_file():
        return _REPOSITORY / folder / name
    raise DpmedtfError(f"dpmedtf's file {folder}/{name} is missing from this installation; reinstall dpmedtf")


def release_file(name: str) -> Path:
    return _repository_file("release", "dpmedtf.release_files", name)


def pipeline_file(name: str) -> Path:
    return _repository_file("pipelines", "dpmedtf.pipeline_files", name)


def schema_problems(document: object, schema_name: str) -> list[str]:
    """Every way ``document`` breaks ``release/<schema_name>``, as 'path: message' lines."""
    import json

    schema = json.loads(release_file(schema_name).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(str(p) for p in error.absolute_path) or '(top level)'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]
