"""dpmedtf: differentially private diagnostic models for medical imaging, audited and certified."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("dpmedtf")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
