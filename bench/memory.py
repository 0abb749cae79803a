#!/usr/bin/env python3
"""Does the operator give memory back? Rounds of N environments made at once, then deleted.

Each round: N AnalysisEnvironments POSTed at once in a fresh namespace -> all Ready; the operator's
RSS; the namespace deleted and gone; 15 s later the RSS again. An operator that keeps something for
every environment ever made (or leaves garbage only a rare collection frees) grows round by round;
one that does not comes back to about the same RSS after every deletion (issue 17, G4).

Uses bench/run.py's stack plumbing (KWOK nodes, a service range, the operator pinned to a core).

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/memory.py --rounds 3 --n 1000 --out bench/logs/memory-<id>.md
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run  # bench/run.py


def rounds_bench(description: str, n: int) -> tuple[argparse.Namespace, run.Bench]:
    """The options of a rounds script (--rounds, --n, --core, --out) and bench/run.py's stack plumbing
    for it, with none of run.py's own phases."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--core", type=int, default=1, help="CPU core the operator is pinned to")
    parser.add_argument("--allocator", choices=sorted(run.ALLOCATORS), default="jemalloc")
    parser.add_argument("--out", type=pathlib.Path)
    arguments = parser.parse_args()
    defaults = ["--single", "0", "--sizes=", "--raw", "0", "--skip-10k", "--no-restart", "--core", str(arguments.core)]
    defaults += ["--allocator", arguments.allocator]
    return arguments, run.Bench(run.argument_parser().parse_args(defaults))


def start_idle(bench: run.Bench) -> None:
    """The stack's additions, then the operator, and its RSS once it has settled."""
    bench.setup()
    bench.operator.start()
    time.sleep(10)
    bench.checkpoint("idle")


def resources_table(bench: run.Bench) -> list[str]:
    return [
        "| phase | environments | RSS MiB | peak RSS MiB | operator CPU s in phase |",
        "|---|---|---|---|---|",
        *(f"| {phase} | {envs} | {rss} | {hwm} | {cpu} |" for phase, envs, rss, hwm, cpu in bench.resources),
    ]


def main() -> None:
    arguments, bench = rounds_bench(__doc__ or "", 1000)
    try:
        start_idle(bench)
        for index in range(arguments.rounds):
            bench.batch(arguments.n, purpose=f"r{index}", record=False)
            bench.checkpoint(f"round {index + 1}: {arguments.n} Ready")
            bench.drop_namespace(bench.namespaces[-1])
            time.sleep(15)
            bench.environments_total = 0
            bench.checkpoint(f"round {index + 1}: deleted, 15 s later")
    finally:
        bench.cleanup()
    lines = [
        f"# bench/memory.py: {arguments.rounds} rounds of {arguments.n} made at once, then deleted",
        "",
        f"Run {bench.run_id}, operator at {run.git_commit()}, pinned to core {arguments.core}, on {bench.args.allocator}; "
        "RSS and peak from /proc/<pid>/status.",
        "",
        *resources_table(bench),
        "",
    ]
    report = "\n".join(lines)
    sys.stdout.write(report)
    if arguments.out:
        arguments.out.write_text(report)


if __name__ == "__main__":
    main()
