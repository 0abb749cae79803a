"""All configuration in one typed place, read once at startup.

Sources, later wins: defaults, a YAML file (ANALYSIS_OPERATOR_CONFIG), then
environment variables ANALYSIS_OPERATOR_<FIELD> for the top-level fields and
ANALYSIS_OPERATOR_<SECTION>_<FIELD> for sections (e.g. ..._SLURM_URL).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

PREFIX = "ANALYSIS_OPERATOR_"


@dataclass(frozen=True)
class SlurmSettings:
    enabled: bool = False
    url: str = "http://127.0.0.1:6820"
    # The slurmrestd API version to speak: "auto" asks slurmrestd (GET /openapi/v3) and speaks the
    # newest it serves of v0.0.43, v0.0.42, v0.0.41, v0.0.40 (Slurm 24.05-25.11), v0.0.38 (22.05);
    # or one of them, pinned (backends/slurm_api.py).
    api_version: str = "auto"
    # The operator's own account (listing, cancelling, raising time limits): SlurmUser or a Slurm
    # operator/administrator. In single-token mode every job runs as this account too.
    user: str = "slurm"  # X-SLURM-USER-NAME
    token_file: str = ""  # single-token mode: file holding the JWT (refreshed by the site)
    # Per-user mode (backends/slurm_auth.py): the cluster's auth/jwt key; jobs run as their owner.
    jwt_key_file: str = ""
    token_lifetime_seconds: int = 300  # of each token minted from the key
    # The job owner's Unix account: the engine's POSIX identity if it has one, else the owner ID
    # with this prefix and suffix removed when present (e.g. "oidc:" and "@facility.eu").
    owner_prefix: str = ""
    owner_suffix: str = ""
    refused_accounts: tuple[str, ...] = ("root", "slurm")  # never submit as these (nor as `user`)
    # The job's HOME, its output and the datasets' links ("{user}" is replaced by the job's account);
    # it must exist on the nodes. "" = the mode's default (`job_working_directory`).
    working_directory: str = ""
    # What the batch script starts: one command and its arguments, exec'd (as `exec <command>`).
    jupyter_command: str = "jupyter lab"
    job_path: str = "/usr/local/bin:/usr/bin:/bin"  # PATH in the job (a job's environment is the operator's)
    # JupyterLab's port is chosen by the operator in this range (keyed by the JWT key, so not
    # predictable by other users); keep it outside the nodes' ip_local_port_range.
    port_min: int = 20000
    port_max: int = 32767
    node_domain: str = ""  # appended to Slurm's node name for the URL ("" = as is)
    # With the gateway on (gateway.enabled), each job's JupyterLab speaks TLS with a key and certificate of
    # its own (infra/server_tls.py), and the gateway (a BackendTLSPolicy) and the operator accept only that
    # certificate: a process that listens on the port after JupyterLab exits is sent nothing. false: plain
    # HTTP to the node, for a gateway that does not implement BackendTLSPolicy (README, "OPEN"). Without
    # the gateway, plain HTTP: browsers reach the node themselves and could not check the certificate.
    server_tls: bool = True
    executor_workers: int = 4

    @property
    def job_working_directory(self) -> str:
        """`working_directory`, or the mode's default, a directory of the job's account's own (the
        batch script refuses any other, in both modes): per user, each user's; single token, the
        one account's below /tmp, which every node has (/home/slurm/... they seldom do). Slurm
        makes it as that account on first use; /tmp itself would be everyone's (anyone could put
        startup files there that then run in every environment, as that account)."""
        if self.working_directory:
            return self.working_directory
        if self.jwt_key_file:
            return "/home/{user}/analysis-environments"
        return "/tmp/analysis-environments-{user}"

    def working_directory_problem(self) -> str | None:
        """Why jobs cannot be submitted with `working_directory` (None if they can).

        It is the job's HOME, where Python and JupyterLab run what they find (user site-packages,
        Jupyter and IPython config and startup files): per user (jobs run as their owner), a
        directory without {user} would be every user's HOME, and one user's files would run as
        the next."""
        directory = self.job_working_directory
        if not directory.startswith("/"):
            return f"slurm.working_directory {directory!r} is not an absolute path"
        if self.jwt_key_file and "{user}" not in directory:
            return (
                f"slurm.working_directory {directory!r} has no {{user}}: jobs run as their owners, and each "
                "needs a directory of their own (HOME, job output, dataset links), e.g. "
                "/home/{user}/analysis-environments; set ANALYSIS_OPERATOR_SLURM_WORKING_DIRECTORY"
            )
        return None


@dataclass(frozen=True)
class OpenStackSettings:
    enabled: bool = False
    cloud: str = "analysis"  # entry in clouds.yaml
    clouds_yaml: str = ""  # path; empty = openstacksdk's default search
    executor_workers: int = 8


@dataclass(frozen=True)
class HomeSettings:
    """The user's writable space in JupyterLab pods (datasets are mounted read-only beside it)."""

    # false: an emptyDir per environment (gone with it); true: one PersistentVolumeClaim per
    # user and namespace, created on first use and kept across that user's environments.
    claims: bool = False
    size: str = "10Gi"
    storage_class: str = ""  # empty: the cluster's default StorageClass
    access_mode: str = "ReadWriteMany"  # two environments of one user may run on different nodes


@dataclass(frozen=True)
class AdmissionSettings:
    """The validating/mutating webhooks the operator serves (kopf's admission server)."""

    enabled: bool = True
    listen_address: str = "0.0.0.0"
    port: int = 9443
    # How the API server reaches us. host set: kopf registers the webhooks itself
    # (url https://host:port, local stacks); empty: the Helm chart registers them (Service).
    host: str = ""
    managed_name: str = "analysis.panosc.eu"  # the Validating/MutatingWebhookConfiguration kopf keeps
    cert_dir: str = "/tmp/analysis-operator-webhook"  # tls.crt/tls.key/ca.crt; generated when missing
    # Set (the Helm chart's default): the operator makes and renews the serving certificate itself,
    # kept in this Secret (in tls_secret_namespace), valid for tls_hosts, and sets the caBundle of
    # the Validating/MutatingWebhookConfiguration named webhook_configuration (infra/certificates.py).
    tls_secret: str = ""
    tls_secret_namespace: str = ""
    tls_hosts: tuple[str, ...] = ()
    webhook_configuration: str = ""
    # how often each replica checks (and renews) it; also how long, after a rotation (the Secret
    # deleted), a replica may serve a certificate the new caBundle does not trust
    tls_check_interval_seconds: float = 30.0
    # CA of the client certificate the API server presents to webhooks (its admission configuration):
    # set, the webhook port accepts only clients with a certificate from it; empty, any TLS client.
    client_ca_file: str = ""
    # Identities trusted to create environments on behalf of another owner (the portal).
    trusted_users: tuple[str, ...] = ()
    trusted_groups: tuple[str, ...] = ("analysis-portal", "system:masters")
    # Stripped from userInfo.username to get the facility user ID (e.g. "oidc:").
    username_prefix: str = ""


@dataclass(frozen=True)
class BudgetSettings:
    """ComputeBudgets: who may start what, and how usage is charged (engine/budget_gate.py, engine/accounting.py)."""

    enabled: bool = True  # False: no checks, no accounting (budgets are just records)
    require_budget: bool = True  # an owner with no ComputeBudget is refused; False = runs unmetered
    check_at_admission: bool = True  # the webhook refuses early; the reconcile check always holds
    charge_interval_seconds: float = 60.0  # how often running environments are charged
    warning_percent: float = 80.0  # Warning Event on the budget at this share of a limit
    admission_hold_seconds: float = 10.0  # an admitted create counts against the budget this long until
    # the operator sees it (covers a burst of racing creates)
    expiry_warning_seconds: float = 1800.0  # Warning Event on an environment this long before it expires


@dataclass(frozen=True)
class IdentitySettings:
    """Who environments run as: the owner's POSIX identity from FacilityUser objects (policy/identity.py)."""

    # An owner without a FacilityUser is refused (admission and reconcile). False: they run as the
    # backends' default account (pods uid 1000 / gid 100, the VM user "analysis"), shared by all such
    # users, so only where no facility user holds that uid on the data's file systems.
    require_posix_identity: bool = True
    # Below this a uid is a system account (daemon, bin, ...): refused. 1 allows every uid but root.
    min_uid: int = 1000
    # Pods: supplementalGroupsPolicy Strict, so the image's /etc/group adds no gids of its own
    # (needs Kubernetes 1.33+ nodes with a runtime that supports it, e.g. containerd 2.0).
    strict_supplemental_groups: bool = True


@dataclass(frozen=True)
class GatewaySettings:
    """OPEN: one Gateway API gateway in front of every environment (engine/routes.py), and the
    operator answering its forward-auth requests (handlers/gateway.py)."""

    enabled: bool = False  # False: no routes; status.connection.url is what the backend reports
    name: str = "analysis"  # the Gateway every HTTPRoute attaches to
    namespace: str = "analysis-gateway"
    section_name: str = ""  # one listener of it ("" = all)
    url: str = "https://analysis.example.org"  # the public URL of that Gateway: what browsers open
    hostname: str = ""  # the HTTPRoutes' hostname ("" = any the listener accepts)
    path_prefix: str = "/env"  # environments live at <url><path_prefix>/<namespace>/<name>/
    # One browser origin per environment: set (e.g. env.facility.eu, served by the Gateway's listener
    # with a *.env.facility.eu certificate), each environment is at <label>.<environment_domain>, same
    # path (policy/opening.environment_host), and the portal sets the session cookie with
    # Domain=<environment_domain>. "" = every environment under the host of `url` (one origin for all).
    environment_domain: str = ""
    # Forward-auth: the gateway asks the operator here whether a request may pass.
    auth_listen_address: str = "0.0.0.0"
    auth_port: int = 9100
    auth_url: str = ""  # how the gateway reaches it, e.g. http://analysis-operator.<ns>.svc:9100/authorize
    # Who the viewer is: an OIDC ID token from the facility's SSO, signed by the issuer, in
    # "Authorization: Bearer" (oauth2-proxy's --set-authorization-header) or in this cookie.
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_jwks_url: str = ""  # the issuer's keys (its jwks_uri); or a file of them (tests, air-gapped)
    oidc_jwks_file: str = ""
    oidc_username_claim: str = "preferred_username"
    oidc_username_prefix: str = ""  # prepended to the claim to get the facility user ID
    session_cookie: str = "aenv_session"
    # The browser's cookies passed on to the environment's server, by name; every other one is dropped (the
    # session cookie always). The server is its owner's, who can log what it is sent: a sharee's or an
    # admin's other cookies for the site (oauth2-proxy's `_oauth2_proxy`, a portal's session) would let the
    # owner sign in as them. None by default: JupyterLab needs none (the gateway's token signs in every request,
    # and jupyter_server skips its XSRF check for a token-authenticated one), and `_xsrf` is also the name of
    # other tornado apps' CSRF cookie (JupyterHub's) on the same host.
    pass_cookies: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()  # facility user IDs who may open every environment (support staff)
    login_url: str = ""  # where a browser without a valid session is sent ("" = a 401 page)
    # Ready means OPEN works: how the operator reaches the gateway (e.g. its Service,
    # http://traefik.<ns>.svc) to see an environment's own route answer before calling it Ready
    # ("" = Ready when the backend is, the route following within a moment)
    probe_url: str = ""
    probe_timeout_seconds: float = 120.0  # Ready anyway after this long (the gateway is slow or sick)


@dataclass(frozen=True)
class IdleSettings:
    """Idle culling (engine/idle.py, policy/idle.py) for flavors with an idleTimeout."""

    enabled: bool = True
    check_interval_seconds: float = 60.0  # one round over every Ready environment that can be culled
    # servers read at once (two requests each); bench/idle.py: a round of 10,000 with 2.5 % of them
    # hanging stays under the 60 s interval at 50 (at 20 the rounds that read them take 70-80 s)
    concurrency: int = 50
    request_timeout_seconds: float = 5.0  # per server: a slow one never holds up the others
    status_interval_seconds: float = 300.0  # status.lastActivity written at most this often per environment
    max_clock_skew_seconds: float = 120.0  # a server's last_activity further ahead is not believed
    unknown: str = "keep"  # activity that cannot be read: keep (never culled) or cull (timeout from the start)


@dataclass(frozen=True)
class Settings:
    templates_dir: str = ""  # empty = the package's own templates; else a site's directory
    log_format: str = "auto"  # auto (JSON unless a terminal), json, console
    log_level: str = "INFO"
    event_loop: str = "uvloop"  # uvloop, as kopf's own CLI runs, or asyncio (the standard library's; cli.py)
    namespace: str = ""  # empty = all namespaces
    standalone: bool = True  # False = kopf peering (HA with standbys)
    peering_name: str = "analysis-operator"
    # kopf pauses every replica when two share a priority: 0 picks a random one at start,
    # so exactly one replica (the highest) is active.
    peering_priority: int = 0
    # A replica silent this long is presumed dead: bounds the takeover after a crash.
    peering_lifetime_seconds: int = 60
    # Peered replicas label their own pod analysis.panosc.eu/replica=active|standby (the chart's offer
    # Service selects the active one): the pod's namespace; its name is kopf's identity, POD_ID.
    pod_namespace: str = ""
    sweep_interval_seconds: float = 10.0  # expiry / accounting / orphan sweep period
    # A JupyterLab environment's first status ("starting") waits this long to be written together with
    # Ready (one status write per start instead of two); written alone when the pod takes longer. 0: at once.
    quiet_start_seconds: float = 15.0
    kube_workers: int = 16  # connections for Kubernetes API calls (kept alive)
    jupyter_port: int = 8888
    cluster_domain: str = "cluster.local"
    liveness_endpoint: str = "http://0.0.0.0:8080/healthz"
    metrics_port: int = 9090
    metrics_address: str = "0.0.0.0"  # 127.0.0.1 on a shared machine
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    openstack: OpenStackSettings = field(default_factory=OpenStackSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    home: HomeSettings = field(default_factory=HomeSettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    idle: IdleSettings = field(default_factory=IdleSettings)


def _coerce(value: str, current: Any) -> Any:
    if isinstance(current, tuple):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(current, bool):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def _build(cls: type, file_values: Mapping[str, Any], environ: Mapping[str, str], prefix: str) -> Any:
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        default = spec.default if spec.default_factory is dataclasses.MISSING else spec.default_factory()
        if dataclasses.is_dataclass(default):
            values[spec.name] = _build(
                type(default), file_values.get(spec.name) or {}, environ, f"{prefix}{spec.name.upper()}_"
            )
            continue
        value = file_values.get(spec.name, default)
        if isinstance(value, str) and not isinstance(default, str):
            value = _coerce(value, default)  # a quoted "false" in the file is still false
        if isinstance(value, list):
            value = tuple(value)
        env_name = f"{prefix}{spec.name.upper()}"
        if env_name in environ:
            value = _coerce(environ[env_name], default)
        values[spec.name] = value
    return cls(**values)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    file_values: Mapping[str, Any] = {}
    path = environ.get(f"{PREFIX}CONFIG")
    if path:
        file_values = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    settings: Settings = _build(Settings, file_values, environ, PREFIX)
    return settings
