"""Admission webhooks for AnalysisEnvironments: one mutating, one validating.

Served by kopf's webhook server (configured at startup, see lifecycle). The
validating webhook runs every check in turn, first refusal wins: who owns it
(here), which datasets and flavor the owner may use (handlers/datasets.py),
and whether the budget has room (handlers/budgets.py, last: an admitted
create holds a slot in memory). One webhook instead of one per check: each
create costs the API server two calls to the operator, not four, which is
what keeps admission fast under a burst (bench/budget_race.py).

failurePolicy Fail (kopf's default): who created an object is known only at
admission, so while no replica answers, creates are refused rather than let
through unchecked. The data and budget checks are repeated at reconcile.
"""
from __future__ import annotations

from typing import Any

import kopf
import structlog

from analysis_operator.domain import GROUP, VERSION
from analysis_operator.handlers.budgets import check_budget
from analysis_operator.handlers.datasets import check_data_access
from analysis_operator.policy.identity import owner_refusal, requester

log = structlog.get_logger("analysis_operator.admission")
CREATED_BY = f"{GROUP}/created-by"


@kopf.on.mutate(GROUP, VERSION, "analysisenvironments", id="environment-owner", operation="CREATE")
def default_owner(spec: kopf.Spec, patch: kopf.Patch, userinfo: dict[str, Any], memo: kopf.Memo,
                  **_: Any) -> None:
    """No owner given: the requester owns it. The creator is kept as an annotation for audits."""
    if not spec.get("owner"):
        patch.setdefault("spec", {})["owner"] = requester(userinfo, memo.config.admission)
    patch.setdefault("metadata", {}).setdefault("annotations", {})[CREATED_BY] = str(userinfo.get("username", ""))


@kopf.on.validate(GROUP, VERSION, "analysisenvironments", id="environment-admission", operation="CREATE",
                  side_effects=True)  # a data refusal posts an Event, except on dry runs
async def admit_environment(**kwargs: Any) -> None:
    check_owner(**kwargs)
    await check_data_access(**kwargs)
    await check_budget(**kwargs)


def check_owner(name: str, namespace: str, spec: kopf.Spec, userinfo: dict[str, Any], memo: kopf.Memo,
                **_: Any) -> None:
    refusal = owner_refusal(str(spec.get("owner", "")), userinfo, memo.config.admission)
    log.info("admission.identity", environment=f"{namespace}/{name}", owner=spec.get("owner"),
             requester=userinfo.get("username"), decision="refused" if refusal else "allowed", reason=refusal)
    if refusal:
        raise kopf.AdmissionError(refusal, code=403)
