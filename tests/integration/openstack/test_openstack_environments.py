"""The remote-desktop VM cards end to end: AnalysisEnvironment -> operator -> real Nova (fake driver)."""

from __future__ import annotations

from tests.waiting import wait_for


def servers_named(cloud, name: str) -> list:
    return [server for server in cloud.compute.servers() if server.name == name]


def test_vm_card_becomes_an_active_server_shelved_on_suspend_and_deleted_with_the_environment(vm_environments, cloud):
    environments = vm_environments
    environments.create("desk", flavor="vm-desktop", lifetime="2h")
    status = environments.wait_phase("desk", "Ready", timeout=120)["status"]
    server_id = status["backend"]["id"]
    assert cloud.compute.get_server(server_id).status == "ACTIVE"

    environments.patch_spec("desk", suspend=True)
    environments.wait_phase("desk", "Suspended", timeout=60)
    wait_for(
        lambda: cloud.compute.get_server(server_id).status.startswith("SHELVED"), timeout=90, what="the server shelved"
    )
    environments.patch_spec("desk", suspend=False)
    environments.wait_phase("desk", "Ready", timeout=120)
    assert environments.get("desk")["status"]["backend"]["id"] == server_id  # same server, disk kept

    environments.delete("desk")
    wait_for(
        lambda: all(server.id != server_id for server in cloud.compute.servers()), timeout=90, what="the server deleted"
    )
    wait_for(lambda: not environments.exists("desk"), timeout=30, what="the finalizer released")


def test_a_vm_is_charged_for_its_nova_flavor_while_active(vm_environments, operator, custom, cloud):
    """Budgets charge a VM for the vCPUs Nova gives it (2), not the catalogue card's number (1),
    and only while it is ACTIVE."""
    import datetime
    import uuid

    group, version = "analysis.panosc.eu", "v1alpha1"
    operator.configure(ANALYSIS_OPERATOR_BUDGETS_CHARGE_INTERVAL_SECONDS="1")
    owner, budget = f"vm-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:8]}"
    custom.create_cluster_custom_object(
        group,
        version,
        "computebudgets",
        {
            "apiVersion": f"{group}/{version}",
            "kind": "ComputeBudget",
            "metadata": {"name": budget},
            "spec": {"user": owner, "limits": {"cpuHours": 100}},
        },
    )

    def entry() -> dict:
        ledger = custom.get_cluster_custom_object(group, version, "computebudgets", budget).get("status") or {}
        return next(iter((ledger.get("environments") or {}).values()), {})

    def seconds(text: str) -> float:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").timestamp()

    try:
        wait_for(
            lambda: (
                custom.get_cluster_custom_object(group, version, "computebudgets", budget).get("status") or {}
            ).get("display"),
            timeout=20,
            what="the operator to see the budget",
        )
        vm_environments.create("charged-vm", flavor="test-vm-card-understates", owner=owner, lifetime="1h")
        backend = vm_environments.wait_phase("charged-vm", "Ready", timeout=120)["status"]["backend"]
        vcpus = cloud.compute.get_server(backend["id"]).flavor.vcpus
        assert vcpus == 2 and backend["allocatedCpus"] == vcpus

        wait_for(
            lambda: entry().get("cpus") == vcpus and entry().get("cpuHours", 0) > 0,
            timeout=30,
            what="a charge for Nova's vCPUs",
        )
        charged = entry()
        charged_seconds = charged["cpuHours"] * 3600 / vcpus
        # Whole seconds of ACTIVE time, never more than the slot has existed (BUILD is free).
        assert abs(charged_seconds - round(charged_seconds)) < 1e-3 and charged_seconds >= 1
        assert charged_seconds <= seconds(charged["chargedUntil"]) - seconds(charged["since"]) + 1e-3
        vm_environments.delete("charged-vm")
        wait_for(lambda: not vm_environments.exists("charged-vm"), timeout=90, what="the environment gone")
    finally:
        custom.delete_cluster_custom_object(group, version, "computebudgets", budget)
