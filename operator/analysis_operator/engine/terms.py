"""The terms an environment started with: its flavor as it was, kept in status.terms.

A running environment keeps the limits and backend it started with until it
ends: a flavor changed or deleted later affects new environments only. So a
lowered maxLifetime does not turn a running environment Rejected, a deleted
flavor does not leave its environments unexpired, and a resumed environment
comes back as it started. Who may use a flavor (its access list) is a
permission, not a term: that is always the catalogue's current word.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from analysis_operator.engine.views import Index, first
from analysis_operator.model.domain import (
    BackendKind,
    Environment,
    Flavor,
    FlavorAccess,
    OpenStackSpec,
    Resources,
    SlurmSpec,
    parse_duration,
)
from analysis_operator.policy.requests import format_duration


def build_terms(flavor: Flavor) -> dict[str, Any]:
    """status.terms: the flavor as the environment starts on it (pure, JSON-able). Only what applies:
    the specifics of its own backend, idleTimeout when it has one (flavor_from_terms reads anything
    left out as unset). Every field here is one more the API server tracks on the start's status write."""
    terms: dict[str, Any] = {
        "flavor": flavor.name,
        "backend": flavor.backend,
        "resources": {"cpu": flavor.resources.cpu, "memory": flavor.resources.memory, "gpu": flavor.resources.gpu},
        "image": flavor.image,
        "allowCustomImage": flavor.allow_custom_image,
        "maxLifetime": format_duration(flavor.max_lifetime),
    }
    if flavor.idle_timeout:
        terms["idleTimeout"] = format_duration(flavor.idle_timeout)
    if flavor.backend == BackendKind.SLURM:
        terms["slurm"] = {
            "partition": flavor.slurm.partition,
            "account": flavor.slurm.account,
            "timeLimitMinutes": flavor.slurm.time_limit_minutes,
            "qos": flavor.slurm.qos,
            "modules": list(flavor.slurm.modules),
        }
    if flavor.backend == BackendKind.OPENSTACK:
        terms["openstack"] = {
            "flavor": flavor.openstack.flavor,
            "image": flavor.openstack.image,
            "network": flavor.openstack.network,
            "keyName": flavor.openstack.key_name,
        }
    return terms


def flavor_from_terms(terms: Mapping[str, Any], access: FlavorAccess) -> Flavor | None:
    """The flavor as recorded, with today's access list; None if nothing (readable) was recorded."""
    try:
        resources, slurm, openstack = terms["resources"], terms.get("slurm") or {}, terms.get("openstack") or {}
        idle = _duration(terms.get("idleTimeout"))
        return Flavor(
            name=str(terms["flavor"]),
            backend=str(terms["backend"]),
            resources=Resources(cpu=str(resources["cpu"]), memory=str(resources["memory"]), gpu=int(resources["gpu"])),
            image=str(terms.get("image") or ""),
            allow_custom_image=bool(terms.get("allowCustomImage")),
            max_lifetime=_duration(terms["maxLifetime"]) or datetime.timedelta(),
            idle_timeout=idle,
            slurm=SlurmSpec(
                partition=str(slurm.get("partition") or ""),
                account=str(slurm.get("account") or ""),
                time_limit_minutes=slurm.get("timeLimitMinutes"),
                qos=str(slurm.get("qos") or ""),
                modules=tuple(slurm.get("modules") or ()),
            ),
            openstack=OpenStackSpec(
                flavor=str(openstack.get("flavor") or ""),
                image=str(openstack.get("image") or ""),
                network=str(openstack.get("network") or ""),
                key_name=str(openstack.get("keyName") or ""),
            ),
            access=access,
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


def _duration(text: Any) -> datetime.timedelta | None:
    return parse_duration(str(text)) if text else None


class RecordedTerms(dict[str, Any]):
    """status.terms as the environments index holds it, with the Flavor read from it kept alongside:
    the sweep reads every environment's terms every 10 s, and building a Flavor from them was most of
    its time at 10,000 environments. Kept on the object itself, the Flavor goes when the index lets go
    of the status (a cache by the object's identity held every terms object of every watch event
    until it reached its bound: hundreds of MiB at 10,000 environments)."""

    __slots__ = ("read",)

    def __init__(self, terms: Mapping[str, Any]) -> None:
        super().__init__(terms)
        self.read: tuple[FlavorAccess, Flavor | None] | None = None


def indexed_status(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """A status as the environments index keeps it: a copy whose terms remember what they read as."""
    copied = dict(status or {})
    if isinstance(copied.get("terms"), Mapping):
        copied["terms"] = RecordedTerms(copied["terms"])
    return copied


def effective_flavor(status: Mapping[str, Any], current: Flavor | None) -> Flavor | None:
    """The flavor an environment runs on: its recorded terms once started, else the catalogue's."""
    terms = status.get("terms")
    if not isinstance(terms, Mapping):
        return current
    access = current.access if current is not None else FlavorAccess()
    if not isinstance(terms, RecordedTerms):
        return _interned(terms, access) or current
    if terms.read is None or not (terms.read[0] is access or terms.read[0] == access):
        terms.read = (access, _interned(terms, access))
    return terms.read[1] or current


# One Flavor for every environment that started on the same terms (most of them share a few):
# 10,000 environments hold a handful of Flavors, not 10,000 copies.
_INTERNED: dict[tuple[str, FlavorAccess], Flavor | None] = {}


def _interned(terms: Mapping[str, Any], access: FlavorAccess) -> Flavor | None:
    try:
        key = (json.dumps(terms, sort_keys=True, default=str), access)
    except (TypeError, ValueError):
        return flavor_from_terms(terms, access)
    if key not in _INTERNED:
        if len(_INTERNED) >= 1024:
            _INTERNED.clear()
        _INTERNED[key] = flavor_from_terms(terms, access)
    return _INTERNED[key]


def flavor_for(environment: Environment, status: Mapping[str, Any], flavors: Index) -> Flavor | None:
    return effective_flavor(status, first(flavors, environment.flavor))
