"""The operator-made webhook certificate (infra/certificates.py): when it is renewed, what is
kept across a renewal, what the Secret and the caBundle patch look like, and the files kopf reads."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ssl

import pytest
from cryptography import x509

from analysis_operator.infra.certificates import (
    CA_VALIDITY,
    RENEW_BEFORE,
    VALIDITY,
    build_ca_bundle_patch,
    build_secret,
    material_from_secret,
    renew,
    renewal_reason,
    write_material,
)

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
HOSTS = ("aop-analysis-operator-webhook.ops.svc", "aop-analysis-operator-webhook.ops.svc.cluster.local")


@pytest.fixture(scope="module")
def material():
    return renew(None, HOSTS, NOW)


def _certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_new_material_serves_the_hosts_and_is_signed_by_its_ca(material):
    assert renewal_reason(material, HOSTS, NOW) == ""
    certificate, ca = _certificate(material.certificate), material.ca()
    certificate.verify_directly_issued_by(ca)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert tuple(names.get_values_for_type(x509.DNSName)) == HOSTS
    assert ca.not_valid_after_utc - NOW > CA_VALIDITY - datetime.timedelta(days=1)
    assert certificate.not_valid_after_utc - NOW > VALIDITY - datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "later, hosts, reason",
    [
        (datetime.timedelta(0), HOSTS, ""),
        (VALIDITY - RENEW_BEFORE - datetime.timedelta(days=1), HOSTS, ""),
        (VALIDITY - RENEW_BEFORE + datetime.timedelta(days=1), HOSTS, "expiring"),  # renewed a month ahead
        (CA_VALIDITY - RENEW_BEFORE + datetime.timedelta(days=1), HOSTS, "ca-expiring"),
        (datetime.timedelta(0), (*HOSTS, "other.ops.svc"), "names"),  # a renamed Service
    ],
)
def test_renewal_reason(material, later, hosts, reason):
    assert renewal_reason(material, hosts, NOW + later) == reason


def test_material_that_does_not_fit_together_is_renewed(material):
    other = renew(None, HOSTS, NOW)
    assert renewal_reason(None, HOSTS, NOW) == "missing"
    assert renewal_reason(dataclasses.replace(material, certificate=b"garbage"), HOSTS, NOW) == "unreadable"
    # Someone edited the Secret: a certificate from another CA, or another CA's key.
    assert renewal_reason(dataclasses.replace(material, certificate=other.certificate), HOSTS, NOW) == (
        "not-signed-by-ca"
    )
    assert renewal_reason(dataclasses.replace(material, ca_key=other.ca_key), HOSTS, NOW) == "ca-key-mismatch"
    repaired = renew(dataclasses.replace(material, ca_key=other.ca_key), HOSTS, NOW)
    assert renewal_reason(repaired, HOSTS, NOW) == ""


def test_renewing_the_certificate_keeps_the_ca(material):
    """The caBundle the API server has stays right: no window in which it distrusts a replica."""
    later = NOW + VALIDITY - RENEW_BEFORE + datetime.timedelta(days=1)
    renewed = renew(material, HOSTS, later)
    assert renewed.ca_bundle == material.ca_bundle and renewed.ca_key == material.ca_key
    assert renewed.certificate != material.certificate and renewed.key != material.key
    assert renewal_reason(renewed, HOSTS, later) == ""


def test_a_new_ca_is_bundled_with_the_old_one_while_it_is_valid(material):
    later = NOW + CA_VALIDITY - RENEW_BEFORE + datetime.timedelta(days=1)
    renewed = renew(material, HOSTS, later)
    bundle = x509.load_pem_x509_certificates(renewed.ca_bundle)
    assert len(bundle) == 2 and bundle[1] == material.ca() and bundle[0] != material.ca()
    _certificate(renewed.certificate).verify_directly_issued_by(bundle[0])
    assert renewal_reason(renewed, HOSTS, later) == ""
    # Once the old CA has ended it leaves the bundle.
    after_end = NOW + CA_VALIDITY + datetime.timedelta(days=1)
    assert len(x509.load_pem_x509_certificates(renew(material, HOSTS, after_end).ca_bundle)) == 1


def test_secret_round_trip_and_owner(material):
    owner = {"metadata": {"name": "aop-analysis-operator", "uid": "1234"}}
    secret = build_secret("aop-analysis-operator-webhook-tls", "ops", material, owner)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert material_from_secret(secret) == material
    (reference,) = secret["metadata"]["ownerReferences"]
    assert reference["kind"] == "ValidatingWebhookConfiguration" and reference["uid"] == "1234"
    assert "blockOwnerDeletion" not in reference  # that would need delete rights on the configuration
    assert "ownerReferences" not in build_secret("x", "ops", material, None)["metadata"]
    # A Secret missing a key (say, made by hand with only tls.crt/tls.key) is not used as it is.
    partial = {"data": {k: v for k, v in secret["data"].items() if k != "ca.key"}}
    assert material_from_secret(partial) is None and material_from_secret(None) is None


def test_ca_bundle_patch_only_where_it_differs(material):
    encoded = base64.b64encode(material.ca_bundle).decode()
    configuration = {
        "webhooks": [
            {"name": "a.analysis.panosc.eu", "clientConfig": {"service": {"name": "s"}}},
            {"name": "b.analysis.panosc.eu", "clientConfig": {"caBundle": encoded}},
            {"name": "c.analysis.panosc.eu", "clientConfig": {"caBundle": "b2xk"}},
        ]
    }
    assert build_ca_bundle_patch(configuration, material.ca_bundle) == [
        {"op": "test", "path": "/webhooks/0/name", "value": "a.analysis.panosc.eu"},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": encoded},
        {"op": "test", "path": "/webhooks/2/name", "value": "c.analysis.panosc.eu"},
        {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": encoded},
    ]
    settled = {"webhooks": [{"name": "a", "clientConfig": {"caBundle": encoded}}]}
    assert build_ca_bundle_patch(settled, material.ca_bundle) == []  # replicas agreeing write nothing


def test_files_load_into_a_server_context_and_are_rewritten_only_on_change(material, tmp_path):
    ca_path, pem_path = write_material(str(tmp_path), material)
    assert ca_path.read_bytes() == material.ca_bundle
    assert pem_path.stat().st_mode & 0o077 == 0  # the key: the operator's only
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem_path, pem_path)  # as kopf does, certfile = pkeyfile
    before = pem_path.stat().st_mtime_ns
    write_material(str(tmp_path), material)
    assert pem_path.stat().st_mtime_ns == before  # kopf restarts its server on any change
    renewed = renew(material, HOSTS, NOW + VALIDITY)
    write_material(str(tmp_path), renewed)
    assert pem_path.read_bytes() == renewed.key + renewed.certificate
    assert not list(tmp_path.glob(".*.tmp"))
