"""A real Orthanc DICOM server with its DICOMweb plugin on 127.0.0.1, for the archive tests.

Orthanc and the plugin come from the distribution's packages (Debian: orthanc, orthanc-dicomweb).
`.ci/run` installs them; where they are missing and this process may install packages (root with
apt-get) the fixture installs them itself, and otherwise the tests are skipped with that reason.
Each server gets its own port, storage folder and HTTP basic credentials, and is stopped at the end.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

USER, PASSWORD = "radiology", "orthanc-test-secret"
PACKAGES = ("orthanc", "orthanc-dicomweb")
PLUGIN_GLOB = "/usr/lib/orthanc/libOrthancDicomWeb.so*"


def _installed() -> tuple[str | None, str | None]:
    binary = shutil.which("Orthanc") or (os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None
    plugins = sorted(glob.glob(PLUGIN_GLOB))
    return binary, (plugins[-1] if plugins else None)


def ensure_orthanc() -> tuple[str, str]:
    """(server binary, DICOMweb plugin); installs the packages if allowed, else skips the calling test."""
    binary, plugin = _installed()
    if binary and plugin:
        return binary, plugin
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"Orthanc with its DICOMweb plugin is not installed and cannot be installed here (needs root "
                    f"and apt-get): install the packages {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"installing {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}")
    binary, plugin = _installed()
    if not (binary and plugin):
        pytest.skip(f"{' '.join(PACKAGES)} installed, but no Orthanc binary or DICOMweb plugin ({PLUGIN_GLOB}) found")
    return binary, plugin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process; ``url`` is its DICOMweb root."""

    def __init__(self, directory: Path, tls: bool = False):
        self.binary, self.plugin = ensure_orthanc()
        self.directory = Path(directory)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        self.rest = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        # With TLS, Orthanc sits behind a TLS-terminating proxy, as archives often do (Debian's Orthanc 1.10
        # crashes on its own TLS handshakes), with a certificate of its own CA: the test's stand-in for a
        # hospital's certificate authority. ``url`` is then the proxy's https address.
        self.ca_certificate = _self_signed_certificate(self.directory) if tls else None
        self.proxy = _TlsProxy(self.directory / "server.pem", self.port) if tls else None
        if self.proxy:
            self.url = f"https://127.0.0.1:{self.proxy.port}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD

    def environment(self) -> dict[str, str]:
        """The variables a user sets for dpmedtf to log in."""
        return {"DPMEDTF_DICOMWEB_USER": USER, "DPMEDTF_DICOMWEB_PASSWORD": PASSWORD}

    def start(self) -> "OrthancServer":
        storage = self.directory / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.directory / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "dpmedtf-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [self.plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
        log = open(self.directory / "orthanc.log", "ab")
        self.process = subprocess.Popen([self.binary, str(config)], cwd=self.directory, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start; see {self.directory / 'orthanc.log'}")
            try:
                if requests.get(f"{self.rest}/dicom-web/studies", auth=self.auth, timeout=2).status_code == 200:
                    if self.proxy:
                        self.proxy.start()
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer within 30 s; see {self.directory / 'orthanc.log'}")

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def upload(self, paths) -> None:
        """Store DICOM files through Orthanc's own REST API (not the code under test)."""
        for path in paths:
            response = requests.post(f"{self.rest}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
            response.raise_for_status()

    def instances(self, study_uid: str, modality: str | None = None) -> list[dict]:
        """QIDO-RS answer for a study's instances, asked with plain HTTP (not the code under test)."""
        params = {"Modality": modality} if modality else {}
        response = requests.get(f"{self.rest}/dicom-web/studies/{study_uid}/instances", params=params, auth=self.auth,
                                timeout=30, headers={"Accept": "application/dicom+json"})
        if response.status_code == 204 or not response.content:
            return []
        response.raise_for_status()
        return response.json()


def _self_signed_certificate(directory: Path) -> Path:
    """``server.pem`` (key and certificate, as Orthanc takes them) for 127.0.0.1; returns the certificate alone."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # Debian's Orthanc 1.10 crashes on EC keys
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpmedtf test archive")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    (directory / "server.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()) + pem)
    (directory / "ca.pem").write_bytes(pem)
    return directory / "ca.pem"


class _TlsProxy:
    """TLS on a port of its own, relaying each connection's bytes to a plain HTTP port (Python's ssl)."""

    def __init__(self, certificate_and_key: Path, target_port: int):
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate_and_key)
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = False

    def start(self) -> None:
        import threading

        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()

    def _accept(self) -> None:
        import ssl
        import threading

        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                secured = self.context.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):  # a client that does not trust the certificate hangs up here
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((secured, upstream), (upstream, secured)):
                threading.Thread(target=_relay, args=(source, sink), daemon=True).start()


def _relay(source, sink) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.close()
            except OSError:
                pass
