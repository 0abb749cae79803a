"""The webhook server's TLS: a private CA and a serving certificate.

Two ways to hold them:

- `ensure_certificates(directory, hosts)`: files in a directory, made when absent or
  close to expiry. The local stack, where kopf registers the webhooks itself.
- `WebhookCertificates`: the Helm chart's default (as controller-runtime's cert rotator
  does it). The operator keeps the CA and the serving certificate in one Secret, made
  by whichever replica comes first (create-if-absent: a 409 means another replica made
  it, and its Secret is used), renewed before expiry (replace with the read
  resourceVersion: a 409 means another replica renewed it first), served from files
  kopf re-reads, and the CA written into the `caBundle` of the chart's webhook
  configurations (patched only where it differs). The chart renders no key material,
  so `helm template` (and Argo CD) gives the same output every time.

A new CA is made only when the old one is close to its end; the bundle then holds the
new CA and the old one while that is valid, so replicas still serving a certificate
signed by the old CA are trusted until they reload.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import ipaddress
import os
import pathlib
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from analysis_operator.infra.kube import KubeClient

log = structlog.get_logger("analysis_operator.certificates")

CA_VALIDITY = datetime.timedelta(days=3650)
VALIDITY = datetime.timedelta(days=365)  # the serving certificate
RENEW_BEFORE = datetime.timedelta(days=30)  # of either, renewed this long before it ends
CA_NAME = "analysis-operator-webhook-ca"
# The webhook configurations whose caBundle the operator keeps (the chart names both alike).
CONFIGURATION_KINDS = ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")


def _name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _covers(certificate: x509.Certificate, hosts: tuple[str, ...]) -> bool:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    covered = {str(name) for name in names.get_values_for_type(x509.DNSName)}
    covered |= {str(address) for address in names.get_values_for_type(x509.IPAddress)}
    return set(hosts) <= covered


@dataclasses.dataclass(frozen=True)
class Material:
    """PEM: the CA bundle (the signing CA first, then a previous CA still valid), the CA's key,
    the serving certificate and its key."""

    ca_bundle: bytes
    ca_key: bytes
    certificate: bytes
    key: bytes

    def ca(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.ca_bundle)[0]


def build_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(key, hashes.SHA256())
    )
    return ca, key


def build_serving(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: tuple[str, ...], now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_name(host) for host in hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


def renewal_reason(material: Material | None, hosts: tuple[str, ...], now: datetime.datetime) -> str:
    """Why the material must be (re)made, or "" while it serves: missing, unreadable, the CA or
    the certificate close to its end, names not covered, or a certificate the CA did not sign."""
    if material is None:
        return "missing"
    try:
        ca = material.ca()
        certificate = x509.load_pem_x509_certificate(material.certificate)
        ca_key = serialization.load_pem_private_key(material.ca_key, None)
        serialization.load_pem_private_key(material.key, None)
    except ValueError:
        return "unreadable"
    if ca.not_valid_after_utc - RENEW_BEFORE <= now:
        return "ca-expiring"
    if ca_key.public_key() != ca.public_key():
        return "ca-key-mismatch"
    if not _signed_by(certificate, ca):
        return "not-signed-by-ca"
    if certificate.not_valid_after_utc - RENEW_BEFORE <= now:
        return "expiring"
    if not _covers(certificate, hosts):
        return "names"
    return ""


def _signed_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except Exception:  # ValueError, TypeError, InvalidSignature: not this CA's
        return False
    return True


def renew(material: Material | None, hosts: tuple[str, ...], now: datetime.datetime) -> Material:
    """New material for hosts: the CA kept while it is good, a new one (the old one kept in the
    bundle while valid) when it is close to its end or unusable."""
    previous: list[x509.Certificate] = []
    ca: x509.Certificate | None = None
    ca_key: Any = None
    if material is not None:
        try:
            bundle = x509.load_pem_x509_certificates(material.ca_bundle)
            ca, ca_key = bundle[0], serialization.load_pem_private_key(material.ca_key, None)
        except ValueError:
            ca = None
        if ca is not None and (ca.not_valid_after_utc - RENEW_BEFORE <= now or ca_key.public_key() != ca.public_key()):
            previous = [ca] if ca.not_valid_after_utc > now else []
            ca = None
    if ca is None or not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        ca, ca_key = build_ca(now)
    certificate, key = build_serving(ca, ca_key, hosts, now)
    return Material(
        ca_bundle=b"".join(_pem(authority) for authority in (ca, *previous)),
        ca_key=key_pem(ca_key),
        certificate=_pem(certificate),
        key=key_pem(key),
    )


SECRET_KEYS = {"ca_bundle": "ca.crt", "ca_key": "ca.key", "certificate": "tls.crt", "key": "tls.key"}


def material_from_secret(secret: dict[str, Any] | None) -> Material | None:
    data = (secret or {}).get("data") or {}
    if not all(data.get(key) for key in SECRET_KEYS.values()):
        return None
    return Material(**{field: base64.b64decode(data[key]) for field, key in SECRET_KEYS.items()})


def build_secret(name: str, namespace: str, material: Material, owner: dict[str, Any] | None) -> dict[str, Any]:
    """The Secret holding the material; owned by the ValidatingWebhookConfiguration when there is
    one, so uninstalling the release (which deletes it) removes the Secret too."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "analysis-operator", "app.kubernetes.io/component": "webhook-tls"},
    }
    if owner:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
        ]
    data = {key: base64.b64encode(getattr(material, field)).decode() for field, key in SECRET_KEYS.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "kubernetes.io/tls", "data": data}


def build_ca_bundle_patch(configuration: dict[str, Any], ca_bundle: bytes) -> list[dict[str, Any]]:
    """JSON patch setting every webhook's caBundle, only where it differs (empty: nothing to do).
    Each change is guarded by a test of that webhook's name, so a reordered list fails, not misapplies."""
    encoded = base64.b64encode(ca_bundle).decode()
    operations: list[dict[str, Any]] = []
    for index, webhook in enumerate(configuration.get("webhooks") or ()):
        if (webhook.get("clientConfig") or {}).get("caBundle") == encoded:
            continue
        operations.append({"op": "test", "path": f"/webhooks/{index}/name", "value": webhook["name"]})
        operations.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": encoded})
    return operations


def _write_atomically(path: pathlib.Path, content: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(content)
    temporary.chmod(mode)
    os.replace(temporary, path)


def write_material(directory: str, material: Material) -> tuple[pathlib.Path, pathlib.Path]:
    """(ca.crt, tls.pem) in directory: key and certificate in one file, replaced at once, so kopf
    (which re-reads its files and restarts the server when they change) never sees a key without
    its certificate. Unchanged files are not rewritten."""
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_path, pem_path = root / "ca.crt", root / "tls.pem"
    for path, content, mode in (
        (pem_path, material.key + material.certificate, 0o600),
        (ca_path, material.ca_bundle, 0o644),
    ):
        if not path.exists() or path.read_bytes() != content:
            _write_atomically(path, content, mode)
    return ca_path, pem_path


class WebhookCertificates:
    """The operator-made webhook certificate (see the module's docstring); every replica runs one."""

    def __init__(
        self, kube: KubeClient, secret: str, namespace: str, hosts: tuple[str, ...], configuration: str, directory: str
    ) -> None:
        self.kube, self.secret, self.namespace, self.hosts = kube, secret, namespace, hosts
        self.configuration, self.directory = configuration, directory

    async def ensure(self, now: datetime.datetime) -> Material:
        """The Secret made or renewed if needed, its material in the directory, the caBundles set."""
        material = await self._ensure_secret(now)
        write_material(self.directory, material)
        await self._ensure_ca_bundles(material.ca_bundle)
        return material

    async def _ensure_secret(self, now: datetime.datetime) -> Material:
        for _ in range(5):  # each lost race means another replica wrote a good Secret: read it again
            secret = await self.kube.read_secret(self.namespace, self.secret)
            current = material_from_secret(secret)
            reason = renewal_reason(current, self.hosts, now)
            if not reason and current is not None:
                return current
            material = renew(current, self.hosts, now)
            if secret is None:
                owner = await self._configuration("validatingwebhookconfigurations")
                body = build_secret(self.secret, self.namespace, material, owner)
                if await self.kube.create("Secret", self.namespace, body):
                    log.info("webhook_certificate.created", secret=self.secret, namespace=self.namespace)
                    return material
            else:
                body = {**secret, "type": "kubernetes.io/tls", "data": build_secret("", "", material, None)["data"]}
                if await self.kube.replace_secret(self.namespace, self.secret, body):
                    log.info("webhook_certificate.renewed", secret=self.secret, reason=reason)
                    return material
            log.info("webhook_certificate.race_lost", secret=self.secret)  # another replica was first
        raise RuntimeError(f"webhook certificate Secret {self.namespace}/{self.secret}: kept changing under us")

    async def _configuration(self, kind: str) -> dict[str, Any] | None:
        if not self.configuration:
            return None
        return await self.kube.get_cluster_path(f"/apis/admissionregistration.k8s.io/v1/{kind}/{self.configuration}")

    async def _ensure_ca_bundles(self, ca_bundle: bytes) -> None:
        for kind in CONFIGURATION_KINDS:
            configuration = await self._configuration(kind)
            if configuration is None:  # admission.enabled=false: nothing registered
                continue
            operations = build_ca_bundle_patch(configuration, ca_bundle)
            if operations:
                path = f"/apis/admissionregistration.k8s.io/v1/{kind}/{self.configuration}"
                await self.kube.json_patch(path, operations)
                log.info("webhook_certificate.ca_bundle_set", configuration=self.configuration, kind=kind)

    async def keep(self, interval: float, clock: Any) -> None:
        """Check and renew every interval, on every replica (each one serves the webhooks)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.ensure(clock())
            except Exception:  # one failed round must not end the loop; the next one retries
                log.exception("webhook_certificate.check_failed", secret=self.secret)


def _still_valid(path: pathlib.Path, hosts: tuple[str, ...], now: datetime.datetime) -> bool:
    if not path.exists():
        return False
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    if certificate.not_valid_after_utc - RENEW_BEFORE <= now:
        return False
    return _covers(certificate, hosts)


def ensure_certificates(
    directory: str, hosts: tuple[str, ...], now: datetime.datetime | None = None
) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(ca.crt, tls.crt, tls.key) in directory, valid for hosts; made or renewed when needed."""
    now = now or datetime.datetime.now(datetime.UTC)
    root = pathlib.Path(directory)
    ca_path, cert_path, key_path = root / "ca.crt", root / "tls.crt", root / "tls.key"
    if _still_valid(cert_path, hosts, now) and ca_path.exists() and key_path.exists():
        return ca_path, cert_path, key_path
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    material = renew(None, hosts, now)
    key_path.write_bytes(material.key)
    key_path.chmod(0o600)
    cert_path.write_bytes(material.certificate)
    ca_path.write_bytes(material.ca_bundle)
    return ca_path, cert_path, key_path
