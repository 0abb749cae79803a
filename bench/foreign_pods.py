#!/usr/bin/env python3
"""What do pods that are not the operator's cost it? A facility's cluster runs many more pods than
environments (other services, batch jobs, other users' notebooks).

Rounds of N plain pods (no `app.kubernetes.io/managed-by: analysis-operator` label) created at once
in a fresh namespace -> all Running on the KWOK nodes; the operator's CPU over that and its RSS; the
namespace deleted and gone; the RSS again. No AnalysisEnvironment exists, so everything the operator
spends here is spent on pods it has no business with.

Uses bench/run.py's stack plumbing (KWOK nodes, the operator pinned to a core).

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/foreign_pods.py --rounds 3 --n 2000 --out bench/logs/foreign-pods-<id>.md
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run  # bench/run.py
from memory import resources_table, rounds_bench, start_idle  # bench/memory.py


def foreign_pod(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "someone-else"}},
        "spec": {
            "containers": [
                {"name": "main", "image": "registry.example/batch:1", "resources": {"requests": {"cpu": "1m"}}}
            ],
            "tolerations": [{"operator": "Exists"}],
        },
    }


def main() -> None:
    arguments, bench = rounds_bench(__doc__ or "", 2000)
    rounds: list[tuple[int, float, float]] = []  # (pods Running, seconds, operator CPU s)
    try:
        start_idle(bench)
        for index in range(arguments.rounds):
            namespace = bench.namespace(f"foreign{index}")
            tracker = bench.track(namespace, pod_selector="app=someone-else", environments=False)
            cpu = bench.operator.cpu_seconds()
            began = time.perf_counter()
            names = [f"p{number:05d}" for number in range(arguments.n)]
            errors = run.run_pool(
                bench.pool,
                lambda name: run.consumed(
                    bench.cluster.core.create_namespaced_pod(namespace, foreign_pod(name), _preload_content=False)
                ),
                names,
            )
            tracker.wait(lambda: len(tracker.pod_running) >= arguments.n - len(errors), timeout=600)
            elapsed = time.perf_counter() - began
            bench.quiet(5, 120)
            rounds.append((len(tracker.pod_running), elapsed, bench.operator.cpu_seconds() - cpu))
            bench.checkpoint(f"round {index + 1}: {len(tracker.pod_running)} foreign pods Running")
            bench.drop_namespace(namespace)
            time.sleep(15)
            bench.checkpoint(f"round {index + 1}: deleted, 15 s later")
    finally:
        bench.cleanup()
    lines = [
        f"# bench/foreign_pods.py: {arguments.rounds} rounds of {arguments.n} pods that are not the operator's",
        "",
        f"Run {bench.run_id}, operator at {run.git_commit()}, pinned to core {arguments.core}; "
        "RSS and peak from /proc/<pid>/status.",
        "",
        "| round | pods Running | seconds to all Running | operator CPU s (create to quiet) | operator CPU ms per pod |",
        "|---|---|---|---|---|",
        *(
            f"| {index + 1} | {running} | {elapsed:.1f} | {cpu:.2f} | {cpu / max(running, 1) * 1000:.2f} |"
            for index, (running, elapsed, cpu) in enumerate(rounds)
        ),
        "",
        *resources_table(bench),
        "",
        *(f"- {note}" for note in bench.notes),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if arguments.out:
        arguments.out.write_text(report)


if __name__ == "__main__":
    main()
