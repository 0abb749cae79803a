#!/usr/bin/env python3
"""Issue 17, G2b: does the population matter to the operator? bench/run.py's G2 comparison (the
operator's N at once alternating with bench/goraw creating the same children) at a population of 0,
then again with P environments existing, in one of two layouts:

  one     the population and every burst in one namespace: the worst case (per-namespace lists,
          Endpoints and the namespace's Services grow with it)
  spread  the population over --users namespaces (a namespace per user or group, as facilities lay
          it out); every burst in a fresh namespace, deleted after it

The operator / Go raw ratio at P against the ratio at 0 says whether the population costs the operator
more than it costs the API server; the Go raw client's own change from 0 to P is the control plane's.
A burst in the population's namespace is deleted object by object (the namespace stays), so every run
starts with the same population.

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/population.py --layout one --population 2000 --out bench/logs/population-<id>.md
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run  # bench/run.py

GO_RAW = "app.kubernetes.io/managed-by=bench-goraw"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=["one", "spread"], default="one")
    parser.add_argument("--population", type=int, default=2000, help="environments existing at the second level")
    parser.add_argument("--users", type=int, default=50, help="spread: namespaces the population is spread over")
    parser.add_argument("--n", type=int, default=1000, help="environments per burst")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path at each level")
    parser.add_argument("--core", type=int, default=1, help="CPU core the operator is pinned to")
    parser.add_argument("--allocator", choices=sorted(run.ALLOCATORS), default="jemalloc")
    parser.add_argument("--out", type=pathlib.Path)
    return parser.parse_args()


class Population:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.bench = run.Bench(
            run.argument_parser().parse_args(
                [
                    *("--single", "0", "--sizes=", "--raw", "0", "--no-restart"),
                    *("--scale", str(options.population), "--go-raw", str(options.n)),
                    *("--rounds", str(options.rounds), "--core", str(options.core), "--allocator", options.allocator),
                ]
            )
        )
        self.homes: list[str] = []  # the population's namespaces
        self.existing = 0

    @property
    def cluster(self) -> run.Cluster:
        return self.bench.cluster

    def count(self, namespace: str, selector: str) -> tuple[int, int]:
        """(AnalysisEnvironments, pods matching selector) in a namespace."""
        environments = self.cluster.list_json(
            self.cluster.custom.list_namespaced_custom_object, run.GROUP, run.VERSION, namespace, run.PLURAL
        )
        pods = self.cluster.list_json(self.cluster.core.list_namespaced_pod, namespace, label_selector=selector)
        return len(environments["items"]), len(pods["items"])

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not done after {timeout:.0f} s")
            time.sleep(2)

    def populate(self, total: int) -> None:
        """Up to `total` environments, all Ready, in the layout's namespaces (POSTed 1,000 at a time)."""
        if not self.homes:
            self.homes = (
                [self.bench.namespace("pop")]
                if self.options.layout == "one"
                else [self.bench.namespace(f"u{index:03d}") for index in range(self.options.users)]
            )
        began = time.perf_counter()
        wanted = [(self.homes[i % len(self.homes)], f"p{i:05d}") for i in range(self.existing, total)]
        for start in range(0, len(wanted), 1000):
            chunk = wanted[start : start + 1000]
            errors = run.run_pool(self.bench.pool, lambda item: self.cluster.create_environment(*item), chunk)
            if errors:
                raise RuntimeError(f"population: {len(errors)} POST errors, first: {errors[0]}")
            self.existing += len(chunk)
            self.wait_for("population Ready", lambda: self.ready() >= self.existing, 600)
        run.log(
            f"population: {self.existing} Ready in {len(self.homes)} namespaces ({time.perf_counter() - began:.0f} s)"
        )

    def ready(self) -> int:
        items = self.cluster.list_json(
            self.cluster.custom.list_cluster_custom_object, run.GROUP, run.VERSION, run.PLURAL
        )["items"]
        return sum(1 for item in items if (item.get("status") or {}).get("phase") == "Ready")

    def burst(self, path: str, level: int, index: int, binary: pathlib.Path, shapes: pathlib.Path) -> dict:
        """One path's N at once: in the population's namespace (one), or in a fresh one (spread)."""
        bench, n = self.bench, self.options.n
        home = self.homes[0] if self.options.layout == "one" else ""
        if path == "operator":
            return bench.operator_burst(n, index, namespace=home, prefix=f"b{level}r{index}-")
        return bench.go_raw_burst(binary, shapes, n, index, namespace=home, prefix=f"g{level}r{index}-")

    def remove(self, path: str, sample: dict) -> None:
        """The burst's objects gone, the population left as it was."""
        if self.options.layout != "one":
            self.bench.drop_namespace(sample["namespace"])
            return
        namespace, began = sample["namespace"], time.perf_counter()
        if path == "operator":
            names = sample["names"]
            run.run_pool(self.bench.pool, lambda name: self.cluster.delete_environment(namespace, name), names)
            self.wait_for(
                "burst deleted", lambda: self.count(namespace, run.MANAGED) == (self.existing, self.existing), 900
            )
        else:
            # kubectl's own --wait took over 8 minutes here after the objects were gone: poll instead.
            self.cluster.kubectl("delete", "pods,services,secrets", "-n", namespace, "-l", GO_RAW, "--wait=false")
            self.wait_for("Go raw burst deleted", lambda: self.count(namespace, GO_RAW)[1] == 0, 900)
        run.log(f"deleted the {path} burst in {time.perf_counter() - began:.0f} s")

    def level(self, level: int, binary: pathlib.Path, shapes: pathlib.Path) -> dict[str, list[dict]]:
        """bench/run.py's compare_go_raw at the current population."""
        bench = self.bench
        runs: dict[str, list[dict]] = {"operator": [], "go raw": []}
        for index in range(self.options.rounds):
            for path in runs:
                sample = bench.measured(lambda: self.burst(path, level, index, binary, shapes))
                runs[path].append(sample)
                run.log(
                    f"population {level}, {path} run {index + 1}: {sample['elapsed']:.2f} s, "
                    f"{sample['done']}/{self.options.n} done, {sample['errors']} errors, "
                    f"{sample['cpu']['whole machine'] / self.options.n * 1000:.0f} core-ms/env"
                )
                self.remove(path, sample)
        bench.checkpoint(f"after the runs at population {level}")
        return runs


def throughput(sample: dict) -> float:
    return sample["done"] / sample["elapsed"] if sample["elapsed"] == sample["elapsed"] else 0.0


def per_env(sample: dict, n: int, key: str = "whole machine") -> float:
    return sample["cpu"].get(key, 0.0) / n * 1000


def report(population: Population, levels: dict[int, dict[str, list[dict]]], shapes: pathlib.Path) -> str:
    options, med = population.options, statistics.median
    n = options.n
    where = (
        "one namespace (population and bursts)"
        if options.layout == "one"
        else f"the population over {options.users} namespaces, each burst in a fresh namespace"
    )
    lines = [
        f"# bench/population.py: G2 at a population of {' and '.join(str(level) for level in levels)}, {where}",
        "",
        f"Run {population.bench.run_id}, operator at {run.git_commit()}, pinned to core {options.core}, "
        f"on {population.bench.args.allocator}; "
        f"{options.rounds} runs of each path at each population, alternating, N={n}; shapes `{shapes.name}`; "
        f"Go raw: {getattr(population.bench, 'go_raw_info', '?')}.",
        "",
        "| population | run | path | time s | env/s | whole machine core-ms/env | operator | "
        + " | ".join(run.STACK_COMPONENTS[:3])
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for level, runs in levels.items():
        for index in range(options.rounds):
            for path, samples in runs.items():
                sample = samples[index]
                cells = [f"{per_env(sample, n, key):.1f}" for key in ("operator", *run.STACK_COMPONENTS[:3])]
                lines.append(
                    f"| {level} | {index + 1} | {path} | {sample['elapsed']:.2f} | {throughput(sample):.1f} "
                    f"| {per_env(sample, n):.0f} | {' | '.join(cells)} |"
                )
        summary[level] = {
            path: (med(throughput(s) for s in samples), med(per_env(s, n) for s in samples))
            for path, samples in runs.items()
        }
    lines += [
        "",
        "| population | operator env/s | Go raw env/s | **operator / Go raw** | operator path core-ms/env "
        "| Go raw path core-ms/env | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for level, paths in summary.items():
        (op_rate, op_cpu), (go_rate, go_cpu) = paths["operator"], paths["go raw"]
        lines.append(
            f"| {level} | {op_rate:.1f} | {go_rate:.1f} | **{op_rate / go_rate:.2f}** | {op_cpu:.0f} | {go_cpu:.0f} "
            f"| {op_cpu / go_cpu:.2f}x |"
        )
    first, last = summary[min(summary)], summary[max(summary)]
    lines += [
        "",
        f"From population {min(summary)} to {max(summary)} (medians): operator throughput x"
        f"{last['operator'][0] / first['operator'][0]:.2f}, Go raw throughput x"
        f"{last['go raw'][0] / first['go raw'][0]:.2f} (the control plane's share of any decay), the ratio "
        f"{first['operator'][0] / first['go raw'][0]:.2f} -> {last['operator'][0] / last['go raw'][0]:.2f} "
        "(G2b: equal).",
        "",
        "Operator RSS and CPU by phase:",
        "",
        "| phase | RSS MiB | peak RSS MiB | operator CPU s in phase |",
        "|---|---|---|---|",
        *(f"| {phase} | {rss} | {hwm} | {cpu} |" for phase, _, rss, hwm, cpu in population.bench.resources),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    options = arguments()
    population = Population(options)
    bench = population.bench
    levels: dict[int, dict[str, list[dict]]] = {}
    try:
        bench.setup()
        bench.operator.start()
        time.sleep(10)
        bench.checkpoint("idle")
        binary = run.build_goraw()
        shapes = bench.dump_shapes()
        population.populate(0)
        levels[0] = population.level(0, binary, shapes)
        population.populate(options.population)
        bench.checkpoint(f"population {options.population} Ready")
        levels[options.population] = population.level(options.population, binary, shapes)
    finally:
        bench.cleanup()
    text = report(population, levels, shapes)
    sys.stdout.write(text)
    if options.out:
        options.out.write_text(text)


if __name__ == "__main__":
    main()
