"""BudgetRequests: the "request more" flow. Who asked and who decided come from the
authenticated requests (webhooks); an approval is carried out exactly once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import kopf
import structlog

from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.converge import expiry
from analysis_operator.engine.ledger import BUDGETS
from analysis_operator.engine.reconciler import utcnow
from analysis_operator.engine.terms import flavor_for
from analysis_operator.engine.views import first, member_of
from analysis_operator.infra.kopf_patches import Cause, Refused
from analysis_operator.model.domain import GROUP, VERSION, format_time, parse_duration, parse_time
from analysis_operator.policy.budgets import Budget, apply_grant
from analysis_operator.policy.identity import is_trusted, requester
from analysis_operator.policy.refusal import Refusal
from analysis_operator.policy.requests import filing_refusal, format_duration, requested_for

log = structlog.get_logger("analysis_operator.requests")
REQUESTS = "budgetrequests"
REQUESTED_BY = f"{GROUP}/requested-by"  # the scientist the request is for (stamped)
FILED_BY = f"{GROUP}/filed-by"  # who sent it: the scientist, or the portal acting for them (stamped)
ON_BEHALF_OF = f"{GROUP}/on-behalf-of"  # set by the portal: the scientist it files for
ON_BEHALF_OF_FIELD = f"metadata.annotations[{ON_BEHALF_OF}]"
REQUEST_FIELDS = {  # the field each filing refusal concerns (policy/requests.filing_refusal)
    "BudgetNotFound": "spec.budget",
    "NotBudgetMember": "spec.budget",
    "EnvironmentNotFound": "spec.environment",
    "NotEnvironmentOwner": "spec.environment",
}


# Two calls per create: the mutating one stamps who the request is for (and refuses a misused
# on-behalf-of, which nothing later could tell); the validating one, after schema validation (so a
# malformed spec gets the schema's words first), decides whether that person may file it.
@kopf.on.mutate(GROUP, VERSION, REQUESTS, id="budgetrequest-requester", operations={"CREATE"})
async def stamp_requester(
    body: kopf.Body,
    namespace: str,
    patch: kopf.Patch,
    userinfo: dict[str, Any],
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """requested-by: the scientist the request is for (the requester, or the user the portal names in
    on-behalf-of); filed-by: who sent it. Whatever the sender wrote under either is replaced."""
    settings = memo.config.admission
    on_behalf_of = str(body.metadata.annotations.get(ON_BEHALF_OF) or "")
    scientist = requested_for(on_behalf_of, requester(userinfo, settings), is_trusted(userinfo, settings))
    if isinstance(scientist, Refusal):
        refuse_request(namespace, body, scientist, ON_BEHALF_OF_FIELD)
    annotations = patch.setdefault("metadata", {}).setdefault("annotations", {})
    annotations.update({REQUESTED_BY: scientist, FILED_BY: str(userinfo.get("username", ""))})


@kopf.on.validate(GROUP, VERSION, REQUESTS, id="budgetrequest-filing", operations={"CREATE"})
async def check_filing(
    spec: kopf.Spec,
    body: kopf.Body,
    namespace: str,
    userinfo: dict[str, Any],
    memo: kopf.Memo,
    environments: kopf.Index,
    **_: Any,
) -> None:
    """Only a member of the budget (or the portal for one) may ask to raise it, only an environment's
    owner (or the portal for them) may ask to run it longer. The scientist is the one stamped above."""
    scientist = str(body.metadata.annotations.get(REQUESTED_BY) or "")
    refusal = await _filing_refusal(memo, namespace, spec, scientist, environments)
    if refusal is not None:
        refuse_request(namespace, body, refusal, REQUEST_FIELDS[refusal.reason])
    log.info(
        "budget_request.filed",
        request=f"{namespace}/{body.metadata.get('name') or body.metadata.get('generateName')}",
        requested_by=scientist,
        filed_by=userinfo.get("username"),
    )


async def _filing_refusal(
    memo: kopf.Memo, namespace: str, spec: Mapping[str, Any], scientist: str, environments: kopf.Index
) -> Refusal | None:
    """Why `scientist` may not file this request (None: they may), from the operator's indexes."""
    budget_name = str(spec.get("budget") or "")
    views = memo.budget_gate.ledger.views
    budget = first(views.budgets, budget_name) if budget_name else None
    if budget_name and budget is None:  # the index may lag a budget created a moment ago
        found = await memo.context.kube.get_cluster_object(BUDGETS, budget_name)
        budget = Budget.from_body(found) if found else None
    environment_owner = None
    if spec.get("environment"):
        record = first(environments, (namespace, str(spec["environment"])))
        if record is not None:
            environment_owner = record.environment.owner
        else:  # the index may lag an environment created a moment ago
            found = await memo.context.kube.get_environment(namespace, str(spec["environment"]))
            environment_owner = str(((found or {}).get("spec") or {}).get("owner") or "")
    return filing_refusal(
        scientist, budget_name, budget, lambda group, user: member_of(views.groups, group, user), environment_owner
    )


async def _target_uid(memo: kopf.Memo, namespace: str, spec: Mapping[str, Any], environments: kopf.Index) -> str:
    """The uid of the environment a lifetime request is about, as it is now ("" for none)."""
    if not spec.get("environment"):
        return ""
    record = first(environments, (namespace, str(spec["environment"])))
    if record is not None:
        return record.environment.uid
    found = await memo.context.kube.get_environment(namespace, str(spec["environment"]))
    return str(((found or {}).get("metadata") or {}).get("uid") or "")


def _replaced(environment: Mapping[str, Any], request: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """Why an approved lifetime may not go to `environment` (its body, as the API server has it now; pure):
    not the one the request was filed about (deleted and created again under its name since, by its owner
    with another flavor or by someone else in the namespace: another uid than the one recorded at filing,
    or created after the request, which also covers a request filed before the uid was recorded), or no
    longer owned by whom the request is for. "" when it may."""
    metadata = environment.get("metadata") or {}
    filed_about = str(status.get("environmentUid") or "")
    created, asked = parse_time(metadata.get("creationTimestamp")), parse_time(request.get("creationTimestamp"))
    if (filed_about and filed_about != metadata.get("uid")) or (created and asked and created > asked):
        return "was deleted and created again since this request was filed: nothing extended (file a new request)"
    owner = str((environment.get("spec") or {}).get("owner") or "")
    scientist = str((request.get("annotations") or {}).get(REQUESTED_BY) or "")
    if scientist and owner != scientist:
        return f"belongs to {owner}, not to {scientist} who asked: nothing extended"
    return ""


def refuse_request(namespace: str, body: kopf.Body, refusal: Refusal, field: str) -> NoReturn:
    log.info(
        "budget_request.refused",
        request=f"{namespace}/{body.metadata.get('name') or body.metadata.get('generateName')}",
        reason=refusal.reason,
        field=field,
    )
    raise Refused(refusal.message, [Cause(refusal.reason, field, refusal.message)], code=403)


# failurePolicy Fail (the default): without the operator no decision can be stamped, so none is accepted.
@kopf.on.mutate(GROUP, VERSION, REQUESTS, id="budgetrequest-decision", operations={"UPDATE"}, subresource="status")
async def stamp_decision(
    status: kopf.Status, old: Mapping[str, Any] | None, patch: kopf.Patch, userinfo: dict[str, Any], **_: Any
) -> None:
    """Who decided and when come from the authenticated request, never from the writer."""
    before = dict((old or {}).get("status") or {})
    if status.get("decision") and not before.get("decision"):
        patch.setdefault("status", {}).update(
            decidedBy=str(userinfo.get("username", "")), decidedAt=format_time(utcnow())
        )
    elif before.get("decision"):
        patch.setdefault("status", {}).update(decidedBy=before.get("decidedBy"), decidedAt=before.get("decidedAt"))


@kopf.on.validate(GROUP, VERSION, REQUESTS, id="budgetrequest-final", operations={"UPDATE"}, subresource="status")
async def check_decision(status: kopf.Status, old: Mapping[str, Any] | None, **_: Any) -> None:
    before = dict((old or {}).get("status") or {})
    if before.get("decision") and status.get("decision") != before["decision"]:
        message = (
            f"this request was already {before['decision'].lower()} by "
            f"{before.get('decidedBy')} at {before.get('decidedAt')}; decisions are final: "
            f"create a new BudgetRequest"
        )
        raise Refused(message, [Cause("DecisionFinal", "status.decision", message)], code=403)


@kopf.on.event(GROUP, VERSION, REQUESTS)
async def on_request(
    type: str, body: kopf.Body, memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index, **_: Any
) -> None:
    """Carry out a decision exactly once: the grant is keyed by the request's uid in the target's
    status, so a restart between the grant and `phase: Applied` repeats nothing."""
    status = body.get("status") or {}
    if type == "DELETED" or status.get("phase") in ("Applied", "Denied", "Invalid"):
        return
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    decision = status.get("decision")
    if not decision:
        if not status.get("phase"):
            # Decided again here: a request created while no webhook answered (the API server's
            # policy checked only whom it names) never had its filing checked.
            scientist = str(body["metadata"].get("annotations", {}).get(REQUESTED_BY) or "")
            refusal = await _filing_refusal(memo, namespace, body.get("spec") or {}, scientist, environments)
            if refusal is not None:
                update = {"phase": "Invalid", "message": f"{refusal.reason}: {refusal.message}"}
                log.info("budget_request.refused", request=f"{namespace}/{name}", reason=refusal.reason)
            else:
                update = {"phase": "Pending", "message": "waiting for an administrator's decision"}
                target = await _target_uid(memo, namespace, body.get("spec") or {}, environments)
                if target:  # the environment asked about, not whichever has its name when it is decided
                    update["environmentUid"] = target
            await memo.context.kube.patch_namespaced_status(REQUESTS, namespace, name, update)
        return
    if decision == "Denied":
        update = {"phase": "Denied", "message": f"denied by {status.get('decidedBy')}"}
    else:
        update = await _grant(memo, body, status, environments, flavors)
    await memo.context.kube.patch_namespaced_status(
        REQUESTS, namespace, name, {**update, "appliedAt": format_time(utcnow())}
    )
    log.info(
        "budget_request.decided",
        request=f"{namespace}/{name}",
        decision=decision,
        phase=update["phase"],
        decided_by=status.get("decidedBy"),
    )


async def _grant(
    memo: kopf.Memo, body: kopf.Body, status: Mapping[str, Any], environments: kopf.Index, flavors: kopf.Index
) -> dict[str, str]:
    spec, metadata = body.get("spec") or {}, body["metadata"]
    request = f"{metadata['namespace']}/{metadata['name']}"
    decided = (str(status.get("decidedBy", "")), str(status.get("decidedAt", "")))
    messages = []
    checked = ""  # the uid of the environment the lifetime goes to, as checked
    if spec.get("environment") and spec.get("lifetime"):  # before any grant: an Invalid request grants nothing
        found = await memo.context.kube.get_environment(metadata["namespace"], str(spec["environment"]))
        checked = str(((found or {}).get("metadata") or {}).get("uid") or "")
        replaced = _replaced(found, metadata, status) if found is not None else ""
        if replaced:
            return {"phase": "Invalid", "message": f"AnalysisEnvironment {spec['environment']!r} {replaced}"}
    if spec.get("budget") and any((spec.get("add") or {}).values()):
        gate: BudgetGate = memo.budget_gate
        moment = utcnow()
        written = await gate.ledger.update(
            spec["budget"],
            lambda budget: apply_grant(budget, metadata["uid"], request, spec["add"], *decided, moment) or "already",
        )
        if written is None:
            return {"phase": "Invalid", "message": f"ComputeBudget {spec['budget']!r} does not exist"}
        raised = ", ".join(f"{key} +{value:g}" for key, value in sorted(dict(spec["add"]).items()) if value)
        messages.append(f"ComputeBudget {spec['budget']!r} raised: {raised}")
    if spec.get("environment") and spec.get("lifetime"):
        record = first(environments, (metadata["namespace"], spec["environment"]))
        flavor = record and flavor_for(record.environment, record.status, flavors)
        if record is None or flavor is None or record.environment.uid != checked:
            return {"phase": "Invalid", "message": f"AnalysisEnvironment {spec['environment']!r} does not exist"}
        extensions = {**(record.status.get("lifetimeExtensions") or {}), metadata["uid"]: spec["lifetime"]}
        _, expires_at = expiry(
            record.environment, flavor, {**record.status, "lifetimeExtensions": extensions}, utcnow()
        )
        await memo.context.kube.patch_environment_status(
            metadata["namespace"],
            spec["environment"],
            {"lifetimeExtensions": extensions, "expiresAt": format_time(expires_at)},
        )
        added = format_duration(parse_duration(str(spec["lifetime"])))
        messages.append(f"lifetime of {spec['environment']!r} extended by {added}")
    return {"phase": "Applied", "message": "; ".join(messages) or "nothing to apply"}
