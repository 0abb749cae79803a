"""What the sweep's budget check (engine/budget_gate.BudgetGate.unheld) costs per round: N running
environments (20 per user, each user's own personal budget holding them), the check timed over
`--rounds` rounds, median. No server: the budget gate over in-memory indexes, built the way the
unit tests build them (tests/unit/test_budget_gate_unheld.py).

    PYTHONPATH=operator:. python bench/sweep_budgets.py --environments 10000
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import Environment
from tests.unit.test_budget_gate_unheld import READY, Api, gate, held

PER_USER = 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--environments", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    arguments = parser.parse_args()
    api, records = Api(), []
    for number in range(arguments.environments // PER_USER):
        user, entries = f"user{number}", {}
        for index in range(PER_USER):
            uid, name = f"u-{number}-{index}", f"lab{number}-{index}"
            entries[uid] = held(name)
            records.append(EnvironmentRecord(Environment("ns", name, uid, owner=user, flavor="gpu"), READY))
        api.add(f"user-{user}", {"gpuHours": 2000}, entries, user=user)
    budget_gate = gate(api)
    times = []
    for round_ in range(arguments.rounds):
        start = time.perf_counter()
        due = budget_gate.unheld(records, float(round_))
        times.append(time.perf_counter() - start)
        assert not due  # every one is held: nothing to reconcile
    print(
        f"{len(records)} environments, {platform.processor() or platform.machine()}: "
        f"unheld {statistics.median(times) * 1000:.1f} ms a round (median of {arguments.rounds}), "
        f"min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}"
    )


if __name__ == "__main__":
    main()
