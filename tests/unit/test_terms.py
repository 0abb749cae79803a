"""The terms an environment started with hold until it ends, whatever happens to its flavor."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime

from analysis_operator.engine.converge import converge
from analysis_operator.engine.sweep import due
from analysis_operator.engine.terms import build_terms, effective_flavor, flavor_from_terms
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import Flavor, FlavorAccess, OpenStackSpec, Resources, SlurmSpec
from tests.unit.test_backend_interface import ENVIRONMENT, FLAVOR, NOW, setup

HOUR = datetime.timedelta(hours=1)
FULL = Flavor(
    name="gpu",
    backend="slurm",
    resources=Resources(cpu="4", memory="32Gi", gpu=2),
    image="jupyter:1",
    allow_custom_image=True,
    max_lifetime=36 * HOUR,
    idle_timeout=datetime.timedelta(minutes=30),
    slurm=SlurmSpec(partition="gpu", account="p1", time_limit_minutes=90, qos="short", modules=("cuda",)),
    openstack=OpenStackSpec(flavor="g1", image="ubuntu", network="net", key_name="ops"),
    access=FlavorAccess(groups=frozenset({"staff"})),
)


def test_terms_round_trip_every_field_but_access():
    recorded = flavor_from_terms(build_terms(FULL), FULL.access)
    assert recorded == FULL
    assert flavor_from_terms(build_terms(FULL), FlavorAccess()).access == FlavorAccess()  # access is today's


def test_unreadable_terms_fall_back_to_the_catalogue():
    assert effective_flavor({"terms": {"flavor": "x"}}, FLAVOR) is FLAVOR
    assert effective_flavor({}, FLAVOR) is FLAVOR
    assert effective_flavor({"terms": "nonsense"}, None) is None


def started(status_flavor: Flavor = FLAVOR) -> dict:
    backend, cluster, context = setup()

    async def start():
        outcome = await converge(context, ENVIRONMENT, {}, status_flavor, NOW)
        return outcome.status

    status = asyncio.run(start())
    assert status["terms"]["maxLifetime"] == "2h"
    return status


def test_a_lowered_max_lifetime_does_not_reject_a_running_environment_and_it_still_expires():
    status = started()
    backend, cluster, context = setup()
    backend.running["u-1"] = "ready"
    lowered = dataclasses.replace(FLAVOR, max_lifetime=HOUR // 2)
    outcome = asyncio.run(converge(context, ENVIRONMENT, status, lowered, NOW + HOUR))
    assert outcome.status["phase"] == "Ready"  # not Rejected: its terms allow 2 h
    expired = asyncio.run(converge(context, ENVIRONMENT, {**status, **outcome.status}, lowered, NOW + 2 * HOUR))
    assert (expired.status["phase"], expired.status["reason"]) == ("Expired", "LifetimeExpired")


def test_a_deleted_flavor_still_expires_its_environments_and_the_sweep_still_sees_them():
    status = started()
    backend, cluster, context = setup()
    backend.running["u-1"] = "ready"
    record = EnvironmentRecord(ENVIRONMENT, status)
    assert due(record, {}, frozenset({"memory"}), NOW)  # no flavor in the index any more
    outcome = asyncio.run(converge(context, ENVIRONMENT, status, None, NOW + 3 * HOUR))
    assert outcome.status["phase"] == "Expired" and "u-1" not in backend.running


def test_a_custom_image_allowed_at_start_stays_allowed_until_the_end():
    custom = dataclasses.replace(ENVIRONMENT, image="custom:1")
    backend, cluster, context = setup()
    allowed = dataclasses.replace(FLAVOR, allow_custom_image=True)
    status = asyncio.run(converge(context, custom, {}, allowed, NOW)).status
    outcome = asyncio.run(converge(context, custom, status, FLAVOR, NOW + HOUR))  # allowCustomImage removed
    assert outcome.status is None or outcome.status["phase"] != "Rejected"
    expired = asyncio.run(converge(context, custom, status, FLAVOR, NOW + 3 * HOUR))
    assert expired.status["phase"] == "Expired"


def test_a_new_environment_gets_the_changed_flavor():
    backend, cluster, context = setup()
    lowered = dataclasses.replace(FLAVOR, max_lifetime=HOUR)
    status = asyncio.run(converge(context, ENVIRONMENT, {}, lowered, NOW)).status
    assert status["terms"]["maxLifetime"] == "1h" and status["expiresAt"] == "2026-11-30T13:00:00Z"


def test_terms_read_once_per_status_object_and_the_access_always_the_catalogues():
    """effective_flavor remembers the Flavor built from one status.terms object (the sweep reads
    every environment's terms every round); a changed catalogue access or new terms are read anew."""
    terms = build_terms(FULL)
    status = {"terms": terms}
    first = effective_flavor(status, FULL)
    assert effective_flavor(status, FULL) is first  # the same object: not rebuilt
    opened = dataclasses.replace(FULL, access=FlavorAccess(groups=frozenset({"staff", "guests"})))
    assert effective_flavor(status, opened).access == opened.access  # a permission: today's word
    changed = {**terms, "maxLifetime": "2h"}  # a new status object, as a watch event brings
    assert effective_flavor({"terms": changed}, FULL).max_lifetime == 2 * HOUR
    assert effective_flavor(status, FULL).max_lifetime == 36 * HOUR
