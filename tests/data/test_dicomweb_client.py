"""The archive client's credentials: from the environment only, a bearer token sent as DICOMweb servers
expect, and a refusal that names the variable to fix. A small real HTTP server records what arrives."""

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from dpmedtf.data.dicomweb import ArchiveError, DicomwebArchive, credentials_from_environment


@pytest.fixture
def refusing_server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="pacs"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/dicom-web", seen
    server.shutdown()


def test_a_bearer_token_from_the_environment_is_sent_and_a_refusal_names_it(refusing_server, monkeypatch):
    url, seen = refusing_server
    monkeypatch.setenv("DPMEDTF_DICOMWEB_TOKEN", "token-123")
    archive = DicomwebArchive.from_environment(url)
    with pytest.raises(ArchiveError) as raised:
        archive.study_instances("1.2.3")
    assert seen == ["Bearer token-123"]  # asked once: a 401 is not retried
    assert "HTTP 401" in str(raised.value) and "DPMEDTF_DICOMWEB_TOKEN" in str(raised.value)
    assert "study 1.2.3" in str(raised.value) and "token-123" not in str(raised.value)


def test_credentials_come_whole_from_one_source():
    assert credentials_from_environment({}) is None
    assert credentials_from_environment({"DPMEDTF_DICOMWEB_USER": "u", "DPMEDTF_DICOMWEB_PASSWORD": "p"}) == ("u", "p")
    with pytest.raises(ArchiveError, match="only one is set"):
        credentials_from_environment({"DPMEDTF_DICOMWEB_USER": "u"})
    with pytest.raises(ArchiveError, match="set only the one"):
        credentials_from_environment({"DPMEDTF_DICOMWEB_TOKEN": "t", "DPMEDTF_DICOMWEB_USER": "u"})


def test_a_url_without_a_scheme_and_a_missing_ca_bundle_are_refused(tmp_path):
    with pytest.raises(ArchiveError, match="starts with https://"):
        DicomwebArchive("pacs.example.org/dicom-web")
    with pytest.raises(ArchiveError, match="CA bundle not found"):
        DicomwebArchive("https://pacs.example.org/dicom-web", ca_bundle=tmp_path / "missing.pem")


def test_credentials_over_plain_http_to_another_host_are_flagged():
    assert DicomwebArchive("http://pacs.example.org/dicom-web", ("u", "p")).sends_credentials_in_clear
    assert not DicomwebArchive("https://pacs.example.org/dicom-web", ("u", "p")).sends_credentials_in_clear
    assert not DicomwebArchive("http://127.0.0.1:8042/dicom-web", ("u", "p")).sends_credentials_in_clear
    assert not DicomwebArchive("http://pacs.example.org/dicom-web").sends_credentials_in_clear
