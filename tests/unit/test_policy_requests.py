"""Is an environment request acceptable for its flavor?"""

from __future__ import annotations

import datetime

import pytest

from analysis_operator.model.domain import BackendKind, Environment, Flavor
from analysis_operator.policy.requests import check_request

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
