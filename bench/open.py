#!/usr/bin/env python3
"""OPEN through the gateway: the three numbers of the OPEN issue, each from one run.

  route      1,000 JupyterLab environments (KWOK pods, flavor jupyter-basic) created in a burst. For each:
             t_ready = a watch sees status.phase Ready; t_route = the first request through the gateway
             to /env/<ns>/<name>/api/status, signed in as the owner, answered by the environment's own
             route (an echo server at the pod's IP: 200 with the request's path) rather than by the
             namespace's closed page (503, X-Analysis-Reason: RouteNotReady) or its forward-auth's
             "is starting". Polled from Ready: every --poll-interval once Traefik has written the
             HTTPRoute's status (it does before serving it), every --poll-slow before, at most
             --poll-pool requests in flight. p50/p99/max of t_route - t_ready, and where the time goes
             (pod Ready, HTTPRoute, EndpointSlice, Traefik's status, from watches). Goal p99 <= 1 s.
  authorize  --index environments in the operator's index (the route part's, plus cheap ones created
             with spec.suspend: true: no pod, no route, nothing to retry), then --requests forward-auth
             requests straight to the operator's /authorize (the headers Traefik sends) for random
             environments, as their owner or as a stranger, --concurrency at a time on keep-alive
             connections. p50/p99 client side and as the operator logs it (`gateway.authorize`
             seconds); the API server's write requests (apiserver_request_total) during each burst,
             beside --quiet seconds without requests before them. Goal p99 <= 5 ms, 0 writes.
  gateway    one Cluster environment (Slurm, hack/slurm.sh: real JupyterLab on the node's own address):
             GET <base>api/status directly at http://<node>:<port> with `Authorization: token ...`
             versus through the gateway with the session cookie, --samples each, interleaved (which
             one goes first alternates), sequential, keep-alive. p50/p99 of each and the difference.
             Goal <= 5 ms added at p50.

The operator runs as tests/integration/conftest.py's OperatorProcess with the settings of its
`gateway` fixture (hack/gateway.sh env, hack/identity.py env, forward-auth on a free port), and the
production sweep interval (10 s) instead of the tests' 1 s. KWOK pods run nothing, so the route part
adds fake KWOK nodes whose podCIDR (--pod-cidr) is routed into one network namespace where every
address of it is local (AnyIP) and one echo server answers on port 8888; the stack's own nodes are
cordoned meanwhile. Everything it made is removed at the end (namespaces, nodes, netns, route).

    export CLUSTER_STATE_DIR=/tmp/bo-cluster PORT_OFFSET=800    # a side stack: gateway on 8800
    hack/cluster.sh up && hack/gateway.sh up && eval "$(hack/cluster.sh env)"
    SLURM_STATE_DIR=/tmp/bo-slurm SLURM_NODE_SUBNET=10.250.11 ... hack/slurm.sh up   # for `gateway`
    SLURM_STATE_DIR=/tmp/bo-slurm .venv/bin/python bench/open.py --out /tmp/open.md
    .venv/bin/python bench/open.py --parts route,authorize --environments 20 --index 100 --requests 200  # trial
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import http.client
import json
import math
import os
import pathlib
import platform
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import kubernetes
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "operator"))
from tests.integration.conftest import GROUP, VERSION, Gateway, OperatorProcess, _free_port  # noqa: E402
from tests.integration.netns import ECHO_SERVER  # noqa: E402
from tests.integration.scripts import parse_exports, run_script  # noqa: E402

STATE = pathlib.Path(os.environ.get("CLUSTER_STATE_DIR", "/tmp/analysis-operator-cluster"))
PLURAL = "analysisenvironments"
GATEWAY_API = ("gateway.networking.k8s.io", "v1")
WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE", "APPLY")
# What the operator writes (environments, their children, routes and their Middlewares, Events).
OPERATOR_RESOURCES = {
    "analysisenvironments",
    "computebudgets",
    "pods",
    "services",
    "secrets",
    "events",
    "httproutes",
    "middlewares",
    "endpointslices",
    "configmaps",
}
NODE_PREFIX = "kwok-open-"
JUPYTER_PORT = 8888
LOGS = REPO / "bench" / "logs"


def log(message: str) -> None:
    print(f"[open {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 samples is the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(values: list[float], digits: int = 0) -> str:
    if not values:
        return "no samples"
    return (
        f"p50 {percentile(values, 50) * 1000:.{digits}f} ms, p99 {percentile(values, 99) * 1000:.{digits}f} ms, "
        f"max {max(values) * 1000:.{digits}f} ms (n={len(values)})"
    )


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def busiest(count: int = 6) -> str:
    """The processes using the most CPU right now (ps, over their lifetime: a hint of what else runs)."""
    out = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"], capture_output=True, text=True
    ).stdout
    return ", ".join(" ".join(line.split()[::-1]) + "%" for line in out.splitlines()[:count])


# --------------------------------------------------------------------------- cluster access


class Cluster:
    def __init__(self, kubeconfig: str, pool: int) -> None:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = pool + 16
        self.kubeconfig = kubeconfig
        self.api = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.discovery = kubernetes.client.DiscoveryV1Api(self.api)
        self.host = configuration.host

    def kubectl(self, *arguments: str) -> str:
        binary = pathlib.Path((STATE / "bin").read_text().strip()) / "kubectl"
        return subprocess.run(
            [str(binary), *arguments],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": self.kubeconfig},
        ).stdout

    def list_json(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return json.loads(method(*args, _preload_content=False, **kwargs).data)

    def writes(self) -> collections.Counter:
        """apiserver_request_total of write verbs, by (verb, resource, subresource, code)."""
        response = self.api.rest_client.pool_manager.request("GET", f"{self.host}/metrics", preload_content=True)
        counts: collections.Counter = collections.Counter()
        for line in response.data.decode().splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels_text, _, value = line[len("apiserver_request_total{") :].rpartition("} ")
            labels = {k: v.strip('"') for k, v in (p.split("=", 1) for p in labels_text.split('",') if "=" in p)}
            if labels.get("verb") in WRITE_VERBS:
                key = (
                    labels["verb"],
                    labels.get("resource", ""),
                    labels.get("subresource", ""),
                    labels.get("code", ""),
                )
                counts[key] += float(value)
        return counts

    def create_namespace(self, name: str) -> None:
        self.core.create_namespace({"metadata": {"name": name, "labels": {"bench": "open"}}}, _preload_content=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # pods are refused until the default ServiceAccount exists
            try:
                self.core.read_namespaced_service_account("default", name, _preload_content=False)
                return
            except ApiException:
                time.sleep(0.2)
        raise RuntimeError(f"no default ServiceAccount in {name}")

    def create_environment(self, namespace: str, name: str, owner: str, flavor: str, **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": name},
            "spec": {"owner": owner, "flavor": flavor, **spec},
        }
        answer = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, _preload_content=False
        )
        answer.data  # noqa: B018  (read and released: the pool takes the connection back, no new TLS handshake per call)
        answer.release_conn()

    def phases(self, namespace: str) -> collections.Counter:
        items = self.list_json(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)["items"]
        return collections.Counter((item.get("status") or {}).get("phase") or "" for item in items)


def diff(before: collections.Counter, after: collections.Counter) -> dict[tuple, float]:
    return {key: after[key] - before.get(key, 0) for key in after if after[key] - before.get(key, 0) > 0}


class Watch:
    """One watch (list + watch from its resourceVersion, again after 410), timestamping events on arrival."""

    def __init__(self, method: Callable[..., Any], args: tuple, handle: Callable[[str, dict, float], None]) -> None:
        self.method, self.args, self.handle = method, args, handle
        self._stop = threading.Event()
        self._listed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._listed.wait(timeout=60)

    def _list(self) -> str:
        return json.loads(self.method(*self.args, _preload_content=False).data)["metadata"]["resourceVersion"]

    def _run(self) -> None:
        version = self._list()
        self._listed.set()
        while not self._stop.is_set():
            try:
                response = self.method(
                    *self.args,
                    watch=True,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=30,
                    _preload_content=False,
                )
                try:
                    for line in iter_resp_lines(response):
                        now = time.perf_counter()
                        event = json.loads(line)
                        body = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            if body.get("code") == 410:
                                version = self._list()
                            break
                        version = (body.get("metadata") or {}).get("resourceVersion", version)
                        if event.get("type") != "BOOKMARK":
                            self.handle(event["type"], body, now)
                        if self._stop.is_set():
                            break
                finally:
                    response.release_conn()
            except Exception as error:
                if not self._stop.is_set():
                    log(f"watch: {error!r}; restarting")
                    time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- the stack


def gateway_settings(run_id: str) -> tuple[Gateway, dict[str, str]]:
    """What tests/integration/conftest.py's `gateway` fixture does: Traefik up, an identity provider
    stand-in, and the operator's settings for OPEN."""
    run_script("gateway.sh", "up", timeout=900)
    exported = parse_exports(run_script("gateway.sh", "env"))
    identity_dir = LOGS / f"identity-{run_id}"
    subprocess.run([sys.executable, str(REPO / "hack/identity.py"), "init", str(identity_dir)], check=True)
    port = _free_port()
    settings = {
        **{key: value for key, value in exported.items() if key.startswith("ANALYSIS_OPERATOR_GATEWAY_")},
        **parse_exports(
            subprocess.run(
                [sys.executable, str(REPO / "hack/identity.py"), "env", str(identity_dir)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        ),
        "ANALYSIS_OPERATOR_GATEWAY_ENABLED": "true",
        "ANALYSIS_OPERATOR_GATEWAY_AUTH_LISTEN_ADDRESS": "127.0.0.1",
        "ANALYSIS_OPERATOR_GATEWAY_AUTH_PORT": str(port),
        "ANALYSIS_OPERATOR_GATEWAY_AUTH_URL": f"http://127.0.0.1:{port}/authorize",
        "ANALYSIS_OPERATOR_GATEWAY_SESSION_COOKIE": "aenv_session",
        "ANALYSIS_OPERATOR_GATEWAY_ADMINS": "support",
    }
    return Gateway(exported["ANALYSIS_OPERATOR_GATEWAY_URL"], settings, identity_dir), settings


def slurm_settings() -> dict[str, str] | None:
    """hack/slurm.sh env (SLURM_STATE_DIR etc. from the environment), or None if it is not up."""
    try:
        exported = parse_exports(run_script("slurm.sh", "env"))
    except RuntimeError:
        return None
    return {k: v for k, v in exported.items() if k.startswith("ANALYSIS_OPERATOR_SLURM_") or k == "SLURM_CONF"}


def ip(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *arguments], check=check, capture_output=True, text=True)


class PodNetwork:
    """Every address of `cidr` answered by one echo server: a network namespace where the whole range is
    local (a `local` route: AnyIP), reached from the host by a veth pair and one route."""

    def __init__(self, run_id: str, cidr: str) -> None:
        self.cidr, self.name = cidr, f"bo-open-{run_id}"
        self.host_side, self.inside = f"boh{run_id}"[:15], f"bon{run_id}"[:15]
        # Outside tests/integration/netns.py's 169.254.1-250.1, so never the same address as a test's.
        self.host_address, self.node_address = "169.254.252.1", "169.254.252.2"
        self.server: subprocess.Popen | None = None

    def __enter__(self) -> PodNetwork:
        if ip("route", "show", self.cidr).stdout.strip() or ip("route", "show", "root", self.cidr).stdout.strip():
            raise RuntimeError(f"{self.cidr} is already routed on this host: choose another --pod-cidr")
        ip("netns", "add", self.name)
        try:
            ip("link", "add", self.host_side, "type", "veth", "peer", "name", self.inside)
            ip("link", "set", self.inside, "netns", self.name)
            ip("addr", "add", f"{self.host_address}/32", "dev", self.host_side)
            ip("link", "set", self.host_side, "up")
            inside = ["netns", "exec", self.name, "ip"]
            ip(*inside, "link", "set", "lo", "up")
            ip(*inside, "addr", "add", f"{self.node_address}/32", "dev", self.inside)
            ip(*inside, "link", "set", self.inside, "up")
            ip(*inside, "route", "add", f"{self.host_address}/32", "dev", self.inside)
            ip(*inside, "route", "add", "local", self.cidr, "dev", "lo")
            ip("route", "add", f"{self.node_address}/32", "dev", self.host_side, "src", self.host_address)
            ip("route", "add", self.cidr, "via", self.node_address, "dev", self.host_side, "src", self.host_address)
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, "-c", ECHO_SERVER, "0.0.0.0", str(JUPYTER_PORT)],
                stdout=subprocess.DEVNULL,
            )
            probe = self.cidr.split("/")[0].rsplit(".", 1)[0] + ".77"
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection((probe, JUPYTER_PORT), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        except Exception:
            self.__exit__()
            raise
        return self

    def listen_drops(self) -> int:
        """Connections the echo server's listen queue dropped so far (each: a 1 s SYN retransmission)."""
        answer = ip("netns", "exec", self.name, "nstat", "-az", "TcpExtListenDrops", check=False).stdout
        return sum(int(line.split()[1]) for line in answer.splitlines() if line.startswith("TcpExtListenDrops"))

    def __exit__(self, *_: object) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        ip("route", "del", self.cidr, check=False)
        ip("link", "del", self.host_side, check=False)
        ip("netns", "del", self.name, check=False)


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.args = arguments
        self.kubeconfig = os.environ.get("KUBECONFIG") or str(STATE / "kubeconfig")
        self.cluster = Cluster(self.kubeconfig, arguments.pool)
        self.run_id = uuid.uuid4().hex[:6]
        LOGS.mkdir(parents=True, exist_ok=True)
        self.namespaces: list[str] = []
        self.nodes: list[str] = []
        self.cordoned: list[str] = []
        self.lines: list[str] = []
        self.ready_names: list[tuple[str, str]] = []  # (namespace, name) of the route part's environments
        self.owners: dict[tuple[str, str], str] = {}
        self.gateway: Gateway | None = None
        self.operator: OperatorProcess | None = None

    # ---- bookkeeping
    def out(self, line: str = "") -> None:
        self.lines.append(line)
        log(line) if line else None

    def namespace(self, purpose: str) -> str:
        name = f"bench-open-{self.run_id}-{purpose}"
        self.cluster.create_namespace(name)
        self.namespaces.append(name)
        return name

    def operator_cpu(self) -> float:
        assert self.operator and self.operator.process
        fields = pathlib.Path(f"/proc/{self.operator.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def operator_rss(self) -> float:
        assert self.operator and self.operator.process
        for line in pathlib.Path(f"/proc/{self.operator.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    # ---- setup
    def setup(self) -> None:
        cluster = self.cluster
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        cluster.kubectl("apply", "-f", str(REPO / "deploy/authorization"))
        cluster.kubectl("apply", "-f", str(REPO / "examples/flavors.yaml"), "-f", str(REPO / "examples/users.yaml"))
        self.gateway, settings = gateway_settings(self.run_id)
        if "gateway" in self.args.parts:
            slurm = slurm_settings()
            if slurm is None:
                log("hack/slurm.sh is not up (with this SLURM_STATE_DIR): the `gateway` part is skipped")
                self.args.parts = [part for part in self.args.parts if part != "gateway"]
            else:
                settings.update(slurm)
        settings["ANALYSIS_OPERATOR_SWEEP_INTERVAL_SECONDS"] = str(self.args.sweep_interval)
        self.settings = settings
        self.operator = OperatorProcess(self.kubeconfig, LOGS / f"open-{self.run_id}.log", **settings)
        self.operator.start()
        log(f"operator PID {self.operator.process.pid}, log {self.operator.log_path}")

    def machine(self) -> list[str]:
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        )
        memory_kib = next(
            int(line.split()[1])
            for line in pathlib.Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        server = kubernetes.client.VersionApi(self.cluster.api).get_code()
        try:  # the running one (the cache's link may have moved since it started)
            traefik = pathlib.Path(f"/proc/{(STATE / 'gateway' / 'traefik.pid').read_text().strip()}/exe").resolve()
        except OSError:
            traefik = (pathlib.Path((STATE / "bin").read_text().strip()) / "traefik").resolve()
        import kopf

        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "operator"], capture_output=True)
        return [
            "| | |",
            "|---|---|",
            f"| CPU | {os.cpu_count()} x {model}, {memory_kib / 1024**2:.1f} GiB RAM |",
            f"| OS | {platform.platform()} |",
            f"| python / kopf / aiohttp | {platform.python_version()} / {kopf.__version__} / {aiohttp.__version__} |",
            f"| kube-apiserver | {server.git_version} |",
            f"| gateway | Traefik {traefik.parent.name} ({traefik}, hack/gateway.sh) |",
            f"| operator code | {commit.stdout.strip()}{' (modified)' if dirty.stdout.strip() else ''} |",
            f"| load average at start | {loadavg()} |",
            f"| busiest processes at start | {busiest()} |",
        ]

    # ---- nodes for the route part
    def add_nodes(self, pods: int) -> None:
        """Fake KWOK nodes with their podCIDR in --pod-cidr (KWOK takes pod IPs from the node's podCIDR);
        the stack's own nodes are cordoned meanwhile, so every pod gets an address the echo server answers."""
        base = self.args.pod_cidr.split("/")[0].split(".")
        count = max(1, math.ceil(pods * 1.2 / 3000))
        for node in self.cluster.list_json(self.cluster.core.list_node)["items"]:
            if not node["spec"].get("unschedulable"):
                self.cluster.core.patch_node(node["metadata"]["name"], {"spec": {"unschedulable": True}})
                self.cordoned.append(node["metadata"]["name"])
        for index in range(count):
            name = f"{NODE_PREFIX}{self.run_id}-{index}"
            capacity = {"cpu": "4000", "memory": "64Ti", "pods": "3000"}
            cidr = f"{base[0]}.{base[1]}.{16 * index}.0/20"
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
                    "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
                },
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                "status": {"allocatable": capacity, "capacity": capacity},
            }
            self.cluster.core.create_node(body, _preload_content=False)
            self.nodes.append(name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = [self.cluster.list_json(self.cluster.core.read_node, name) for name in self.nodes]
            if all(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (n.get("status") or {}).get("conditions", [])
                )
                for n in nodes
            ):
                break
            time.sleep(0.5)
        log(
            f"added {count} KWOK nodes ({NODE_PREFIX}{self.run_id}-*, podCIDR in {self.args.pod_cidr}); "
            f"cordoned {', '.join(self.cordoned) or 'none'}"
        )

    # ---- 1. route in place and answering, from Ready
    def route(self) -> None:
        args, cluster = self.args, self.cluster
        assert self.gateway is not None
        n = args.environments
        namespace = self.namespace("route")
        owner = "bench"
        cookie = f"aenv_session={self.gateway.token(owner, minutes=240)}"
        self.add_nodes(n)
        with PodNetwork(self.run_id, args.pod_cidr) as pod_network:
            loop = asyncio.new_event_loop()
            # perf_counter times, by environment name, as the watches saw them
            ready: dict[str, float] = {}
            pod_ready: dict[str, float] = {}
            route_added: dict[str, float] = {}
            endpoint_ready: dict[str, float] = {}
            accepted: dict[str, float] = {}  # Traefik wrote the HTTPRoute's status (it does so before serving it)
            wake: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
            queue: asyncio.Queue = asyncio.Queue()

            def on_environment(kind: str, body: dict, now: float) -> None:
                name = body["metadata"]["name"]
                if (body.get("status") or {}).get("phase") == "Ready" and name not in ready:
                    ready[name] = now
                    loop.call_soon_threadsafe(queue.put_nowait, name)

            def on_pod(kind: str, body: dict, now: float) -> None:
                conditions = (body.get("status") or {}).get("conditions") or ()
                if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
                    pod_ready.setdefault(body["metadata"]["name"].removeprefix("aenv-"), now)

            def on_route(kind: str, body: dict, now: float) -> None:
                name = body["metadata"]["name"].removeprefix("aenv-")
                route_added.setdefault(name, now)
                parents = (body.get("status") or {}).get("parents") or ()
                if name not in accepted and any(
                    c.get("type") == "Accepted" and c.get("status") == "True"
                    for parent in parents
                    for c in parent.get("conditions") or ()
                ):
                    accepted[name] = now
                    loop.call_soon_threadsafe(lambda woken=name: wake[woken].set())

            def on_slice(kind: str, body: dict, now: float) -> None:
                service = ((body.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name", "")
                if any(
                    (e.get("conditions") or {}).get("ready") and e.get("addresses") for e in body.get("endpoints") or ()
                ):
                    endpoint_ready.setdefault(service.removeprefix("aenv-"), now)

            custom = cluster.custom.list_namespaced_custom_object
            watches = [
                Watch(custom, (GROUP, VERSION, namespace, PLURAL), on_environment),
                Watch(custom, (*GATEWAY_API, namespace, "httproutes"), on_route),
                Watch(cluster.core.list_namespaced_pod, (namespace,), on_pod),
                Watch(cluster.discovery.list_namespaced_endpoint_slice, (namespace,), on_slice),
            ]
            load_before, cpu_before = loadavg(), self.operator_cpu()
            traefik_log = STATE / "gateway" / "traefik.log"
            traefik_offset = traefik_log.stat().st_size if traefik_log.exists() else 0
            names = [f"lab-{index:04d}" for index in range(n)]
            for name in names:
                self.owners[(namespace, name)] = owner
            began = time.perf_counter()
            pool = concurrent.futures.ThreadPoolExecutor(args.pool)
            posts = [
                pool.submit(cluster.create_environment, namespace, name, owner, "jupyter-basic", lifetime="4h")
                for name in names
            ]
            result = loop.run_until_complete(self._follow(namespace, names, cookie, queue, wake, accepted, began))
            errors = [str(f.exception())[:200] for f in posts if f.exception() is not None]
            pool.shutdown()
            for watch in watches:
                watch.stop()
            loop.close()
            listen_drops = pod_network.listen_drops()
        self.ready_names = [(namespace, name) for name in names if name in ready]
        traefik_lines: collections.Counter = collections.Counter()
        if traefik_log.exists():
            with traefik_log.open("rb") as handle:
                handle.seek(traefik_offset)
                for raw in handle:
                    words = raw.decode(errors="replace").split(" ", 3)
                    if len(words) > 2 and words[1] in ("ERR", "WRN"):
                        traefik_lines[f"{words[1]} {words[2]} {words[3][:40]}..."] += 1
        routed, first_other, gaps, kinds, polls, early = result
        last = max(received for _, received in routed.values()) if routed else began

        def since(later: dict[str, float], earlier: dict[str, float]) -> list[float]:
            return [later[name] - earlier[name] for name in names if name in later and name in earlier]

        answered = {name: received for name, (_, received) in routed.items()}
        all_ready = max(ready.values()) - began if ready else float("nan")
        self.out(f"### 1. Route in place and answering, from Ready ({n} environments, burst)")
        self.out()
        self.out("| | |")
        self.out("|---|---|")
        self.out(
            f"| created | {n} `jupyter-basic` in one namespace, POSTed by {args.pool} threads; {len(errors)} errors |"
        )
        self.out(
            f"| Ready | {len(ready)} of {n}; the last {all_ready:.1f} s after the first POST "
            f"({len(ready) / all_ready:.1f}/s) |"
        )
        self.out(
            f"| routed (the echo server answered through the gateway) | {len(routed)} of {len(ready)}; the last "
            f"{last - began:.1f} s after the first POST |"
        )
        self.out(f"| **t_route - t_ready** (answer received) | **{ms(since(answered, ready))}** |")
        self.out(f"| the same, to the sending of that request | {ms([routed[k][0] - ready[k] for k in routed])} |")
        self.out(f"| poll resolution (the previous poll's sending -> the routed one's) | {ms(gaps)} |")
        self.out(f"| connections the echo server's listen queue dropped (1 s SYN retransmissions) | {listen_drops} |")
        self.out(f"| pod Ready -> environment Ready (operator) | {ms(since(ready, pod_ready))} |")
        self.out(
            f"| HTTPRoute ADDED - t_ready (operator; negative: the route is made before the status) "
            f"| {ms(since(route_added, ready))} |"
        )
        self.out(f"| EndpointSlice ready - t_ready (controller-manager) | {ms(since(endpoint_ready, ready))} |")
        self.out(
            f"| Traefik wrote the route's status (Accepted) - HTTPRoute ADDED | {ms(since(accepted, route_added))} |"
        )
        self.out(f"| answered - Traefik wrote the route's status | {ms(since(answered, accepted))} |")
        self.out(f"| routed before Traefik's status was seen | {early} |")
        self.out(
            f"| polls | {polls} (every {args.poll_interval} s per environment once Traefik accepted its route, "
            f"every {args.poll_slow} s before; at most {args.poll_pool} in flight) |"
        )
        self.out(f"| answers before the route's | {dict(kinds)} |")
        self.out(f"| Traefik's log during the part (ERR/WRN lines) | {dict(traefik_lines.most_common(4)) or 'none'} |")
        self.out(f"| first answer that was not the closed page, when not the echo | {dict(first_other) or 'none'} |")
        self.out(
            f"| operator CPU during the part | {self.operator_cpu() - cpu_before:.1f} s; "
            f"RSS {self.operator_rss():.0f} MiB |"
        )
        self.out(f"| load average before / after | {load_before} / {loadavg()} |")
        if errors:
            self.out(f"| POST errors (first 3) | {errors[:3]} |")
        self.out()

    async def _follow(
        self,
        namespace: str,
        names: list[str],
        cookie: str,
        queue: asyncio.Queue,
        wake: dict[str, asyncio.Event],
        accepted: dict[str, float],
        began: float,
    ) -> tuple:
        """Poll each Ready environment through the gateway until its own route answers: often once Traefik
        has accepted its HTTPRoute (it writes the status before serving it), seldom before (a safety net)."""
        args = self.args
        assert self.gateway is not None
        routed: dict[str, tuple[float, float]] = {}  # name -> (request sent, answer received)
        gaps: list[float] = []
        kinds: collections.Counter = collections.Counter()
        first_other: collections.Counter = collections.Counter()
        counters = {"polls": 0, "early": 0}
        in_flight = asyncio.Semaphore(args.poll_pool)
        connector = aiohttp.TCPConnector(limit=args.poll_pool, limit_per_host=args.poll_pool)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def follow(name: str) -> None:
                path = f"/env/{namespace}/{name}/api/status"
                url, last_sent, other_seen = self.gateway.url + path, None, False
                while True:
                    async with in_flight:
                        sent = time.perf_counter()
                        counters["polls"] += 1
                        try:
                            async with session.get(url, headers={"Cookie": cookie}) as response:
                                body = await response.read()
                                status, reason = response.status, response.headers.get("X-Analysis-Reason", "")
                        except (aiohttp.ClientError, TimeoutError) as error:
                            status, reason, body = 0, type(error).__name__, b""
                        received = time.perf_counter()
                    echoed = False
                    if status == 200:
                        with contextlib.suppress(ValueError):
                            echoed = json.loads(body).get("path") == path
                    if echoed:
                        routed[name] = (sent, received)
                        counters["early"] += name not in accepted
                        if last_sent is not None:
                            gaps.append(sent - last_sent)
                        return
                    kind = f"{status} {reason}".strip()
                    kinds[kind] += 1
                    if reason != "RouteNotReady" and not other_seen:
                        first_other[kind] += 1
                        other_seen = True
                    last_sent = sent
                    if name in accepted:
                        await asyncio.sleep(args.poll_interval)
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake[name].wait(), timeout=args.poll_slow)

            tasks = []
            deadline = began + args.timeout
            while len(tasks) < len(names) and time.perf_counter() < deadline:
                try:
                    name = await asyncio.wait_for(queue.get(), timeout=max(0.1, deadline - time.perf_counter()))
                except TimeoutError:
                    break
                tasks.append(asyncio.create_task(follow(name)))
                if len(tasks) % 100 == 0:
                    log(f"route: {len(tasks)} Ready, {len(routed)} routed, {counters['polls']} polls")
            pending = set(tasks)
            while pending and time.perf_counter() < deadline:
                _, pending = await asyncio.wait(pending, timeout=min(30.0, max(1.0, deadline - time.perf_counter())))
                log(f"route: {len(tasks)} Ready, {len(routed)} routed, {counters['polls']} polls")
            for task in pending:
                task.cancel()
            if pending:
                log(f"route: {len(pending)} not routed in time")
        return routed, first_other, gaps, kinds, counters["polls"], counters["early"]

    # ---- 2. the forward-auth decision with many environments indexed
    def authorize(self) -> None:
        args, cluster = self.args, self.cluster
        assert self.gateway is not None and self.operator is not None
        cheap = max(0, args.index - len(self.ready_names))
        per_namespace = 1000
        targets: list[tuple[str, str]] = list(self.ready_names)
        pool = concurrent.futures.ThreadPoolExecutor(args.pool)
        began = time.perf_counter()
        futures, namespaces = [], []
        for start in range(0, cheap, per_namespace):
            namespace = self.namespace(f"idx{start // per_namespace}")
            namespaces.append(namespace)
            for index in range(start, min(cheap, start + per_namespace)):
                name, owner = f"env-{index:05d}", f"user{index % 100:02d}"
                self.owners[(namespace, name)] = owner
                targets.append((namespace, name))
                futures.append(
                    pool.submit(cluster.create_environment, namespace, name, owner, "jupyter-basic", suspend=True)
                )
        errors = [str(f.exception())[:200] for f in futures if f.exception() is not None]
        posted = time.perf_counter() - began
        log(f"authorize: {cheap} suspended environments POSTed in {posted:.1f} s ({len(errors)} errors)")
        pool.shutdown()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            phases: collections.Counter = collections.Counter()
            for namespace in namespaces:
                phases.update(cluster.phases(namespace))
            if phases.get("Suspended", 0) >= cheap - len(errors):
                break
            log(f"authorize: waiting for the operator: {dict(phases)}")
            time.sleep(5)
        indexed = time.perf_counter() - began
        log(f"authorize: {cheap} Suspended after {indexed:.1f} s")
        time.sleep(2)  # the last status events reach the operator's index

        users = sorted(set(self.owners.values()))
        tokens = {user: self.gateway.token(user, minutes=240) for user in [*users, "stranger"]}
        auth_url = self.settings["ANALYSIS_OPERATOR_GATEWAY_AUTH_URL"]
        host = self.gateway.url.split("://", 1)[1]

        def request(target: tuple[str, str], as_owner: bool) -> tuple[str, dict[str, str]]:
            user = self.owners[target] if as_owner else "stranger"
            return auth_url, {
                "X-Forwarded-Method": "GET",
                "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": host,
                "X-Forwarded-Uri": f"/env/{target[0]}/{target[1]}/api/status",
                "X-Forwarded-For": "127.0.0.1",
                "Cookie": f"_xsrf=2|x; aenv_session={tokens[user]}",
            }

        loop = asyncio.new_event_loop()
        # One pass over every environment as its owner: every one is indexed (no 404), and the token of
        # each Ready one is read once (its Secret: the only API call a decision makes, cached after).
        first = loop.run_until_complete(self._send([request(t, True) for t in targets], max(args.concurrency)))
        statuses = collections.Counter(status for status, _, _ in first)
        if statuses.get(404):
            log(f"authorize: {statuses[404]} environments answered 404 (not indexed?)")

        rng = random.Random(args.seed)
        burst = []
        for _ in range(args.requests):
            target, as_owner = rng.choice(targets), rng.random() < 0.5
            burst.append((request(target, as_owner), "owner" if as_owner else "stranger"))
        self.out(f"### 2. The forward-auth decision at the operator ({len(targets)} environments indexed)")
        self.out()
        self.out("| | |")
        self.out("|---|---|")
        self.out(
            f"| indexed | {len(self.ready_names)} Ready (part 1) + {cheap} created with `suspend: true` in "
            f"{len(namespaces)} namespaces (100 owners); all Suspended {indexed:.0f} s after the first POST "
            f"({len(errors)} POST errors) |"
        )
        self.out(
            f"| first pass: one request per environment as its owner (reads each Ready one's token once) | "
            f"{ms([s for _, s, _ in first], 2)}; {dict(statuses)} |"
        )
        before_quiet = cluster.writes()
        time.sleep(args.quiet)
        self.out(
            f"| API writes in a quiet {args.quiet:.0f} s before the bursts | {self._writes(diff(before_quiet, cluster.writes()))} |"
        )
        for concurrency in args.concurrency:
            offset = self.operator.log_path.stat().st_size
            before = cluster.writes()
            cpu_before, load_before = self.operator_cpu(), loadavg()
            start = time.perf_counter()
            answers = loop.run_until_complete(self._send([r for r, _ in burst], concurrency))
            elapsed = time.perf_counter() - start
            cpu = self.operator_cpu() - cpu_before
            during = diff(before, cluster.writes())
            time.sleep(1)
            logged = self._logged_seconds(offset)
            latencies = [seconds for _, seconds, _ in answers]
            by_case: dict[str, list[float]] = collections.defaultdict(list)
            for (status, seconds, reason), (_, who) in zip(answers, burst, strict=True):
                by_case[f"{who}: {status} {reason}".strip()].append(seconds)
            operator_writes = {k: v for k, v in during.items() if k[1] in OPERATOR_RESOURCES}
            where = f"concurrency {concurrency}"
            self.out(
                f"| burst, {where} | {args.requests} requests, random environment, owner or stranger (1:1), "
                f"{concurrency} keep-alive connection{'s' if concurrency > 1 else ''}: {elapsed:.1f} s "
                f"({args.requests / elapsed:.0f}/s); load average before / after {load_before} / {loadavg()} |"
            )
            self.out(f"| **{where}: client-side latency** | **{ms(latencies, 2)}** |")
            self.out(f"| **{where}: operator's `gateway.authorize` seconds** | **{ms(logged, 3)}** |")
            for case, values in sorted(by_case.items()):
                self.out(f"| {where}: client-side, {case} | {ms(values, 2)} |")
            self.out(
                f"| {where}: operator CPU | {cpu:.1f} s, {1000 * cpu / args.requests:.2f} ms per request "
                f"({100 * cpu / elapsed:.0f} % of one core) |"
            )
            self.out(
                f"| **{where}: API writes to the operator's resources during the burst** "
                f"| **{sum(operator_writes.values()):.0f}** |"
            )
            self.out(f"| {where}: all API writes during the burst ({elapsed:.1f} s) | {self._writes(during)} |")
        loop.close()
        self.out()

    @staticmethod
    def _writes(counts: dict[tuple, float]) -> str:
        if not counts:
            return "none"
        return ", ".join(
            f"{verb} {resource}{'/' + sub if sub else ''} ({code}): {value:.0f}"
            for (verb, resource, sub, code), value in sorted(counts.items())
        )

    async def _send(self, requests: list[tuple[str, dict[str, str]]], concurrency: int) -> list[tuple[int, float, str]]:
        """(status, seconds, X-Analysis-Reason) per request, sent `concurrency` at a time on keep-alive connections."""
        results: list[tuple[int, float, str]] = [(0, 0.0, "")] * len(requests)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            cursor = iter(range(len(requests)))

            async def worker() -> None:
                for index in cursor:
                    url, headers = requests[index]
                    started = time.perf_counter()
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        results[index] = (
                            response.status,
                            time.perf_counter() - started,
                            response.headers.get("X-Analysis-Reason", ""),
                        )

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    def _logged_seconds(self, offset: int) -> list[float]:
        assert self.operator is not None
        values = []
        with self.operator.log_path.open("rb") as handle:
            handle.seek(offset)
            for raw in handle:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if line.get("event") == "gateway.authorize" and "seconds" in line:
                    values.append(float(line["seconds"]))
        return values

    # ---- 3. the gateway's added latency for a JupyterLab API call
    def gateway_latency(self) -> None:
        args, cluster = self.args, self.cluster
        assert self.gateway is not None
        namespace, name = self.namespace("slurm"), "hpc"
        cluster.create_environment(namespace, name, "alice", "jupyter-cluster", lifetime="1h")
        deadline = time.monotonic() + 300
        phase = ""
        while time.monotonic() < deadline:
            body = cluster.list_json(
                cluster.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
            phase = (body.get("status") or {}).get("phase", "")
            if phase == "Ready":
                break
            if phase in ("Failed", "Rejected"):
                raise RuntimeError(f"the Cluster environment is {phase}: {body.get('status')}")
            time.sleep(0.5)
        if phase != "Ready":
            raise RuntimeError(f"the Cluster environment is not Ready after 300 s ({phase})")
        (endpoints,) = cluster.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name=aenv-{name}"
        ).items
        address, port = endpoints.endpoints[0].addresses[0], endpoints.ports[0].port
        token = base64.b64decode(cluster.core.read_namespaced_secret(f"aenv-{name}", namespace).data["token"]).decode()
        path = f"/env/{namespace}/{name}/api/status"
        gateway_host, gateway_port = self.gateway.url.split("://", 1)[1].split(":")
        cookie = f"aenv_session={self.gateway.token('alice', minutes=120)}"
        direct = http.client.HTTPConnection(address, port, timeout=10)
        through = http.client.HTTPConnection(gateway_host, int(gateway_port), timeout=10)

        def get(connection: http.client.HTTPConnection, headers: dict[str, str]) -> tuple[int, float]:
            started = time.perf_counter()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status, time.perf_counter() - started

        calls = {
            "direct": lambda: get(direct, {"Authorization": f"token {token}"}),
            "gateway": lambda: get(through, {"Cookie": cookie}),
        }
        deadline = time.monotonic() + 60
        while calls["gateway"]()[0] != 200:  # the route is in place
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} does not answer 200 through the gateway")
            time.sleep(0.2)
        for _ in range(20):  # warm: connections, the token cache, JupyterLab's own caches
            calls["direct"](), calls["gateway"]()
        samples: dict[str, list[float]] = {"direct": [], "gateway": []}
        paired: list[float] = []
        statuses: collections.Counter = collections.Counter()
        load_before = loadavg()
        for index in range(args.samples):
            order = ("direct", "gateway") if index % 2 == 0 else ("gateway", "direct")
            pair = {}
            for which in order:
                status, seconds = calls[which]()
                statuses[(which, status)] += 1
                samples[which].append(seconds)
                pair[which] = seconds
            paired.append(pair["gateway"] - pair["direct"])
        direct.close(), through.close()
        d, g = samples["direct"], samples["gateway"]
        self.out(f"### 3. The gateway's added latency for a JupyterLab API call (Slurm, {args.samples} each)")
        self.out()
        self.out("| | p50 | p99 | max |")
        self.out("|---|---|---|---|")
        for label, values in (
            (f"direct: http://{address}:{port}{path}, `Authorization: token`", d),
            (f"through the gateway: {self.gateway.url}{path}, session cookie", g),
        ):
            self.out(
                f"| {label} | {percentile(values, 50) * 1000:.2f} ms | {percentile(values, 99) * 1000:.2f} ms "
                f"| {max(values) * 1000:.2f} ms |"
            )
        self.out(
            f"| **added by the gateway** (p50 - p50, p99 - p99) | **{(percentile(g, 50) - percentile(d, 50)) * 1000:.2f} ms** "
            f"| {(percentile(g, 99) - percentile(d, 99)) * 1000:.2f} ms | |"
        )
        self.out(
            f"| per pair (gateway - direct, the same moment) | {percentile(paired, 50) * 1000:.2f} ms "
            f"| {percentile(paired, 99) * 1000:.2f} ms | {max(paired) * 1000:.2f} ms |"
        )
        self.out()
        self.out(f"Statuses: {dict(statuses)}. Load average before / after: {load_before} / {loadavg()}.")
        self.out()

    # ---- cleanup
    def cleanup(self) -> None:
        # The environments first, while the operator runs: it releases the Slurm job (and any finalizer),
        # and a pod deleted by a namespace's deletion would otherwise be made again (and refused) meanwhile.
        for namespace in self.namespaces:
            try:
                self.cluster.custom.delete_collection_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, propagation_policy="Background", _preload_content=False
                )
            except ApiException as error:
                log(f"delete environments in {namespace}: {error.status}")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and any(sum(self.cluster.phases(ns).values()) for ns in self.namespaces):
            time.sleep(2)
        for namespace in self.namespaces:
            try:
                self.cluster.core.delete_namespace(namespace, propagation_policy="Background", _preload_content=False)
            except ApiException as error:
                log(f"delete namespace {namespace}: {error.status}")
        deadline = time.monotonic() + 600
        while self.namespaces and time.monotonic() < deadline:
            existing = {
                item["metadata"]["name"] for item in self.cluster.list_json(self.cluster.core.list_namespace)["items"]
            }
            if not existing & set(self.namespaces):
                break
            time.sleep(2)
        if self.operator is not None:
            self.operator.stop()
        for name in self.nodes:
            try:
                self.cluster.core.delete_node(name, _preload_content=False)
            except ApiException as error:
                log(f"delete node {name}: {error.status}")
        for name in self.cordoned:
            self.cluster.core.patch_node(name, {"spec": {"unschedulable": False}})

    def run(self) -> str:
        self.lines = []
        header = self.machine()
        self.setup()
        try:
            for part in self.args.parts:
                log(f"part {part}: load average {loadavg()}")
                {"route": self.route, "authorize": self.authorize, "gateway": self.gateway_latency}[part]()
        finally:
            self.cleanup()
        command = "python bench/open.py " + " ".join(sys.argv[1:])
        return "\n".join(
            [
                f"One run of `{command}` on {time.strftime('%Y-%m-%d', time.gmtime())} (run id {self.run_id}), "
                f"operator log {self.operator.log_path.relative_to(REPO) if self.operator else '-'}.",
                "",
                *header,
                "",
                *self.lines,
            ]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="route,authorize,gateway", type=lambda s: s.split(","))
    parser.add_argument("--environments", type=int, default=1000, help="route: environments created in the burst")
    parser.add_argument("--pool", type=int, default=32, help="threads POSTing environments")
    parser.add_argument("--poll-pool", type=int, default=32, help="route: requests in flight through the gateway")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="route: seconds between polls of one")
    parser.add_argument("--poll-slow", type=float, default=5, help="route: the same before Traefik accepted it")
    parser.add_argument("--pod-cidr", default="10.211.0.0/16", help="route: the fake nodes' pod range (unrouted here)")
    parser.add_argument("--index", type=int, default=10000, help="authorize: environments in the operator's index")
    parser.add_argument("--requests", type=int, default=20000, help="authorize: forward-auth requests in the burst")
    parser.add_argument(
        "--concurrency",
        default="1,8",
        type=lambda s: [int(x) for x in s.split(",")],
        help="authorize: keep-alive connections; one burst per value",
    )
    parser.add_argument("--quiet", type=float, default=20, help="authorize: seconds of background before the burst")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--samples", type=int, default=500, help="gateway: requests each way")
    parser.add_argument("--sweep-interval", type=float, default=10)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=pathlib.Path)
    arguments = parser.parse_args()
    report = Bench(arguments).run()
    print(report)
    if arguments.out:
        arguments.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
