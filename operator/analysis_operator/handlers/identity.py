"""The facility's directory in memory: FacilityUsers by name, FacilityGroup gids by group name.

engine/identity.py reads these (with the FacilityGroup members index in
handlers/indexes.py) to decide whom an environment runs as. Neither index
function raises: an object that cannot be used is still indexed with its
problems (a FacilityUser: so the refusal can say what is wrong) or left out (a
gid that is not one: that group grants no gid), and logged once (handlers/indexes.py).

A FacilityUser changed or removed reconciles its owner's live environments at
once: one whose owner is gone from the directory (or whose entry became
unusable) is stopped then, not at its next reconcile. A valid change (a new uid)
applies at the next start; what runs is left as it is (engine/identity.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from analysis_operator.engine.reconciler import Reconciler, utcnow
from analysis_operator.engine.views import values
from analysis_operator.handlers.indexes import never_raises, report_problems
from analysis_operator.model.domain import GROUP, VERSION, is_terminal
from analysis_operator.model.identity import POSIX_ID_MAX, FacilityUser, parse_posix_id


@kopf.index(GROUP, VERSION, "facilityusers")
@never_raises("facility_users")
def facility_users(name: str, spec: Mapping[str, Any], body: kopf.Body, **_: Any) -> dict[str, FacilityUser]:
    """Facility user ID -> their POSIX account, as the facility's directory sync wrote it."""
    user = FacilityUser.from_body(name, spec)
    report_problems("facility_users", body, user.problems)
    return {name: user}


@kopf.index(GROUP, VERSION, "facilitygroups")
@never_raises("group_gids")
def group_gids(name: str, spec: Mapping[str, Any], body: kopf.Body, **_: Any) -> dict[str, int] | None:
    """FacilityGroup name -> its POSIX gid; groups without one are not indexed."""
    value = spec.get("gid") if isinstance(spec, Mapping) else None
    gid = parse_posix_id(value)
    report_problems(
        "group_gids",
        body,
        ()
        if gid is not None or value is None
        else [f"spec.gid {value!r} is not a group ID from 1 to {POSIX_ID_MAX}: the group grants no gid"],
    )
    return None if gid is None else {name: gid}


@kopf.on.event(GROUP, VERSION, "facilityusers")
async def on_directory_change(type: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    if type not in ("MODIFIED", "DELETED"):
        return  # a new FacilityUser takes nothing away
    reconciler: Reconciler = memo.reconciler
    for record in list(values(reconciler.environments)):
        phase = record.status.get("phase")
        if record.environment.owner == name and phase and not is_terminal(phase):
            await reconciler.reconcile(record, utcnow())
