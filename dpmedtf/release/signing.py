"""Offline signatures over a whole bundle with OpenSSF model-signing and an elliptic-curve (P-256) key.

model-signing hashes every file of the bundle directory into a manifest and signs that manifest
(a Sigstore bundle, verified locally against a public key: nothing touches the network). The
signature file itself is the one path left out of what is signed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dpmedtf.errors import DpmedtfError, OutputError

SIGNATURE_FILE = "model.sig"
PASSWORD_ENVIRONMENT = "DPMEDTF_SIGNING_KEY_PASSWORD"


class SigningError(DpmedtfError):
    """A key that cannot be used, or a signature that does not verify."""


def generate_keypair(private_key: str | os.PathLike, public_key: str | os.PathLike,
                     password: str | None = None) -> str:
    """Writes a new P-256 key pair as PEM (the private key readable by its owner only); returns the
    public key's fingerprint. Refuses to replace an existing key: a lost signing key cannot be recovered."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_key, public_key = Path(private_key), Path(public_key)
    for path in (private_key, public_key):
        if path.exists():
            raise SigningError(f"{path} already exists; dpmedtf never replaces a key. Choose another path")
    key = ec.generate_private_key(ec.SECP256R1())
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_bytes = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        private_key.parent.mkdir(parents=True, exist_ok=True)
        public_key.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(private_bytes)
        public_key.write_bytes(public_bytes)
    except OSError as exc:
        raise OutputError(f"{exc.filename or private_key}: cannot write the key ({exc.strerror or exc}); choose "
                          "another --private-key/--public-key in a writable folder") from None
    return fingerprint(public_key)


def fingerprint(public_key: str | os.PathLike) -> str:
    """SHA-256 of the DER public key: what a consumer compares with the publisher's announced key."""
    from cryptography.hazmat.primitives import serialization

    key = _load_public_key(Path(public_key))
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SigningError(f"{path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SigningError(f"{path}: expected an elliptic-curve P-256 public key")
    return key


def _hashing_config():
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def sign_bundle(bundle: str | os.PathLike, private_key: str | os.PathLike, password: str | None = None,
                signature: str | os.PathLike | None = None) -> Path:
    """Signs every file in ``bundle`` into ``bundle/model.sig`` (or into ``signature``, outside the bundle,
    for a release that moves it in only once the bundle has its final place)."""
    from model_signing import signing

    bundle, private_key = Path(bundle), Path(private_key)
    signature = Path(signature) if signature is not None else bundle / SIGNATURE_FILE
    if not private_key.is_file():
        raise SigningError(f"signing key {private_key} not found; create one with `dpmedtf keygen` or set "
                           "release.private_key in the job")
    password = password if password is not None else os.environ.get(PASSWORD_ENVIRONMENT)
    try:
        signing.Config().use_elliptic_key_signer(private_key=private_key, password=password).set_hashing_config(
            _hashing_config()).sign(bundle, signature)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"cannot sign with {private_key}: {exc} (encrypted keys take their password from "
                           f"{PASSWORD_ENVIRONMENT})") from None
    return signature


def verify_signature(bundle: str | os.PathLike, public_key: str | os.PathLike,
                     signature: str | os.PathLike | None = None) -> None:
    """Raises SigningError naming the cause unless ``bundle/model.sig`` is a valid signature by
    ``public_key`` over exactly the files now in ``bundle``."""
    from model_signing import verifying

    bundle, public_key = Path(bundle), Path(public_key)
    _load_public_key(public_key)
    signature = Path(signature) if signature is not None else bundle / SIGNATURE_FILE
    if not signature.is_file():
        raise SigningError(f"{signature}: signature file missing")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            _hashing_config()).verify(bundle, signature)
    except Exception as exc:  # model-signing raises ValueError and Sigstore/protobuf errors alike
        message = str(exc).replace(f"'{bundle.name}'", str(bundle))
        raise SigningError(f"{signature}: signature does not verify with {public_key}: {message}") from None
