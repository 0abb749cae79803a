"""The terms an environment started with hold until it ends, whatever happens to its flavor."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime

from analysis_operator.engine.converge import converge
from analysis_operator.engine.sweep import due
from analysis_operator.engine.terms import build_terms, effective_flavor, flavor_from_terms, indexed_status
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


def test_terms_round_trip_every_field_of_its_backend_but_access():
    assert flavor_from_terms(build_terms(FULL), FULL.access) == dataclasses.replace(FULL, openstack=OpenStackSpec())
    on_openstack = dataclasses.replace(FULL, backend="openstack")
    recorded = flavor_from_terms(build_terms(on_openstack), FULL.access)
    assert recorded == dataclasses.replace(on_openstack, slurm=SlurmSpec())
    assert flavor_from_terms(build_terms(FULL), FlavorAccess()).access == FlavorAccess()  # access is today's


def test_terms_hold_only_what_applies_and_read_the_same_as_terms_with_every_block():
    """Each field is one more the API server tracks on the start's status write: a JupyterLab's terms
    carry no Slurm or OpenStack block and no idleTimeout it does not have. Terms written before
    (every block, empty ones too) still read as the same flavor."""
    jupyter = Flavor(name="jupyter", backend="kubernetes", resources=Resources(cpu="1", memory="16Gi"), image="lab:1")
    terms = build_terms(jupyter)
    assert set(terms) == {"flavor", "backend", "resources", "image", "allowCustomImage", "maxLifetime"}
    assert set(build_terms(FULL)) == set(terms) | {"idleTimeout", "slurm"}
    assert flavor_from_terms(terms, jupyter.access) == jupyter
    written_before = {
        **terms,
        "idleTimeout": "",
        "slurm": {"partition": "", "account": "", "timeLimitMinutes": None, "qos": "", "modules": []},
        "openstack": {"flavor": "", "image": "", "network": "", "keyName": ""},
    }
    assert flavor_from_terms(written_before, jupyter.access) == jupyter


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


def test_terms_read_once_per_status_object_and_the_access_always_the_catalogues(monkeypatch):
    """The index's status remembers the Flavor built from its terms (the sweep reads every
    environment's terms every round); a changed catalogue access or new terms are read anew."""
    from analysis_operator.engine import terms as module

    reads = []
    real = module._interned
    monkeypatch.setattr(module, "_interned", lambda terms, access: reads.append(1) or real(terms, access))
    terms = build_terms(FULL)
    status = indexed_status({"terms": terms})
    first = effective_flavor(status, FULL)
    assert effective_flavor(status, FULL) is first and len(reads) == 1  # the same object: not rebuilt
    opened = dataclasses.replace(FULL, access=FlavorAccess(groups=frozenset({"staff", "guests"})))
    assert effective_flavor(status, opened).access == opened.access and len(reads) == 2  # today's word
    changed = indexed_status({"terms": {**terms, "maxLifetime": "2h"}})  # a new status, as a watch event brings
    assert effective_flavor(changed, FULL).max_lifetime == 2 * HOUR
    assert effective_flavor(status, FULL).max_lifetime == 36 * HOUR
    assert status == {"terms": terms}  # what the index holds reads as the status it copied


def test_what_was_read_from_terms_goes_with_the_status_that_held_them():
    """Nothing outside the status keeps it: a cache by identity once held every terms object of
    every watch event until its bound (hundreds of MiB at 10,000 environments)."""
    import gc

    from analysis_operator.engine.terms import RecordedTerms

    statuses = [indexed_status({"terms": {**build_terms(FULL), "n": index}}) for index in range(500)]
    for status in statuses:
        assert effective_flavor(status, FULL) is not None
    assert sum(isinstance(item, RecordedTerms) for item in gc.get_objects()) >= 500
    del statuses, status
    gc.collect()
    assert sum(isinstance(item, RecordedTerms) for item in gc.get_objects()) == 0
