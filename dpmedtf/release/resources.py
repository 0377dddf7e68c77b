"""The release managers' files (policy, schemas, model-card template) from the repository's `release/`.

An installed wheel carries them as ``dpmedtf.release_files`` (see pyproject.toml); a source checkout
or editable install reads them straight from `release/` at the repository root.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jsonschema

from dpmedtf.errors import DpmedtfError

_SOURCE_TREE = Path(__file__).resolve().parents[2] / "release"


def release_file(name: str) -> Path:
    try:
        packaged = Path(str(resources.files("dpmedtf.release_files") / name))
        if packaged.is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    if (_SOURCE_TREE / name).is_file():
        return _SOURCE_TREE / name
    raise DpmedtfError(f"dpmedtf's release file {name!r} is missing from this installation; reinstall dpmedtf")


def schema_problems(document: object, schema_name: str) -> list[str]:
    """Every way ``document`` breaks ``release/<schema_name>``, as 'path: message' lines."""
    import json

    schema = json.loads(release_file(schema_name).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(str(p) for p in error.absolute_path) or '(top level)'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]
