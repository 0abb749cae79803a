"""Who the operator is to slurmrestd, who a job runs as, and the marks only the operator makes on a job.

Two modes (SlurmSettings):

- per-user (`jwt_key_file` set, the recommended one and what the local stack
  and tests use): the operator holds the cluster's auth/jwt key
  (AuthAltParameters=jwt_key=...) and mints a short-lived HS256 token for each
  request. A job is submitted with a token for its owner's Unix account, so
  slurmrestd acts for that user and the job runs with their uid; the operator's
  own requests (listing the queue, cancelling, raising a time limit) use a
  token for `user`, which must be SlurmUser or a Slurm operator/administrator.
- single token (`jwt_key_file` empty, the old mode): every request, and so
  every job, uses `user` and the token in `token_file`, which the site renews.

The key also signs the identity the operator writes into a job's comment and
picks the port JupyterLab listens on (`derive_key`): users cannot forge the
one nor predict the other. Slurm reads the whole key file as the key, so this
module does the same; both files are read on each use, so a site can rotate
them without a restart.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass

from analysis_operator.backends.base import BackendUnavailable
from analysis_operator.backends.slurm_api import SlurmJob
from analysis_operator.model.domain import Environment
from analysis_operator.model.identity import PosixIdentity
from analysis_operator.settings import SlurmSettings

IDENTITY_MARKER = "analysis-operator/v1"
_IDENTITY = re.compile(
    re.escape(IDENTITY_MARKER) + r" namespace=(?P<namespace>\S+) name=(?P<name>\S+) uid=(?P<uid>\S+)"
    r"(?: user=(?P<user>\S+) sig=(?P<sig>[0-9a-f]{32}))?"
)
_OUTPUT = re.compile(
    r"/(?P<namespace>[a-z0-9-]+)\.aenv-(?P<name>[a-z0-9.-]+)\.(?P<uid>[0-9a-f-]{36})"
    r"(?:\.(?P<nonce>[0-9a-f]{1,40}))?(?:\.s(?P<sig>[0-9a-f]{32}))?\.%j\.out$"
)
_ACCOUNT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def build_jwt(key: bytes, user: str, issued_at: int, lifetime_seconds: int) -> str:
    """An HS256 JWT as Slurm's auth/jwt plugin checks it: `sun` is the Unix user name (pure)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"iat": issued_at, "exp": issued_at + lifetime_seconds, "sun": user}
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def token_expiry(token: str) -> int | None:
    """The `exp` claim of a JWT (seconds since the epoch), None if it is not a JWT with one (pure;
    nothing is verified: this is for saying why a token may have been refused)."""
    parts = token.strip().removeprefix("SLURM_JWT=").split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return int(expiry) if isinstance(expiry, int | float) and not isinstance(expiry, bool) else None


def derive_key(key: bytes, purpose: str) -> bytes:
    """A key for one purpose, so that a signature made for one use never serves another (pure)."""
    return hmac.new(key, f"analysis-operator/{purpose}".encode(), hashlib.sha256).digest()


def sign(key: bytes, *fields: str) -> str:
    """128 bits of HMAC-SHA256 over the fields, unambiguously joined (pure)."""
    message = "\0".join(fields).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class SlurmCredentials:
    settings: SlurmSettings

    @property
    def per_user(self) -> bool:
        return bool(self.settings.jwt_key_file)

    def key(self) -> bytes | None:
        """The cluster's JWT key (per-user mode), None in single-token mode."""
        if not self.per_user:
            return None
        try:
            with open(self.settings.jwt_key_file, "rb") as key_file:
                key = key_file.read()
        except OSError as error:
            raise BackendUnavailable(
                f"cannot read the Slurm JWT key {self.settings.jwt_key_file}: {error.strerror}; the operator "
                "needs read access to the key slurmctld has in AuthAltParameters=jwt_key"
            ) from None
        if not key:
            raise BackendUnavailable(f"the Slurm JWT key file {self.settings.jwt_key_file} is empty")
        return key

    def purpose_key(self, purpose: str) -> bytes | None:
        key = self.key()
        return derive_key(key, purpose) if key is not None else None

    def headers(self, user: str = "") -> dict[str, str]:
        """Headers for a request made as `user` (a job's owner), or as the operator itself ("")."""
        user = user or self.settings.user
        key = self.key()
        if key is not None:
            token = build_jwt(key, user, int(time.time()), self.settings.token_lifetime_seconds)
            return {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token}
        if user != self.settings.user:
            raise ValueError(f"single-token mode acts only as {self.settings.user!r}, not {user!r}")
        try:
            with open(self.settings.token_file, encoding="utf-8") as token_file:
                token = token_file.read().strip()
        except OSError as error:
            raise BackendUnavailable(
                f"cannot read the Slurm token file {self.settings.token_file}: {error.strerror}"
            ) from None
        return {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token.removeprefix("SLURM_JWT=")}

    def diagnose(self, now: float | None = None) -> str:
        """Why slurmctld may have refused the operator's credentials, for a condition (never the token)."""
        if self.per_user:
            return (
                f"the operator signs its tokens with {self.settings.jwt_key_file}: it must be the cluster's "
                "key (slurm.conf AuthAltParameters=jwt_key=...), and the operator's clock must agree with slurmctld's"
            )
        where = self.settings.token_file
        try:
            with open(where, encoding="utf-8") as token_file:
                expiry = token_expiry(token_file.read())
        except OSError as error:
            return f"cannot read the token file {where}: {error.strerror}"
        renew = f"renew it (scontrol token username={self.settings.user} lifespan=<seconds>)"
        if expiry is None:
            return f"the token in {where} is not a JWT with an expiry: {renew}"
        when = datetime.datetime.fromtimestamp(expiry, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if expiry <= (time.time() if now is None else now):
            return f"the token in {where} expired at {when}: {renew}"
        return (
            f"the token in {where} (valid until {when}) is not accepted: was it issued by this cluster "
            f"for {self.settings.user}?"
        )


# ---------------------------------------------------------------- who a job is (pure)


def build_account(environment: Environment, identity: PosixIdentity | None, settings: SlurmSettings) -> str:
    """The Unix account the job runs as: the POSIX identity the engine found, else the owner ID
    without the configured prefix/suffix. Raises ValueError saying why there is none."""
    if not settings.jwt_key_file:
        return settings.user  # single-token mode: one account for every job
    account = identity.user if identity is not None else environment.owner
    if identity is None:
        account = account.removeprefix(settings.owner_prefix) if settings.owner_prefix else account
        account = account.removesuffix(settings.owner_suffix) if settings.owner_suffix else account
    if not _ACCOUNT.match(account):
        raise ValueError(f"owner {environment.owner!r} gives {account!r}, which is not a Unix account name")
    if account in settings.refused_accounts or account == settings.user:
        raise ValueError(f"jobs are never submitted as the privileged account {account!r}")
    return account


def build_identity_comment(environment: Environment, user: str = "", key: bytes | None = None) -> str:
    """The operator's mark on a job; with a key, signed and bound to the job's user."""
    comment = f"{IDENTITY_MARKER} namespace={environment.namespace} name={environment.name} uid={environment.uid}"
    if key is None:
        return comment
    return f"{comment} user={user} sig={sign(key, environment.namespace, environment.name, environment.uid, user)}"


def parse_identity(comment: str) -> dict[str, str] | None:
    match = _IDENTITY.search(comment or "")
    return {k: v for k, v in match.groupdict().items() if v is not None} if match else None


def build_working_directory(settings: SlurmSettings, user: str) -> str:
    """The job's HOME for `user`: the setting, or the mode's default, with {user} replaced (pure)."""
    return settings.job_working_directory.replace("{user}", user)


def build_output_path(
    environment: Environment, settings: SlurmSettings, user: str, nonce: str = "", key: bytes | None = None
) -> str:
    """Where the job's output goes; it also names the environment and the job's nonce (which keys
    its port), and Slurm lets nobody change it once the job runs. With a key, signed for the job's
    user (output_signature): any user may write any path for a job of their own."""
    suffix = f".{nonce}" if nonce else ""
    if key is not None:
        suffix += f".s{output_signature(key, environment.namespace, environment.name, environment.uid, user, nonce)}"
    return (
        f"{build_working_directory(settings, user)}/"
        f"{environment.namespace}.{environment.child_name}.{environment.uid}{suffix}.%j.out"
    )


def output_signature(key: bytes, namespace: str, name: str, uid: str, user: str, nonce: str) -> str:
    return sign(key, "output", namespace, name, uid, user, nonce)


def job_nonce(job: SlurmJob) -> str:
    """The nonce the operator put into the job's output path at submission ("" if none)."""
    match = _OUTPUT.search(job.standard_output)
    return (match.group("nonce") or "") if match else ""


def marked_for(job: SlurmJob, user: str, key: bytes | None) -> dict[str, str] | None:
    """The environment the job's comment names if the operator signed it for `user` (pure); without
    a key (single-token mode) the comment as written."""
    identity = parse_identity(job.comment)
    if key is None or not identity or identity.get("user") != user:
        return identity if key is None else None
    signed = sign(key, identity["namespace"], identity["name"], identity["uid"], user)
    return identity if identity.get("sig") == signed else None


def job_identity(job: SlurmJob, settings: SlurmSettings, key: bytes | None) -> dict[str, str] | None:
    """Which environment a job belongs to, from marks only the operator makes (pure).

    Per-user mode: a comment signed for the job's own user, or the output path the operator
    chose (fixed once the job runs), signed for the job's own user too (every user may write any
    path for a job of their own, one naming another user's environment under their own directory
    included), under that user's own working directory (only when the working directory is per user).
    Single-token mode: the comment as written (every job is the operator's account anyway)."""
    user = job.user_name
    identity = marked_for(job, user, key)
    if key is None or identity is not None:
        return identity
    output = job.standard_output
    match = _OUTPUT.search(output)
    if (
        match
        and match["sig"]
        and hmac.compare_digest(
            match["sig"],
            output_signature(key, match["namespace"], match["name"], match["uid"], user, match["nonce"] or ""),
        )
        and "{user}" in settings.job_working_directory
        and output.startswith(build_working_directory(settings, user) + "/")
    ):
        return {"namespace": match["namespace"], "name": match["name"], "uid": match["uid"], "user": user}
    return None


def build_jupyter_port(
    environment: Environment, settings: SlurmSettings, key: bytes | None = None, nonce: str = ""
) -> int:
    """The port JupyterLab listens on, from the environment and the job's nonce (pure).

    Keyed with the JWT key when there is one, so that no other user can predict it and bind it
    before JupyterLab does; a new nonce for each job, so that a port seen while one job ran
    says nothing about the next (a resumed environment's job)."""
    digest = (
        hashlib.sha256(f"{environment.uid}.{nonce}".encode()).digest()
        if key is None
        else sign(key, "port", environment.uid, nonce).encode()
    )
    span = max(1, settings.port_max - settings.port_min + 1)
    return settings.port_min + int.from_bytes(hashlib.sha256(digest).digest()[:8], "big") % span
