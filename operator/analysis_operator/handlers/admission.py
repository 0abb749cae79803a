"""Admission webhooks for AnalysisEnvironments: who owns it.

Served by kopf's webhook server (configured at startup, see lifecycle). The
data-permission and budget webhooks live next to their resources
(handlers/datasets.py, handlers/budgets.py); each is its own webhook, so
the API server asks them all and shows the first refusal.
"""
from __future__ import annotations

from typing import Any

import kopf
import structlog

from analysis_operator.domain import GROUP, VERSION
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


@kopf.on.validate(GROUP, VERSION, "analysisenvironments", id="environment-identity", operation="CREATE")
def check_owner(name: str, namespace: str, spec: kopf.Spec, userinfo: dict[str, Any], memo: kopf.Memo,
                **_: Any) -> None:
    refusal = owner_refusal(str(spec.get("owner", "")), userinfo, memo.config.admission)
    log.info("admission.identity", environment=f"{namespace}/{name}", owner=spec.get("owner"),
             requester=userinfo.get("username"), decision="refused" if refusal else "allowed", reason=refusal)
    if refusal:
        raise kopf.AdmissionError(refusal, code=403)
