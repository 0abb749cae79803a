"""Dataset and FacilityGroup handlers: the catalogue indexes, the admission check of
data permissions, and revocation when the catalogue changes.

The decisions are in policy/access.py; the reconcile side in engine/data_access.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.data_access import DataAccess, IndexCatalogue, affected, audit
from analysis_operator.engine.events import post_event
from analysis_operator.engine.reconciler import Reconciler, utcnow
from analysis_operator.engine.viewers import affected_by_catalogue
from analysis_operator.engine.views import first, values
from analysis_operator.handlers.indexes import never_raises, report_problems
from analysis_operator.model.domain import API_VERSION, GROUP, VERSION, Dataset, Environment
from analysis_operator.policy.access import pid_key
from analysis_operator.policy.refusal import Refusal


@kopf.index(GROUP, VERSION, "datasets")
@never_raises("datasets")
def datasets(name: str, spec: Mapping[str, Any], body: kopf.Body, **_: Any) -> dict[str, Dataset]:
    """Dataset name -> Dataset; one whose embargo end cannot be read is kept, closed (model/domain.py)."""
    dataset = Dataset.from_body(name, spec)
    report_problems("datasets", body, [dataset.problem] if dataset.problem else [])
    return {name: dataset}


@kopf.index(GROUP, VERSION, "datasets")
@never_raises("dataset_pids")
def dataset_pids(name: str, spec: Mapping[str, Any], **_: Any) -> dict[str, str]:
    """PID (in its compared form) -> Dataset name, for references by PID."""
    return pid_entry(name, spec)


def pid_entry(name: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """A Dataset's entry in the PID index (also read from the API server by the mutating webhook)."""
    return {pid_key(str(spec.get("pid", ""))): name}


async def check_data_access(
    body: kopf.Body,
    name: str,
    namespace: str,
    spec: Mapping[str, Any],
    dryrun: bool,
    userinfo: dict[str, Any],
    memo: kopf.Memo,
    flavors: kopf.Index,
    **_: Any,
) -> tuple[Refusal, ...]:
    """Datasets the owner may not read, bad mount paths, a flavor the owner may not use: the refusals
    (none: allowed), each posted as a Warning Event except on dry runs; the caller refuses the request."""
    environment = Environment.from_body(
        {"metadata": {"namespace": namespace, "name": name, "uid": body.metadata.get("uid") or ""}, "spec": dict(spec)}
    )
    flavor = first(flavors, environment.flavor)  # unknown flavor: not refused here, the environment waits
    backend = memo.context.backends.get(flavor.backend) if flavor is not None else None
    access: DataAccess = memo.access
    plan = await access.plan(environment, flavor, utcnow(), backend.dataset_problem if backend else None)
    audit(environment, plan, stage="admission", requester=userinfo.get("username"), dry_run=dryrun)
    if plan.allowed:
        return ()
    if not dryrun:
        involved = {
            "apiVersion": API_VERSION,
            "kind": "AnalysisEnvironment",
            "metadata": {"namespace": namespace, "name": name},
        }
        for refusal in plan.refusals:
            await post_event(
                memo.context.kube, involved, "Warning", refusal.reason, f"refused at admission: {refusal.message}"
            )
    return plan.refusals


@kopf.on.event(GROUP, VERSION, "datasets")
@kopf.on.event(GROUP, VERSION, "facilitygroups")
@kopf.on.event(GROUP, VERSION, "environmentflavors")
async def on_catalogue_change(type: str, memo: kopf.Memo, **_: Any) -> None:
    """A Dataset, group or flavor changed or went: stop the environments that lost access now, to
    data, to a flavor, or to the group budget they run on (its FacilityGroup lost their owner)."""
    if type not in ("MODIFIED", "DELETED"):
        return  # something new grants, never withdraws
    moment = utcnow()
    reconciler: Reconciler = memo.reconciler
    catalogue: IndexCatalogue = memo.access.catalogue
    gate: BudgetGate = memo.budget_gate
    viewers = getattr(memo, "viewers", None)  # with the gateway on: open connections of people refused now
    for record in list(values(reconciler.environments)):
        if affected(record, reconciler.flavors, catalogue, moment) or gate.withdrawn(record):
            await reconciler.reconcile(record, moment)
        elif viewers is not None and affected_by_catalogue(record):  # who may open it may have changed
            viewers.soon(record.environment.namespace, record.environment.name)
