"""Admission webhooks for AnalysisEnvironments: one mutating, one validating.

Served by kopf's webhook server (configured at startup, see lifecycle). The
validating webhook runs every check in turn, first refusal wins: who owns it
(here), which datasets and flavor the owner may use (handlers/datasets.py),
and whether the budget has room (engine/budget_gate.py, last: an admitted
create holds a slot in memory). One webhook instead of one per check: each
create costs the API server two calls to the operator, not four, which is
what keeps admission fast under a burst (bench/budget_race.py).

failurePolicy Fail (kopf's default): who created an object is known only at
admission, so while no replica answers, creates are refused rather than let
through unchecked. The data and budget checks are repeated at reconcile.
"""

from __future__ import annotations

from typing import Any, NoReturn

import kopf
import structlog

from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.identity import DirectoryIdentities
from analysis_operator.engine.reconciler import utcnow
from analysis_operator.engine.terms import flavor_for
from analysis_operator.engine.views import first
from analysis_operator.handlers.datasets import check_data_access
from analysis_operator.infra import metrics
from analysis_operator.model.domain import GROUP, VERSION, Environment, Flavor
from analysis_operator.policy.identity import owner_refusal, requester
from analysis_operator.policy.refusal import Refusal
from analysis_operator.policy.requests import check_request

log = structlog.get_logger("analysis_operator.admission")
CREATED_BY = f"{GROUP}/created-by"


@kopf.on.mutate(GROUP, VERSION, "analysisenvironments", id="environment-owner", operations={"CREATE"})
def default_owner(spec: kopf.Spec, patch: kopf.Patch, userinfo: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """No owner given: the requester owns it. The creator is kept as an annotation for audits."""
    if not spec.get("owner"):
        patch.setdefault("spec", {})["owner"] = requester(userinfo, memo.config.admission)
    patch.setdefault("metadata", {}).setdefault("annotations", {})[CREATED_BY] = str(userinfo.get("username", ""))


@kopf.on.validate(
    GROUP,
    VERSION,
    "analysisenvironments",
    id="environment-admission",
    operations={"CREATE", "UPDATE"},
    side_effects=True,
)  # a data refusal posts an Event, not on dry runs
async def admit_environment(operation: str, old: kopf.Body | None, spec: kopf.Spec, **kwargs: Any) -> None:
    """CREATE: every check. UPDATE (who may change it at all is the API server's authorization policy,
    deploy/authorization): a changed spec must still be one policy accepts, so a lifetime above the
    flavor's limit is refused here instead of being accepted and acted on later."""
    if operation == "CREATE":
        check_owner(spec=spec, **kwargs)
        await check_posix_identity(spec=spec, **kwargs)
    elif old is None or dict(old.get("spec") or {}) == dict(spec):
        return  # metadata only (labels, finalizers, kopf's annotations): nothing for policy to say
    sharing = spec.get("sharing") or {}
    if operation == "CREATE" or (old is not None and (old.get("spec", {}).get("sharing") or {}) != sharing):
        if operation == "UPDATE":  # only the owner (or the portal acting for them) shares, not admins
            check_owner(spec=spec, **kwargs)
        await check_sharing(spec=spec, **kwargs)
    check_request_terms(spec=spec, **kwargs)
    if operation == "CREATE" or (old is not None and old.get("spec", {}).get("datasets") != spec.get("datasets")):
        await check_data_access(spec=spec, **kwargs)
    if operation == "CREATE":
        await check_budget(spec=spec, **kwargs)


def check_request_terms(
    body: kopf.Body, name: str, namespace: str, spec: kopf.Spec, memo: kopf.Memo, flavors: kopf.Index, **_: Any
) -> None:
    """Lifetime and image against the flavor: the terms the environment started with, once started."""
    environment = Environment.from_body(
        {"metadata": {"namespace": namespace, "name": name, "uid": body.metadata.get("uid") or ""}, "spec": dict(spec)}
    )
    flavor = flavor_for(environment, body.get("status") or {}, flavors)
    if flavor is None:
        return  # an unknown flavor is explained by the environment's status, which waits for it
    backend = memo.context.backends.get(flavor.backend)
    refusal = check_request(environment, flavor) or (backend.validate(environment, flavor) if backend else None)
    if refusal is not None:
        log.info("admission.request", environment=f"{namespace}/{name}", decision="refused", reason=refusal.reason)
        raise kopf.AdmissionError(refusal.message, code=422)


def check_owner(
    name: str, namespace: str, spec: kopf.Spec, userinfo: dict[str, Any], memo: kopf.Memo, **_: Any
) -> None:
    refusal = owner_refusal(str(spec.get("owner", "")), userinfo, memo.config.admission)
    log.info(
        "admission.identity",
        environment=f"{namespace}/{name}",
        owner=spec.get("owner"),
        requester=userinfo.get("username"),
        decision="refused" if refusal else "allowed",
        reason=refusal.reason if refusal else None,
    )
    if refusal:
        raise kopf.AdmissionError(refusal.message, code=403)


async def check_posix_identity(name: str, namespace: str, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    """The owner must have a usable FacilityUser (setting identity.require_posix_identity): whom it
    would run as is decided at start (engine/identity.py), and again on every reconcile."""
    identities: DirectoryIdentities = memo.identities
    refusal = await identities.admit(str(spec.get("owner", "")))
    if refusal is not None:
        refuse("admission.posix_identity", namespace, name, spec, refusal)


async def check_sharing(body: kopf.Body, name: str, namespace: str, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    """spec.sharing names known people only, each of whom may read every dataset it mounts."""
    environment = Environment.from_body(
        {"metadata": {"namespace": namespace, "name": name, "uid": body.metadata.get("uid") or ""}, "spec": dict(spec)}
    )
    if not (environment.shared_users or environment.shared_groups):
        return
    refusals = await memo.sharing.check(environment, utcnow())
    if refusals:
        refusal = refusals[0]
        message = "; ".join(each.message for each in refusals)
        refuse("admission.sharing", namespace, name, spec, Refusal(refusal.reason, message, subject=refusal.subject))


async def check_budget(
    name: str, namespace: str, spec: kopf.Spec, memo: kopf.Memo, flavors: kopf.Index, environments: kopf.Index, **_: Any
) -> None:
    flavor: Flavor | None = first(flavors, spec.get("flavor"))
    if flavor is None:
        return  # an unknown flavor is explained by the environment's status, which waits for it
    gate: BudgetGate = memo.budget_gate
    refusal = gate.admit(
        namespace, name, str(spec.get("owner", "")), str(spec.get("budget", "")), flavor, environments, utcnow()
    )
    if refusal is not None:
        refuse("admission.budget", namespace, name, spec, refusal)


def refuse(event: str, namespace: str, name: str, spec: kopf.Spec, refusal: Refusal) -> NoReturn:
    """Count, log and answer a refusal (403: the request is understood, and not allowed)."""
    metrics.ADMISSION_REFUSALS.labels(reason=refusal.reason, stage="admission").inc()
    log.info(
        event, environment=f"{namespace}/{name}", owner=spec.get("owner"), decision="refused", reason=refusal.reason
    )
    raise kopf.AdmissionError(refusal.message, code=403)
