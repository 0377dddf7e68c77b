"""Who signed: a bundle verifies only with the publisher's key (given, in the environment, or trusted),
a bundle re-signed with someone else's key is refused, and the trust store's add/list/remove work.

The key inside a bundle is whatever whoever last signed it put there, so every test that expects a
refusal also checks that the same bundle passes an integrity-only check: the refusal is about the signer.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import dpmedtf.release
from dpmedtf.release import onnx_model
from dpmedtf.release.bundle import write_sums
from dpmedtf.release.signing import SIGNATURE_FILE, fingerprint, sign_bundle
from dpmedtf.release.trust import TrustStoreError, add_key, list_keys, remove_key, trust_dir
from dpmedtf.release.verify import (SOURCE_BUNDLE, SOURCE_ENVIRONMENT, SOURCE_PUBLIC_KEY, SOURCE_TRUST_STORE,
                                    BundleVerificationError, verify_bundle)

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))


def run(*args, trust: Path, **environment) -> subprocess.CompletedProcess:
    """The installed CLI with its own trust store and no key from the tester's environment."""
    env = {k: v for k, v in os.environ.items() if k != "DPMEDTF_PUBLIC_KEY"}
    env.update({"DPMEDTF_TRUST_DIR": str(trust), "COLUMNS": "200", **environment})
    return subprocess.run([DPMEDTF, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(autouse=True)
def own_trust_store(tmp_path, monkeypatch):
    """No test may see the tester's trust store or DPMEDTF_PUBLIC_KEY."""
    monkeypatch.delenv("DPMEDTF_PUBLIC_KEY", raising=False)
    monkeypatch.setenv("DPMEDTF_TRUST_DIR", str(tmp_path / "trust"))
    return tmp_path / "trust"


@pytest.fixture
def resigned(bundle_copy, keys):
    """The publisher's bundle with every threshold set to 0 ("everything is positive") wherever it is
    stated, its sums rewritten and re-signed with another key, which it now ships: a forgery consistent in
    every file, intact as signed, by the wrong signer."""
    metadata = json.loads((bundle_copy / "metadata.json").read_text())
    metadata["thresholds"] = {name: 0.0 for name in metadata["thresholds"]}
    (bundle_copy / "metadata.json").write_text(json.dumps(metadata))
    model = onnx.load(str(bundle_copy / "model.onnx"))
    onnx_model.set_metadata(model, {"thresholds": json.dumps(metadata["thresholds"])})
    onnx.save(model, str(bundle_copy / "model.onnx"))
    (bundle_copy / SIGNATURE_FILE).unlink()
    shutil.copyfile(keys / "other.pub", bundle_copy / "signing_key.pub")
    write_sums(bundle_copy)
    sign_bundle(bundle_copy, keys / "other.pem")
    return bundle_copy


def test_without_any_key_verification_fails_saying_how_to_give_it(bundle, keys):
    report = verify_bundle(bundle)
    assert not report.ok and report.signer is None
    (failure,) = report.failures
    claimed = fingerprint(keys / "publisher.pub")
    for hint in ("--public-key", "DPMEDTF_PUBLIC_KEY", "dpmedtf trust add", "--integrity-only", claimed):
        assert hint in failure, failure
    with pytest.raises(BundleVerificationError, match="no publisher key given"):
        dpmedtf.release.load(bundle)


def test_the_key_is_taken_from_the_argument_the_environment_or_the_trust_store(bundle, keys, monkeypatch):
    publisher = fingerprint(keys / "publisher.pub")
    given = verify_bundle(bundle, keys / "publisher.pub")
    assert given.signer_verified and (given.signer.fingerprint, given.signer.source) == (publisher, SOURCE_PUBLIC_KEY)
    assert any(publisher in line for line in given.passed)

    add_key(keys / "publisher.pub", name="Test site radiology")
    trusted = verify_bundle(bundle)
    assert trusted.signer_verified
    assert (trusted.signer.name, trusted.signer.fingerprint, trusted.signer.source) == \
           ("Test site radiology", publisher, SOURCE_TRUST_STORE)
    # A given key that is also trusted is reported under its trusted name.
    assert verify_bundle(bundle, keys / "publisher.pub").signer.name == "Test site radiology"

    monkeypatch.setenv("DPMEDTF_PUBLIC_KEY", str(keys / "publisher.pub"))
    assert verify_bundle(bundle).signer.source == SOURCE_ENVIRONMENT


def test_a_bundle_re_signed_with_another_key_is_refused_unless_that_key_is_given_or_trusted(resigned, keys):
    add_key(keys / "publisher.pub", name="publisher")
    other = fingerprint(keys / "other.pub")

    by_trust = verify_bundle(resigned)
    assert not by_trust.ok and by_trust.signer is None
    assert any("none of the 1 key(s) in your trust store" in f and other in f
               for f in by_trust.failures), by_trust.failures
    by_key = verify_bundle(resigned, keys / "publisher.pub")
    assert not by_key.ok and any("Key mismatch" in f for f in by_key.failures)
    with pytest.raises(BundleVerificationError):
        dpmedtf.release.load(resigned)

    intact = verify_bundle(resigned, integrity_only=True)  # the refusals above are about the signer only
    assert intact.ok and intact.integrity_only and not intact.signer_verified
    assert (intact.signer.fingerprint, intact.signer.source) == (other, SOURCE_BUNDLE)

    assert verify_bundle(resigned, keys / "other.pub").signer_verified  # the user named that key: accepted
    add_key(keys / "other.pub", name="someone else")
    accepted = verify_bundle(resigned)
    assert accepted.signer_verified and (accepted.signer.name, accepted.signer.fingerprint) == ("someone else", other)
    assert dpmedtf.release.load(resigned).signer.name == "someone else"

    with pytest.raises(Exception, match="not both"):
        verify_bundle(resigned, keys / "other.pub", integrity_only=True)


def test_the_cli_refuses_the_re_signed_bundle_and_reports_integrity_only_with_exit_3(resigned, keys, own_trust_store):
    add_key(keys / "publisher.pub", name="publisher")
    refused = run("verify", resigned, trust=own_trust_store)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "none of the 1 key(s) in your trust store" in refused.stderr and "FAILED verification" in refused.stderr
    assert "verified" not in refused.stdout

    intact = run("verify", resigned, "--integrity-only", trust=own_trust_store)
    assert intact.returncode == 3, intact.stderr
    assert intact.stdout.strip().splitlines()[-1].endswith("integrity only: signer NOT verified")

    both = run("verify", resigned, "--integrity-only", "--public-key", keys / "other.pub", trust=own_trust_store)
    assert both.returncode == 2 and "not both" in both.stderr


def test_trust_store_add_list_remove(keys, own_trust_store):
    publisher, other = fingerprint(keys / "publisher.pub"), fingerprint(keys / "other.pub")
    added = run("trust", "add", keys / "publisher.pub", "--name", "Test site radiology", trust=own_trust_store)
    assert added.returncode == 0 and publisher in added.stdout, added.stderr
    assert run("trust", "add", keys / "other.pub", trust=own_trust_store).returncode == 0
    # Each key is stored under its fingerprint, byte for byte.
    stored = own_trust_store / (publisher.replace(":", "-") + ".pub")
    assert stored.read_bytes() == (keys / "publisher.pub").read_bytes()

    listed = run("trust", "list", trust=own_trust_store)
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == [f"{other}  other", f"{publisher}  Test site radiology"]
    as_json = json.loads(run("trust", "list", "--format", "json", trust=own_trust_store).stdout)
    assert {k["fingerprint"]: k["name"] for k in as_json["keys"]} == {publisher: "Test site radiology", other: "other"}

    for not_a_key in (keys / "publisher.pem", keys / "missing.pub"):
        refused = run("trust", "add", not_a_key, trust=own_trust_store)
        assert refused.returncode == 1 and refused.stdout == ""
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("dpmedtf: error: ") and str(not_a_key) in line

    removed = run("trust", "remove", publisher, trust=own_trust_store)
    assert removed.returncode == 0 and "Test site radiology" in removed.stdout
    assert [k.fingerprint for k in list_keys()] == [other] and not stored.exists()
    unknown = run("trust", "remove", publisher, trust=own_trust_store)
    assert unknown.returncode == 1 and "no trusted key has fingerprint" in unknown.stderr


def test_the_trust_store_ignores_a_key_file_whose_content_is_not_its_fingerprint(keys, own_trust_store):
    add_key(keys / "publisher.pub")
    # Someone swaps the stored key's content for their own key: it must not become trusted under the old name.
    stored = own_trust_store / (fingerprint(keys / "publisher.pub").replace(":", "-") + ".pub")
    stored.write_bytes((keys / "other.pub").read_bytes())
    assert list_keys() == []


def test_trust_store_location(tmp_path, monkeypatch):
    monkeypatch.setenv("DPMEDTF_TRUST_DIR", str(tmp_path / "chosen"))
    assert trust_dir() == tmp_path / "chosen"
    monkeypatch.delenv("DPMEDTF_TRUST_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert trust_dir() == tmp_path / "config" / "dpmedtf" / "trusted_keys"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")  # the XDG spec says: ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert trust_dir() == tmp_path / "home" / ".config" / "dpmedtf" / "trusted_keys"


def test_remove_needs_an_unambiguous_fingerprint(keys):
    add_key(keys / "publisher.pub")
    with pytest.raises(TrustStoreError, match="not a key fingerprint"):
        remove_key("abc")
    assert remove_key(fingerprint(keys / "publisher.pub")[len("sha256:"):][:12]).fingerprint == \
        fingerprint(keys / "publisher.pub")
