"""Is an environment request acceptable for its flavor?"""

from __future__ import annotations

import datetime

import pytest

from analysis_operator.model.domain import BackendKind, Environment, Flavor
from analysis_operator.policy.budgets import Budget
from analysis_operator.policy.refusal import Refusal
from analysis_operator.policy.requests import backend_refusal, check_request, filing_refusal, requested_for

HOUR = datetime.timedelta(hours=1)


def make_environment(image="", lifetime=None) -> Environment:
    return Environment(
        namespace="team-a", name="lab", uid="uid-1", owner="alice", flavor="small", image=image, lifetime=lifetime
    )


def make_flavor(
    backend=BackendKind.KUBERNETES, image="jupyter/scipy:2024", allow_custom_image=False, max_lifetime=8 * HOUR
) -> Flavor:
    return Flavor(
        name="small", backend=backend, image=image, allow_custom_image=allow_custom_image, max_lifetime=max_lifetime
    )


@pytest.mark.parametrize(
    "environment, flavor, expected_reason",
    [
        # images
        (make_environment(image="custom:1"), make_flavor(), "CustomImageNotAllowed"),
        (make_environment(image="custom:1"), make_flavor(allow_custom_image=True), None),
        (make_environment(image="custom:1"), make_flavor(image="", allow_custom_image=True), None),
        (make_environment(), make_flavor(), None),
        (make_environment(), make_flavor(image=""), None),  # a pod needs one: KubernetesBackend.validate
        (make_environment(), make_flavor(backend=BackendKind.SLURM, image=""), None),
        (make_environment(), make_flavor(backend=BackendKind.OPENSTACK, image=""), None),
        (make_environment(image="custom:1"), make_flavor(backend=BackendKind.SLURM, image=""), "CustomImageNotAllowed"),
        # lifetimes
        (make_environment(lifetime=9 * HOUR), make_flavor(), "LifetimeTooLong"),
        (make_environment(lifetime=8 * HOUR), make_flavor(), None),  # the limit itself is fine
        (make_environment(lifetime=HOUR), make_flavor(), None),
        (make_environment(lifetime=None), make_flavor(max_lifetime=HOUR), None),  # default: the flavor's
        (make_environment(lifetime=8 * HOUR + datetime.timedelta(seconds=1)), make_flavor(), "LifetimeTooLong"),
        (make_environment(lifetime=3 * 24 * HOUR), make_flavor(backend=BackendKind.SLURM, image=""), "LifetimeTooLong"),
    ],
)
def test_check_request(environment, flavor, expected_reason):
    rejection = check_request(environment, flavor)
    assert (rejection.reason if rejection else None) == expected_reason
    if rejection:
        assert "'small'" in rejection.message  # names the flavor


@pytest.mark.parametrize(
    "reason, environment, flavor, words",
    [
        (
            "CustomImageNotAllowed",
            make_environment(image="custom:1"),
            make_flavor(),
            ["spec.image", "allowCustomImage"],
        ),
    ],
)
def test_image_rejections_say_what_to_do(reason, environment, flavor, words):
    rejection = check_request(environment, flavor)
    assert rejection.reason == reason
    assert all(word in rejection.message for word in words), rejection.message


@pytest.mark.parametrize(
    "lifetime, max_lifetime, asked, allowed",
    [
        (12 * HOUR, 8 * HOUR, "12h", "8h"),
        (2 * 24 * HOUR, 36 * HOUR, "48h", "36h"),
        (9 * HOUR + datetime.timedelta(minutes=5), 9 * HOUR, "9h5m", "9h"),
        (8 * HOUR + datetime.timedelta(seconds=30), 8 * HOUR, None, "8h"),  # only seconds over the limit
    ],
)
def test_lifetime_rejection_names_both_durations(lifetime, max_lifetime, asked, allowed):
    rejection = check_request(make_environment(lifetime=lifetime), make_flavor(max_lifetime=max_lifetime))
    assert rejection.reason == "LifetimeTooLong"
    assert "spec.lifetime" in rejection.message
    assert f"({allowed})" in rejection.message
    if asked is not None:
        assert f"spec.lifetime {asked} " in rejection.message
    # whatever the wording, what was asked must read differently from what is allowed
    assert f"spec.lifetime {allowed} " not in rejection.message, rejection.message


# --- a flavor whose backend is not enabled -----------------------------------------------------------


@pytest.mark.parametrize(
    "backend, enabled, refused",
    [
        (BackendKind.KUBERNETES, {"kubernetes"}, False),
        (BackendKind.OPENSTACK, {"kubernetes"}, True),
        (BackendKind.SLURM, {"kubernetes", "openstack"}, True),
        (BackendKind.SLURM, {"kubernetes", "slurm"}, False),
        ("nomad", {"kubernetes", "slurm", "openstack"}, True),  # a flavor naming a backend nobody ships
    ],
)
def test_a_flavor_on_a_backend_that_is_not_enabled_is_refused_in_words(backend, enabled, refused):
    refusal = backend_refusal(make_flavor(backend=backend), enabled)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert refusal.reason == "BackendNotEnabled" and refusal.subject == "small"
        assert "flavor 'small'" in refusal.message and "choose another flavor" in refusal.message


def test_the_vm_refusal_says_what_the_flavor_runs():
    refusal = backend_refusal(make_flavor(backend=BackendKind.OPENSTACK), {"kubernetes"})
    assert "virtual machine" in refusal.message and "openstack backend is not enabled" in refusal.message


# --- BudgetRequests: who files for whom ---------------------------------------------------------------


@pytest.mark.parametrize(
    "on_behalf_of, me, trusted, expected",
    [
        ("", "alice", False, "alice"),  # alice files for herself
        ("alice", "alice", False, "alice"),  # and may say so
        ("alice", "system:serviceaccount:portal:backend", True, "alice"),  # the portal acts for alice
        ("", "system:serviceaccount:portal:backend", True, "system:serviceaccount:portal:backend"),
        ("alice", "bob", False, "NotOwner"),  # bob pretending to be the portal
    ],
)
def test_who_a_request_is_for(on_behalf_of, me, trusted, expected):
    result = requested_for(on_behalf_of, me, trusted)
    assert (result.reason if isinstance(result, Refusal) else result) == expected


ALICE_BUDGET = Budget(name="alice-2026", user="alice")
GROUP_BUDGET = Budget(name="p11", group="p11-team")


def members(group: str, user: str) -> bool:
    return group == "p11-team" and user in ("alice", "carol")


@pytest.mark.parametrize(
    "scientist, budget_name, budget, environment_owner, expected",
    [
        ("alice", "alice-2026", ALICE_BUDGET, None, None),
        ("bob", "alice-2026", ALICE_BUDGET, None, "NotBudgetMember"),  # bob against alice's budget
        ("carol", "p11", GROUP_BUDGET, None, None),  # a member of the group
        ("bob", "p11", GROUP_BUDGET, None, "NotBudgetMember"),
        ("alice", "gone", None, None, "BudgetNotFound"),
        ("alice", "", None, "alice", None),  # a longer lifetime of her own environment
        ("bob", "", None, "alice", "NotEnvironmentOwner"),  # of someone else's
        ("bob", "", None, "", "EnvironmentNotFound"),
    ],
)
def test_only_a_member_files_against_a_budget_and_only_the_owner_for_an_environment(
    scientist, budget_name, budget, environment_owner, expected
):
    refusal = filing_refusal(scientist, budget_name, budget, members, environment_owner)
    assert (refusal.reason if refusal else None) == expected
    if expected == "NotBudgetMember":
        assert f"{scientist!r} may not ask for more" in refusal.message and budget_name in refusal.message


def test_an_approved_lifetime_goes_only_to_the_environment_it_was_filed_about():
    from analysis_operator.handlers.requests import _replaced

    def lab(uid: str, created: str, owner: str = "alice") -> dict:
        return {"metadata": {"uid": uid, "creationTimestamp": created}, "spec": {"owner": owner}}

    request = {"creationTimestamp": "2026-12-06T10:00:00Z", "annotations": {"analysis.panosc.eu/requested-by": "alice"}}
    assert _replaced(lab("u-2", "2026-12-06T09:00:00Z"), request, {"environmentUid": "u-2"}) == ""
    again = "deleted and created again"
    assert again in _replaced(lab("u-2", "2026-12-06T09:00:00Z"), request, {"environmentUid": "u-1"})  # a namesake
    # no uid recorded (filed while no operator ran, or before this): made after the request, so not its environment
    assert again in _replaced(lab("u-2", "2026-12-06T11:00:00Z"), request, {})
    assert _replaced(lab("u-2", "2026-12-06T09:00:00Z"), request, {}) == ""
    assert "belongs to bob, not to alice" in _replaced(lab("u-2", "2026-12-06T09:00:00Z", "bob"), request, {})
