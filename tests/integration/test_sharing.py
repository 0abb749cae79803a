"""spec.sharing on the real API server: only the owner (or the portal for them) changes it, only known
people, and only people who may read every dataset it mounts (embargo-aware). Refusals name what is
wrong. Who may then open it through the gateway is in tests/integration/gateway/."""

from __future__ import annotations

import kubernetes
import pytest

from tests.integration.conftest import GROUP, REPO, VERSION, impersonating, kubectl
from tests.integration.test_datasets import PORTAL, PUBLIC, catalogue, create_as, embargoed, refusal  # noqa: F401

PLURAL = "analysisenvironments"


@pytest.fixture(scope="module")
def directory(kubeconfig):
    """FacilityUsers alice, bob, carol, dave (examples/users.yaml): the people one may share with."""
    kubectl("apply", "-f", str(REPO / "examples/users.yaml"))
    yield


def share_as(kubeconfig, user, namespace, name, group="facility-users", **sharing):
    api = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user, group))
    return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": {"sharing": sharing}})


def test_owner_shares_and_unshares_with_team_members(kubeconfig, directory, catalogue, environments, namespace):
    team = catalogue.group("team", ["alice", "bob"])
    raw = catalogue.dataset("raw", embargoed(groups=(team,)))
    create_as(kubeconfig, "alice", namespace, "mine", datasets=[{"name": raw}])
    shared = share_as(kubeconfig, "alice", namespace, "mine", users=["bob"], groups=[team])
    assert shared["spec"]["sharing"] == {"users": ["bob"], "groups": [team]}
    unshared = share_as(kubeconfig, "alice", namespace, "mine", users=[], groups=[])
    assert unshared["spec"]["sharing"] == {"users": [], "groups": []}


def test_someone_else_may_not_share_it_not_even_with_themselves(kubeconfig, directory, environments, namespace):
    create_as(kubeconfig, "alice", namespace, "mine")
    status, message = refusal(lambda: share_as(kubeconfig, "bob", namespace, "mine", users=["bob"]))
    assert status == 403
    assert "alice" in message  # the authorization policy or the owner check names whose it is


def test_the_portal_shares_for_the_owner(kubeconfig, directory, environments, namespace):
    create_as(kubeconfig, "alice", namespace, "mine")
    shared = share_as(kubeconfig, PORTAL, namespace, "mine", group="analysis-portal", users=["carol"])
    assert shared["spec"]["sharing"]["users"] == ["carol"]


def test_unknown_user_or_group_is_refused_by_name(kubeconfig, directory, environments, namespace):
    create_as(kubeconfig, "alice", namespace, "mine")
    status, message = refusal(lambda: share_as(kubeconfig, "alice", namespace, "mine", users=["zed"]))
    assert status == 403 and "'zed' is not a facility user" in message
    status, message = refusal(lambda: share_as(kubeconfig, "alice", namespace, "mine", groups=["no-such-team"]))
    assert status == 403 and "'no-such-team' is not a FacilityGroup" in message
    assert "sharing" not in environments.get("mine")["spec"]  # nothing was stored


def test_sharing_embargoed_data_with_an_outsider_is_refused_naming_person_and_dataset(
    kubeconfig, directory, catalogue, environments, namespace
):
    team = catalogue.group("team", ["alice", "bob"])
    raw = catalogue.dataset("raw", embargoed(groups=(team,)))
    create_as(kubeconfig, "alice", namespace, "mine", datasets=[{"name": raw}])
    status, message = refusal(lambda: share_as(kubeconfig, "alice", namespace, "mine", users=["carol"]))
    assert status == 403 and "'carol' may not read dataset" in message and raw in message
    # a group with one outsider is refused too, naming the outsider
    mixed = catalogue.group("mixed", ["bob", "dave"])
    status, message = refusal(lambda: share_as(kubeconfig, "alice", namespace, "mine", groups=[mixed]))
    assert status == 403 and "'dave'" in message and "'bob'" not in message


def test_sharing_at_create_is_checked_too(kubeconfig, directory, catalogue, environments, namespace):
    public = catalogue.dataset("open", PUBLIC)
    created = create_as(
        kubeconfig, "alice", namespace, "ok", datasets=[{"name": public}], sharing={"users": ["carol", "dave"]}
    )
    assert created["spec"]["sharing"]["users"] == ["carol", "dave"]
    status, message = refusal(lambda: create_as(kubeconfig, "alice", namespace, "bad", sharing={"users": ["zed"]}))
    assert status == 403 and "'zed'" in message
