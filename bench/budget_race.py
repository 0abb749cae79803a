#!/usr/bin/env python3
"""Racing creates against a ComputeBudget: N slots, COUNT simultaneous creates, exactly N may run.

Runs the operator as its own process (budgets required) against the local stack, creates COUNT
environments at once from THREADS client threads for one owner whose budget allows N at once, and
records for every create when it was decided: refused by the admission webhook (the POST's answer),
or, once admitted, when the operator moved it to Provisioning/Ready (a slot) or Rejected (none),
seen on a watch. Mode `reconcile` turns the budget webhook off, so every create reaches the
operator's reconcile check (the webhook down or bypassed).

The race meets the operator as a long-running one would be: after a warm-up burst (2 x N creates
for another owner with a budget of its own, all settled before the race), so its code paths and the
API server's connections to its webhooks have been used; and each client thread has its connection
to the API server open, as a portal's backend keeps its own. With --cold (as recorded before stop
41) the operator is started a second before the race and each thread connects with its first
create: that cost lands on the first creates, the admitted ones (bench/RESULTS.md, stop 41).
Each race deletes what it made while its operator still runs and waits until it is gone (before
stop 42 the operator was stopped first, and what its finalizers held was left for the next one).

With --webhook go the same race is decided by bench/gowebhook instead (built by
hack/build-go-bench.sh): a Go server registered for the same two webhook calls, which refuses and
admits from a counter in memory and does nothing else, while the operator runs with no webhooks of
its own and reconciles what it admits. It is the limit the operator's admission is measured against:
what this API server and machine take for the race when the webhook costs next to nothing.

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/budget_race.py --count 1000 --slots 50 --mode admission
    .venv/bin/python bench/budget_race.py --count 1000 --slots 50 --mode reconcile
    .venv/bin/python bench/budget_race.py --count 1000 --slots 50 --webhook go
"""

from __future__ import annotations

import argparse
import atexit
import base64
import concurrent.futures
import contextlib
import itertools
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import kubernetes
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.integration.conftest import (  # noqa: E402
    CLUSTER_STATE,
    GROUP,
    VERSION,
    OperatorProcess,
    _free_port,
    kubectl,
)

sys.path.insert(0, str(REPO / "operator"))
from analysis_operator.infra.certificates import ensure_certificates  # noqa: E402

PLURAL = "analysisenvironments"
MATCH_CONDITIONS = REPO / "operator" / "analysis_operator" / "match_conditions.yaml"
DECIDED = {"Provisioning", "Ready", "Rejected"}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def watch_decisions(custom, namespace: str, decided: dict[str, tuple[float, str]], stop: threading.Event) -> None:
    while not stop.is_set():
        stream = kubernetes.watch.Watch()
        for event in stream.stream(
            custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, timeout_seconds=5
        ):
            body = event["object"]
            phase = (body.get("status") or {}).get("phase")
            name = body["metadata"]["name"]
            if phase in DECIDED and name not in decided:
                decided[name] = (time.monotonic(), phase)
            if stop.is_set():
                stream.stop()


def webhook_clients(port: int) -> set[str]:
    """The client ends of the API server's open connections to the operator's webhook port."""
    out = subprocess.run(
        ["ss", "-Htan", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True
    ).stdout
    return {line.split()[2] for line in out.splitlines()}


def sample_webhook_clients(port: int, stop: threading.Event, seen: set[str]) -> None:
    """webhook_clients every 0.1 s until `stop`, into `seen`. Counted by sampling, since on loopback
    Linux reuses the closed ones' TIME_WAIT at once (tcp_tw_reuse), so a count at the end misses most
    of those the race opened."""
    while not stop.wait(0.1):
        seen.update(webhook_clients(port))


# What a full accept queue moves: the connections it dropped, and the SYNs sent again (1 s, then 3 s later).
TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")


def tcp_counters() -> dict[str, int]:
    """The machine's TCP counters (/proc/net/netstat, TcpExt) that a full accept queue moves."""
    lines = [line.split() for line in pathlib.Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in itertools.pairwise(lines):
        if names[0] == values[0] == "TcpExt:":
            counters = dict(zip(names[1:], map(int, values[1:]), strict=True))
            return {name: counters[name] for name in TCP_COUNTERS}
    return {}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (utime + stime) used so far by every process on the machine, by command name
    (the operator is `python`, as is this client: see the report's split)."""
    used: dict[str, float] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, rest = stat.read_text().rpartition(")")
        except OSError:
            continue  # ended meanwhile
        fields = rest.split()
        pid, name = stat.parent.name, head.partition("(")[2]
        used[f"{name}:{pid}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def cpu_split(before: dict[str, float], after: dict[str, float], operator_pid: int) -> dict[str, float]:
    """CPU seconds per command used between two cpu_seconds() snapshots, the operator and this
    client (both python) named apart; processes that ended meanwhile are not counted."""
    split: dict[str, float] = {}
    for key, value in after.items():
        name, _, pid = key.rpartition(":")
        if int(pid) == operator_pid:
            name = "operator"
        elif int(pid) == os.getpid():
            name = "this client"
        used = value - before.get(key, 0.0)
        if used > 0:
            split[name] = split.get(name, 0.0) + used
    return dict(sorted(split.items(), key=lambda item: -item[1]))


def slow_answers(text: str, metric: str, name_label: str, over: str) -> dict[str, int]:
    """Requests answered in more than `over` seconds, per webhook, from a Prometheus histogram's text."""
    totals: dict[str, float] = {}
    within: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(f"{metric}_bucket{{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        hook, value = labels.get(name_label, "").split(".")[0], float(line.rsplit(" ", 1)[1])
        if labels.get("le") == "+Inf":
            totals[hook] = totals.get(hook, 0) + value
        elif labels.get("le") == over:
            within[hook] = within.get(hook, 0) + value
    return {hook: int(total - within.get(hook, 0)) for hook, total in totals.items()}


def webhook_tail(api, operator: OperatorProcess) -> dict[str, dict[str, int]]:
    """Webhook calls over 0.5 s as the API server timed them (the call) and as the operator did (its
    handler, from the request's arrival in kopf's server): the difference waited outside the handler."""
    server = api.rest_client.pool_manager.request("GET", f"{api.configuration.host}/metrics").data.decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as response:
        own = response.read().decode()
    return {
        "API server": slow_answers(server, "apiserver_admission_webhook_admission_duration_seconds", "name", "0.5"),
        "operator": slow_answers(own, "analysis_webhook_duration_seconds", "webhook", "0.5"),
    }


GO_WEBHOOK = "race-gowebhook"  # its Mutating/ValidatingWebhookConfiguration


def go_webhook_configurations(port: int, ca_bundle: bytes) -> tuple[dict, dict]:
    """The operator's two webhooks for environments (as kopf registers them: same rules, match
    condition, failure policy and side effects), pointed at bench/gowebhook on `port`."""

    def hook(path: str, operations: list[str]) -> dict:
        return {
            "name": f"{path}.{GROUP}",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "url": f"https://127.0.0.1:{port}/{path}",
                "caBundle": base64.b64encode(ca_bundle).decode(),
            },
            "failurePolicy": "Fail",
            "sideEffects": "NoneOnDryRun",
            "timeoutSeconds": 30,
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "apiVersions": [VERSION],
                    "operations": operations,
                    "resources": [PLURAL],
                    "scope": "*",
                }
            ],
        }

    conditions = yaml.safe_load(MATCH_CONDITIONS.read_text())  # as the operator registers them
    mutating = {**hook("environment-owner", ["CREATE"]), "reinvocationPolicy": "Never"}
    validating = hook("environment-admission", ["UPDATE", "CREATE"])
    for webhook, name in ((mutating, "environment-owner"), (validating, "environment-admission")):
        if conditions.get(name):
            webhook["matchConditions"] = conditions[name]
    return (
        {"metadata": {"name": GO_WEBHOOK}, "webhooks": [mutating]},
        {"metadata": {"name": GO_WEBHOOK}, "webhooks": [validating]},
    )


def remove_go_webhook(admission) -> None:
    for delete in (admission.delete_mutating_webhook_configuration, admission.delete_validating_webhook_configuration):
        with contextlib.suppress(kubernetes.client.ApiException):
            delete(GO_WEBHOOK)


@contextlib.contextmanager
def go_webhook(api, slots: int, log_dir: pathlib.Path):
    """bench/gowebhook running and registered for the environments' creates; its port. Removed after."""
    binary = subprocess.run(
        [str(REPO / "hack" / "build-go-bench.sh"), "gowebhook"], check=True, capture_output=True, text=True
    ).stdout.strip()
    ca, cert, key = ensure_certificates(str(log_dir / "gowebhook-tls"), ("127.0.0.1",))
    port = _free_port()
    process = subprocess.Popen(
        [binary, "-listen", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key), "-slots", str(slots)]
        + ["-client-ca", str(CLUSTER_STATE / "pki" / "webhook-client-ca.crt")],
        stdout=subprocess.PIPE,
        text=True,
    )
    admission = kubernetes.client.AdmissionregistrationV1Api(api)
    try:
        if process.stdout.readline().strip() != "listening":
            raise RuntimeError("bench/gowebhook did not start")
        mutating, validating = go_webhook_configurations(port, ca.read_bytes())
        remove_go_webhook(admission)  # a killed run's, which would refuse every create (failurePolicy Fail)
        admission.create_mutating_webhook_configuration(mutating)
        admission.create_validating_webhook_configuration(validating)
        yield port
    finally:
        remove_go_webhook(admission)
        process.terminate()
        process.wait(timeout=10)


def environment(name: str, owner: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"owner": owner, "flavor": "test-short"},
    }


def make_budget(custom, name: str, owner: str, slots: int) -> None:
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "computebudgets",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ComputeBudget",
            "metadata": {"name": name},
            "spec": {"user": owner, "limits": {"maxEnvironments": slots, "cpuHours": 1e6}},
        },
    )


def warm_up(custom, namespace: str, owner: str, slots: int) -> None:
    """2 x slots creates for another owner, with a budget of its own of `slots`: half admitted, half
    refused; back once every admitted one is Ready (its reconcile done, so none overlaps the race)."""
    make_budget(custom, namespace, owner, slots)
    time.sleep(1)  # the budget in the operator's index

    def create(index: int) -> bool:
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, environment(f"w-{index}", owner))
            return True
        except kubernetes.client.ApiException:
            return False

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        admitted = sum(pool.map(create, range(2 * slots)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        if sum((item.get("status") or {}).get("phase") == "Ready" for item in items) == admitted:
            return
        time.sleep(0.5)
    raise RuntimeError("the warm-up's environments did not all get Ready")


def clean_up(core, custom, names: tuple[str, ...]) -> float:
    """Delete the race's namespaces and budgets (each budget is named as its namespace) while the
    operator still runs, and wait until they are gone: it removes the finalizers, so the next
    race's operator does not start with a thousand deletions to finish. The seconds it took."""
    began = time.monotonic()
    for name in names:
        core.delete_namespace(name, propagation_policy="Background")
        custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", name)
    deadline = began + 300
    while time.monotonic() < deadline:
        namespaces = {item.metadata.name for item in core.list_namespace().items}
        budgets = {
            item["metadata"]["name"]
            for item in custom.list_cluster_custom_object(GROUP, VERSION, "computebudgets")["items"]
        }
        if not (namespaces | budgets) & set(names):
            break
        time.sleep(1)
    else:
        print(f"warning: {names} still there after {deadline - began:.0f} s", file=sys.stderr)
    return time.monotonic() - began


def run(count: int, slots: int, threads: int, mode: str, cold: bool = False, webhook: str = "operator") -> dict:
    kubeconfig = os.environ["KUBECONFIG"]
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kubectl("apply", "-f", str(REPO / "tests/integration/flavors.yaml"))
    # The API server's policies as deployed (the identity policies on every create: since stop 57 the
    # mutating one stamps the labels, and the environment-owner webhook is then not called)
    kubectl("apply", "-f", str(REPO / "deploy/authorization"))
    api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    run_id = uuid.uuid4().hex[:6]
    namespace, owner, budget = f"race-{run_id}", f"racer-{run_id}", f"race-{run_id}"
    warm = f"warm-{run_id}"  # the warm-up's namespace and budget
    for name in (namespace,) if cold else (namespace, warm):
        core.create_namespace({"metadata": {"name": name}})
    make_budget(custom, budget, owner, slots)
    log_dir = REPO / "bench/logs"
    log_dir.mkdir(exist_ok=True)
    operator = OperatorProcess(
        kubeconfig,
        log_dir / f"budget-race-{run_id}.log",
        ANALYSIS_OPERATOR_BUDGETS_REQUIRE_BUDGET="true",
        ANALYSIS_OPERATOR_BUDGETS_CHECK_AT_ADMISSION=str(mode == "admission").lower(),
        # --webhook go: the operator registers no webhooks (bench/gowebhook answers them)
        **({"ANALYSIS_OPERATOR_ADMISSION_HOST": ""} if webhook == "go" else {}),
    )
    operator.start()
    cleanup = contextlib.ExitStack()
    # also when the race fails: bench/gowebhook registered with failurePolicy Fail and not running
    # would refuse every environment's create
    atexit.register(cleanup.close)
    webhook_port = operator.webhook_port
    if webhook == "go":
        webhook_port = cleanup.enter_context(go_webhook(api, slots, log_dir))
    if not cold:  # as a long-running operator is: its code paths and the API server's connections to it used
        warm_up(custom, warm, f"warmer-{run_id}", slots)
    decided: dict[str, tuple[float, str]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_decisions, args=(custom, namespace, decided, stop), daemon=True)
    watcher.start()
    time.sleep(1)  # the watch is open before the first create
    posted: dict[str, tuple[float, float, int]] = {}
    clients = [
        kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=kubeconfig))
        for _ in range(threads)
    ]
    barrier = threading.Barrier(threads)

    def create(worker: int) -> None:
        if not cold:  # its connection open, as a portal's would be: the race times decisions, not handshakes
            clients[worker].list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, limit=1)
        barrier.wait()
        for index in range(worker, count, threads):
            name = f"r-{index}"
            started = time.monotonic()
            try:
                clients[worker].create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, environment(name, owner)
                )
                code = 201
            except kubernetes.client.ApiException as error:
                code = error.status
            posted[name] = (started, time.monotonic(), code)

    tail_before = webhook_tail(api, operator)
    connections_before = webhook_clients(webhook_port)
    sampled, sampling = set(connections_before), threading.Event()
    sampler = threading.Thread(target=sample_webhook_clients, args=(webhook_port, sampling, sampled), daemon=True)
    sampler.start()
    cpu_before, tcp_before = cpu_seconds(), tcp_counters()
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, range(threads)))
    cpu = cpu_split(cpu_before, cpu_seconds(), operator.process.pid)
    tcp = {name: count - tcp_before[name] for name, count in tcp_counters().items()}
    sampling.set()
    sampler.join()
    sampled |= webhook_clients(webhook_port)
    webhook_opened = len(sampled - connections_before)
    tail_after = webhook_tail(api, operator)
    slow = {
        where: {hook: count - tail_before[where].get(hook, 0) for hook, count in counts.items()}
        for where, counts in tail_after.items()
    }
    created = [name for name, (_, _, code) in posted.items() if code == 201]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(name in decided for name in created):
        time.sleep(0.2)
    stop.set()
    latencies, by_outcome, outcomes = (
        [],
        {"refused": [], "admitted": []},
        {"refused at admission": 0, "running": 0, "rejected by reconcile": 0, "undecided": 0},
    )
    # The admission decision is the POST's answer (403, or 201 with a slot held); the final one for
    # an admitted create is the operator taking the slot in the ledger (Provisioning) or refusing it.
    answers = [answered - started for started, answered, code in posted.values() if code in (201, 403)]
    by_outcome["admitted (POST answered)"] = [
        answered - started for started, answered, code in posted.values() if code == 201
    ]
    for name, (started, answered, code) in posted.items():
        if code == 403:
            outcomes["refused at admission"] += 1
            latencies.append(answered - started)
            by_outcome["refused"].append(answered - started)
        elif name in decided:
            moment, phase = decided[name]
            outcomes["rejected by reconcile" if phase == "Rejected" else "running"] += 1
            latencies.append(moment - started)
            by_outcome["admitted"].append(moment - started)
        else:
            outcomes["undecided" if code == 201 else f"error {code}"] = outcomes.get(f"error {code}", 0) + 1
    # When the slow answers came: refusals by the second of the race their POST was sent in.
    timeline: dict[int, list[float]] = {}
    for started, answered, code in posted.values():
        if code == 403:
            timeline.setdefault(int(started - began), []).append(answered - started)
    # The longest time in which no create was answered: a stall (what made G6's p99, bench/RESULTS.md stop 31).
    ends = sorted(answered for _, answered, _ in posted.values())
    stall = max((later - earlier for earlier, later in itertools.pairwise(ends)), default=0.0)
    status = custom.get_cluster_custom_object(GROUP, VERSION, "computebudgets", budget).get("status") or {}
    wall = time.monotonic() - began  # to the last decision seen (or the 120 s deadline), not the cleanup
    cleanup_seconds = clean_up(core, custom, (namespace,) if cold else (namespace, warm))
    cleanup.close()
    operator.stop()
    return {
        "mode": mode if webhook == "operator" else f"{mode}, bench/gowebhook",
        "count": count,
        "slots": slots,
        "threads": threads,
        "cold": cold,
        "outcomes": outcomes,
        "ledger": status.get("running", {}).get("environments"),
        "wall": wall,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "answers": (statistics.median(answers), percentile(answers, 0.99), max(answers)),
        "stall": stall,
        "webhook_opened": webhook_opened,
        "slow": slow,
        "cpu": cpu,
        "tcp": tcp,
        "cleanup": cleanup_seconds,
        "log": operator.log_path.name,
        "timeline": {
            second: (len(values), statistics.median(values), max(values)) for second, values in sorted(timeline.items())
        },
        "split": {
            key: (statistics.median(values), percentile(values, 0.99)) for key, values in by_outcome.items() if values
        },
    }


def report(result: dict) -> str:
    ok = result["outcomes"]["running"] == result["slots"] == result["ledger"]
    return (
        f"| {result['mode']} | {result['count']} creates from {result['threads']} threads "
        f"({'cold: a fresh operator' if result['cold'] else 'after a warm-up'}), {result['slots']} slots "
        f"| {result['outcomes']} | ledger holds {result['ledger']} | **{'exactly N' if ok else 'NOT N'}** "
        f"| p50 {1000 * result['p50']:.0f} ms, p99 {1000 * result['p99']:.0f} ms, max {1000 * result['max']:.0f} ms "
        f"| p50 {1000 * result['answers'][0]:.0f} ms, p99 {1000 * result['answers'][1]:.0f} ms, "
        f"max {1000 * result['answers'][2]:.0f} ms "
        f"| {result['wall']:.1f} s | longest stall {1000 * result['stall']:.0f} ms "
        f"| webhook connections opened {result['webhook_opened']} |\n"
        + "".join(
            f"  {key}: p50 {1000 * p50:.0f} ms p99 {1000 * p99:.0f} ms\n" for key, (p50, p99) in result["split"].items()
        )
        + f"  webhook calls over 0.5 s: {result['slow']}\n"
        + f"  TCP during the creates, the whole machine: {result['tcp']}\n"
        + f"  cleaned up (namespaces and budgets gone, the operator still running) in {result['cleanup']:.1f} s\n"
        + "  CPU during the creates (s): "
        + ", ".join(f"{name} {used:.2f}" for name, used in result["cpu"].items() if used >= 0.05)
        + "\n"
        + "  refusals by the second their POST was sent in (count, p50, max): "
        + ", ".join(
            f"{second}s {count} {1000 * p50:.0f}/{1000 * top:.0f} ms"
            for second, (count, p50, top) in result["timeline"].items()
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=50)
    parser.add_argument("--threads", type=int, default=50)
    parser.add_argument("--mode", choices=["admission", "reconcile"], default="admission")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="no warm-up, and each client thread connects with its first create (as recorded before stop 41)",
    )
    parser.add_argument(
        "--webhook",
        choices=["operator", "go"],
        default="operator",
        help="go: the race decided by bench/gowebhook (the limit), the operator registering no webhooks",
    )
    arguments = parser.parse_args()
    if arguments.webhook == "go" and arguments.mode != "admission":
        parser.error("--webhook go decides at admission: --mode admission only")
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}")
    print(
        report(
            run(arguments.count, arguments.slots, arguments.threads, arguments.mode, arguments.cold, arguments.webhook)
        )
    )


if __name__ == "__main__":
    main()
