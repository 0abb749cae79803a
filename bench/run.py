#!/usr/bin/env python3
"""Benchmark the analysis operator against the local stack (hack/cluster.sh up).

One run measures, each in its own namespace:
  1. single environments, one at a time: POST -> pod exists / status Ready (watch events)
  2. batches created at once (thread pool): time to all Ready, errors, duplicate children
  3. API writes per environment (kube-apiserver's apiserver_request_total, diffed per batch)
  4. operator RSS and CPU per phase (idle, ~1,000 and 10,000 environments)
  5. operator restart with everything unchanged: time to live, to steady state, writes
  6. delete -> pod gone (garbage collector), one at a time
  7. the raw limit: Secret + Service + Pod created directly, N=1000, ratio to the operator
  8. --go-raw N: the operator's N-at-once burst alternating with bench/goraw (client-go, no rate
     limit) creating the same children, --rounds times each; medians, throughput ratio and CPU
     per environment for the whole machine and by process

The operator runs as `taskset -c 1 python -m analysis_operator --log-format json`.
Output: a markdown report on stdout and in --out. Operator logs go to bench/logs/.

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/run.py --out bench/RESULTS.md                       # full: 50, 100, 1000, 10000
    .venv/bin/python bench/run.py --single 10 --sizes 20 --skip-10k --raw 20  # quick trial
    .venv/bin/python bench/run.py --single 0 --sizes= --raw 0 --skip-10k --no-restart --go-raw 1000  # issue 17 G2
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import pathlib
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))
from analysis_operator.backends.kubernetes import build_pod, build_service  # noqa: E402
from analysis_operator.engine.tokens import build_token_secret, new_token  # noqa: E402
from analysis_operator.model.domain import Environment, Flavor  # noqa: E402
from analysis_operator.settings import load_settings  # noqa: E402

STATE = pathlib.Path(os.environ.get("CLUSTER_STATE_DIR", "/tmp/analysis-operator-cluster"))
GROUP, VERSION, PLURAL = "analysis.panosc.eu", "v1alpha1", "analysisenvironments"
MANAGED = "app.kubernetes.io/managed-by=analysis-operator"
# The operator's environment for each allocator: the image runs Python on jemalloc (Dockerfile).
ALLOCATORS = {"jemalloc": {"PYTHONMALLOC": "malloc", "LD_PRELOAD": "libjemalloc.so.2"}, "pymalloc": {}}
RAW_MANAGER = "bench-raw"
LABEL_ENVIRONMENT = f"{GROUP}/environment"
FLAVOR = "jupyter-basic"
WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE", "APPLY")
# Resources the operator writes; a write to anything else is not the operator's.
OPERATOR_RESOURCES = {
    ("", "pods", ""),
    ("", "services", ""),
    ("", "secrets", ""),
    (GROUP, PLURAL, ""),
    (GROUP, PLURAL, "status"),
    ("", "events", ""),
}
NODE_PREFIX = "kwok-bench-"  # tests assert pods land on nodes named kwok-*


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 50 samples is the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    if not values:
        return "no samples"
    return (
        f"p50 {percentile(values, 50) * scale:.0f} {unit}, p99 {percentile(values, 99) * scale:.0f} {unit}, "
        f"max {max(values) * scale:.0f} {unit} (n={len(values)})"
    )


# --------------------------------------------------------------------------- cluster access


def consumed(response: Any) -> None:
    """Read and release an unparsed answer: the client's pool takes its connection back only then (left
    unread, every call opens a new TLS connection, a handshake the API server pays for too)."""
    response.data  # noqa: B018
    response.release_conn()


class Cluster:
    def __init__(self, kubeconfig: str, pool: int) -> None:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = pool + 16
        self.kubeconfig = kubeconfig
        self.api = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
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

    def metrics(self) -> collections.Counter:
        """apiserver_request_total for writes (not dry runs), by (verb, group, resource, subresource, code class)."""
        response = self.api.rest_client.pool_manager.request("GET", f"{self.host}/metrics", preload_content=True)
        counts: collections.Counter = collections.Counter()
        for line in response.data.decode().splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels_text, _, value = line[len("apiserver_request_total{") :].rpartition("} ")
            labels = dict(part.split("=", 1) for part in labels_text.split('",') if "=" in part)
            labels = {k: v.strip('"') for k, v in labels.items()}
            if labels.get("verb") not in WRITE_VERBS or labels.get("dry_run"):
                continue  # a dry run stores nothing (the operator's start probes with one, Operator.creates_served)
            code, verb = labels.get("code", ""), labels["verb"]
            if verb == "DELETE" and labels.get("scope") != "resource":
                verb = "DELETECOLLECTION"  # the namespace controller emptying a namespace
            key = (
                verb,
                labels.get("group", ""),
                labels.get("resource", ""),
                labels.get("subresource", ""),
                "ok" if code.startswith("2") else code,
            )
            counts[key] += float(value)
        return counts

    def create_namespace(self, name: str) -> None:
        self.core.create_namespace(
            {"metadata": {"name": name, "labels": {"bench": "analysis-operator"}}}, _preload_content=False
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # pods are refused until the default ServiceAccount exists
            try:
                self.core.read_namespaced_service_account("default", name, _preload_content=False)
                return
            except ApiException:
                time.sleep(0.2)
        raise RuntimeError(f"no default ServiceAccount in {name}")

    def ensure_owner(self) -> None:
        """Environments run as their owner's POSIX identity: the owner "bench" needs a FacilityUser."""
        owner = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FacilityUser",
            "metadata": {"name": "bench"},
            "spec": {"uid": 29999, "gid": 29999},
        }
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, "facilityusers", owner, _preload_content=False)
        except ApiException as error:
            if error.status != 409:  # already there
                raise

    def create_environment(self, namespace: str, name: str, flavor: str = FLAVOR) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": name},
            "spec": {"owner": "bench", "flavor": flavor},
        }
        consumed(
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, _preload_content=False)
        )

    def delete_environment(self, namespace: str, name: str) -> None:
        consumed(
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _preload_content=False)
        )

    def list_json(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return json.loads(method(*args, _preload_content=False, **kwargs).data)


# --------------------------------------------------------------------------- watches


class Tracker:
    """Watch events in one namespace, timestamped on arrival (time.perf_counter)."""

    def __init__(self, cluster: Cluster, namespace: str, pod_selector: str | None, environments: bool = True) -> None:
        """Watches the namespace's pods (pod_selector; None: no pod watch) and its environments."""
        self.cluster, self.namespace = cluster, namespace
        self.condition = threading.Condition()
        self.pod_added: dict[str, float] = {}
        self.pod_running: dict[str, float] = {}
        self.pod_terminating: dict[str, float] = {}
        self.pod_deleted: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.phases: dict[str, str] = {}
        self.events = 0  # watch events (not bookmarks) seen
        self.last_event = 0.0
        self._stop = threading.Event()
        watches = []
        if pod_selector is not None:
            watches.append(
                ("pods", cluster.core.list_namespaced_pod, (namespace,), {"label_selector": pod_selector}, self._on_pod)
            )
        if environments:
            watches.append(
                (
                    "aenv",
                    cluster.custom.list_namespaced_custom_object,
                    (GROUP, VERSION, namespace, PLURAL),
                    {},
                    self._on_environment,
                )
            )
        self._threads = [
            threading.Thread(target=self._watch, daemon=True, name=f"watch-{what}-{namespace}", args=watch)
            for what, *watch in watches
        ]
        self._started = threading.Barrier(len(self._threads) + 1)
        for thread in self._threads:
            thread.start()
        self._started.wait(timeout=60)

    def _watch(self, method: Callable[..., Any], args: tuple, kwargs: dict, handle: Callable) -> None:
        resource_version = self.cluster.list_json(method, *args, **kwargs)["metadata"]["resourceVersion"]
        self._started.wait(timeout=60)
        while not self._stop.is_set():
            try:
                response = method(
                    *args,
                    watch=True,
                    resource_version=resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=30,
                    _preload_content=False,
                    **kwargs,
                )
                try:
                    for line in iter_resp_lines(response):
                        now = time.perf_counter()
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            if obj.get("code") == 410:  # expired: start again from now
                                resource_version = self.cluster.list_json(method, *args, **kwargs)["metadata"][
                                    "resourceVersion"
                                ]
                            break
                        resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                        if event.get("type") != "BOOKMARK":
                            with self.condition:
                                self.events += 1
                                self.last_event = now
                                handle(event["type"], obj, now)
                                self.condition.notify_all()
                        if self._stop.is_set():
                            break
                finally:
                    response.release_conn()
            except Exception as error:
                if not self._stop.is_set():
                    log(f"watch {self.namespace}: {error!r}; restarting")
                    time.sleep(0.5)

    def _on_pod(self, kind: str, pod: dict, now: float) -> None:
        name = pod["metadata"]["name"]
        self.pod_added.setdefault(name, now)
        if (pod.get("status") or {}).get("phase") == "Running":
            self.pod_running.setdefault(name, now)
        if pod["metadata"].get("deletionTimestamp"):
            self.pod_terminating.setdefault(name, now)
        if kind == "DELETED":
            self.pod_terminating.setdefault(name, now)
            self.pod_deleted.setdefault(name, now)

    def _on_environment(self, kind: str, environment: dict, now: float) -> None:
        name = environment["metadata"]["name"]
        phase = (environment.get("status") or {}).get("phase") or ""
        self.phases[name] = phase
        if phase == "Ready":
            self.ready.setdefault(name, now)

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.condition:
            return self.condition.wait_for(predicate, timeout=timeout)

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- the operator process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Operator:
    def __init__(self, kubeconfig: str, log_path: pathlib.Path, core: int, **settings: str) -> None:
        self.kubeconfig, self.log_path, self.core, self.settings = kubeconfig, log_path, core, settings
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.webhook_port = free_port()  # kept across restarts: the registration points at it

    def start(self, timeout: float = 300) -> tuple[float, float]:
        """Start and wait for the liveness endpoint; returns (started_at, live_at) in perf_counter time."""
        self.port = free_port()
        while self.port == self.webhook_port:  # free between a stop and this start: the system may hand it out
            self.port = free_port()
        environment = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "PYTHONPATH": str(REPO / "operator"),
            "ANALYSIS_OPERATOR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.port}/healthz",
            "ANALYSIS_OPERATOR_METRICS_PORT": "0",
            "ANALYSIS_OPERATOR_BUDGETS_REQUIRE_BUDGET": "false",  # unmetered: budgets are budget_race.py's
            "ANALYSIS_OPERATOR_ADMISSION_HOST": "127.0.0.1",
            "ANALYSIS_OPERATOR_ADMISSION_LISTEN_ADDRESS": "127.0.0.1",
            "ANALYSIS_OPERATOR_ADMISSION_PORT": str(self.webhook_port),
            "ANALYSIS_OPERATOR_ADMISSION_CERT_DIR": str(self.log_path.parent / "webhook-tls"),
            **self.settings,
        }
        with self.log_path.open("a") as log_file:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                ["taskset", "-c", str(self.core), sys.executable, "-m", "analysis_operator", "--log-format", "json"],
                env=environment,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=str(REPO),
            )
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited with {self.process.returncode}, see {self.log_path}")
            if self.live() and self.webhooks_registered() and self.creates_served():
                return started, time.perf_counter()
            time.sleep(0.05)
        raise RuntimeError(f"operator not live after {timeout} s, see {self.log_path}")

    def creates_served(self) -> bool:
        """An environment's create is answered (a server-side dry run; a refusal is an answer too): just after a
        fresh stack's CRDs are Established, kube-apiserver can still answer 503 for a few seconds (stop 39: 284
        of a first burst of 1,000)."""
        custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(self.kubeconfig))
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AnalysisEnvironment", "metadata": {"name": "probe"}}
        body["spec"] = {"owner": "bench", "flavor": FLAVOR}
        try:
            consumed(
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, "default", PLURAL, body, dry_run="All", _preload_content=False
                )
            )
        except ApiException as error:
            return error.status < 500
        return True

    def webhooks_registered(self) -> bool:
        """kopf registers the webhooks just after start (a killed operator leaves its old URL behind)."""
        api = kubernetes.client.AdmissionregistrationV1Api(kubernetes.config.new_client_from_config(self.kubeconfig))
        try:
            hooks = [
                *(api.read_validating_webhook_configuration("analysis.panosc.eu").webhooks or []),
                *(api.read_mutating_webhook_configuration("analysis.panosc.eu").webhooks or []),
            ]
        except ApiException:
            return False
        wanted = f"https://127.0.0.1:{self.webhook_port}/"
        return bool(hooks) and all((hook.client_config.url or "").startswith(wanted) for hook in hooks)

    def live(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status == 200
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid  # taskset execs python: same PID

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        values = {}
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def cpu_seconds(self) -> float:
        fields = pathlib.Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def affinity(self) -> str:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(self.pid)))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> float:
        """Signal and wait; returns seconds until the process exited."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        began = time.perf_counter()
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.perf_counter() - began

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def errors_since(self, offset: int) -> int:
        """Log lines at level error/critical (or tracebacks) written after offset."""
        count = 0
        with self.log_path.open("rb") as handle:
            handle.seek(offset)
            for raw in handle:
                line = raw.decode(errors="replace")
                try:
                    level = str(json.loads(line).get("level", "")).lower()
                except (ValueError, AttributeError):
                    level = "error" if line.startswith("Traceback") else ""
                count += level in ("error", "critical", "exception")
        return count


# --------------------------------------------------------------------------- helpers


def other_operators(own_pid: int | None) -> list[str]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (own_pid, os.getpid()):
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "analysis_operator" in command and "bench/run.py" not in command and "taskset" not in command:
            found.append(f"{entry.name}: {command.strip()[:120]}")
    return found


def machine_info(cluster: Cluster) -> list[tuple[str, str]]:
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
    server = kubernetes.client.VersionApi(cluster.api).get_code()
    import kopf

    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", model),
        ("RAM", f"{memory_kib / 1024**2:.1f} GiB"),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        ("kube-apiserver", server.git_version),
        ("kubernetes client", kubernetes.__version__),
        ("kopf", kopf.__version__),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def run_pool(pool: concurrent.futures.ThreadPoolExecutor, function: Callable, items: list) -> list[str]:
    """Run function over items in the pool; returns the error messages."""
    errors = []
    for future in concurrent.futures.as_completed([pool.submit(function, item) for item in items]):
        error = future.exception()
        if error is not None:
            errors.append(f"{type(error).__name__}: {str(error)[:200]}")
    return errors


# --------------------------------------------------------------------------- 8: the Go raw client


SHAPE_NAME = "tmplq9x"  # an environment name found nowhere else in its children, so it can be templated
STACK_COMPONENTS = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")


def build_goraw() -> pathlib.Path:
    """bench/goraw's binary, built (or found in the cache) by hack/build-go-bench.sh."""
    built = subprocess.run(
        [str(REPO / "hack" / "build-go-bench.sh"), "goraw"], check=True, capture_output=True, text=True
    )
    return pathlib.Path(built.stdout.strip().splitlines()[-1])


def merge_fields(into: dict, fields: dict) -> dict:
    """Union of two managedFields fieldsV1 trees."""
    for key, sub in fields.items():
        merge_fields(into.setdefault(key, {}), sub)
    return into


def owned_fields(value: Any, fields: dict) -> Any:
    """The parts of `value` that a fieldsV1 tree names: what clients sent, without what the server set
    afterwards (uid, resourceVersion, status, the scheduler's nodeName, a Service's clusterIP, admission's
    additions). Defaults applied while decoding the request stay: sending them again changes nothing."""
    children = {key: sub for key, sub in fields.items() if key != "."}
    if not children:
        return {} if isinstance(value, dict) and "." in fields else value
    if isinstance(value, dict):
        return {
            key[2:]: owned_fields(value[key[2:]], sub)
            for key, sub in children.items()
            if key.startswith("f:") and key[2:] in value
        }
    if isinstance(value, list):
        kept = []
        for index, item in enumerate(value):
            for key, sub in children.items():
                kind, _, spec = key.partition(":")
                if (
                    (
                        kind == "k"
                        and isinstance(item, dict)
                        and all(item.get(k) == v for k, v in json.loads(spec).items())
                    )
                    or (kind == "v" and item == json.loads(spec))
                    or (kind == "i" and int(spec) == index)
                ):
                    kept.append(owned_fields(item, sub))
                    break
        return kept
    return value


def client_shape(body: dict) -> tuple[dict, list[str]]:
    """A live object as its clients wrote it (managedFields of the main resource, no subresources), and
    the managers that wrote it."""
    entries = [e for e in body["metadata"].get("managedFields") or () if not e.get("subresource")]
    fields: dict = {}
    for entry in entries:
        merge_fields(fields, entry.get("fieldsV1") or {})
    shape = owned_fields(body, fields)
    shape["apiVersion"], shape["kind"] = body["apiVersion"], body["kind"]
    shape.setdefault("metadata", {})["name"] = body["metadata"]["name"]
    return shape, sorted({f"{e['manager']} ({e['operation']})" for e in entries})


class CpuMeter:
    """CPU seconds used by the whole machine (/proc/stat: user, nice, system, irq, softirq, steal) and by
    process (/proc/<pid>/stat utime + stime): the operator, this script, and the stack's components (their
    process groups, from the PID files hack/cluster.sh writes)."""

    def __init__(self, operator: Operator) -> None:
        self.operator = operator
        self.ticks = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> dict[str, float]:
        fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        usage: dict[str, float] = collections.defaultdict(float)
        usage["whole machine"] = sum(fields[i] for i in (0, 1, 2, 5, 6, 7)) / self.ticks
        groups = {}
        for name in STACK_COMPONENTS:
            with contextlib.suppress(OSError, ValueError):
                groups[int((STATE / "pids" / name).read_text())] = name
        named = {self.operator.pid: "operator", os.getpid(): "bench/run.py (POSTs, watches)"}
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            label = named.get(int(entry.name)) or groups.get(int(stat[2]))
            if label:
                usage[label] += (int(stat[11]) + int(stat[12])) / self.ticks
        return dict(usage)

    @staticmethod
    def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        used = {key: after[key] - before.get(key, 0.0) for key in after}
        return used

    @staticmethod
    def with_other(used: dict[str, float]) -> dict[str, float]:
        """Adds "other" = the whole machine minus every named process (other processes, interrupts)."""
        named = sum(value for key, value in used.items() if key != "whole machine")
        return {**used, "other (machine minus the above)": used["whole machine"] - named}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "operator"], capture_output=True, text=True
        )
        return head.stdout.strip() + (" + uncommitted changes in operator/" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def write_table(before: collections.Counter, after: collections.Counter, n: int) -> dict:
    diff = {key: after[key] - before.get(key, 0) for key in after if after[key] - before.get(key, 0) > 0}
    return {"diff": diff, "n": n}


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.args = arguments
        kubeconfig = os.environ.get("KUBECONFIG") or str(STATE / "kubeconfig")
        self.cluster = Cluster(kubeconfig, arguments.pool)
        self.run_id = uuid.uuid4().hex[:6]
        logs = REPO / "bench" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.operator = Operator(
            kubeconfig, logs / f"operator-{self.run_id}.log", arguments.core, **ALLOCATORS[arguments.allocator]
        )
        self.pool = concurrent.futures.ThreadPoolExecutor(arguments.pool, thread_name_prefix="post")
        self.namespaces: list[str] = []
        self.deleted: set[str] = set()
        self.trackers: list[Tracker] = []
        self.nodes: list[str] = []
        self.service_cidr = ""
        self.results: list[tuple[str, str]] = []
        self.resources: list[tuple[str, str, str, str, str]] = []  # phase, envs, RSS, HWM, CPU s
        self.writes: dict[int, dict] = {}
        self.sections: list[str] = []  # extra report sections (8)
        self.meter = CpuMeter(self.operator)
        self.notes: list[str] = []
        self.cpu_mark = 0.0
        self.environments_total = 0

    # ---- bookkeeping
    def namespace(self, purpose: str) -> str:
        name = f"bench-{self.run_id}-{purpose}"
        self.cluster.create_namespace(name)
        self.namespaces.append(name)
        return name

    def track(self, namespace: str, pod_selector: str | None = MANAGED, environments: bool = True) -> Tracker:
        tracker = Tracker(self.cluster, namespace, pod_selector, environments)
        self.trackers.append(tracker)
        return tracker

    def result(self, metric: str, value: str) -> None:
        self.results.append((metric, value))
        log(f"{metric}: {value}")

    def checkpoint(self, phase: str) -> None:
        rss, hwm = self.operator.rss_mib()
        cpu = self.operator.cpu_seconds()
        self.resources.append(
            (phase, str(self.environments_total), f"{rss:.0f}", f"{hwm:.0f}", f"{cpu - self.cpu_mark:.1f}")
        )
        log(f"{phase}: RSS {rss:.0f} MiB, HWM {hwm:.0f} MiB, CPU {cpu - self.cpu_mark:.1f} s")
        self.cpu_mark = cpu

    # ---- setup
    def setup(self) -> None:
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        self.cluster.kubectl("apply", "-f", str(REPO / "examples/flavors.yaml"))
        # The API server's own policies, as the local stack, the tests and the chart install them: the
        # authorization policy on every change and delete, the identity policies on every create.
        self.cluster.kubectl("apply", "-f", str(REPO / "deploy/authorization"))
        self.cluster.ensure_owner()
        self.add_nodes()
        self.add_service_cidr()

    def add_service_cidr(self) -> None:
        """The stack's service range is 10.0.0.0/24 (about 250 ClusterIPs): add a ServiceCIDR for the run."""
        self.service_cidr = f"bench-{self.run_id}"
        body = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": self.service_cidr},
            "spec": {"cidrs": [self.args.service_cidr]},
        }
        networking = kubernetes.client.NetworkingV1Api(self.cluster.api)
        networking.create_service_cidr(body, _preload_content=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self.cluster.list_json(networking.read_service_cidr, self.service_cidr).get("status") or {}
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()):
                break
            time.sleep(0.5)
        log(f"added ServiceCIDR {self.service_cidr} ({self.args.service_cidr})")

    def add_nodes(self) -> None:
        """The stack's 3 KWOK nodes hold 16 jupyter-basic pods each (1 CPU, 16Gi): add big fake nodes."""
        args = self.args
        pods = args.single + sum(args.sizes) + args.raw + (0 if args.skip_10k else args.scale)
        pods += 2 * args.go_raw * args.rounds + 1  # 8: in case a namespace is slow to go
        count = max(1, math.ceil(pods * 1.2 / 3000))
        for index in range(count):
            name = f"{NODE_PREFIX}{self.run_id}-{index}"
            capacity = {"cpu": "4000", "memory": "64Ti", "pods": "3000"}
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        "bench": "true",
                    },
                },
                "status": {"allocatable": capacity, "capacity": capacity},
            }
            self.cluster.core.create_node(body, _preload_content=False)
            self.nodes.append(name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = 0
            for name in self.nodes:
                node = self.cluster.list_json(self.cluster.core.read_node, name)
                ready += any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (node.get("status") or {}).get("conditions") or ()
                )
            if ready == len(self.nodes):
                break
            time.sleep(0.5)
        log(f"added {count} KWOK nodes ({NODE_PREFIX}{self.run_id}-*), 3000 pods each")

    # ---- 1 and 6
    def single(self) -> str:
        n = self.args.single
        namespace = self.namespace("single")
        tracker = self.track(namespace)
        pod_latency, ready_latency, failures = [], [], 0
        for index in range(n):
            name = f"s{index:03d}"
            began = time.perf_counter()
            self.cluster.create_environment(namespace, name)
            # both events: on a fresh stack the pod watch can still be (re)starting when the status says Ready
            if not tracker.wait(
                lambda: name in tracker.ready and f"aenv-{name}" in tracker.pod_added, timeout=self.args.timeout_single
            ):
                failures += 1
                log(f"single {name}: not Ready after {self.args.timeout_single} s (phase {tracker.phases.get(name)!r})")
                continue
            self.environments_total += 1
            pod_latency.append(tracker.pod_added[f"aenv-{name}"] - began)
            ready_latency.append(tracker.ready[name] - began)
        self.result(f"1a. one at a time: POST -> pod exists (watch), {n}x", summary(pod_latency))
        self.result(f"1b. one at a time: POST -> status Ready (watch), {n}x", summary(ready_latency))
        if failures:
            self.result("1. one at a time: not Ready in time", str(failures))
        return namespace

    def delete_one_by_one(self, namespace: str) -> None:
        tracker = next(t for t in self.trackers if t.namespace == namespace)
        names = sorted(tracker.ready)[: self.args.single]
        terminating, deleted = [], []
        for name in names:
            child = f"aenv-{name}"
            began = time.perf_counter()
            self.cluster.delete_environment(namespace, name)
            if not tracker.wait(lambda: child in tracker.pod_deleted, timeout=self.args.timeout_single):
                log(f"delete {name}: pod still there after {self.args.timeout_single} s")
                continue
            self.environments_total -= 1
            terminating.append(tracker.pod_terminating[child] - began)
            deleted.append(tracker.pod_deleted[child] - began)
        self.result(f"6a. DELETE environment -> pod deletionTimestamp (GC, watch), {len(names)}x", summary(terminating))
        self.result(f"6b. DELETE environment -> pod DELETED event (watch), {len(names)}x", summary(deleted))

    # ---- 2 and 3
    def batch(self, n: int, purpose: str | None = None, record: bool = True) -> float:
        namespace = self.namespace(purpose or f"n{n}")
        tracker = self.track(namespace)
        names = [f"e{index:05d}" for index in range(n)]
        self.quiet(2, 60)
        before = self.cluster.metrics()
        log_offset = self.operator.log_offset()
        began = time.perf_counter()
        errors = run_pool(self.pool, lambda name: self.cluster.create_environment(namespace, name), names)
        posted = time.perf_counter()
        expected = n - len(errors)
        timeout = self.args.timeout_batch_base + n * self.args.timeout_batch_per_env
        all_ready = tracker.wait(lambda: len(tracker.ready) >= expected, timeout=timeout)
        elapsed = (max(tracker.ready.values()) - began) if tracker.ready else float("nan")
        self.environments_total += len(tracker.ready)
        if not record:
            if not all_ready:
                self.notes.append(f"{purpose}: only {len(tracker.ready)}/{n} Ready after {timeout:.0f} s")
            return elapsed
        self.quiet(3, 120)
        after = self.cluster.metrics()
        self.writes[n] = write_table(before, after, n)
        duplicates = self.children(namespace, names)
        latencies = [tracker.ready[name] - began for name in tracker.ready]
        self.result(
            f"2. N={n} at once: time until all Ready",
            f"{elapsed:.2f} s"
            + ("" if all_ready else f" (TIMEOUT: {len(tracker.ready)}/{expected} Ready after {timeout:.0f} s)"),
        )
        self.result(
            f"2. N={n}: throughput",
            f"{len(tracker.ready) / elapsed:.1f} environments/s (POSTs done after {posted - began:.2f} s)",
        )
        self.result(f"2. N={n}: per-environment POST -> Ready", summary(latencies))
        self.result(
            f"2. N={n}: errors",
            f"{len(errors)} POST errors, {self.operator.errors_since(log_offset)} "
            f"operator error log lines" + (f"; first: {errors[0]}" if errors else ""),
        )
        self.result(f"2. N={n}: children per environment", duplicates)
        return elapsed

    def children(self, namespace: str, names: list[str]) -> str:
        parts = []
        for kind, method in (
            ("pods", self.cluster.core.list_namespaced_pod),
            ("services", self.cluster.core.list_namespaced_service),
            ("secrets", self.cluster.core.list_namespaced_secret),
        ):
            items = self.cluster.list_json(method, namespace, label_selector=MANAGED)["items"]
            per = collections.Counter(item["metadata"]["labels"].get(LABEL_ENVIRONMENT) for item in items)
            missing = sum(1 for name in names if per[name] == 0)
            extra = sum(1 for name in names if per[name] > 1)
            parts.append(f"{kind}: {len(items)} for {len(names)}, {missing} missing, {extra} duplicated")
        return "; ".join(parts)

    # ---- 7
    def raw(self, n: int) -> float:
        namespace = self.namespace(f"raw{n}")
        tracker = self.track(namespace, pod_selector=f"app.kubernetes.io/managed-by={RAW_MANAGER}", environments=False)
        flavor_body = self.cluster.list_json(
            self.cluster.custom.get_cluster_custom_object, GROUP, VERSION, "environmentflavors", FLAVOR
        )
        flavor = Flavor.from_body(FLAVOR, flavor_body["spec"])
        settings = load_settings({})
        bodies = []
        for index in range(n):  # rendered before the clock starts, by the operator's own builders
            environment = Environment(
                namespace=namespace, name=f"r{index:05d}", uid=str(uuid.uuid4()), owner="bench", flavor=FLAVOR
            )
            objects = [
                build_token_secret(environment, new_token()),
                build_service(environment, settings),
                build_pod(environment, flavor, settings),
            ]
            for body in objects:  # same size; no owner (it does not exist), not the operator's label
                body["metadata"].pop("ownerReferences", None)
                body["metadata"]["labels"]["app.kubernetes.io/managed-by"] = RAW_MANAGER
            bodies.append(objects)

        def create(objects: list[dict]) -> None:
            secret, service, pod = objects
            consumed(self.cluster.core.create_namespaced_secret(namespace, secret, _preload_content=False))
            consumed(self.cluster.core.create_namespaced_service(namespace, service, _preload_content=False))
            consumed(self.cluster.core.create_namespaced_pod(namespace, pod, _preload_content=False))

        began = time.perf_counter()
        errors = run_pool(self.pool, create, bodies)
        posted = time.perf_counter()
        timeout = self.args.timeout_batch_base + n * self.args.timeout_batch_per_env
        done = tracker.wait(lambda: len(tracker.pod_running) >= n - len(errors), timeout=timeout)
        elapsed = (max(tracker.pod_running.values()) - began) if tracker.pod_running else float("nan")
        self.result(
            f"7. raw limit N={n}: Secret+Service+Pod directly, time until all pods Running",
            f"{elapsed:.2f} s, {len(errors)} errors (POSTs done after {posted - began:.2f} s)"
            + ("" if done else f" (TIMEOUT: {len(tracker.pod_running)}/{n})"),
        )
        tracker.stop()
        self.cluster.core.delete_namespace(namespace, propagation_policy="Background", _preload_content=False)
        self.deleted.add(namespace)
        deadline = time.monotonic() + 300  # its deletion is not to be counted in later phases
        while self._exists(namespace) and time.monotonic() < deadline:
            time.sleep(1)
        return elapsed

    # ---- 8: the operator beside the Go raw client
    def compare_go_raw(self, n: int, rounds: int) -> None:
        """The operator's N at once, alternating with bench/goraw creating the same children, `rounds`
        times each, every run in a fresh namespace deleted before the next (same population each time)."""
        binary = build_goraw()
        shapes = self.args.go_raw_shapes or self.dump_shapes()
        runs: dict[str, list[dict]] = {"operator": [], "go raw": []}
        for index in range(rounds):
            for path in runs:
                sample = self.measured(
                    lambda: (
                        self.operator_burst(n, index)
                        if path == "operator"
                        else self.go_raw_burst(binary, shapes, n, index)
                    )
                )
                runs[path].append(sample)
                log(
                    f"8. {path} run {index + 1}/{rounds}: {sample['elapsed']:.2f} s, {sample['done']}/{n} done, "
                    f"{sample['errors']} errors, whole machine {sample['cpu']['whole machine'] / n * 1000:.0f} "
                    f"core-ms/env ({sample['cpu+tail']['whole machine'] / n * 1000:.0f} with the tail)"
                )
                self.drop_namespace(sample["namespace"])
        self.compare_section(n, runs, binary, shapes)

    def measured(self, burst: Callable[[], dict]) -> dict:
        """One burst started on an idle machine: its CPU to done, and with the tail (what it left to do:
        Endpoints, late writes) until the machine is idle again."""
        idle = self.settle()
        sample = burst()
        sample["idle cores"] = idle
        self.settle()
        tail = CpuMeter.diff(sample.pop("before"), self.meter.snapshot())
        sample["cpu+tail"] = CpuMeter.with_other({**tail, **sample.pop("exited", {})})
        return sample

    def dump_shapes(self) -> pathlib.Path:
        """The Secret, Service and Pod of one Ready jupyter-basic environment made by this operator, as its
        client wrote them, with {{name}}, {{namespace}} and {{uid}} in place of the environment's."""
        namespace = self.namespace("shape")
        tracker = self.track(namespace)
        self.cluster.create_environment(namespace, SHAPE_NAME)
        if not tracker.wait(lambda: SHAPE_NAME in tracker.ready, timeout=self.args.timeout_single):
            raise RuntimeError(f"shape environment not Ready after {self.args.timeout_single} s")
        tracker.stop()
        environment = self.cluster.list_json(
            self.cluster.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, SHAPE_NAME
        )
        selector = f"{LABEL_ENVIRONMENT}={SHAPE_NAME}"
        shapes: dict[str, Any] = {}
        managers: set[str] = set()
        for kind, method in (
            ("secret", self.cluster.core.list_namespaced_secret),
            ("service", self.cluster.core.list_namespaced_service),
            ("pod", self.cluster.core.list_namespaced_pod),
        ):
            items = self.cluster.list_json(method, namespace, label_selector=selector)["items"]
            if len(items) != 1:
                raise RuntimeError(f"shape environment has {len(items)} {kind}s")
            body = items[0]
            body.setdefault("apiVersion", "v1")
            body.setdefault("kind", kind.capitalize())
            shapes[kind], written_by = client_shape(body)
            managers.update(written_by)
        text = json.dumps(shapes, indent=1, sort_keys=True)
        for value, placeholder in (
            (namespace, "{{namespace}}"),
            (environment["metadata"]["uid"], "{{uid}}"),
            (SHAPE_NAME, "{{name}}"),
        ):
            text = text.replace(value, placeholder)
        document = json.loads(text)
        document["_source"] = {
            "dumped": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "from": f"environment {SHAPE_NAME} ({FLAVOR}), Ready, made by the operator at {git_commit()}",
            "writers": sorted(managers),
        }
        path = REPO / "bench" / "logs" / f"goraw-shapes-{self.run_id}.json"
        path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
        log(f"8. shapes of {SHAPE_NAME}'s children (written by {', '.join(sorted(managers))}) in {path}")
        self.drop_namespace(namespace)
        return path

    def settle(self, seconds: float = 3.0, timeout: float = 90.0) -> float:
        """Wait until the whole machine uses less than --settle-cores for `seconds`; returns the cores used."""
        deadline = time.monotonic() + timeout
        used = float("nan")
        while time.monotonic() < deadline:
            before = self.meter.snapshot()["whole machine"]
            time.sleep(seconds)
            used = (self.meter.snapshot()["whole machine"] - before) / seconds
            if used < self.args.settle_cores:
                return used
        self.notes.append(f"8: machine not below {self.args.settle_cores} cores after {timeout:.0f} s ({used:.2f})")
        return used

    def operator_burst(self, n: int, index: int, namespace: str = "", prefix: str = "e") -> dict:
        """N AnalysisEnvironments POSTed at once -> all Ready, in a fresh namespace unless one is given
        (then named <prefix>00000... beside what it holds)."""
        namespace = namespace or self.namespace(f"op{index}")
        # What a portal watches: its environments. The pods are the operator's to watch (as the Go client
        # watches its own): a second pod watch here would charge the operator path for the benchmark.
        tracker = self.track(namespace, pod_selector=None)
        names = [f"{prefix}{i:05d}" for i in range(n)]
        before = self.meter.snapshot()
        began = time.perf_counter()
        errors = run_pool(self.pool, lambda name: self.cluster.create_environment(namespace, name), names)
        timeout = self.args.timeout_batch_base + n * self.args.timeout_batch_per_env
        wanted, expected = set(names), n - len(errors)  # the namespace's other environments do not count
        tracker.wait(
            lambda: len(tracker.ready) >= expected and len(wanted.intersection(tracker.ready)) >= expected,
            timeout=timeout,
        )
        after = self.meter.snapshot()  # POSTs -> all Ready, as the Go client's POSTs -> all Running
        tracker.stop()
        ready = [at for name, at in tracker.ready.items() if name in wanted]
        return {
            "namespace": namespace,
            "names": names,
            "elapsed": (max(ready) - began) if ready else float("nan"),
            "done": len(ready),
            "errors": len(errors),
            "before": before,
            "cpu": CpuMeter.with_other(CpuMeter.diff(before, after)),
        }

    def go_raw_burst(
        self, binary: pathlib.Path, shapes: pathlib.Path, n: int, index: int, namespace: str = "", prefix: str = "g"
    ) -> dict:
        namespace = namespace or self.namespace(f"go{index}")
        timeout = self.args.timeout_batch_base + n * self.args.timeout_batch_per_env
        command = [
            str(binary),
            *("-kubeconfig", self.cluster.kubeconfig, "-namespace", namespace, "-n", str(n), "-prefix", prefix),
            *("-workers", str(self.args.go_raw_workers), "-content-type", self.args.go_raw_content_type),
            *("-shapes", str(shapes), "-timeout", f"{timeout:.0f}s"),
        ]
        before = self.meter.snapshot()
        completed = subprocess.run(command, capture_output=True, text=True)
        after = self.meter.snapshot()
        try:
            result = json.loads(completed.stdout)
        except ValueError:
            raise RuntimeError(f"goraw exited with {completed.returncode}: {completed.stderr[-2000:]}") from None
        self.go_raw_info = f"{result['client_go']}, {result['workers']} workers, {result['content_type']}"
        exited = {"go raw client": result["cpu_total_s"]}  # its rusage: it is gone by the second snapshot
        return {
            "before": before,
            "exited": exited,
            "namespace": namespace,
            "elapsed": result["elapsed_s"] if result["running"] else float("nan"),
            "done": result["running"],
            "errors": result["errors"],
            "cpu": CpuMeter.with_other({**CpuMeter.diff(before, after), **exited}),
        }

    def drop_namespace(self, namespace: str) -> None:
        """Delete a namespace and wait until it is gone, so the next run starts with the same population."""
        began = time.perf_counter()
        self.cluster.core.delete_namespace(namespace, propagation_policy="Background", _preload_content=False)
        self.deleted.add(namespace)
        deadline = time.monotonic() + self.args.timeout_cleanup
        while self._exists(namespace) and time.monotonic() < deadline:
            time.sleep(1)
        log(f"deleted namespace {namespace} in {time.perf_counter() - began:.0f} s")

    def compare_section(self, n: int, runs: dict[str, list[dict]], binary: pathlib.Path, shapes: pathlib.Path) -> None:
        operator, go_raw = runs["operator"], runs["go raw"]
        med = statistics.median

        def throughput(sample: dict) -> float:
            return sample["done"] / sample["elapsed"] if sample["elapsed"] == sample["elapsed"] else 0.0

        def per_env(sample: dict, key: str = "whole machine", window: str = "cpu") -> float:
            return sample[window].get(key, 0.0) / n * 1000

        op_rate, go_rate = med(throughput(s) for s in operator), med(throughput(s) for s in go_raw)
        op_cpu, go_cpu = med(per_env(s) for s in operator), med(per_env(s) for s in go_raw)
        op_tail, go_tail = (
            med(per_env(s, window="cpu+tail") for s in operator),
            med(per_env(s, window="cpu+tail") for s in go_raw),
        )
        pairs = list(zip(operator, go_raw, strict=True))
        rate_pairs = [throughput(o) / throughput(g) if throughput(g) else 0.0 for o, g in pairs]
        cpu_pairs = [per_env(o) / per_env(g) if per_env(g) else 0.0 for o, g in pairs]
        shown = shapes.relative_to(REPO) if shapes.is_relative_to(REPO) else shapes
        lines = [
            "",
            f"## 8. The operator beside the Go raw client: N={n} at once, alternating, {len(operator)} runs each",
            "",
            f"Go raw client: `bench/goraw` ({getattr(self, 'go_raw_info', '?')}, no client-side rate limit), "
            f"binary `{binary}`, shapes `{shown}`. Operator path: POST N AnalysisEnvironments (this script, "
            f"{self.args.pool} threads) -> all status Ready; Go raw path: N x (Secret, Service, Pod) -> all pods "
            "Running. Each run in a fresh namespace, deleted before the next, and the machine idle (below "
            f'{self.args.settle_cores} cores for 3 s) before each. CPU "to done": from just before the first '
            'POST to the last Ready/Running event; "+ tail": until the machine is idle again afterwards '
            "(what the burst left to do; includes those idle seconds).",
            "",
            "| run | path | time s | env/s | done | errors | whole machine core-ms/env, to done | + tail "
            "| machine idle before, cores |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for index in range(len(operator)):
            for path in runs:
                sample = runs[path][index]
                lines.append(
                    f"| {index + 1} | {path} | {sample['elapsed']:.2f} | {throughput(sample):.1f} | {sample['done']} "
                    f"| {sample['errors']} | {per_env(sample):.0f} | {per_env(sample, window='cpu+tail'):.0f} "
                    f"| {sample['idle cores']:.2f} |"
                )
        lines += [
            "",
            f"Medians: operator {med(s['elapsed'] for s in operator):.2f} s ({op_rate:.1f} env/s), Go raw "
            f"{med(s['elapsed'] for s in go_raw):.2f} s ({go_rate:.1f} env/s): **operator / Go raw throughput "
            f"{op_rate / go_rate:.2f}** (G2: >= 0.8). Whole machine per environment, to done: operator path "
            f"{op_cpu:.0f} core-ms, Go raw path {go_cpu:.0f} core-ms: **{op_cpu / go_cpu:.2f}x** (G2: <= 1.25x); "
            f"with the tail {op_tail:.0f} / {go_tail:.0f} core-ms = {op_tail / go_tail:.2f}x.",
            "",
            # The machine's speed can drift by half within a run (stop 39): a run and the one after it share
            # the drift, so the ratios of each pair are shown too, with their medians.
            f"Each pair (operator run i / Go raw run i): throughput {', '.join(f'{r:.2f}' for r in rate_pairs)} "
            f"(median {med(rate_pairs):.2f}); CPU per environment {', '.join(f'{r:.2f}' for r in cpu_pairs)} "
            f"(median {med(cpu_pairs):.2f}x).",
            "",
            "CPU per environment by process, core-ms (median over the runs of each path; medians do not add up):",
            "",
            "| process | operator path, to done | + tail | Go raw path, to done | + tail |",
            "|---|---|---|---|---|",
        ]
        keys = ["whole machine", "operator", *STACK_COMPONENTS, "bench/run.py (POSTs, watches)", "go raw client"]
        keys.append("other (machine minus the above)")
        for key in keys:
            cells = [
                f"{med(per_env(s, key, window) for s in samples):.1f}"
                for samples in (operator, go_raw)
                for window in ("cpu", "cpu+tail")
            ]
            lines.append(f"| {key} | {' | '.join(cells)} |")
        self.sections += lines
        self.result(
            f"8. N={n} at once, operator / Go raw throughput (medians of {len(operator)})", f"{op_rate / go_rate:.2f}"
        )
        self.result(
            f"8. N={n}: whole-machine CPU per environment, operator path / Go raw path (to done)",
            f"{op_cpu:.0f} / {go_cpu:.0f} core-ms = {op_cpu / go_cpu:.2f}x",
        )

    # ---- 4 (10,000)
    def scale(self, target: int) -> None:
        remaining = target - self.environments_total
        if remaining <= 0:
            return
        namespace = self.namespace("scale")
        tracker = self.track(namespace)
        began = time.perf_counter()
        created, errors = 0, []
        while created < remaining:
            size = min(self.args.scale_batch, remaining - created)
            names = [f"x{index:05d}" for index in range(created, created + size)]
            errors += run_pool(self.pool, lambda name: self.cluster.create_environment(namespace, name), names)
            created += size
            expected = created - len(errors)
            if not tracker.wait(
                lambda: len(tracker.ready) >= expected,
                timeout=self.args.timeout_batch_base + size * self.args.timeout_batch_per_env,
            ):
                self.notes.append(f"scale: only {len(tracker.ready)}/{expected} Ready")
                break
        if errors:
            self.notes.append(f"scale: {len(errors)} POSTs failed, the first: {errors[0]}")
            log(self.notes[-1])
            log(f"scale: {len(tracker.ready)} Ready in {namespace} ({time.perf_counter() - began:.0f} s)")
        self.environments_total += len(tracker.ready)
        self.result(
            f"4. top-up to {target} environments: {remaining} more in batches of {self.args.scale_batch}",
            f"{time.perf_counter() - began:.1f} s ({len(tracker.ready) / (time.perf_counter() - began):.1f}/s)",
        )

    # ---- 5
    def quiet(self, seconds: float, timeout: float) -> float:
        """Wait until nothing changes in the bench namespaces (watch events) and the operator uses under half
        its core for `seconds`; returns the perf_counter time of the last activity."""
        last_busy, last_cpu = time.perf_counter(), self.operator.cpu_seconds()
        deadline = last_busy + timeout
        while time.perf_counter() < deadline:
            time.sleep(1.0)
            now, cpu = time.perf_counter(), self.operator.cpu_seconds()
            if cpu - last_cpu > 0.5:
                last_busy = now
            last_busy = max([last_busy] + [t.last_event for t in self.trackers if not t._stop.is_set()])
            last_cpu = cpu
            if now - last_busy >= seconds:
                return last_busy
        self.notes.append(f"not quiet after {timeout:.0f} s")
        return last_busy

    def bench_events(self) -> int:
        """core Events in the bench namespaces (kopf posts them; the scheduler's only on scheduling)."""
        return sum(
            len(self.cluster.list_json(self.cluster.core.list_namespaced_event, ns)["items"])
            for ns in self.namespaces
            if ns not in self.deleted
        )

    def restart(self) -> None:
        self.quiet(5, 300)
        before, events_before = self.cluster.metrics(), self.bench_events()
        watch_before = sum(t.events for t in self.trackers)
        stopped_in = self.operator.stop(getattr(signal, self.args.restart_signal))
        began = time.perf_counter()
        started, live = self.operator.start()
        self.cpu_mark = 0.0
        last_busy = max(live, self.quiet(self.args.idle_seconds, self.args.timeout_restart))
        after, events_after = self.cluster.metrics(), self.bench_events()
        changes = sum(t.events for t in self.trackers) - watch_before
        diff = {
            key: after[key] - before.get(key, 0)
            for key in after
            if after[key] - before.get(key, 0) > 0 and key[1:4] in OPERATOR_RESOURCES and key[0] != "DELETECOLLECTION"
        }
        writes_total = sum(diff.values())
        detail = ", ".join(
            f"{verb} {resource}{'/' + sub if sub else ''}{'' if code == 'ok' else ' ' + code}: {value:.0f}"
            for (verb, group, resource, sub, code), value in sorted(diff.items())
        )
        self.result(
            f"5. restart with {self.environments_total} environments: old process exited after",
            f"{stopped_in:.2f} s ({self.args.restart_signal})",
        )
        self.result("5. restart: start -> liveness endpoint up", f"{live - started:.2f} s")
        self.result(
            f"5. restart: start -> steady state (no change in bench namespaces, operator CPU < 50%, "
            f"for {self.args.idle_seconds:.0f} s)",
            f"{last_busy - started:.2f} s",
        )
        self.result(
            "5. restart: changes in bench namespaces (watch events on pods/environments + new Events; target 0)",
            f"{changes} watch events, {events_after - events_before} Events",
        )
        self.result(
            "5. restart: all clients' writes to pods/services/secrets/environments/events cluster-wide "
            "(kill -> steady + quiet; includes concurrent users)",
            f"{writes_total:.0f}" + (f" ({detail})" if detail else "") + f" over {time.perf_counter() - began:.0f} s",
        )

    # ---- the run
    def run(self) -> str:
        args = self.args
        wall = time.perf_counter()
        info = [*machine_info(self.cluster), ("operator's allocator", args.allocator)]
        others_before = other_operators(None)
        if others_before:
            self.notes.append(
                "other analysis_operator processes were running (they act on these environments "
                "too, clusterwide): " + "; ".join(others_before)
            )
        self.setup()
        _, live = self.operator.start()
        log(f"operator PID {self.operator.pid}, CPU affinity {self.operator.affinity()}, log {self.operator.log_path}")
        info.append(("operator CPU affinity", f"core {self.operator.affinity()} (taskset -c {args.core})"))
        time.sleep(args.idle_seconds)
        self.cpu_mark = 0.0
        self.checkpoint("idle after start")
        single_namespace = None
        if args.single:
            single_namespace = self.single()
            self.checkpoint(f"after {args.single} single")
        operator_1000 = None
        for n in args.sizes:
            elapsed = self.batch(n)
            if n == max(args.sizes):
                operator_1000 = (n, elapsed)
            time.sleep(2)
            self.checkpoint(f"after batch N={n}")
        if args.raw:
            raw_elapsed = self.raw(args.raw)
            if operator_1000 and operator_1000[0] == args.raw:
                self.result(f"7. operator N={args.raw} / raw N={args.raw}", f"{operator_1000[1] / raw_elapsed:.2f}x")
            self.checkpoint(f"during raw N={args.raw} (operator idle)")
        if args.go_raw:
            self.compare_go_raw(args.go_raw, args.rounds)
            self.checkpoint(f"after {args.rounds} x 2 alternating N={args.go_raw} (operator, Go raw)")
        if not args.skip_10k:
            self.scale(args.scale)
            time.sleep(args.idle_seconds)
            self.checkpoint(f"after top-up to {args.scale}")
        if args.restart:
            self.restart()
            self.checkpoint("restart (new process)")
        if single_namespace:
            self.delete_one_by_one(single_namespace)
            self.checkpoint("after delete one by one")
        self.results.append(("run wall time (before cleanup)", f"{time.perf_counter() - wall:.0f} s"))
        others_after = [o for o in other_operators(self.operator.pid) if o not in others_before]
        if others_after:
            self.notes.append("other analysis_operator processes appeared during the run: " + "; ".join(others_after))
        return self.report(info)

    def cleanup(self) -> None:
        for tracker in self.trackers:
            tracker.stop()
        for namespace in self.namespaces:
            try:
                self.cluster.core.delete_namespace(namespace, propagation_policy="Background", _preload_content=False)
            except ApiException as error:
                if error.status != 404:
                    log(f"delete namespace {namespace}: {error.status}")
        deadline = time.monotonic() + self.args.timeout_cleanup
        remaining = list(self.namespaces)
        while remaining and time.monotonic() < deadline:
            time.sleep(2)
            remaining = [ns for ns in remaining if self._exists(ns)]
        if remaining:
            log(f"namespaces still terminating after {self.args.timeout_cleanup} s: {remaining}")
        self.operator.stop()
        for name in self.nodes:  # only when nothing else landed on the node
            pods = self.cluster.list_json(
                self.cluster.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={name}"
            )["items"]
            if pods:
                log(f"node {name} still has {len(pods)} pods; left in place (cordoned)")
                self.cluster.core.patch_node(name, {"spec": {"unschedulable": True}}, _preload_content=False)
            else:
                self.cluster.core.delete_node(name, _preload_content=False)
        if self.service_cidr:  # its finalizer holds it until no Service uses an address from it
            kubernetes.client.NetworkingV1Api(self.cluster.api).delete_service_cidr(
                self.service_cidr, _preload_content=False
            )
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _exists(self, namespace: str) -> bool:
        try:
            self.cluster.core.read_namespace(namespace, _preload_content=False)
            return True
        except ApiException as error:
            return error.status != 404

    # ---- output
    def report(self, info: list[tuple[str, str]]) -> str:
        args = self.args
        lines = [
            f"# analysis-operator benchmark ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, run {self.run_id})",
            "",
            f"Command: `python bench/run.py {' '.join(sys.argv[1:])}`",
            "",
            "## Machine",
            "",
            "| | |",
            "|---|---|",
        ]
        lines += [f"| {key} | {value} |" for key, value in info]
        lines += [
            "",
            "## Results",
            "",
            "Latencies: client `perf_counter()` just before the request to the arrival "
            "of the watch event; p99 is nearest-rank (with 50 samples, the maximum).",
            "",
            "| Measurement | Result |",
            "|---|---|",
        ]
        lines += [f"| {metric} | {value} |" for metric, value in self.results]
        lines += [
            "",
            "## Operator memory and CPU",
            "",
            f"Operator process (pinned to core {args.core}): VmRSS / VmHWM from /proc/<pid>/status, "
            "CPU = utime+stime used during the phase.",
            "",
            "| Phase | Environments existing | RSS MiB | peak RSS MiB | CPU s in phase |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {' | '.join(row)} |" for row in self.resources]
        lines += self.sections
        for n, table in sorted(self.writes.items()):
            lines += self.writes_section(n, table["diff"])
        lines += [
            "",
            "## Notes",
            "",
            "- The stack's three KWOK nodes fit 16 `jupyter-basic` pods each (1 CPU, 16Gi), so the run adds "
            f"fake nodes `{NODE_PREFIX}{self.run_id}-*` (3000 pods each) and removes them at the end.",
            f"- The stack's service range 10.0.0.0/24 holds about 250 ClusterIPs; the run adds a ServiceCIDR "
            f"`{self.service_cidr}` ({args.service_cidr}) and deletes it at the end.",
            "- Write counts come from kube-apiserver's `apiserver_request_total` (all clients), diffed "
            "around the batch; other writers are the scheduler (pods/binding, events.k8s.io events), "
            "KWOK (pods/status), the controller-manager (endpointslices, endpoints) and this script "
            "(one POST analysisenvironments per environment). Concurrent use of the cluster adds noise.",
            "- 5. steady state: after the new process is live, the time of the last watch event in the "
            "bench namespaces (pods, environments) or of the last second in which the operator used more "
            f"than half its core, confirmed by {args.idle_seconds:.0f} s of quiet. The cluster-wide write "
            "count cannot tell the operator from concurrent users; the bench-namespace counts can (a no-op "
            "write that changes nothing is invisible to them, but counted cluster-wide).",
        ]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def writes_section(self, n: int, diff: dict) -> list[str]:
        lines = [
            "",
            f"## API writes per environment, batch N={n} (apiserver_request_total diff / N)",
            "",
            "| verb | resource | code | per environment | writer |",
            "|---|---|---|---|---|",
        ]
        operator_total, operator_events, by_resource = 0.0, 0.0, collections.Counter()
        for (verb, group, resource, subresource, code), value in sorted(diff.items(), key=lambda kv: -kv[1]):
            full = f"{resource}{'/' + subresource if subresource else ''}" + (f" ({group})" if group else "")
            operator_value = value
            if (group, resource, subresource) == (GROUP, PLURAL, "") and verb == "POST":
                writer, operator_value = "this script (create) + operator", value - n
            elif verb == "DELETECOLLECTION":
                writer, operator_value = "namespace controller (deleting namespaces)", 0
            elif (group, resource, subresource) in OPERATOR_RESOURCES:
                writer = "operator (kopf events)" if resource == "events" else "operator"
            else:
                writer, operator_value = (
                    {
                        "pods/binding": "scheduler",
                        "pods/status": "KWOK",
                        "events (events.k8s.io)": "scheduler / controllers",
                        "endpointslices (discovery.k8s.io)": "controller-manager",
                        "endpoints": "controller-manager",
                        "namespaces": "someone else (concurrent tests?)",
                    }.get(full, "other"),
                    0,
                )
            if operator_value > 0:
                if resource == "events":
                    operator_events += operator_value
                else:
                    operator_total += operator_value
                    by_resource[resource] += operator_value
            lines.append(f"| {verb} | {full} | {code} | {value / n:.2f} | {writer} |")
        per = ", ".join(f"{resource} {value / n:.2f}" for resource, value in sorted(by_resource.items()))
        lines += [
            "",
            f"Operator writes per environment, excluding events: **{operator_total / n:.2f}** ({per}); "
            f"core/v1 events (kopf): **{operator_events / n:.2f}**.",
        ]
        return lines


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=50, help="environments one at a time (1, 6); 0 = skip")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[100, 1000],
        help="batch sizes created at once (2, 3), comma-separated",
    )
    parser.add_argument("--raw", type=int, default=None, help="raw-limit size (7; default: largest batch; 0 = skip)")
    parser.add_argument(
        "--go-raw",
        type=int,
        default=0,
        help="8: N at once by the operator alternating with bench/goraw's N, --rounds times each (0 = skip)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="8: runs of each path")
    parser.add_argument("--go-raw-workers", type=int, default=64)
    parser.add_argument("--go-raw-content-type", default="json", choices=["json", "protobuf"])
    parser.add_argument("--go-raw-shapes", type=pathlib.Path, help="8: shapes file (default: dumped in this run)")
    parser.add_argument("--settle-cores", type=float, default=0.3, help="8: idle below this many cores before a run")
    parser.add_argument("--scale", type=int, default=10000, help="total environments for the scale point (4, 5)")
    parser.add_argument("--scale-batch", type=int, default=1000)
    parser.add_argument("--skip-10k", action="store_true", help="no scale point; restart uses what exists")
    parser.add_argument("--no-restart", dest="restart", action="store_false")
    parser.add_argument("--restart-signal", default="SIGTERM", choices=["SIGTERM", "SIGKILL", "SIGINT"])
    parser.add_argument("--pool", type=int, default=32, help="client threads for concurrent POSTs")
    parser.add_argument("--core", type=int, default=1, help="CPU core the operator is pinned to")
    parser.add_argument(
        "--allocator", choices=sorted(ALLOCATORS), default="jemalloc", help="Python's objects from (image: jemalloc)"
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--timeout-single", type=float, default=60.0)
    parser.add_argument("--timeout-batch-base", type=float, default=120.0)
    parser.add_argument("--timeout-batch-per-env", type=float, default=0.3)
    parser.add_argument("--timeout-restart", type=float, default=900.0)
    parser.add_argument("--timeout-cleanup", type=float, default=900.0)
    parser.add_argument(
        "--service-cidr",
        default="10.96.0.0/16",
        help="extra ServiceCIDR for the run (the stack's 10.0.0.0/24 holds ~250 Services)",
    )
    parser.add_argument("--out", type=pathlib.Path, help="also write the markdown report here")
    return parser


def main() -> None:
    arguments = argument_parser().parse_args()
    if arguments.raw is None:
        arguments.raw = max(arguments.sizes) if arguments.sizes else 0
    bench = Bench(arguments)
    report = None
    try:
        report = bench.run()
    finally:
        try:
            bench.cleanup()
        except Exception as error:
            log(f"cleanup failed: {error!r}")
            bench.operator.stop(signal.SIGKILL)
    sys.stdout.write(report)
    if arguments.out:
        arguments.out.write_text(report)


if __name__ == "__main__":
    main()
