#!/usr/bin/env python3
"""Operator restart with many unchanged environments: kopf's startup gate with and without
analysis_operator/infra/kopf_patches.py, in one run on the same objects.

Creates N environments (default 3,000: 6,000 indexed objects with their pods), then restarts the
operator alternately with ANALYSIS_OPERATOR_KOPF_PATCHES=off and on, and measures each restart as
bench/run.py does (start -> steady state; writes, which must be 0).

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/restart.py --environments 3000 --rounds 2
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run import Bench, log, machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--environments", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="off,on", help="kopf_patches settings to restart with, in order")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    # What bench/run.py's Bench expects, for one batch and restarts only.
    bench = Bench(
        argparse.Namespace(
            single=0,
            sizes=[args.environments],
            raw=0,
            scale=0,
            scale_batch=1000,
            skip_10k=True,
            restart=True,
            restart_signal="SIGTERM",
            pool=32,
            core=1,
            idle_seconds=10.0,
            timeout_single=60.0,
            timeout_batch_base=120.0,
            timeout_batch_per_env=0.3,
            timeout_restart=1800.0,
            timeout_cleanup=900.0,
            service_cidr="10.96.0.0/16",
            out=None,
        )
    )
    rows = []
    try:
        info = machine_info(bench.cluster)
        bench.setup()
        bench.operator.start()
        bench.batch(args.environments, record=False)
        for round_ in range(args.rounds):
            for mode in args.modes.split(","):
                bench.operator.settings["ANALYSIS_OPERATOR_KOPF_PATCHES"] = mode
                bench.results.clear()
                bench.restart()
                steady = next(value for metric, value in bench.results if "steady state" in metric)
                writes = next(value for metric, value in bench.results if "writes" in metric)
                rows.append((round_ + 1, mode, steady, writes.split(" over ")[0]))
                log(f"round {round_ + 1}, patches {mode}: steady after {steady}, writes {writes}")
    finally:
        try:
            bench.cleanup()
        except Exception as error:
            log(f"cleanup failed: {error!r}")
            bench.operator.stop(signal.SIGKILL)
    report = "\n".join(
        [
            f"## Restart with {args.environments} environments: kopf's startup gate vs kopf_patches.py (`bench/restart.py`)",
            "",
            "| machine | |",
            "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in info],
            "",
            "| round | kopf_patches | start -> steady state | writes |",
            "| --- | --- | --- | --- |",
            *[f"| {r} | {m} | {s} | {w} |" for r, m, s, w in rows],
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
