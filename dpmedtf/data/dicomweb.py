"""A hospital's image archive over DICOMweb: find studies (QIDO-RS), retrieve instances (WADO-RS), store
results (STOW-RS). No TensorFlow: consumers predicting from a PACS use it, and so does the export of a
training cohort.

Credentials come from the environment only, never from a command line (which other users of the machine
can read in the process list): ``DPMEDTF_DICOMWEB_TOKEN`` (a bearer token), or ``DPMEDTF_DICOMWEB_USER``
and ``DPMEDTF_DICOMWEB_PASSWORD`` (HTTP basic). TLS certificates are verified; a hospital's own CA is
given with ``ca_bundle`` (or ``DPMEDTF_DICOMWEB_CA_BUNDLE``), not by switching verification off.

Every request is retried a bounded number of times when the failure may be passing (connection refused
or reset, timeout, 429/502/503/504) and never when it will not pass (401, 403, 404). Each failure is an
``ArchiveError`` that names the server, the UID being fetched and what to do.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from requests.adapters import HTTPAdapter

from dpmedtf.errors import DataError
from dpmedtf.files import write_beside_and_rename

TOKEN_VARIABLE = "DPMEDTF_DICOMWEB_TOKEN"
USER_VARIABLE = "DPMEDTF_DICOMWEB_USER"
PASSWORD_VARIABLE = "DPMEDTF_DICOMWEB_PASSWORD"
CA_BUNDLE_VARIABLE = "DPMEDTF_DICOMWEB_CA_BUNDLE"

# Where an input came from, in predict's table and in an exported manifest.
UID_COLUMNS = ("study_uid", "series_uid", "sop_instance_uid")

# Whether a failed request may succeed if asked again. 408/429/502/503/504 are a busy or restarting
# server; everything else (401 wrong credentials, 404 unknown UID, 400 bad query) will fail the same way.
RETRIABLE_STATUS = frozenset({408, 429, 502, 503, 504})

SEARCH_PAGE_SIZE = 1000
MAX_SEARCH_PAGES = 200

# DICOM tags as QIDO-RS returns them (DICOM JSON keys).
_TAG = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
        "SOPClassUID": "00080016", "Modality": "00080060", "Rows": "00280010", "StudyDate": "00080020",
        "NumberOfStudyRelatedInstances": "00201208", "AccessionNumber": "00080050"}


class ArchiveError(DataError):
    """The archive could not be reached, refused us, or does not hold what was asked for."""


@dataclass(frozen=True)
class InstanceRef:
    """Where one instance lives in the archive, and what QIDO-RS says it is."""

    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    sop_class_uid: str
    is_image: bool
    """Whether QIDO-RS lists Rows for it: images do; SRs, key-object notes and presentation states do not."""

    def relative_path(self) -> Path:
        """Where a download keeps it: one folder per study and series, named by UID."""
        return Path(self.study_uid) / self.series_uid / f"{self.sop_uid}.dcm"


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often, and how patiently, a request that may pass is asked again."""

    attempts: int = 3
    """Requests in all, the first included."""
    first_wait_seconds: float = 0.5
    """Pause before the second attempt; it doubles before each later one."""
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 60.0


def credentials_from_environment(environ=os.environ) -> tuple[str, str] | str | None:
    """(user, password), a bearer token, or None: from the environment, never the command line."""
    token = environ.get(TOKEN_VARIABLE, "").strip()
    user, password = environ.get(USER_VARIABLE), environ.get(PASSWORD_VARIABLE)
    if token and (user or password):
        raise ArchiveError(f"both {TOKEN_VARIABLE} and {USER_VARIABLE}/{PASSWORD_VARIABLE} are set; set only the one "
                           "the archive expects")
    if token:
        return token
    if user is not None or password is not None:
        if not user or password is None:
            raise ArchiveError(f"set both {USER_VARIABLE} and {PASSWORD_VARIABLE} for HTTP basic authentication "
                               "(only one is set)")
        return user, password
    return None


@dataclass
class DicomwebArchive:
    """One DICOMweb service root (e.g. ``https://pacs.example.org/dicom-web``), with its session."""

    url: str
    credentials: tuple[str, str] | str | None = None
    ca_bundle: str | os.PathLike | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self):
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ArchiveError(f"{self.url}: a DICOMweb URL starts with https:// (or http:// on a trusted network), "
                               "e.g. https://pacs.example.org/dicom-web")
        session = requests.Session()
        if isinstance(self.credentials, tuple):
            session.auth = self.credentials
        elif isinstance(self.credentials, str):
            session.headers["Authorization"] = f"Bearer {self.credentials}"
        if self.ca_bundle is not None:
            if not Path(self.ca_bundle).is_file():
                raise ArchiveError(f"{self.ca_bundle}: CA bundle not found; give the PEM file of the hospital's "
                                   "certificate authority")
            # Not session.verify: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override that (and many
            # machines set them to the system store), so the adapter puts the CA on every https request.
            session.mount("https://", _VerifyWith(str(self.ca_bundle)))
        self._client = DICOMwebClient(self.url, session=session,
                                      timeout=(self.retry.connect_timeout_seconds, self.retry.read_timeout_seconds))
        self._client.set_http_retry_params(retry=False)  # retries are ours: bounded, and only where they can help

    @property
    def sends_credentials_in_clear(self) -> bool:
        """Credentials over plain http:// to a host other than this machine: anyone on the path reads them."""
        from urllib.parse import urlsplit

        host = urlsplit(self.url).hostname or ""
        return (self.credentials is not None and self.url.startswith("http://")
                and host not in ("localhost", "127.0.0.1", "::1"))

    @classmethod
    def from_environment(cls, url: str, *, ca_bundle: str | os.PathLike | None = None,
                         retry: RetryPolicy = RetryPolicy()) -> "DicomwebArchive":
        """The archive at ``url`` with credentials and CA bundle from the environment (see the module)."""
        return cls(url, credentials_from_environment(), ca_bundle or os.environ.get(CA_BUNDLE_VARIABLE) or None, retry)

    # --- finding ------------------------------------------------------------------------------------

    def study_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRef]:
        """Every instance of a study (or of one of its series); ArchiveError if the archive has none."""
        what = f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"
        found = self._search(what, "SOPInstanceUID", lambda **page: self._client.search_for_instances(
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            fields=["Modality", "Rows", "SOPClassUID"], **page))
        if not found:
            raise ArchiveError(f"{self.url}: the archive holds no {what}; check the UID (it is case- and "
                               "digit-exact) and that this archive is the one that holds it")
        return sorted((_instance_ref(entry, study_uid) for entry in found), key=lambda r: (r.series_uid, r.sop_uid))

    def study_of_series(self, series_uid: str) -> str:
        """The study a series belongs to (WADO-RS addresses series within their study)."""
        found = self._request(f"series {series_uid}", lambda: self._client.search_for_series(
            search_filters={"SeriesInstanceUID": series_uid}, fields=["StudyInstanceUID"]))
        if not found:
            raise ArchiveError(f"{self.url}: the archive holds no series {series_uid}; check the UID")
        return _value(found[0], "StudyInstanceUID")

    def find_studies(self, *, study_date: str | None = None, modality: str | None = None,
                     accession_number: str | None = None) -> list[str]:
        """Study UIDs matching a query: ``study_date`` as DICOM gives it (``20240101-20240131``, ``20240101-``),
        ``modality`` among the study's modalities (e.g. ``CR``), an accession number."""
        filters = {key: value for key, value in (("StudyDate", study_date), ("ModalitiesInStudy", modality),
                                                  ("AccessionNumber", accession_number)) if value}
        if not filters:
            raise ArchiveError("a query needs at least one of a study date range, a modality or an accession number")
        described = ", ".join(f"{key}={value}" for key, value in filters.items())
        found = self._search(f"studies with {described}", "StudyInstanceUID", lambda **page:
                             self._client.search_for_studies(search_filters=filters, fields=["StudyInstanceUID"], **page))
        return sorted({_value(entry, "StudyInstanceUID") for entry in found})

    def _search(self, what: str, key: str, search: Callable) -> list[dict]:
        """Every match of a QIDO-RS search, page by page: archives cap the answers to one request (a
        ``limit``), and some ignore ``offset`` (answering the same page again), so paging stops at a page
        that is short or brings nothing new rather than trusting the server to end it."""
        found: dict[str, dict] = {}
        for page in range(MAX_SEARCH_PAGES):
            answer = self._request(what, lambda: search(limit=SEARCH_PAGE_SIZE, offset=page * SEARCH_PAGE_SIZE))
            new = {_value(entry, key): entry for entry in answer if _value(entry, key) not in found}
            found.update(new)
            if len(answer) < SEARCH_PAGE_SIZE or not new:
                return list(found.values())
        raise ArchiveError(f"{self.url}: more than {MAX_SEARCH_PAGES * SEARCH_PAGE_SIZE} matches for {what}; "
                           "narrow the query")

    # --- retrieving and storing ---------------------------------------------------------------------

    def address(self, ref: InstanceRef, series: bool = False) -> str:
        """The WADO-RS URL of an instance (or of its series): where a result came from."""
        where = f"{self.url}/studies/{ref.study_uid}/series/{ref.series_uid}"
        return where if series else f"{where}/instances/{ref.sop_uid}"

    def retrieve(self, ref: InstanceRef):
        """The instance as a pydicom Dataset (its original transfer syntax)."""
        return self._request(f"instance {ref.sop_uid} (series {ref.series_uid}, study {ref.study_uid})",
                             lambda: self._client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid,
                                                                    media_types=(("application/dicom", "*"),)))

    def download(self, refs: Sequence[InstanceRef], directory: str | os.PathLike,
                 progress: Callable[[int, int], None] | None = None) -> list[Path]:
        """Each instance written under ``directory`` (``InstanceRef.relative_path``); all or an ArchiveError.

        A file appears under its name only once complete (written beside it, then renamed), and an instance
        already there from an earlier, interrupted download is not fetched again."""
        directory = Path(directory)
        paths = []
        for done, ref in enumerate(refs, 1):
            path = directory / ref.relative_path()
            if not path.is_file():
                try:
                    dataset = self.retrieve(ref)
                except ArchiveError as exc:
                    raise ArchiveError(f"study {ref.study_uid}: download stopped after {done - 1} of {len(refs)} "
                                       f"instance(s): {exc}") from None
                _save_atomically(dataset, path)
            paths.append(path)
            if progress:
                progress(done, len(refs))
        return paths

    def store(self, datasets: Iterable, what: str) -> None:
        """STOW-RS; ArchiveError naming ``what`` unless the archive accepted every instance."""
        datasets = list(datasets)
        response = self._request(f"storing {what}", lambda: self._client.store_instances(datasets))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            uids = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in failed]
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise ArchiveError(f"{self.url}: the archive refused {len(failed)} of {len(datasets)} instance(s) of {what} "
                               f"({', '.join(uids)}; DICOM failure reason {', '.join(reasons)})")

    # --- one request, with bounded retries and a message a user can act on --------------------------

    def _request(self, what: str, call: Callable):
        import requests

        wait = self.retry.first_wait_seconds
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return call()
            except requests.exceptions.SSLError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise ArchiveError(f"{self.url}: TLS certificate verification failed while fetching {what}; if "
                                       "the archive uses the hospital's own certificate authority, give its PEM file "
                                       f"with --ca-bundle or {CA_BUNDLE_VARIABLE}") from None
                raise ArchiveError(f"{self.url}: the TLS handshake failed while fetching {what} ({_short(exc)}); "
                                   "check the URL's scheme and port (https:// for a TLS server, http:// only for "
                                   "one without TLS)") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                problem = (f"the archive did not answer in time ({_short(exc)})"
                           if isinstance(exc, requests.exceptions.Timeout)
                           else f"cannot reach the archive ({_short(exc)})")
            except requests.exceptions.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status in (401, 403):
                    raise ArchiveError(_refused_message(self.url, what, status, self.credentials)) from None
                if status == 404:
                    raise ArchiveError(f"{self.url}: the archive has no {what} (HTTP 404); check the UIDs or query, and that "
                                       "the URL is the DICOMweb root (e.g. …/dicom-web)") from None
                if status not in RETRIABLE_STATUS:
                    raise ArchiveError(f"{self.url}: the archive answered HTTP {status} for {what}; "
                                       "its log says why") from None
                problem = f"the archive is busy or restarting (HTTP {status})"
            if attempt < self.retry.attempts:
                time.sleep(wait)
                wait *= 2
        raise ArchiveError(f"{self.url}: {problem} for {what}, {self.retry.attempts} attempt(s); check that the "
                           "server is running and the URL is right, then run again")


class _VerifyWith(HTTPAdapter):
    """Verifies TLS against one CA bundle, whatever the environment says."""

    def __init__(self, ca_bundle: str):
        super().__init__()
        self.ca_bundle = ca_bundle

    def send(self, request, **kwargs):
        kwargs["verify"] = self.ca_bundle
        return super().send(request, **kwargs)


def _refused_message(url: str, what: str, status: int, credentials) -> str:
    if credentials is None:
        given = f"no credentials were given: set {TOKEN_VARIABLE}, or {USER_VARIABLE} and {PASSWORD_VARIABLE}"
    elif isinstance(credentials, tuple):
        given = (f"check {USER_VARIABLE} and {PASSWORD_VARIABLE} (user {credentials[0]!r})" if status == 401
                 else f"user {credentials[0]!r} may not read or store this; ask the archive's administrator")
    else:
        given = f"check {TOKEN_VARIABLE} (expired or for another server?)"
    reason = "refused the credentials" if status == 401 else "forbids this request"
    return f"{url}: the archive {reason} (HTTP {status}) for {what}; {given}"


def _short(exc: Exception) -> str:
    text = str(exc.__context__ or exc) if not str(exc) else str(exc)
    return text if len(text) <= 160 else text[:157] + "…"


def _value(entry: dict, keyword: str):
    values = entry.get(_TAG[keyword], {}).get("Value") or [None]
    return values[0]


def _instance_ref(entry: dict, study_uid: str) -> InstanceRef:
    return InstanceRef(study_uid=_value(entry, "StudyInstanceUID") or study_uid,
                       series_uid=_value(entry, "SeriesInstanceUID"), sop_uid=_value(entry, "SOPInstanceUID"),
                       modality=_value(entry, "Modality") or "", sop_class_uid=_value(entry, "SOPClassUID") or "",
                       is_image=_value(entry, "Rows") is not None)


def _save_atomically(dataset, path: Path) -> None:
    write_beside_and_rename(path, lambda partial: dataset.save_as(partial, enforce_file_format=True), lambda exc: (
        f"{path}: cannot write the retrieved instance ({exc.strerror or exc}); free disk space or choose another "
        "folder"))
