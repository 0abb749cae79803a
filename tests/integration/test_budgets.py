"""ComputeBudgets and BudgetRequests against the real API server and the operator process:
admission refusals, racing creates, accounting, restart, exhaustion, approvals and RBAC."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import signal
import subprocess
import urllib.request
import uuid

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION, impersonating, kubectl
from tests.waiting import wait_for

SETTINGS = {
    "ANALYSIS_OPERATOR_BUDGETS_REQUIRE_BUDGET": "true",
    "ANALYSIS_OPERATOR_BUDGETS_CHARGE_INTERVAL_SECONDS": "1",
    "ANALYSIS_OPERATOR_BUDGETS_EXPIRY_WARNING_SECONDS": "7200",
}


@pytest.fixture(scope="module")
def budget_operator(operator):
    """The operator as in production: no budget, no environment (the session default is lenient)."""
    with operator.configured(**SETTINGS):
        yield operator


class Budgets:
    def __init__(self, custom) -> None:
        self.custom, self.created = custom, []

    def create(self, limits: dict, user: str = "", group: str = "", name: str = "", **spec) -> str:
        name = name or f"b-{uuid.uuid4().hex[:8]}"
        spec = {"limits": limits, **({"user": user} if user else {"group": group}), **spec}
        self.custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "computebudgets",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ComputeBudget", "metadata": {"name": name}, "spec": spec},
        )
        if name not in self.created:
            self.created.append(name)
        # The operator writes the numbers once it sees a budget; only then does admission know it either.
        wait_for(lambda: self.status(name).get("display"), timeout=10, what=f"the operator to see {name}")
        return name

    def get(self, name: str) -> dict:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, "computebudgets", name)

    def delete(self, name: str) -> None:
        """Delete it and wait until it is gone (the operator lets go of it first)."""
        self.custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", name)
        self.created.remove(name)
        wait_for(lambda: not self._exists(name), timeout=15, what=f"{name} deleted")

    def _exists(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return False
            raise

    def holding(self, uid: str) -> list[str]:
        """The budgets whose ledgers hold this environment."""
        listed = self.custom.list_cluster_custom_object(GROUP, VERSION, "computebudgets")["items"]
        return sorted(
            budget["metadata"]["name"]
            for budget in listed
            if uid in ((budget.get("status") or {}).get("environments") or {})
        )

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}


@pytest.fixture
def budgets(custom, budget_operator):
    made = Budgets(custom)
    yield made
    for name in made.created:
        custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", name)


@pytest.fixture
def group(custom):
    name = f"g-{uuid.uuid4().hex[:8]}"
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "facilitygroups",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FacilityGroup",
            "metadata": {"name": name},
            "spec": {"members": ["member-a", "member-b"]},
        },
    )
    yield name
    custom.delete_cluster_custom_object(GROUP, VERSION, "facilitygroups", name)


def user() -> str:
    return f"u{uuid.uuid4().hex[:8]}"


def refusal(environments, name: str, **spec) -> str:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        environments.create(name, **spec)
    assert refused.value.status == 403, refused.value.body
    return refused.value.body


def events(core, namespace: str, name: str, kind: str = "AnalysisEnvironment") -> set[str]:
    selector = f"involvedObject.kind={kind},involvedObject.name={name}"
    return {event.reason for event in core.list_namespaced_event(namespace, field_selector=selector).items}


def test_admission_refuses_with_messages_a_scientist_understands(budgets, group, environments):
    assert "has no ComputeBudget" in refusal(environments, "none", flavor="jupyter-basic", owner=user())
    alice = user()
    spent = budgets.create({"cpuHours": 0}, user=alice)
    assert f"CPU-hours budget of user '{alice}' (ComputeBudget '{spent}') exhausted: 0.0 of 0.0 used" in refusal(
        environments, "cpu", flavor="jupyter-basic", owner=alice
    )
    assert "does not exist" in refusal(
        environments, "unknown", flavor="jupyter-basic", owner=alice, budget="no-such-budget"
    )
    shared = budgets.create({"gpuHours": 20, "maxGpus": 1, "maxEnvironments": 2}, group=group)
    assert f"may not draw on group '{group}'" in refusal(
        environments, "outsider", flavor="jupyter-basic", owner=alice, budget=shared
    )
    environments.create("gpu-1", flavor="jupyter-gpu", owner="member-a", budget=shared)
    assert "allows 1 GPU(s) at once, 1 are in use" in refusal(
        environments, "gpu-2", flavor="jupyter-gpu", owner="member-b", budget=shared
    )
    environments.create("cpu-1", flavor="jupyter-basic", owner="member-b", budget=shared)
    assert "allows 2 environment(s) at once and 2 are running" in refusal(
        environments, "cpu-2", flavor="jupyter-basic", owner="member-b", budget=shared
    )
    expired = budgets.create({"cpuHours": 10}, user=(carol := user()), period={"validUntil": "2020-01-01T00:00:00Z"})
    assert f"(ComputeBudget '{expired}') expired at 2020-01-01T00:00:00Z" in refusal(
        environments, "late", flavor="jupyter-basic", owner=carol
    )


def test_gpu_hours_exhausted_names_the_group(budgets, group, environments):
    shared = budgets.create({"gpuHours": 0}, group=group)
    body = refusal(environments, "gpu", flavor="jupyter-gpu", owner="member-a", budget=shared)
    assert f"GPU-hours budget of group '{group}' (ComputeBudget '{shared}') exhausted: 0.0 of 0.0 used" in body
    environments.create("cpu", flavor="jupyter-basic", owner="member-a", budget=shared)  # no GPU: allowed


def _race(environments, owner: str, count: int) -> list[str]:
    def create(index: int) -> str | None:
        try:
            environments.create(f"race-{index}", flavor="test-short", owner=owner)
            return f"race-{index}"
        except kubernetes.client.ApiException as error:
            assert error.status == 403 and "allows 1 environment(s) at once" in error.body, error.body
            return None

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return [name for name in pool.map(create, range(count)) if name]


def test_racing_creates_admit_exactly_what_fits_at_admission(budgets, environments):
    owner = user()
    budgets.create({"maxEnvironments": 1}, user=owner)
    admitted = _race(environments, owner, 12)
    assert len(admitted) == 1
    environments.wait_phase(admitted[0], "Ready")


def test_racing_creates_past_admission_are_decided_exactly_once_by_reconcile(budgets, environments, budget_operator):
    """The webhook off (as if it were down or bypassed): all creates land, exactly one runs."""
    budget_operator.configure(ANALYSIS_OPERATOR_BUDGETS_CHECK_AT_ADMISSION="false")
    try:
        owner = user()
        name = budgets.create({"maxEnvironments": 1}, user=owner)
        admitted = _race(environments, owner, 12)
        assert len(admitted) == 12
        wait_for(
            lambda: all(environments.phase(n) in {"Ready", "Rejected"} for n in admitted),
            timeout=60,
            what="every environment decided",
        )
        phases = {n: environments.get(n)["status"] for n in admitted}
        assert sorted(status["phase"] for status in phases.values()) == ["Ready"] + ["Rejected"] * 11
        assert {status.get("reason") for status in phases.values() if status["phase"] == "Rejected"} == {
            "TooManyEnvironments"
        }
        assert budgets.status(name)["running"]["environments"] == 1
        # Terminal, and saying so as kubectl wait and kstatus-based health checks understand it.
        rejected = next(n for n, status in phases.items() if status["phase"] == "Rejected")
        kubectl("wait", "--for=condition=Stalled", "--timeout=30s", "-n", environments.namespace, f"aenv/{rejected}")
        conditions = {c["type"]: c for c in environments.get(rejected)["status"]["conditions"]}
        assert (conditions["Stalled"]["status"], conditions["Stalled"]["reason"]) == ("True", "TooManyEnvironments")
        assert conditions["Ready"]["status"] == "False"
        running = next(n for n, status in phases.items() if status["phase"] == "Ready")
        assert "Stalled" not in {c["type"] for c in environments.get(running)["status"]["conditions"]}
        timed_out = kubectl(
            "wait",
            "--for=condition=Stalled",
            "--timeout=2s",
            "-n",
            environments.namespace,
            f"aenv/{running}",
            check=False,
        )
        assert timed_out.returncode != 0
    finally:
        budget_operator.configure(ANALYSIS_OPERATOR_BUDGETS_CHECK_AT_ADMISSION="true")


def _ledger(budgets, name: str) -> dict:
    return next(iter((budgets.status(name).get("environments") or {}).values()), {})


def _seconds(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").timestamp()


def test_usage_is_charged_and_a_restart_neither_loses_nor_double_counts(budgets, environments, budget_operator):
    owner = user()
    name = budgets.create({"cpuHours": 100}, user=owner)
    environments.create("work", flavor="jupyter-basic", owner=owner)  # 1 CPU
    ready = environments.wait_phase("work", "Ready")
    (condition,) = [c for c in ready["status"]["conditions"] if c["type"] == "Ready"]
    wait_for(lambda: _ledger(budgets, name).get("cpuHours", 0) > 0, timeout=30, what="a first charge")
    budget_operator.restart(signal.SIGKILL)  # mid-run, no chance to flush anything
    restarted = datetime.datetime.now(datetime.UTC).timestamp()
    wait_for(
        lambda: _seconds(_ledger(budgets, name)["chargedUntil"]) >= restarted + 2,
        timeout=30,
        what="charges after the restart",
    )
    entry = _ledger(budgets, name)
    charged_from = max(_seconds(entry["since"]), _seconds(condition["lastTransitionTime"]))
    charged_seconds = _seconds(entry["chargedUntil"]) - charged_from
    # Exactly CPUs x wall time from Ready (not while the pod starts) to the last charge: the downtime is not
    # lost, nothing is charged twice.
    assert entry["cpuHours"] * 3600 == pytest.approx(charged_seconds, abs=0.05)
    assert budgets.status(name)["used"]["cpuHours"] == pytest.approx(entry["cpuHours"], abs=1e-6)
    assert budgets.status(name)["display"]["cpuHours"].endswith("/ 100")
    # The ledger's status is recorded as one field owned by the operator, not a managedFields entry per
    # environment and number (which grew with the ledger and was rewritten on every charge).
    statuses = [e for e in budgets.get(name)["metadata"]["managedFields"] if e.get("subresource") == "status"]
    assert [entry["fieldsV1"] for entry in statuses] == [{"f:status": {}}], statuses


def test_an_exhausted_budget_stops_its_environments_and_keeps_them(budgets, environments, core, namespace):
    owner = user()
    name = budgets.create({"cpuHours": 0.002}, user=owner)  # 7.2 CPU-seconds
    environments.create("short", flavor="jupyter-basic", owner=owner)
    environments.wait_phase("short", "Ready")
    stopped = environments.wait_phase("short", "BudgetExhausted", timeout=30)
    assert stopped["status"]["reason"] == "BudgetExhausted"
    (ready,) = [c for c in stopped["status"]["conditions"] if c["type"] == "Ready"]
    assert ready["status"] == "False" and f"(ComputeBudget '{name}') exhausted" in ready["message"]
    wait_for(lambda: _gone(core, namespace, "aenv-short"), timeout=30, what="the pod removed")
    wait_for(lambda: "BudgetExhausted" in events(core, namespace, "short"), timeout=10, what="the Event")
    status = wait_for(
        lambda: (s := budgets.status(name)) and not s.get("environments") and s, timeout=10, what="the entry settled"
    )
    assert status["used"]["cpuHours"] >= 0.002
    assert {"BudgetWarning", "BudgetExhausted"} <= events(core, "default", name, kind="ComputeBudget")
    (exhausted,) = [c for c in status["conditions"] if c["type"] == "Exhausted"]
    assert exhausted["status"] == "True"


def _gone(core, namespace: str, pod: str) -> bool:
    try:
        core.read_namespaced_pod(pod, namespace)
        return False
    except kubernetes.client.ApiException as error:
        return error.status == 404


class Requests:
    def __init__(self, client, namespace: str) -> None:
        self.api, self.namespace = kubernetes.client.CustomObjectsApi(client), namespace

    def create(self, **spec) -> dict:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BudgetRequest",
            "metadata": {"generateName": "more-"},
            "spec": {"reason": "beamtime extended", **spec},
        }
        return self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "budgetrequests", body)

    def decide(self, name: str, **status) -> dict:
        return self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, "budgetrequests", name, {"status": status}
        )

    def status(self, name: str) -> dict:
        return (
            self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "budgetrequests", name).get("status")
            or {}
        )


def test_only_an_admin_approves_and_approval_counts_exactly_once(kubeconfig, budgets, namespace, budget_operator):
    owner = user()
    name = budgets.create({"cpuHours": 140, "gpuHours": 20}, user=owner)
    scientist = Requests(impersonating(kubeconfig, owner), namespace)
    admin = Requests(impersonating(kubeconfig, "dora", group="analysis-admins"), namespace)
    request = scientist.create(budget=name, add={"gpuHours": 10})
    assert request["metadata"]["annotations"][f"{GROUP}/requested-by"] == owner
    request_name = request["metadata"]["name"]
    wait_for(lambda: scientist.status(request_name).get("phase") == "Pending", timeout=10, what="Pending")

    with pytest.raises(kubernetes.client.ApiException) as refused:
        scientist.decide(request_name, decision="Approved")  # RBAC: no patch on budgetrequests/status
    assert refused.value.status == 403 and "budgetrequests/status" in refused.value.body

    # The README's approval: a JSON patch testing the uid decides only the request the admin read
    # (a merge patch of the status does not check metadata.uid).
    def approve(uid: str) -> subprocess.CompletedProcess:
        patch = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "add", "path": "/status/decision", "value": "Approved"},
        ]
        as_admin = ["--as", "dora", "--as-group", "analysis-admins", "-n", namespace]
        command = ["patch", "budgetrequest", request_name, "--subresource=status", "--type=json"]
        return kubectl(*as_admin, *command, "-p", json.dumps(patch), check=False)

    replaced = approve(str(uuid.uuid4()))  # as if withdrawn and filed again under the name
    assert replaced.returncode != 0 and "invalid" in replaced.stderr.lower()
    assert "decision" not in admin.status(request_name)

    admin.decide(request_name, decision="Approved", decidedBy="someone-else")  # the stamp wins
    status = wait_for(
        lambda: (s := admin.status(request_name)).get("phase") == "Applied" and s,
        timeout=10,
        what="the approval applied",
    )
    assert status["decidedBy"] == "dora" and status["decidedAt"]
    wait_for(lambda: budgets.status(name).get("limits", {}).get("gpuHours") == 30, timeout=10, what="limit raised")
    assert budgets.get(name)["spec"]["limits"]["gpuHours"] == 20  # GitOps still owns spec

    # A crash between the grant and "Applied" is replayed: the grant is keyed by the request's uid.
    admin.decide(request_name, phase="Pending")
    budget_operator.restart(signal.SIGKILL)
    wait_for(lambda: admin.status(request_name).get("phase") == "Applied", timeout=30, what="re-applied")
    assert budgets.status(name)["limits"]["gpuHours"] == 30
    assert list(budgets.status(name)["grants"]) == [request["metadata"]["uid"]]

    with pytest.raises(kubernetes.client.ApiException) as final:
        admin.decide(request_name, decision="Denied")
    assert final.value.status == 403 and "decisions are final" in final.value.body
    [cause] = json.loads(final.value.body)["details"]["causes"]
    assert (cause["reason"], cause["field"]) == ("DecisionFinal", "status.decision")

    denied = scientist.create(budget=name, add={"cpuHours": 1000})["metadata"]["name"]
    admin.decide(denied, decision="Denied", comment="no beamtime left")
    wait_for(lambda: admin.status(denied).get("phase") == "Denied", timeout=10, what="denied")
    assert budgets.status(name)["limits"]["cpuHours"] == 140


def test_lifetime_is_extended_by_an_approved_request_after_a_warning(
    kubeconfig, budgets, environments, core, namespace
):
    owner = user()
    budgets.create({"cpuHours": 100}, user=owner)
    environments.create("long", flavor="test-short", owner=owner)  # 1h, warned 2h before expiry here
    before = environments.wait_phase("long", "Ready")["status"]
    wait_for(lambda: "ExpiresSoon" in events(core, namespace, "long"), timeout=15, what="ExpiresSoon Event")
    request = Requests(impersonating(kubeconfig, owner), namespace).create(environment="long", lifetime="2h")
    Requests(impersonating(kubeconfig, "dora", group="analysis-admins"), namespace).decide(
        request["metadata"]["name"], decision="Approved"
    )
    wait_for(
        lambda: environments.get("long")["status"]["expiresAt"] != before["expiresAt"],
        timeout=30,
        what="expiresAt moved",
    )
    after = environments.get("long")["status"]
    assert _seconds(after["expiresAt"]) - _seconds(before["expiresAt"]) == 2 * 3600


def test_an_approved_lifetime_goes_only_to_the_environment_it_was_asked_for(
    kubeconfig, budgets, environments, namespace
):
    """The owner asks to run "long" 7 days longer, then deletes it and creates another "long" (a bigger
    flavor, or someone else in the namespace could) before the admin decides: the approval extends
    nothing, says why, and the new one keeps its own lifetime."""
    owner = user()
    budgets.create({"cpuHours": 100}, user=owner)
    environments.create("long", flavor="test-short", owner=owner)
    environments.wait_phase("long", "Ready")
    scientist = Requests(impersonating(kubeconfig, owner), namespace)
    admin = Requests(impersonating(kubeconfig, "dora", group="analysis-admins"), namespace)
    name = scientist.create(environment="long", lifetime="168h")["metadata"]["name"]
    filed = wait_for(
        lambda: (status := scientist.status(name)).get("phase") == "Pending" and status, timeout=10, what="filed"
    )
    assert filed["environmentUid"] == environments.get("long")["metadata"]["uid"]
    environments.delete("long")
    wait_for(lambda: not environments.exists("long"), timeout=30, what="the first one gone")
    environments.create("long", flavor="test-short", owner=owner)
    before = environments.wait_phase("long", "Ready")["status"]
    admin.decide(name, decision="Approved")
    decided = wait_for(
        lambda: (status := scientist.status(name)).get("phase") == "Invalid" and status, timeout=15, what="decided"
    )
    assert "was deleted and created again since this request was filed" in decided["message"], decided
    after = environments.get("long")["status"]
    assert after["expiresAt"] == before["expiresAt"] and not after.get("lifetimeExtensions")


def test_metrics_show_budgets_phases_and_refusals(budgets, environments, budget_operator):
    owner = user()
    name = budgets.create({"cpuHours": 140, "gpuHours": 20}, user=owner)
    refusal(environments, "nobody", flavor="jupyter-basic", owner=user())
    url = f"http://127.0.0.1:{budget_operator.metrics_port}/metrics"

    def scrape() -> str:
        return urllib.request.urlopen(url, timeout=5).read().decode()

    text = wait_for(lambda: name in (t := scrape()) and t, timeout=10, what="the budget in /metrics")
    assert f'analysis_budget_limit_hours{{budget="{name}",resource="cpu"}} 140.0' in text
    assert 'analysis_refusals_total{enforcement="admission",reason="NoBudget",stage="budget"}' in text
    assert "analysis_environments{" in text and "analysis_reconcile_seconds_bucket" in text


def test_an_owner_removed_from_the_group_has_their_environment_on_its_budget_stopped(
    budgets, group, environments, custom
):
    """As a dataset's or a flavor's access: a FacilityGroup change stops at once what its budget no
    longer covers (NotBudgetMember), and nothing of the members who stay."""
    shared = budgets.create({"cpuHours": 100}, group=group)
    environments.create("left", flavor="jupyter-basic", owner="member-a", budget=shared)
    environments.create("stays", flavor="jupyter-basic", owner="member-b", budget=shared)
    environments.wait_phase("left", "Ready")
    environments.wait_phase("stays", "Ready")
    custom.patch_cluster_custom_object(GROUP, VERSION, "facilitygroups", group, {"spec": {"members": ["member-b"]}})
    stopped = environments.wait_phase("left", "Stopped", timeout=15)["status"]
    assert stopped["reason"] == "NotBudgetMember", stopped
    assert stopped["message"].startswith("budget withdrawn, the environment was stopped: 'member-a' may not draw on")
    wait_for(lambda: budgets.status(shared)["running"]["environments"] == 1, timeout=10, what="the slot freed")
    assert environments.phase("stays") == "Ready"


def test_a_budget_deleted_and_created_again_holds_counts_and_charges_its_running_environment(budgets, environments):
    """kubectl replace --force, a GitOps Replace: the ledger was the old object's status. The new one
    takes the running environment in at once, charges it, and counts it against maxEnvironments."""
    owner = user()
    limits = {"cpuHours": 100, "maxEnvironments": 1}
    name = budgets.create(limits, user=owner)
    environments.create("work", flavor="jupyter-basic", owner=owner)
    uid = environments.wait_phase("work", "Ready")["metadata"]["uid"]
    wait_for(lambda: budgets.holding(uid) == [name], timeout=10, what="the slot taken")
    budgets.delete(name)
    budgets.create(limits, user=owner, name=name)
    status = wait_for(
        lambda: uid in ((s := budgets.status(name)).get("environments") or {}) and s,
        timeout=15,
        what="the running environment in the new budget's ledger",
    )
    assert status["running"]["environments"] == 1
    wait_for(lambda: budgets.status(name)["used"]["cpuHours"] > 0, timeout=15, what="a charge in the new budget")
    assert "allows 1 environment(s) at once and 1 are running" in refusal(
        environments, "another", flavor="jupyter-basic", owner=owner
    )
    assert environments.phase("work") == "Ready"


def test_a_budget_replaced_keeps_running_what_a_grant_let_run_over_its_spec_limit(budgets, environments, custom):
    """The grant (status.grants) goes with the replaced object: the two environments it let run are put
    back in the new one's ledger anyway, neither stopped (a limit lowered in place stops none either),
    and counted, so a third is refused while they are over the limit."""
    owner = user()
    limits = {"cpuHours": 100, "maxEnvironments": 1}
    name = budgets.create(limits, user=owner)
    grant = {"request": "more", "approvedBy": "dora", "approvedAt": "2026-01-01T00:00:00Z", "maxEnvironments": 1}
    custom.patch_cluster_custom_object_status(
        GROUP, VERSION, "computebudgets", name, {"status": {"grants": {str(uuid.uuid4()): grant}}}
    )
    wait_for(lambda: budgets.status(name)["limits"].get("maxEnvironments") == 2, timeout=10, what="the grant")
    uids = []
    for each in ("one", "two"):
        environments.create(each, flavor="jupyter-basic", owner=owner)
        uids.append(environments.wait_phase(each, "Ready")["metadata"]["uid"])
    wait_for(lambda: all(budgets.holding(uid) == [name] for uid in uids), timeout=10, what="both slots taken")
    budgets.delete(name)
    budgets.create(limits, user=owner, name=name)  # kubectl replace --force
    replaced = datetime.datetime.now(datetime.UTC).timestamp()
    status = wait_for(
        lambda: (s := budgets.status(name)).get("running", {}).get("environments") == 2 and s,
        timeout=15,
        what=lambda: (
            f"both counted in the new budget: {json.dumps(budgets.status(name).get('running'))}, "
            f"{environments.phase('one')}, {environments.phase('two')}"
        ),
    )
    assert status["limits"]["maxEnvironments"] == 1
    assert "allows 1 environment(s) at once and 2 are running" in refusal(
        environments, "three", flavor="jupyter-basic", owner=owner
    )
    # Past the sweep's grace for a ledger that lacks them (10 s): charged on, and neither stopped.
    wait_for(
        lambda: (
            min(_seconds(e["chargedUntil"]) for e in budgets.status(name)["environments"].values()) >= replaced + 12
        ),
        timeout=30,
        what="charges past the grace",
    )
    assert [environments.phase(each) for each in ("one", "two")] == ["Ready", "Ready"]
    assert sorted(budgets.status(name)["environments"]) == sorted(uids)


def test_a_deleted_budget_stops_the_environments_it_held_saying_why(budgets, environments, core, namespace):
    """A budget deleted to cut its user off: what runs on it stops, after a grace for a replace."""
    owner = user()
    name = budgets.create({"cpuHours": 100}, user=owner)
    environments.create("work", flavor="jupyter-basic", owner=owner)
    environments.wait_phase("work", "Ready")
    budgets.delete(name)
    stopped = environments.wait_phase("work", "Stopped", timeout=30)["status"]
    assert stopped["reason"] == "NoBudget", stopped
    assert stopped["message"].startswith(
        f"budget withdrawn, the environment was stopped: user {owner!r} has no ComputeBudget"
    )
    wait_for(lambda: _gone(core, namespace, "aenv-work"), timeout=30, what="the pod removed")


def test_of_two_personal_budgets_a_restart_keeps_a_running_environment_in_the_one_holding_it(
    budgets, environments, budget_operator, core
):
    """A second personal budget added before the first is removed: the running environment stays in
    the first one's ledger only, also after a restart lists the second one first; the second one
    carries a Warning saying which one is used."""
    owner = user()
    first = budgets.create({"cpuHours": 100}, user=owner, name=f"z-{uuid.uuid4().hex[:8]}")
    environments.create("work", flavor="jupyter-basic", owner=owner)
    uid = environments.wait_phase("work", "Ready")["metadata"]["uid"]
    wait_for(lambda: budgets.holding(uid) == [first], timeout=10, what="the slot taken")
    second = budgets.create({"cpuHours": 100}, user=owner, name=f"a-{uuid.uuid4().hex[:8]}")  # first by name
    budget_operator.restart(signal.SIGKILL)
    restarted = datetime.datetime.now(datetime.UTC).timestamp()
    wait_for(
        lambda: _seconds(budgets.status(first)["environments"][uid]["chargedUntil"]) >= restarted + 2,
        timeout=30,
        what="charges after the restart",
    )
    assert budgets.holding(uid) == [first]
    assert budgets.status(second)["running"]["environments"] == 0
    assert "SecondPersonalBudget" in events(core, "default", second, kind="ComputeBudget")
