"""The consumer's trust store: publishers' public keys the user decided to trust, by fingerprint.

A signature only says who signed if the verifier already holds the signer's key, obtained apart from
the bundle (the bundle's own ``signing_key.pub`` can be replaced together with the signature). This
store is where a consumer keeps such keys, so that ``dpmedtf verify`` and ``predict`` can name the
publisher without ``--public-key`` on every call.

Location: ``$DPMEDTF_TRUST_DIR``, else ``$XDG_CONFIG_HOME/dpmedtf/trusted_keys``, else
``~/.config/dpmedtf/trusted_keys``. Each key is ``sha256-<hex>.pub`` (its fingerprint; ``:`` is not a
valid file-name character everywhere) with ``sha256-<hex>.json`` beside it holding the name the user
gave it. A key file whose content no longer has the fingerprint of its name is never trusted.
"""

from __future__ import annotations

import datetime as _datetime
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpmedtf.errors import DpmedtfError, OutputError
from dpmedtf.release.signing import SigningError, fingerprint

TRUST_DIR_ENVIRONMENT = "DPMEDTF_TRUST_DIR"
_KEY_SUFFIX, _INFO_SUFFIX = ".pub", ".json"
_FILE_NAME = re.compile(r"^sha256-([0-9a-f]{64})$")


class TrustStoreError(DpmedtfError):
    """A key that cannot be added or removed, or a store that cannot be read or written."""


@dataclass(frozen=True)
class TrustedKey:
    fingerprint: str
    """``sha256:<hex>`` of the DER public key, as ``dpmedtf keygen`` prints it."""
    name: str
    """What the user called the publisher (default: the key file's name without suffix)."""
    path: Path
    """The PEM file in the store."""


def trust_dir() -> Path:
    """Where the trust store lives (it need not exist yet)."""
    chosen = os.environ.get(TRUST_DIR_ENVIRONMENT)
    if chosen:
        return Path(chosen).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME: it would depend on the working directory.
    base = Path(config) if config and os.path.isabs(config) else Path.home() / ".config"
    return base / "dpmedtf" / "trusted_keys"


def _file_stem(key_fingerprint: str) -> str:
    return key_fingerprint.replace(":", "-", 1)


def add_key(key: str | os.PathLike, name: str | None = None, directory: str | os.PathLike | None = None) -> TrustedKey:
    """Copies the public key ``key`` into the store under its fingerprint; a key already there keeps
    its file and takes the new ``name`` if one is given."""
    key = Path(key)
    directory = Path(directory) if directory is not None else trust_dir()
    if not key.is_file():
        raise TrustStoreError(f"{key}: key file not found; give the path of the publisher's public key (PEM)")
    try:
        key_fingerprint = fingerprint(key)
    except SigningError:
        raise TrustStoreError(f"{key}: not a public key dpmedtf can trust (expected the publisher's P-256 public key "
                              "in PEM, as `dpmedtf keygen` writes it: '-----BEGIN PUBLIC KEY-----'); a private key "
                              "or certificate is not accepted") from None
    if name is not None and (not name.strip() or "\n" in name):
        raise TrustStoreError(f"--name must be one non-empty line, got {name!r}")
    stem = _file_stem(key_fingerprint)
    info_path = directory / f"{stem}{_INFO_SUFFIX}"
    existing = _read_info(info_path)
    name = name.strip() if name is not None else existing.get("name") or key.stem
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{stem}{_KEY_SUFFIX}").write_bytes(key.read_bytes())
        info = {"fingerprint": key_fingerprint, "name": name,
                "added_at": existing.get("added_at")
                or _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
                "added_from": existing.get("added_from") or str(key)}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"{exc.filename or directory}: cannot write the trust store ({exc.strerror or exc}); set "
                          f"{TRUST_DIR_ENVIRONMENT} to a writable folder") from None
    return TrustedKey(key_fingerprint, name, directory / f"{stem}{_KEY_SUFFIX}")


def list_keys(directory: str | os.PathLike | None = None) -> list[TrustedKey]:
    """The keys in the store, by name. Files that are not keys, or whose content does not have the
    fingerprint their name says, are left out: trusting them would trust something nobody added."""
    directory = Path(directory) if directory is not None else trust_dir()
    if not directory.is_dir():
        return []
    keys = []
    for path in sorted(directory.glob(f"sha256-*{_KEY_SUFFIX}")):
        match = _FILE_NAME.match(path.name[:-len(_KEY_SUFFIX)])
        if not match:
            continue
        try:
            actual = fingerprint(path)
        except SigningError:
            continue
        if actual != f"sha256:{match.group(1)}":
            continue
        name = _read_info(path.with_suffix(_INFO_SUFFIX)).get("name") or actual
        keys.append(TrustedKey(actual, str(name), path))
    return sorted(keys, key=lambda k: (k.name.lower(), k.fingerprint))


def remove_key(key_fingerprint: str, directory: str | os.PathLike | None = None) -> TrustedKey:
    """Removes the key with this fingerprint (``sha256:<hex>``, or an unambiguous start of ``<hex>`` of
    at least 8 digits) from the store."""
    directory = Path(directory) if directory is not None else trust_dir()
    wanted = key_fingerprint.strip().lower()
    hex_part = wanted.split(":", 1)[1] if wanted.startswith("sha256:") else wanted
    if len(hex_part) < 8 or not re.fullmatch(r"[0-9a-f]+", hex_part):
        raise TrustStoreError(f"{key_fingerprint!r} is not a key fingerprint; give the sha256:… value that "
                              "`dpmedtf trust list` shows (or at least its first 8 hex digits)")
    matches = [k for k in list_keys(directory) if k.fingerprint[len("sha256:"):].startswith(hex_part)]
    if not matches:
        raise TrustStoreError(f"no trusted key has fingerprint {key_fingerprint} in {directory}; "
                              "`dpmedtf trust list` shows the trusted keys")
    if len(matches) > 1:
        raise TrustStoreError(f"{key_fingerprint} matches {len(matches)} trusted keys; give more of the fingerprint")
    (key,) = matches
    try:
        key.path.unlink()
        key.path.with_suffix(_INFO_SUFFIX).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{key.path}: cannot remove it from the trust store ({exc.strerror or exc})") from None
    return key


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no name recorded: the key is still trusted, it is named by its fingerprint
    return info if isinstance(info, dict) else {}
