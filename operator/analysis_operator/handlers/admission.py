"""Admission webhooks for AnalysisEnvironments: one mutating, one validating.

Served by kopf's webhook server (configured at startup, see lifecycle). The
validating webhook runs every check in turn, first refusal wins: who owns it
(here), which datasets and flavor the owner may use (handlers/datasets.py),
and whether the budget has room (engine/budget_gate.py, last: an admitted
create holds a slot in memory). One webhook instead of one per check: a
create costs the API server one call to the operator (two where the mutating
webhook is called too, see below), not four, which is what keeps admission fast
under a burst (bench/budget_race.py).

failurePolicy Fail (kopf's default): who created an object is known only at
admission, so while no replica answers, creates are refused rather than let
through unchecked. The data and budget checks are repeated at reconcile. The
identity checks are decided by the API server too (CEL admission policies,
deploy/authorization/identity-policy.yaml: owner defaulted, a spoofed owner
refused, created-by stamped), which hold with no replica running; here they are
the second line, and the first answer with a cause (NotOwner, spec.owner).

Every refusal is a `Refused` (infra/kopf_patches.py): besides the message, the
answer's status carries reason (Forbidden, Invalid) and details.causes, one
{reason, field, message} per problem, e.g. {reason: TooManyEnvironments, field:
spec.budget}, so a portal can map refusals to its own words without parsing text.
A server-side dry run (kubectl diff, Argo CD, a portal asking "may alice use this
card?") is decided exactly as the create would be and holds nothing.

Where the mutating webhook is called (below: the API server's policy could not stamp the
create) and the owner's budget has no room for it (or there is no budget, where one is
required), as far as the gate's memory shows, the mutating webhook makes every check of the
validating one itself (check_create: the same order, the same answer, the same Events) and
refuses: the API server then calls the operator once for that create, not twice, which is most
of what a burst of creates against a full budget costs (bench/budget_race.py, stop 41). It
holds nothing; a create it lets through (the budget's confirmation found a slot freed) is
decided again by the validating webhook, which holds the slot of a create it admits. It is
decided on the create as sent, with its owner: a later mutating webhook does not change that.
A create by generateName has no name yet when the mutating webhooks run, so only the validating
webhook decides it: a data refusal's Event must name the object.

The mutating webhook stamps the labels that make environments selectable (one
list call for "alice's environments" or "environments that mount dataset X"):
`analysis.panosc.eu/owner` and one `dataset.analysis.panosc.eu/<dataset>: "true"`
per dataset (see selection_labels); whatever the creator sent under those
prefixes is replaced, and on update the authorization policy
(deploy/authorization/policy.yaml) lets only the operator and admins change them.

The API server's mutating policy (deploy/authorization/identity-policy.yaml) runs before
this webhook and stamps the same owner, created-by and labels where CEL can: an owner and
dataset names that are labels as they are, no PID to resolve, a requester who may create for
that owner. The webhook is then not called at all (its matchConditions, match_conditions.yaml):
one call to the operator per create instead of two, half of what admission costs the operator
(bench/RESULTS.md, stop 57). What it alone can do (a PID resolved, a name hashed, a spoofed
owner refused with its cause) it is still called for; and the budget's refusal of such a
create comes from the validating webhook, still one call.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import kopf
import structlog
import yaml

from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.identity import DirectoryIdentities
from analysis_operator.engine.reconciler import utcnow
from analysis_operator.engine.terms import flavor_for
from analysis_operator.engine.views import first
from analysis_operator.handlers.datasets import check_data_access, pid_entry
from analysis_operator.infra.kopf_patches import Cause, Refused
from analysis_operator.model.domain import GROUP, LABEL_OWNER, VERSION, Environment, Flavor, label_text
from analysis_operator.policy.access import pid_key
from analysis_operator.policy.identity import owner_refusal, requester
from analysis_operator.policy.refusal import Refusal
from analysis_operator.policy.requests import backend_refusal, check_request

log = structlog.get_logger("analysis_operator.admission")
CREATED_BY = f"{GROUP}/created-by"


MATCH_CONDITIONS = pathlib.Path(__file__).resolve().parents[1] / "match_conditions.yaml"
DATASET_LABEL_PREFIX = f"dataset.{GROUP}/"


def dataset_label(dataset: str) -> str:
    """The label an environment that mounts Dataset `dataset` carries (value "true")."""
    return DATASET_LABEL_PREFIX + label_text(dataset)


def is_operator_label(key: str) -> bool:
    """analysis.panosc.eu/... or <anything>.analysis.panosc.eu/...: set by the operator only."""
    prefix, _, name = key.rpartition("/")
    return bool(name) and (prefix == GROUP or prefix.endswith("." + GROUP))


def selection_labels(owner: str, datasets: Iterable[str]) -> dict[str, str]:
    """The labels that select an environment by owner and by the datasets it mounts (pure)."""
    return {LABEL_OWNER: label_text(owner), **{dataset_label(name): "true" for name in datasets}}


def label_patch(current: Mapping[str, str], wanted: Mapping[str, str]) -> dict[str, str | None]:
    """A merge patch of metadata.labels: the operator's labels exactly `wanted`, the rest untouched."""
    patch: dict[str, str | None] = {key: None for key in current if is_operator_label(key) and key not in wanted}
    patch.update({key: value for key, value in wanted.items() if current.get(key) != value})
    return patch


def mounted_names(spec: Mapping[str, Any], dataset_pids: Mapping[str, Any]) -> list[str]:
    """The Dataset names spec.datasets refers to: by name, or by PID as the catalogue resolves it now
    (an unknown PID is refused by the validating webhook, which runs after this one)."""
    names = []
    for entry in spec.get("datasets") or ():
        if not isinstance(entry, Mapping):
            continue
        if entry.get("name"):
            names.append(str(entry["name"]))
        elif entry.get("pid"):
            found = list(dataset_pids.get(pid_key(str(entry["pid"])), ()))
            if len(found) == 1:
                names.append(str(found[0]))
    return names


async def confirmed_names(spec: Mapping[str, Any], dataset_pids: Mapping[str, Any], memo: kopf.Memo) -> list[str]:
    """mounted_names, with a PID the index does not resolve confirmed against the API server: the index
    may lag a Dataset created a moment ago, which the validating webhook finds all the same (it confirms
    before it refuses) and admits; without this its label would be missing."""
    names = mounted_names(spec, dataset_pids)
    given = [entry for entry in spec.get("datasets") or () if isinstance(entry, Mapping)]
    if len(names) == sum(1 for entry in given if entry.get("name") or entry.get("pid")):
        return names
    pids: dict[str, list[str]] = {}
    for body in await memo.context.kube.list_cluster_objects("datasets"):  # read as the index reads them
        for key, name in pid_entry(body["metadata"]["name"], body.get("spec") or {}).items():
            pids.setdefault(key, []).append(name)
    return mounted_names(spec, pids)


# The types the CRD's schema gives the spec fields (crds/analysisenvironments.yaml). The mutating webhook
# sees a create before the API server checks it against the schema.
SPEC_TYPES: dict[str, type] = {
    "owner": str,
    "flavor": str,
    "image": str,
    "datasets": list,
    "lifetime": str,
    "budget": str,
    "sharing": Mapping,
    "suspend": bool,
}


def misfits(spec: Mapping[str, Any]) -> list[str]:
    """The spec's fields whose type the schema refuses (pure): a list for spec.flavor, a number for
    spec.datasets, an entry of spec.datasets that is not an object. A null is no value (the API server
    drops it)."""
    wrong = [
        f"spec.{key}"
        for key, kind in SPEC_TYPES.items()
        if spec.get(key) is not None and not isinstance(spec.get(key), kind)
    ]
    datasets = spec.get("datasets")
    if isinstance(datasets, list) and not all(isinstance(entry, Mapping) for entry in datasets):
        wrong.append("spec.datasets")
    return wrong


def match_conditions() -> dict[str, list[dict[str, str]]]:
    """webhook id -> its matchConditions (match_conditions.yaml), as the chart registers them too."""
    return yaml.safe_load(MATCH_CONDITIONS.read_text())


@kopf.on.mutate(
    GROUP, VERSION, "analysisenvironments", id="environment-owner", operations={"CREATE"}, side_effects=True
)  # a create refused here for want of budget posts what a data refusal posts, not on dry runs
async def default_owner(
    spec: kopf.Spec,
    body: kopf.Body,
    patch: kopf.Patch,
    userinfo: dict[str, Any],
    memo: kopf.Memo,
    dataset_pids: kopf.Index,
    flavors: kopf.Index,
    environments: kopf.Index,
    name: str | None = None,
    namespace: str | None = None,
    **kwargs: Any,
) -> None:
    """No owner given: the requester owns it. The creator is kept as an annotation for audits, and
    the selection labels are stamped, replacing any the creator sent under the operator's prefixes.

    A spoofed owner is refused here already, the first step that can answer with a cause (NotOwner,
    spec.owner): the API server's own policy (deploy/authorization/identity-policy.yaml), which
    holds while no replica answers, runs after the mutating webhooks and answers with a sentence only.
    So is a create the budget has no room for, with every check (see the module's docstring).

    A field of the wrong type (a list for spec.flavor, a number for spec.datasets) is left for the
    schema, which the API server checks after the mutating webhooks: it refuses the create (422)
    naming the field. Nothing here reads such a field: a webhook's error is a 500 that names none."""
    wrong = misfits(spec)
    if wrong:
        log.info("admission.misfit", environment=f"{namespace}/{name}", fields=wrong)
        return
    owner = str(spec.get("owner") or "") or requester(userinfo, memo.config.admission)
    refusal = owner_refusal(owner, userinfo, memo.config.admission)
    if refusal is not None:
        refuse("admission.identity", namespace or "", name or "", spec, [refusal])
    # No room in the budget: decided before the patch is written, as kopf diffs the object for a
    # patch even when the answer is no.
    flavor: Flavor | None = first(flavors, spec.get("flavor"))
    gate: BudgetGate = memo.budget_gate
    where = (namespace or "", name or "")
    no_room = (
        None
        if flavor is None or not name  # generateName: named after the mutating webhooks, so the
        # validating one decides, whose Events can name the object (an Event needs an object's name)
        else gate.admit(*where, owner, str(spec.get("budget", "")), flavor, environments, utcnow(), hold=False)
    )
    if no_room is not None:
        await check_create(
            {**spec, "owner": owner},
            hold=False,
            refused=no_room,
            body=body,
            userinfo=userinfo,
            memo=memo,
            dataset_pids=dataset_pids,
            flavors=flavors,
            environments=environments,
            namespace=where[0],
            name=where[1],
            **kwargs,
        )
    if not spec.get("owner"):
        patch.setdefault("spec", {})["owner"] = owner
    metadata = patch.setdefault("metadata", {})
    metadata.setdefault("annotations", {})[CREATED_BY] = str(userinfo.get("username", ""))
    names = await confirmed_names(spec, dataset_pids, memo)
    labels = label_patch(dict(body.metadata.labels), selection_labels(owner, names))
    if labels:
        metadata["labels"] = labels


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
        await check_create(spec, **kwargs)
        return
    if old is None or dict(old.get("spec") or {}) == dict(spec):
        return  # metadata only (labels, finalizers, kopf's annotations): nothing for policy to say
    if (old.get("spec", {}).get("sharing") or {}) != (spec.get("sharing") or {}):
        check_owner(spec=spec, **kwargs)  # only the owner (or the portal acting for them) shares, not admins
        await check_sharing(spec=spec, **kwargs)
    check_request_terms(spec=spec, **kwargs)
    if old.get("spec", {}).get("datasets") != spec.get("datasets"):
        await check_datasets(spec=spec, **kwargs)


async def check_create(
    spec: Mapping[str, Any], hold: bool = True, refused: Refusal | None = None, **kwargs: Any
) -> None:
    """Every check of a create in turn, the first refusal wins: who owns it, whom it would run as,
    with whom it is shared, its flavor's backend and terms, its datasets, and last the budget (an
    admitted create holds a slot there, unless `hold` is False; `refused`: the budget's answer a
    moment ago, confirmed before it is given)."""
    check_owner(spec=spec, **kwargs)
    await check_posix_identity(spec=spec, **kwargs)
    await check_sharing(spec=spec, **kwargs)
    check_backend(spec=spec, **kwargs)  # not on update: one created before its backend was disabled may change
    check_request_terms(spec=spec, **kwargs)
    await check_datasets(spec=spec, **kwargs)
    await check_budget(spec=spec, hold=hold, refused=refused, **kwargs)


async def check_datasets(spec: Mapping[str, Any], **kwargs: Any) -> None:
    refusals = await check_data_access(spec=spec, **kwargs)
    if refusals:
        refuse("admission.data_access", kwargs["namespace"], kwargs["name"], spec, refusals)


def check_request_terms(
    body: kopf.Body, name: str, namespace: str, spec: Mapping[str, Any], memo: kopf.Memo, flavors: kopf.Index, **_: Any
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
    if refusal is not None:  # 422: the request's terms are invalid for this flavor
        refuse("admission.request", namespace, name, spec, [refusal], code=422)


def check_backend(
    name: str, namespace: str, spec: Mapping[str, Any], memo: kopf.Memo, flavors: kopf.Index, **_: Any
) -> None:
    """A flavor whose backend this operator does not run could never start: refused now, not left
    Pending. Decided from the operator's settings only, so every replica and a dry run say the same."""
    flavor: Flavor | None = first(flavors, spec.get("flavor"))
    refusal = backend_refusal(flavor, memo.context.backends) if flavor is not None else None
    if refusal is not None:
        refuse("admission.backend", namespace, name, spec, [refusal])


def check_owner(
    name: str, namespace: str, spec: Mapping[str, Any], userinfo: dict[str, Any], memo: kopf.Memo, **_: Any
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
        refuse("admission.identity", namespace, name, spec, [refusal], logged=True)


async def check_posix_identity(name: str, namespace: str, spec: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """The owner must have a usable FacilityUser (setting identity.require_posix_identity): whom it
    would run as is decided at start (engine/identity.py), and again on every reconcile."""
    identities: DirectoryIdentities = memo.identities
    refusal = await identities.admit(str(spec.get("owner", "")))
    if refusal is not None:
        refuse("admission.posix_identity", namespace, name, spec, [refusal])


async def check_sharing(
    body: kopf.Body, name: str, namespace: str, spec: Mapping[str, Any], memo: kopf.Memo, **_: Any
) -> None:
    """spec.sharing names known people only, each of whom may read every dataset it mounts."""
    environment = Environment.from_body(
        {"metadata": {"namespace": namespace, "name": name, "uid": body.metadata.get("uid") or ""}, "spec": dict(spec)}
    )
    if not (environment.shared_users or environment.shared_groups):
        return
    refusals = await memo.sharing.check(environment, utcnow())
    if refusals:
        refuse("admission.sharing", namespace, name, spec, refusals)


async def check_budget(
    body: kopf.Body,
    name: str,
    namespace: str,
    spec: Mapping[str, Any],
    dryrun: bool,
    memo: kopf.Memo,
    flavors: kopf.Index,
    environments: kopf.Index,
    hold: bool = True,
    refused: Refusal | None = None,
    **_: Any,
) -> None:
    """Last: an admitted create holds a slot for a while (engine/budget_gate.py); a dry run holds
    none, and nor does the mutating webhook's check (hold False), which only refuses."""
    flavor: Flavor | None = first(flavors, spec.get("flavor"))
    if flavor is None:
        return  # an unknown flavor is explained by the environment's status, which waits for it
    gate: BudgetGate = memo.budget_gate
    refusal = await gate.admit_checked(
        namespace,
        name,
        str(spec.get("owner", "")),
        str(spec.get("budget", "")),
        flavor,
        environments,
        utcnow(),
        hold=hold and not dryrun,
        uid=str(body.metadata.get("uid") or ""),
        refused=refused,
    )
    if refusal is not None:
        refuse("admission.budget", namespace, name, spec, [refusal])


# --- refusals: the reason, the field and the sentence -----------------------------------------------

# The field each reason concerns (datasets and sharing are narrowed to the entry, see field_of).
FIELDS = {
    "NotOwner": "spec.owner",
    "NoPosixIdentity": "spec.owner",
    "InvalidPosixIdentity": "spec.owner",
    "FlavorNotAllowed": "spec.flavor",
    "BackendNotEnabled": "spec.flavor",
    "LifetimeTooLong": "spec.lifetime",
    "CustomImageNotAllowed": "spec.image",
    "ImageMissing": "spec.image",
    "MountPathCollision": "spec.datasets",
    "DatasetListedTwice": "spec.datasets",
    "UnknownUser": "spec.sharing.users",
    "UnknownGroup": "spec.sharing.groups",
    "SharingNotAllowed": "spec.sharing",
}
DATASET_REASONS = frozenset(
    {"DatasetNotFound", "DatasetAmbiguous", "DatasetEmbargoed", "DatasetNotAvailable", "InvalidMountPath"}
)
# Which budget the environment draws on and whether it has room: spec.budget (empty: the owner's own).
BUDGET_FIELD = "spec.budget"


def field_of(refusal: Refusal, spec: Mapping[str, Any]) -> str:
    """The field of the request a refusal concerns, as precisely as the refusal says (pure)."""
    if refusal.reason in DATASET_REASONS:
        for index, entry in enumerate(spec.get("datasets") or ()):
            entry = entry if isinstance(entry, Mapping) else {}
            if refusal.subject and refusal.subject in (entry.get("name"), entry.get("pid")):
                if refusal.reason == "InvalidMountPath":
                    return f"spec.datasets[{index}].mountPath"
                return f"spec.datasets[{index}].{'name' if entry.get('name') else 'pid'}"
        return "spec.datasets"
    if refusal.reason in ("UnknownUser", "UnknownGroup", "SharingNotAllowed"):
        sharing = spec.get("sharing")
        for kind in ("users", "groups"):
            listed = [str(each) for each in (sharing.get(kind) if isinstance(sharing, Mapping) else None) or ()]
            if refusal.subject in listed and (refusal.reason != "UnknownGroup" or kind == "groups"):
                return f"spec.sharing.{kind}[{listed.index(refusal.subject)}]"
    return FIELDS.get(refusal.reason, BUDGET_FIELD)


def refused(refusals: Sequence[Refusal], spec: Mapping[str, Any], code: int = 403) -> Refused:
    """The admission answer for these refusals: every message, and one cause each (reason, field)."""
    message = "; ".join(dict.fromkeys(refusal.message for refusal in refusals))
    return Refused(
        message, [Cause(refusal.reason, field_of(refusal, spec), refusal.message) for refusal in refusals], code=code
    )


def refuse(
    event: str,
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    refusals: Sequence[Refusal],
    code: int = 403,
    logged: bool = False,
) -> NoReturn:
    """Log and answer a refusal (403: the request is understood, and not allowed; 422: its terms are
    invalid for the flavor); infra/metrics.py counts it from the answer's causes."""
    if not logged:
        log.info(
            event,
            environment=f"{namespace}/{name}",
            owner=spec.get("owner"),
            decision="refused",
            reason=refusals[0].reason,
        )
    raise refused(refusals, spec, code)
