"""Fixtures that run the real stack: kube-apiserver on etcd, controller-manager
(garbage collection), scheduler and KWOK nodes, plus the operator as its own
process. A cluster that KUBECONFIG already points at is reused."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Collection, Iterator

import kubernetes
import pytest

from tests.integration.invariant import violations
from tests.waiting import wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
CLUSTER_STATE = pathlib.Path(os.environ.get("CLUSTER_STATE_DIR", "/tmp/analysis-operator-cluster"))
GROUP, VERSION = "analysis.panosc.eu", "v1alpha1"


def _reachable(kubeconfig: str) -> bool:
    try:
        client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        kubernetes.client.VersionApi(client).get_code(_request_timeout=3)
        return True
    except Exception:
        return False


def kubectl(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = pathlib.Path((CLUSTER_STATE / "bin").read_text().strip()) / "kubectl"
    return subprocess.run(
        [str(binary), *arguments],
        check=check,
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": os.environ["KUBECONFIG"]},
    )


@pytest.fixture(scope="session")
def kubeconfig() -> str:
    existing = os.environ.get("KUBECONFIG")
    started = False
    if not (existing and _reachable(existing)):
        subprocess.run([str(REPO / "hack/cluster.sh"), "up"], check=True)
        os.environ["KUBECONFIG"] = str(CLUSTER_STATE / "kubeconfig")
        started = True
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    kubectl("apply", "-f", str(REPO / "deploy/authorization"))  # who may change or delete environments
    kubectl(
        "apply",
        "-f",
        str(REPO / "examples/flavors.yaml"),
        "-f",
        str(REPO / "tests/integration/flavors.yaml"),
        "-f",
        str(REPO / "tests/integration/rbac.yaml"),
    )
    yield os.environ["KUBECONFIG"]
    if started and not os.environ.get("KEEP_CLUSTER"):
        subprocess.run([str(REPO / "hack/cluster.sh"), "down"], check=False)


@pytest.fixture(scope="session")
def api(kubeconfig: str) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture(scope="session")
def core(api) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture(scope="session")
def custom(api) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


def _free_port(taken: Collection[int] = ()) -> int:
    """A port nothing listens on now, other than `taken`: a port chosen but not yet bound is free
    for the system to hand out again (a webhook port equal to the metrics port, CI 2026-12-02)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


class OperatorProcess:
    """The operator as a real process, so tests can kill and restart it."""

    running: set[OperatorProcess] = set()  # all started and not stopped (see other_operators_stopped)

    def __init__(
        self, kubeconfig: str, log_path: pathlib.Path, cluster_state: pathlib.Path = CLUSTER_STATE, **settings: str
    ) -> None:
        self.kubeconfig, self.log_path, self.settings = kubeconfig, log_path, settings
        self.client_ca = cluster_state / "pki" / "webhook-client-ca.crt"  # hack/cluster.sh's, for its API server
        self.process: subprocess.Popen | None = None
        # One webhook port for the object's life: a killed operator leaves its
        # registration behind, and the restarted one must answer at the same URL.
        self.webhook_port = _free_port()
        self.metrics_port = _free_port(taken={self.webhook_port})

    def start(self) -> None:
        # Between a stop and this start the kept ports are free, and the system may hand one out again:
        # a liveness port equal to the metrics port killed the restarted operator (CI, 2026-12-01).
        port = _free_port(taken={self.webhook_port, self.metrics_port, *self._configured_ports()})
        environment = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "PYTHONPATH": str(REPO / "operator"),
            "ANALYSIS_OPERATOR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{port}/healthz",
            "ANALYSIS_OPERATOR_SWEEP_INTERVAL_SECONDS": "1",
            "ANALYSIS_OPERATOR_ADMISSION_HOST": "127.0.0.1",
            "ANALYSIS_OPERATOR_ADMISSION_LISTEN_ADDRESS": "127.0.0.1",
            "ANALYSIS_OPERATOR_ADMISSION_PORT": str(self.webhook_port),
            "ANALYSIS_OPERATOR_ADMISSION_CERT_DIR": str(self.log_path.parent / "webhook-tls"),
            # The webhook port accepts only the API server's client certificate (hack/cluster.sh).
            "ANALYSIS_OPERATOR_ADMISSION_CLIENT_CA_FILE": str(self.client_ca) if self.client_ca.exists() else "",
            "ANALYSIS_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "ANALYSIS_OPERATOR_METRICS_ADDRESS": "127.0.0.1",
            # Owners without a ComputeBudget run unmetered here, so tests about other things need no
            # budget; tests/integration/test_budgets.py turns the production default (refuse) back on.
            "ANALYSIS_OPERATOR_BUDGETS_REQUIRE_BUDGET": "false",
            # Owners without a FacilityUser run as the default account here, so tests about other things
            # need none; tests/integration/test_posix_identity.py turns the production default back on.
            "ANALYSIS_OPERATOR_IDENTITY_REQUIRE_POSIX_IDENTITY": "false",
            # Python on jemalloc, as the image runs it (Dockerfile).
            "PYTHONMALLOC": "malloc",
            "LD_PRELOAD": "libjemalloc.so.2",
            **self.settings,
        }
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "analysis_operator", "--log-format", "json"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        OperatorProcess.running.add(self)
        wait_for(lambda: self._healthy(port), timeout=60, what="operator liveness endpoint")
        if environment["ANALYSIS_OPERATOR_ADMISSION_HOST"]:  # empty: registered by others (the Helm chart)
            wait_for(self._webhooks_registered, timeout=60, what="the operator's admission webhooks registered")
        # After a restart the old registration already matches: also wait until the server listens.
        wait_for(self._webhook_listening, timeout=60, what="the operator's webhook server listening")

    def _configured_ports(self) -> set[int]:
        """The ports a test's settings give the operator (the forward-auth's, ..._PORT)."""
        return {int(value) for key, value in self.settings.items() if key.endswith("_PORT") and str(value).isdigit()}

    def _webhooks_registered(self) -> bool:
        """kopf registers its webhooks a moment after start; until then creates would bypass them."""
        api = kubernetes.client.AdmissionregistrationV1Api(kubernetes.config.new_client_from_config(self.kubeconfig))
        wanted = f"https://127.0.0.1:{self.webhook_port}/"
        try:
            validating = api.read_validating_webhook_configuration("analysis.panosc.eu").webhooks or []
            mutating = api.read_mutating_webhook_configuration("analysis.panosc.eu").webhooks or []
        except kubernetes.client.ApiException:
            return False
        hooks = [*validating, *mutating]
        return bool(hooks) and all((hook.client_config.url or "").startswith(wanted) for hook in hooks)

    def _webhook_listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.webhook_port), timeout=1).close()
            return True
        except OSError:
            return False

    def _healthy(self, port: int) -> bool:
        assert self.process is not None and self.process.poll() is None, f"operator died, see {self.log_path}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None
        OperatorProcess.running.discard(self)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def configure(self, **settings: str) -> None:
        """Run with these extra settings (e.g. a backend enabled), restarting only if they change."""
        self._use({**self.settings, **settings})

    @contextlib.contextmanager
    def configured(self, **settings: str) -> Iterator[OperatorProcess]:
        """Run with these settings for a while, then put those keys back as they were (a key that was
        not set is unset again; other settings made meanwhile, the gateway's, stay): a module's setting
        left on changes what later modules see (test_budgets.py's expiry warning of 2 h, left on,
        wrote a second status to every 1 h environment of test_environments.py: a flaky failure)."""
        before = dict(self.settings)
        self.configure(**settings)
        try:
            yield self
        finally:
            self._use({**before, **{key: value for key, value in self.settings.items() if key not in settings}})

    def _use(self, wanted: dict[str, str]) -> None:
        if wanted != self.settings:
            self.settings = wanted
            self.restart()


@pytest.fixture
def other_operators_stopped(kubeconfig: str):
    """For tests that run operators of their own (chart RBAC, peering): stop the session's
    operator meanwhile (two standalone operators would both act), and remove the webhooks
    it registered (they would refuse creates while it is down); both come back after."""
    stopped = list(OperatorProcess.running)
    for process in stopped:
        process.stop()
    for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
        kubectl("delete", kind, "analysis.panosc.eu", "--ignore-not-found")
    yield
    for process in stopped:
        process.start()


@pytest.fixture(scope="session")
def operator(kubeconfig: str, tmp_path_factory) -> OperatorProcess:
    process = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture
def namespace(core) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: _has_default_service_account(core, name), timeout=30, what="default ServiceAccount")
    yield name
    if OperatorProcess.running:  # give the operator one sweep to converge, then the invariant must hold
        api = core.api_client
        wait_for(
            lambda: not violations(api, [name]),
            timeout=20,
            what=lambda: "the invariant (tests/integration/invariant.py): " + "; ".join(violations(api, [name])),
        )
    core.delete_namespace(name, propagation_policy="Background")


def _has_default_service_account(core, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
        return True
    except kubernetes.client.ApiException:
        return False


class Environments:
    """Create and read AnalysisEnvironments in one namespace."""

    def __init__(self, custom, namespace: str) -> None:
        self.custom, self.namespace = custom, namespace

    def create(self, name: str, **spec) -> dict:
        spec.setdefault("owner", "alice")
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": name},
            "spec": spec,
        }
        return self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "analysisenvironments", body, field_validation="Strict"
        )

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "analysisenvironments", name)

    def patch_spec(self, name: str, **spec) -> dict:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "analysisenvironments", name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, "analysisenvironments", name)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
            return False

    def phase(self, name: str) -> str | None:
        return (self.get(name).get("status") or {}).get("phase")

    def wait_phase(self, name: str, phase: str, timeout: float = 30) -> dict:
        wait_for(
            lambda: self.phase(name) == phase,
            timeout=timeout,
            what=lambda: f"{name} to be {phase}: {json.dumps(self.get(name).get('status'))}",
        )
        return self.get(name)


@pytest.fixture
def environments(custom, namespace, operator) -> Environments:
    return Environments(custom, namespace)


def impersonating(kubeconfig: str, user: str, group: str = "facility-users") -> kubernetes.client.ApiClient:
    """An API client acting as `user` in `group` (the admin may impersonate; RBAC then applies
    to that user). tests/integration/rbac.yaml grants the groups used here what the chart's
    roles grant: facility-users and analysis-portal may manage environments."""
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    client.default_headers["Impersonate-User"] = user
    client.default_headers["Impersonate-Group"] = group
    return client


# ---------------------------------------------------------------- OPEN: the gateway (hack/gateway.sh)


class Gateway:
    """The local stack's Traefik, the identity provider stand-in (hack/identity.py), and requests
    through the gateway as a browser would send them."""

    def __init__(self, url: str, settings: dict[str, str], identity_dir: pathlib.Path) -> None:
        self.url, self.settings, self.identity_dir = url.rstrip("/"), settings, identity_dir
        spec = importlib.util.spec_from_file_location("hack_identity", REPO / "hack" / "identity.py")
        assert spec and spec.loader
        self._identity = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self._identity)

    def token(self, user: str, minutes: float = 30) -> str:
        """An ID token for `user`, signed as the facility's identity provider would sign it."""
        return self._identity.token(self.identity_dir, user, minutes)

    def request(
        self,
        path: str,
        user: str | None = None,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        timeout: float = 10,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of a request through the gateway, signed in as `user` (session
        cookie); (0, {}, b"") when nothing answered within `timeout`."""
        headers = dict(headers or {})
        if user is not None:
            cookie = f"{self.settings['ANALYSIS_OPERATOR_GATEWAY_SESSION_COOKIE']}={self.token(user)}"
            headers["Cookie"] = "; ".join(filter(None, [headers.get("Cookie", ""), cookie]))
        url = path if path.startswith("http") else self.url + path
        request = urllib.request.Request(url, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()
        except TimeoutError:
            return 0, {}, b""

    def others_until_owner_back(self, path: str, owner: str, stranger: str, timeout: float = 60) -> set[int]:
        """Ask `path` as no one and as `stranger` (a signed-in user it is not shared with), then as
        `owner`, until the owner gets 200: what the first two were answered meanwhile."""
        answers = set()

        def owner_back() -> bool:
            answers.add(self.request(path, timeout=3)[0])
            answers.add(self.request(path, stranger, timeout=3)[0])
            return self.request(path, owner, timeout=3)[0] == 200

        wait_for(owner_back, timeout=timeout, what=f"{owner} let in again at {path}")
        return answers


def identity_provider(directory: pathlib.Path) -> dict[str, str]:
    """A stand-in identity provider (hack/identity.py) in `directory`: the operator's OIDC settings."""
    from tests.integration.scripts import parse_exports

    identity = [sys.executable, str(REPO / "hack/identity.py")]
    subprocess.run([*identity, "init", str(directory)], check=True)
    exported = subprocess.run([*identity, "env", str(directory)], check=True, capture_output=True, text=True)
    return parse_exports(exported.stdout)


@pytest.fixture(scope="session")
def gateway(kubeconfig: str, tmp_path_factory) -> Gateway:
    from tests.integration.scripts import parse_exports, run_script

    run_script("gateway.sh", "up", timeout=900)  # builds Traefik first on a machine without the cache
    exported = parse_exports(run_script("gateway.sh", "env"))
    identity_dir = tmp_path_factory.mktemp("identity-provider")
    port = _free_port()
    settings = {
        **{key: value for key, value in exported.items() if key.startswith("ANALYSIS_OPERATOR_GATEWAY_")},
        **identity_provider(identity_dir),
        "ANALYSIS_OPERATOR_GATEWAY_ENABLED": "true",
        "ANALYSIS_OPERATOR_GATEWAY_AUTH_LISTEN_ADDRESS": "127.0.0.1",
        "ANALYSIS_OPERATOR_GATEWAY_AUTH_PORT": str(port),
        "ANALYSIS_OPERATOR_GATEWAY_AUTH_URL": f"http://127.0.0.1:{port}/authorize",
        "ANALYSIS_OPERATOR_GATEWAY_SESSION_COOKIE": "aenv_session",
        "ANALYSIS_OPERATOR_GATEWAY_ADMINS": "support",
    }
    yield Gateway(exported["ANALYSIS_OPERATOR_GATEWAY_URL"], settings, identity_dir)
    if not os.environ.get("KEEP_CLUSTER"):
        run_script("gateway.sh", "down")


@pytest.fixture
def opened(operator: OperatorProcess, gateway: Gateway) -> Gateway:
    """The session's operator with OPEN on: routes through the gateway, forward-auth answered."""
    operator.configure(**gateway.settings)
    return gateway
