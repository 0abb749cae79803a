#!/usr/bin/env python3
"""What the create's admission costs, the mutating webhook called or skipped (stop 36's matchConditions).

Server-side dry-run creates of AnalysisEnvironments (the portal's shape: owner given, no datasets, created by
an admin, a trusted identity) go through all of admission, the CEL policies and the operator's webhooks, and
persist nothing: no watch event, no reconcile, no pod. CPU of kube-apiserver and of the operator (their /proc
entries) over COUNT creates from THREADS threads, per create, in two configurations alternated over ROUNDS:

    skipped   the identity policy of SKIPPED (d5c1ad1: the selection labels stamped by the mutating policy in a
              third mutation; c282a54: all in one) and its matchConditions on the environment-owner webhook
              (filled with the operator's default settings): the webhook is not called
    called    the identity policy of BASE (owner and created-by only) and no matchConditions on the
              environment-owner webhook: it is called on every create (as on main: the variant was measured
              and not kept, bench/RESULTS.md stop 36)

Stop 57 measured the change kept: `--base a57ea74 --skipped 86d9a9f` (the selection labels stamped by the mutating
policy where CEL can, the webhook's matchConditions from operator/analysis_operator/match_conditions.yaml, which has
no placeholders). Stop 36 found the operator's CPU the same either way (1.66 core-ms a create), without counting the calls;
--metrics counts them now.

Needs the side stack with deploy/authorization applied and an operator running with kopf registering its
webhooks (ANALYSIS_OPERATOR_ADMISSION_HOST set), pids given:

    .venv/bin/python bench/admission_ab.py --apiserver PID --operator PID --namespace NS
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import subprocess
import time
import urllib.request

import kubernetes
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "analysis.panosc.eu", "v1alpha1", "analysisenvironments"
TICK = os.sysconf("SC_CLK_TCK")
POLICY = "deploy/authorization/identity-policy.yaml"
# The operator's default admission settings (settings.py), what the benchmark's operator runs with.
DEFAULTS = {"$trustedUsers": [], "$trustedGroups": ["analysis-portal", "system:masters"], "$usernamePrefix": ""}


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def kubectl(*arguments: str, stdin: str | None = None) -> str:
    return subprocess.run(["kubectl", *arguments], input=stdin, capture_output=True, text=True, check=True).stdout


def at(ref: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "show", f"{ref}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def configure(mode: str, base: str, skipped: str) -> None:
    kubectl("apply", "-f", "-", stdin=at(skipped if mode == "skipped" else base, POLICY))
    conditions: list = []
    if mode == "skipped":
        text = at(skipped, "operator/analysis_operator/match_conditions.yaml")
        for placeholder, value in DEFAULTS.items():
            text = text.replace(placeholder, json.dumps(value, separators=(",", ":")))
        conditions = yaml.safe_load(text)["environment-owner"]
    hooks = json.loads(kubectl("get", "mutatingwebhookconfiguration", GROUP, "-o", "json"))["webhooks"]
    patch = [
        {"op": "add", "path": f"/webhooks/{index}/matchConditions", "value": conditions}
        if conditions
        else {"op": "remove", "path": f"/webhooks/{index}/matchConditions"}
        for index, hook in enumerate(hooks)
        if hook["name"].startswith("environment-owner.") and (conditions or hook.get("matchConditions"))
    ]
    if patch:
        kubectl("patch", "mutatingwebhookconfiguration", GROUP, "--type=json", "-p", json.dumps(patch))


def owner_calls(url: str | None) -> float:
    """Requests the operator's environment-owner webhook answered so far (its /metrics), or 0 without a URL."""
    if not url:
        return 0.0
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("analysis_webhook_requests_total{") and 'webhook="environment-owner"' in line
    )


def burst(custom: kubernetes.client.CustomObjectsApi, namespace: str, count: int, threads: int, tag: str) -> None:
    def create(index: int) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": f"{tag}-{index:05d}"},
            "spec": {"owner": "bench", "flavor": "jupyter-basic"},
        }
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All", _preload_content=False
        ).read()

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, range(count)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--apiserver", type=int, required=True)
    parser.add_argument("--operator", type=int, required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default="ef5fbbc")
    parser.add_argument("--skipped", default="d5c1ad1", help="the variant: d5c1ad1 (three mutations), c282a54 (one)")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--metrics", help="the operator's /metrics URL: count the environment-owner calls per burst")
    arguments = parser.parse_args()
    custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config())
    results: dict[str, list[tuple[float, float, float, float]]] = {"called": [], "skipped": []}
    for round_ in range(arguments.rounds):
        for mode in ("called", "skipped") if round_ % 2 == 0 else ("skipped", "called"):
            configure(mode, arguments.base, arguments.skipped)
            time.sleep(5)  # the policy and configuration caches follow the change
            burst(custom, arguments.namespace, 100, arguments.threads, f"warm{round_}{mode[0]}")
            time.sleep(2)
            started = time.perf_counter()
            api, operator = cpu_seconds(arguments.apiserver), cpu_seconds(arguments.operator)
            calls = owner_calls(arguments.metrics)
            burst(custom, arguments.namespace, arguments.count, arguments.threads, f"r{round_}{mode[0]}")
            elapsed = time.perf_counter() - started
            per = 1000 / arguments.count
            row = (
                (cpu_seconds(arguments.apiserver) - api) * per,
                (cpu_seconds(arguments.operator) - operator) * per,
                elapsed,
                owner_calls(arguments.metrics) - calls,
            )
            results[mode].append(row)
            print(
                f"round {round_ + 1} {mode}: kube-apiserver {row[0]:.2f}, operator {row[1]:.2f} core-ms a create, "
                f"{row[2]:.1f} s, {row[3]:.0f} environment-owner calls",
                flush=True,
            )
    # back to this checkout's policy and match conditions, as main has them
    configure("skipped", arguments.base, "HEAD")
    lines = [
        f"# Admission A/B: {arguments.count} dry-run creates from {arguments.threads} threads, {arguments.rounds} rounds",
        "",
        f"`--base {arguments.base} --skipped {arguments.skipped}`",
        "",
        "| webhook environment-owner | kube-apiserver core-ms a create | operator core-ms a create | seconds | "
        "its calls a burst | runs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, rows in results.items():
        median = [statistics.median(row[i] for row in rows) for i in range(4)]
        runs = ", ".join(f"{row[0]:.2f}+{row[1]:.2f}" for row in rows)
        counted = f"{median[3]:.0f}" if arguments.metrics else "not counted"
        lines.append(f"| {mode} | {median[0]:.2f} | {median[1]:.2f} | {median[2]:.1f} | {counted} | {runs} |")
    print("\n".join(lines))
    if arguments.out:
        arguments.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
