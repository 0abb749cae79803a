"""A certificate of its own for each JupyterLab in a Slurm job, so that only that server is ever sent
its token.

A Slurm job's JupyterLab listens on `node:port`. When it exits on its own (File > Shut Down, out of
memory) the port is free at once, and the gateway's route (and the operator's own idle and viewer
checks) still point there until the next sweep sees the job end: whatever another user binds on that
port would receive the requests, with the environment's token. So each job gets a key pair and a
self-signed certificate for `server_name` (a name under `.invalid`, which never resolves: it is only
checked, never looked up), made at submission: the key goes to the job alone (its environment, then
a file only the job's account can read), the certificate to a ConfigMap `aenv-<name>` (`ca.crt`, what
the gateway's BackendTLSPolicy names) and to status.backend. The gateway and the operator speak TLS to
the server and check its certificate against exactly that one: a process that does not hold the key
cannot complete the handshake, and nothing is sent to it. A new job (a resume) gets a new pair.
The job is told its certificate by `certificate_id` (in its nonce): a job whose certificate is not the
stored one (a submission whose answer was lost, then another certificate stored for the next) is known
as such and replaced (engine/converge.py), not left Ready where nothing could open it.

Pure functions: nothing here talks to a server.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from analysis_operator.infra.certificates import key_pem
from analysis_operator.model.domain import Environment

CA_KEY = "ca.crt"  # the ConfigMap's key for the certificate (what Gateway API's BackendTLSPolicy reads)
SUFFIX = "jupyter.invalid"
BACKDATE = datetime.timedelta(minutes=5)  # clocks of the gateway and the nodes may lag the operator's
# Long enough for any job: an approved extension moves an environment's end (and its job's time limit)
# past what was known at submission. Its end is no safeguard here: a certificate is revoked by the
# next job's replacing it in the ConfigMap, and its key ends with the job.
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class ServerCertificate:
    server_name: str
    certificate: str  # PEM
    key: str = field(repr=False)  # PEM, unencrypted: for the job's environment only, never logged


def server_name(environment: Environment) -> str:
    """The DNS name a server's certificate is for: `aenv-<name>.<namespace>.jupyter.invalid` (pure)."""
    return f"{environment.child_name}.{environment.namespace}.{SUFFIX}"


def issue(environment: Environment, now: datetime.datetime) -> ServerCertificate:
    """A new P-256 key and a self-signed certificate for server_name(environment), valid from a few
    minutes before `now` for VALIDITY."""
    name = server_name(environment)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ServerCertificate(
        server_name=name,
        certificate=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        key=key_pem(key).decode(),
    )


ID_BYTES = 16  # certificate_id: 32 hex digits


@functools.lru_cache(maxsize=1024)
def certificate_id(certificate: str) -> str:
    """What names a certificate (PEM) where a job's text holds it (pure): the first ID_BYTES of the SHA-256
    of its DER, in hex. Not secret (the certificate is not); one certificate, one id."""
    der = x509.load_pem_x509_certificate(certificate.encode()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()[: 2 * ID_BYTES]


@functools.lru_cache(maxsize=1024)
def client_context(certificate: str) -> ssl.SSLContext:
    """A client's TLS context that trusts exactly this one certificate (and checks the name it is
    asked for against it: aiohttp's server_hostname)."""
    context = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cadata=certificate)
    context.check_hostname = True
    return context
