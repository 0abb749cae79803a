#!/usr/bin/env python3
"""Issue 17, G4: what the operator's memory at a population is made of, over restarts on the same population.

Makes --population environments in one namespace (if fewer exist), then restarts the operator once per
entry of --variants, in that order, and records for each restart: the time to steady, the RSS, and
jemalloc's own counters from inside the process (bench/heapprobe, put on the operator's PYTHONPATH:
never in the image) at their peak and 15 s after steady:

  allocated  bytes in live allocations (what the process still refers to, and garbage not yet collected)
  active     pages holding at least one live allocation: allocated plus the free space between them
  resident   jemalloc's pages in RAM (active plus freed pages not yet given back)

RSS minus resident is the code and libraries. A variant changes one setting of the restarted process:

  current     as the image runs it
  collect3s   a full collection every 3 s for the first 60 s (does collecting the restart's garbage
              sooner lower the peak?)
  gen2x10     the oldest generation collected 10x as often as the operator's own thresholds
  decay       MALLOC_CONF: freed pages given back after 1 s by a background thread (jemalloc: 10 s, on use)
  lean        decay, one arena, a smaller thread cache
  as-is       kopf as it is: none of the two memory patches of stop 33 (kopf_patches.views_on_demand,
              watch_without_managed_fields), the code before on the same population
  whole-list  the pod watch's first list held whole (every pod's parsed body) before it is read into
              summaries, as before stop 34, instead of page by page

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/heap.py --population 10000 --variants current,collect3s,decay,decay,collect3s,current \\
        --out bench/logs/heap-<id>.md
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run  # bench/run.py

PROBE = pathlib.Path(__file__).resolve().parent / "heapprobe"
DECAY = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
VARIANTS: dict[str, dict[str, str]] = {
    "current": {},
    "collect3s": {"HEAPPROBE_COLLECT_EVERY": "3", "HEAPPROBE_COLLECT_FOR": "60"},
    "gen2x10": {"HEAPPROBE_GC_THRESHOLDS": "5000,20,10"},
    "decay": {"MALLOC_CONF": DECAY},
    "lean": {"MALLOC_CONF": DECAY + ",narenas:1,tcache_max:4096"},
    "as-is": {"HEAPPROBE_KOPF_AS_IS": "views,managed-fields"},
    "whole-list": {"HEAPPROBE_LIST_WHOLE": "1"},
}
KNOBS = {key for settings in VARIANTS.values() for key in settings}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=10000)
    parser.add_argument("--variants", default="current,collect3s,current,collect3s", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--core", type=int, default=1, help="CPU core the operator is pinned to")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--settle", type=float, default=15, help="seconds after the top-up before it is measured")
    parser.add_argument(
        "--census",
        action="store_true",
        help="the probe's census of live objects by type (SIGUSR2) "
        "10 s after the top-up and after each restart is steady: bench/logs/heapprobe-<run>.census.*",
    )
    parser.add_argument(
        "--kopf-as-is",
        default="",
        help="the whole run without these of the operator's kopf patches (comma-separated): views (kopf's Body "
        "and Patch as kopf makes them, reference cycles), managed-fields (kopf's watch keeps managedFields); "
        "both: as before stop 33",
    )
    options = parser.parse_args()
    options.variants = options.variants.split(",")
    unknown = set(options.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    return options


def probe(prefix: pathlib.Path, pid: int) -> list[dict[str, float]]:
    """The probe's lines for one process, each {"t": unix time, "rss": MiB, "allocated": MiB, ...}."""
    samples = []
    for line in (pathlib.Path(f"{prefix}.{pid}")).read_text().splitlines():
        stamp, *fields = line.split()
        samples.append({"t": float(stamp), **{k: float(v) for k, v in (field.split("=") for field in fields)}})
    return samples


def census(bench: run.Bench, options: argparse.Namespace) -> None:
    if options.census:
        time.sleep(10)
        os.kill(bench.operator.pid, signal.SIGUSR2)


def base(options: argparse.Namespace) -> dict[str, str]:
    """The run's own settings of the restarted process, under every variant (--kopf-as-is)."""
    return {"HEAPPROBE_KOPF_AS_IS": options.kopf_as_is} if options.kopf_as_is else {}


def described(name: str) -> str:
    return " ".join(f"{key}={value}" for key, value in VARIANTS[name].items()) or "as the image runs it"


def restart(bench: run.Bench, name: str, prefix: pathlib.Path, options: argparse.Namespace) -> dict:
    for key in KNOBS:
        bench.operator.settings.pop(key, None)
    bench.operator.settings.update(base(options))
    bench.operator.settings.update(VARIANTS[name])
    run.log(f"variant {name}: {described(name)}")
    results = len(bench.results)
    bench.restart()
    steady = next(value for metric, value in bench.results[results:] if "steady state" in metric)
    census(bench, options)
    time.sleep(15)
    samples = probe(prefix, bench.operator.pid)
    last = samples[-1]
    peak = {key: max(sample.get(key, 0.0) for sample in samples) for key in ("rss", "allocated")}
    bench.checkpoint(f"{name}: 15 s after steady")
    return {"variant": name, "steady": steady, "last": last, "peak": peak}


def report(options: argparse.Namespace, bench: run.Bench, rows: list[dict]) -> str:
    lines = [
        f"# bench/heap.py: restarts with {bench.environments_total} environments in one namespace",
        "",
        f"Run {bench.run_id}, operator at {run.git_commit()}, pinned to core {options.core}, on jemalloc, "
        f"kopf as is: {options.kopf_as_is or 'nothing (all patches applied)'}. MiB; peak over the restart "
        f"(the first row: over the top-up), then 15 s after steady ({options.settle:.0f} s after the top-up).",
        "",
        "| # | variant | start -> steady | peak RSS | peak allocated | RSS | allocated | active | resident "
        "| collector s | full collections |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(rows, 1):
        last, peak = row["last"], row["peak"]
        lines.append(
            f"| {index} | {row['variant']} | {row['steady']} | {peak['rss']:.0f} | {peak['allocated']:.0f} "
            f"| {last['rss']:.0f} | {last.get('allocated', 0):.0f} | {last.get('active', 0):.0f} "
            f"| {last.get('resident', 0):.0f} | {last['gc_seconds']:.1f} | {last['full_collections']:.0f} |"
        )
    lines += [
        "",
        "Variants:",
        *(f"- {name}: {described(name)}" for name in dict.fromkeys(options.variants)),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    options = arguments()
    bench = run.Bench(
        run.argument_parser().parse_args(
            [
                *("--single", "0", "--sizes=", "--raw", "0", "--no-restart"),  # --scale counts toward the nodes
                *("--scale", str(options.population), "--core", str(options.core)),
            ]
        )
    )
    prefix = run.REPO / "bench" / "logs" / f"heapprobe-{bench.run_id}"
    bench.operator.settings.update(PYTHONPATH=f"{run.REPO / 'operator'}:{PROBE}", HEAPPROBE_OUT=str(prefix))
    bench.operator.settings.update(base(options))
    rows: list[dict] = []
    try:
        bench.setup()
        bench.operator.start()
        began = time.monotonic()
        bench.scale(options.population)
        topped_up = round(time.monotonic() - began, 1)
        if bench.environments_total < options.population:  # a restart of fewer measures something else
            raise RuntimeError(f"{bench.environments_total} of {options.population} environments Ready: {bench.notes}")
        census(bench, options)
        time.sleep(max(0, options.settle - (10 if options.census else 0)))
        samples = probe(prefix, bench.operator.pid)
        rows.append(
            {
                "variant": "(the top-up, no restart)",
                "steady": f"{topped_up} s to make",
                "last": samples[-1],
                "peak": {key: max(sample.get(key, 0.0) for sample in samples) for key in ("rss", "allocated")},
            }
        )
        bench.checkpoint(f"{options.settle:.0f} s after the top-up")
        for name in options.variants:
            rows.append(restart(bench, name, prefix, options))
    finally:
        text = report(options, bench, rows)
        print(text, flush=True)
        if options.out:
            options.out.write_text(text)
        bench.cleanup()


if __name__ == "__main__":
    main()
