#!/usr/bin/env python3
"""Where the identity checks of a create cost least and hold best: in the operator's webhooks, or in
the API server's own admission policies (CEL, deploy/authorization/identity-policy.yaml).

One run, one API server, one operator process; four namespaces, one per way of checking, and every
round sends one create to each, in a shuffled order, so all four see the same load over time:

    webhook       the operator's webhooks only (how it was before the policies)
    cel+webhook   the policies and the webhooks (what the chart and the local stack ship)
    cel-only      the policies only (the webhooks skip this namespace: namespaceSelector)
    none          neither (the API server's own cost of a create: the floor)

Latency: server-side dry-run creates by alice for herself (owner given, so that a create with no
check at all is valid too; every admission step runs, nothing is stored, so 4 x COUNT creates leave
nothing to reconcile), spoofed dry-run creates by bob for alice
(refusals), and real creates (stored, then reconciled by the operator). Client side, the Python
client over one kept-alive connection per identity.

Failure behaviour, with no operator: stopped (SIGTERM: kopf takes the webhooks it registered out of
its configuration, as the local stack runs it), killed (SIGKILL: the webhooks stay registered with
failurePolicy Fail, as the chart registers them), then killed with the webhooks' failurePolicy set to
Ignore (what one might choose for availability): how many
honest and spoofed creates are admitted per namespace.

    CLUSTER_STATE_DIR=/tmp/cel-cluster PORT_OFFSET=400 hack/cluster.sh up
    export CLUSTER_STATE_DIR=/tmp/cel-cluster KUBECONFIG=/tmp/cel-cluster/kubeconfig
    .venv/bin/python bench/admission_cel.py --count 1000 --real 200 --failures 50

The report goes to bench/logs/admission-cel-<run>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import kubernetes
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.integration.conftest import GROUP, VERSION, OperatorProcess, kubectl  # noqa: E402

PLURAL = "analysisenvironments"
MODES = ("webhook", "cel+webhook", "cel-only", "none")
MODE_LABEL = "bench.analysis.panosc.eu/identity"
POLICIES = ("analysis-environment-owner", "analysis-environment-creation")  # the ones a create meets
WEBHOOK_CONFIGURATION = "analysis.panosc.eu"  # kopf's, as the local stack registers it


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values) * 1000,
        "p90": percentile(values, 0.90) * 1000,
        "p99": percentile(values, 0.99) * 1000,
        "max": max(values) * 1000,
    }


def namespace_for(run_id: str, mode: str) -> str:
    return f"cel-{run_id}-{mode.replace('+', '-')}"


def environment(name: str, owner: str | None = None) -> dict:
    spec = {"flavor": "jupyter-basic", "suspend": True}
    if owner is not None:
        spec["owner"] = owner
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AnalysisEnvironment", "metadata": {"name": name}, "spec": spec}


def client_as(kubeconfig: str, user: str) -> kubernetes.client.CustomObjectsApi:
    api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    api.default_headers["Impersonate-User"] = user
    api.default_headers["Impersonate-Group"] = "facility-users"
    return kubernetes.client.CustomObjectsApi(api)


def attempt(call: Callable[[], object]) -> tuple[float, int, str]:
    """(seconds, HTTP status, message) of one create."""
    started = time.perf_counter()
    try:
        call()
        status, message = 201, ""
    except kubernetes.client.ApiException as error:
        status = error.status
        try:
            message = json.loads(error.body)["message"]
        except (TypeError, ValueError, KeyError):
            message = str(error.body)
    return time.perf_counter() - started, status, message


def apply_text(text: str, directory: pathlib.Path) -> None:
    path = directory / f"applied-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(text)
    try:
        kubectl("apply", "-f", str(path))
    finally:
        path.unlink()


def bench_bindings() -> str:
    """The identity policies bound only where the mode says (instead of identity-local.yaml's)."""
    selector = {"matchExpressions": [{"key": MODE_LABEL, "operator": "In", "values": ["cel-webhook", "cel-only"]}]}
    parameters = {"name": "analysis-environment-authorization"}  # deploy/authorization/local.yaml (cluster-scoped)
    documents = []
    for policy in POLICIES:
        kind = "MutatingAdmissionPolicyBinding" if policy.endswith("owner") else "ValidatingAdmissionPolicyBinding"
        spec: dict = {
            "policyName": policy,
            "paramRef": {**parameters, "parameterNotFoundAction": "Deny"},
            "matchResources": {"namespaceSelector": selector},
        }
        if kind.startswith("Validating"):
            spec["validationActions"] = ["Deny"]
        documents.append(
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind, "metadata": {"name": policy}, "spec": spec}
        )
    return yaml.safe_dump_all(documents)


def webhooks_skip(modes: list[str]) -> None:
    """The operator's webhooks skip namespaces of these modes (kopf registers them without a selector)."""
    selector = {"matchExpressions": [{"key": MODE_LABEL, "operator": "NotIn", "values": modes}]}
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        count = len(json.loads(kubectl("get", kind, WEBHOOK_CONFIGURATION, "-o", "json").stdout)["webhooks"])
        patch = [{"op": "add", "path": f"/webhooks/{i}/namespaceSelector", "value": selector} for i in range(count)]
        kubectl("patch", kind, WEBHOOK_CONFIGURATION, "--type=json", "-p", json.dumps(patch))


def webhook_failure_policy(policy: str) -> None:
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        count = len(json.loads(kubectl("get", kind, WEBHOOK_CONFIGURATION, "-o", "json").stdout)["webhooks"])
        patch = [{"op": "replace", "path": f"/webhooks/{i}/failurePolicy", "value": policy} for i in range(count)]
        kubectl("patch", kind, WEBHOOK_CONFIGURATION, "--type=json", "-p", json.dumps(patch))


def selectors_held() -> bool:
    """kopf re-applies its configuration when it sees cause to: were the selectors kept all along?"""
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        hooks = json.loads(kubectl("get", kind, WEBHOOK_CONFIGURATION, "-o", "json").stdout)["webhooks"]
        if not all((hook.get("namespaceSelector") or {}).get("matchExpressions") for hook in hooks):
            return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what() if callable(what) else what)
        time.sleep(0.2)


def latency_rounds(
    clients: dict[str, kubernetes.client.CustomObjectsApi],
    namespaces: dict[str, str],
    count: int,
    kind: str,
    run_id: str,
) -> tuple[dict[str, list[float]], dict[str, dict[int, int]]]:
    """`count` rounds, one create per mode each, shuffled. kind: dry-run, spoofed, real."""
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    statuses: dict[str, dict[int, int]] = {mode: {} for mode in MODES}
    for index in range(count):
        order = list(MODES)
        random.shuffle(order)
        for mode in order:
            name = f"{kind[:4]}-{index}"
            if kind == "spoofed":
                body, api, dry_run = environment(name, owner="alice"), clients["bob"], "All"
            else:
                body, api = environment(name, owner="alice"), clients["alice"]
                dry_run = "All" if kind == "dry-run" else None
            spent, status, _ = attempt(
                lambda: api.create_namespaced_custom_object(
                    GROUP, VERSION, namespaces[mode], PLURAL, body, dry_run=dry_run
                )
            )
            seconds[mode].append(spent)
            statuses[mode][status] = statuses[mode].get(status, 0) + 1
    return seconds, statuses


def failure_round(
    clients: dict[str, kubernetes.client.CustomObjectsApi], namespaces: dict[str, str], count: int
) -> dict[str, dict[str, dict]]:
    """With the operator stopped: per mode, honest and spoofed dry-run creates, what came back."""
    found: dict[str, dict[str, dict]] = {}
    for mode in MODES:
        found[mode] = {}
        for kind, user, owner in (("no owner", "alice", None), ("own", "alice", "alice"), ("spoofed", "bob", "alice")):
            outcomes: dict[int, int] = {}
            seconds: list[float] = []
            messages: dict[int, str] = {}
            for index in range(count):
                body = environment(f"down-{index}", owner=owner)
                api = clients[user]
                spent, status, message = attempt(
                    lambda: api.create_namespaced_custom_object(
                        GROUP, VERSION, namespaces[mode], PLURAL, body, dry_run="All"
                    )
                )
                seconds.append(spent)
                outcomes[status] = outcomes.get(status, 0) + 1
                messages.setdefault(status, message[:220])
            found[mode][kind] = {
                "outcomes": outcomes,
                "median_ms": statistics.median(seconds) * 1000,
                "messages": messages,
            }
    return found


def load_average() -> list[str]:
    return pathlib.Path("/proc/loadavg").read_text().split()[:3]


def machine() -> str:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    version = kubectl("version", "-o", "json").stdout
    server = json.loads(version).get("serverVersion", {}).get("gitVersion", "?")
    load = load_average()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, kube-apiserver {server}, "
        f"load average at start {' '.join(load)}"
    )


def table(results: dict[str, list[float]], statuses: dict[str, dict[int, int]]) -> list[str]:
    lines = [
        "| mode | n | median ms | p90 ms | p99 ms | max ms | answers |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        row = summary(results[mode])
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses[mode].items()))
        lines.append(
            f"| {mode} | {row['n']} | {row['median']:.2f} | {row['p90']:.2f} | {row['p99']:.2f} | {row['max']:.2f} | {answers} |"
        )
    return lines


def run(count: int, real: int, failures: int) -> pathlib.Path:
    kubeconfig = os.environ["KUBECONFIG"]
    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    kubectl("apply", "-f", str(REPO / "deploy/authorization"))
    for flavors in ("examples/flavors.yaml", "tests/integration/flavors.yaml", "tests/integration/rbac.yaml"):
        kubectl("apply", "-f", str(REPO / flavors))
    # The identity policies bound per mode, not cluster-wide.
    for policy in POLICIES:
        kind = "mutatingadmissionpolicybinding" if policy.endswith("owner") else "validatingadmissionpolicybinding"
        kubectl("delete", kind, policy, "--ignore-not-found")
    apply_text(bench_bindings(), REPO / "bench/logs")

    api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    core = kubernetes.client.CoreV1Api(api)
    run_id = uuid.uuid4().hex[:6]
    namespaces = {mode: namespace_for(run_id, mode) for mode in MODES}
    for mode, namespace in namespaces.items():
        core.create_namespace({"metadata": {"name": namespace, "labels": {MODE_LABEL: mode.replace("+", "-")}}})
    log_dir = REPO / "bench/logs"
    log_dir.mkdir(exist_ok=True)
    operator = OperatorProcess(kubeconfig, log_dir / f"admission-cel-{run_id}-operator.log")
    operator.start()
    report: list[str] = []
    try:
        webhooks_skip(["cel-only", "none"])
        clients = {user: client_as(kubeconfig, user) for user in ("alice", "bob")}

        # The bindings and selectors are read through informers: wait until each mode acts as it should.
        def modes_act() -> bool:
            for mode, namespace in namespaces.items():
                _, status, message = attempt(
                    lambda: clients["bob"].create_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, environment("probe", owner="alice"), dry_run="All"
                    )
                )
                by_policy = "ValidatingAdmissionPolicy" in message
                by_webhook = "environment-owner.analysis.panosc.eu" in message
                wanted = {
                    "webhook": (False, True),
                    "cel+webhook": (False, True),
                    "cel-only": (True, False),
                    "none": (False, False),
                }
                if (by_policy, by_webhook) != wanted[mode] or (mode == "none") != (status == 201):
                    return False
            return True

        wait_until(modes_act, 60, "each mode to act as configured")
        for _ in range(20):  # warm-up: connections, informers, the operator's first answers
            latency_rounds(clients, namespaces, 1, "dry-run", run_id)
        load_before = load_average()
        t0 = time.monotonic()
        dry, dry_status = latency_rounds(clients, namespaces, count, "dry-run", run_id)
        spoofed, spoofed_status = latency_rounds(clients, namespaces, max(1, count // 5), "spoofed", run_id)
        stored, stored_status = latency_rounds(clients, namespaces, real, "real", run_id)
        elapsed = time.monotonic() - t0
        held = selectors_held()
        report += [
            f"# Identity checks at admission: webhook vs CEL policies (run {run_id})",
            "",
            f"Started {started_at}. Machine: {machine()}.",
            f"Latency phase {elapsed:.1f} s; the webhooks' namespace selectors held throughout: {held}.",
            "",
            f"## Dry-run creates by alice for herself ({count} per mode, same run, shuffled rounds)",
            "",
            *table(dry, dry_status),
            "",
            f"## Spoofed dry-run creates: bob for alice ({max(1, count // 5)} per mode)",
            "",
            *table(spoofed, spoofed_status),
            "",
            f"## Real creates (stored, suspended; {real} per mode)",
            "",
            *table(stored, stored_status),
            "",
        ]
        # Clean the stored ones while the operator runs (its finalizers).
        for namespace in namespaces.values():
            kubectl("delete", PLURAL, "--all", "-n", namespace, "--wait=false")
        wait_until(
            lambda: all(
                not kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)[
                    "items"
                ]
                for ns in namespaces.values()
            ),
            180,
            "the stored environments deleted",
        )
        # Stopped gracefully (SIGTERM), kopf takes its webhooks out of the configuration it manages (the
        # local stack's; the chart's, registered by Helm, stay): creates are then not sent to it at all.
        operator.stop()
        down = {"none registered (SIGTERM)": failure_round(clients, namespaces, failures)}
        # Killed, as a crash or a lost node would: the webhooks stay registered, nothing answers.
        operator.start()
        webhooks_skip(["cel-only", "none"])
        wait_until(modes_act, 60, "each mode to act as configured again")
        operator.stop(signal.SIGKILL)
        down["Fail"] = failure_round(clients, namespaces, failures)
        webhook_failure_policy("Ignore")
        honest = environment("probe", owner="alice")
        last: list[tuple[float, int, str]] = []

        def ignored() -> bool:
            last[:] = [
                attempt(
                    lambda: clients["alice"].create_namespaced_custom_object(
                        GROUP, VERSION, namespaces["webhook"], PLURAL, honest, dry_run="All"
                    )
                )
            ]
            return last[0][1] == 201

        wait_until(ignored, 30, lambda: f"failurePolicy Ignore to act: {last}")
        down["Ignore"] = failure_round(clients, namespaces, failures)
        report += [
            f"## No operator ({failures} dry-run creates of each kind per mode)",
            "",
            "| webhooks | mode | no owner given | own (owner alice) | spoofed (bob for alice) | median ms | a refusal |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for policy, by_mode in down.items():
            for mode in MODES:
                kinds = by_mode[mode]
                refusal = next(
                    (m for kind in ("spoofed", "no owner") for s, m in kinds[kind]["messages"].items() if s != 201), ""
                )
                answers = " | ".join(
                    ", ".join(f"{status}: {n}" for status, n in sorted(kinds[kind]["outcomes"].items()))
                    for kind in ("no owner", "own", "spoofed")
                )
                report.append(
                    f"| {policy} | {mode} | {answers} | {kinds['own']['median_ms']:.2f} | "
                    f"{refusal[:170].replace('|', '/')} |"
                )
        report.append("")
        report.append(
            f"Load average at the end of the latency phase: {' '.join(load_before)} (before) -> "
            f"{' '.join(load_average())} (now)."
        )
    finally:
        operator.stop()
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            kubectl("delete", kind, WEBHOOK_CONFIGURATION, "--ignore-not-found")
        for namespace in namespaces.values():
            kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        for policy in POLICIES:
            kind = "mutatingadmissionpolicybinding" if policy.endswith("owner") else "validatingadmissionpolicybinding"
            kubectl("delete", kind, policy, "--ignore-not-found")
        kubectl("apply", "-f", str(REPO / "deploy/authorization/identity-local.yaml"))
    path = log_dir / f"admission-cel-{run_id}.md"
    path.write_text("\n".join(report) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="dry-run creates per mode")
    parser.add_argument("--real", type=int, default=200, help="stored creates per mode")
    parser.add_argument("--failures", type=int, default=50, help="creates per mode and kind with the operator down")
    arguments = parser.parse_args()
    path = run(arguments.count, arguments.real, arguments.failures)
    print(path.read_text())
    print(f"report: {path}")


if __name__ == "__main__":
    main()
