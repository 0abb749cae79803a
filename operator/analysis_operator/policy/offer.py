"""What may this user do? The portal's question, answered by admission's own rules (pure).

For one user at one moment (`now`: the request's, so an embargo that ended a second ago is
read as ended), from the same policy functions admission and every reconcile call:
  - flavors: may a create of this card (no spec.budget, no datasets) be admitted? In the order
    admission refuses: the owner's POSIX identity (policy/identity.py), the card's backend
    enabled (`backend_refusal`), the card's access rule (`may_use_flavor`), then the
    budget such a create draws on (`admission_refusal`, with what admission counts as held);
  - datasets: may the user read each one now (`may_read`), until when is it embargoed, and
    which enabled backends can mount it (else DatasetNotAvailable for cards on the others);
  - budgets: the ones the user may draw on (their own, and those of their groups), with limits,
    used, remaining, and the cards each one would refuse now and why.
Each "no" is the Refusal admission would give: the same stable reason code and the same
sentence. The terms of one request (spec.lifetime up to the card's maxLifetime, spec.image
only where the card allows custom images) are the card's, shown beside it, and checked per
request; nothing here depends on them.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from analysis_operator.model.domain import EMBARGO_UNREADABLE, Dataset, Flavor, format_time
from analysis_operator.policy.access import StaticCatalogue, may_read, may_use_flavor, resolve
from analysis_operator.policy.budgets import RESOURCES, Budget, admission_refusal
from analysis_operator.policy.refusal import Refusal
from analysis_operator.policy.requests import backend_refusal, format_duration

EMPTY_CATALOGUE = StaticCatalogue()
# Why a backend cannot reach a dataset's storage (None: it can), by enabled backend kind.
Reaches = Mapping[str, Callable[[Dataset], "str | None"]]


@dataclass(frozen=True)
class BudgetUse:
    """A budget as admission counts it now: its ledger, and the environments and GPUs it holds
    (the ledger's live entries plus creates admitted a moment ago; engine/budget_gate.py)."""

    budget: Budget
    environments: int = 0
    gpus: int = 0


@dataclass(frozen=True)
class BudgetRule:
    """Which budget checks admission makes (settings.budgets)."""

    enforced: bool = True  # budgets.enabled and budgets.check_at_admission
    require_budget: bool = True  # an owner with no budget is refused (NoBudget)


@dataclass(frozen=True)
class FlavorOffer:
    flavor: Flavor
    refusal: Refusal | None
    budget: str = ""  # the budget a create of this card draws on ("" none)


@dataclass(frozen=True)
class DatasetOffer:
    dataset: Dataset
    grounds: str  # why it is readable ("public", "team member", ...); "" when it is not
    refusal: Refusal | None
    embargo_ends: datetime.datetime | None  # None: not (or no longer) embargoed, or an unreadable end
    backends: tuple[str, ...]  # enabled backends that can mount it


@dataclass(frozen=True)
class BudgetOffer:
    use: BudgetUse
    default: bool  # drawn on by a create that names no spec.budget
    refusals: Mapping[str, Refusal] = field(default_factory=dict)  # flavor name -> why not on this budget


@dataclass(frozen=True)
class Offer:
    user: str
    at: datetime.datetime
    identity: Refusal | None
    flavors: tuple[FlavorOffer, ...]
    datasets: tuple[DatasetOffer, ...]
    budgets: tuple[BudgetOffer, ...]
    budget_refusal: Refusal | None = None  # why a create naming no budget has none (NoBudget)
    unknown: tuple[Refusal, ...] = ()  # datasets asked for by a name no Dataset has (DatasetNotFound)


def budget_refusal(use: BudgetUse, flavor: Flavor, rule: BudgetRule, now: datetime.datetime) -> Refusal | None:
    """Admission's budget decision for one more environment of `flavor` on this budget."""
    if not rule.enforced:
        return None
    return admission_refusal(use.budget, flavor, use.environments, use.gpus, now)


def decide_flavor(
    flavor: Flavor,
    user: str,
    user_groups: frozenset[str],
    identity: Refusal | None,
    reaches: Reaches,
    default: BudgetUse | Refusal | None,
    rule: BudgetRule,
    now: datetime.datetime,
) -> FlavorOffer:
    """May `user` create an environment of `flavor` (no spec.budget, no datasets) now? First refusal wins."""
    budget_name = default.budget.name if isinstance(default, BudgetUse) else ""
    if identity is not None:
        return FlavorOffer(flavor, identity, budget_name)
    refusal = backend_refusal(flavor, reaches)
    if refusal is not None:
        return FlavorOffer(flavor, refusal, budget_name)
    verdict = may_use_flavor(flavor, user, user_groups)
    if isinstance(verdict, Refusal):
        return FlavorOffer(flavor, verdict, budget_name)
    if isinstance(default, Refusal):
        refused = rule.enforced and (default.reason != "NoBudget" or rule.require_budget)
        return FlavorOffer(flavor, default if refused else None)
    if default is None:
        return FlavorOffer(flavor, None)
    return FlavorOffer(flavor, budget_refusal(default, flavor, rule, now), budget_name)


def decide_dataset(
    dataset: Dataset, user: str, user_groups: frozenset[str], reaches: Reaches, now: datetime.datetime
) -> DatasetOffer:
    verdict = may_read(dataset, user, user_groups, now)
    embargoed = dataset.embargoed_until is not None and now < dataset.embargoed_until
    ends = dataset.embargoed_until if embargoed and dataset.embargoed_until != EMBARGO_UNREADABLE else None
    backends = tuple(sorted(kind for kind, reach in reaches.items() if reach(dataset) is None))
    if isinstance(verdict, Refusal):
        return DatasetOffer(dataset, "", verdict, ends, backends)
    return DatasetOffer(dataset, verdict, None, ends, backends)


def build_offer(
    user: str,
    user_groups: frozenset[str],
    identity: Refusal | None,
    flavors: Iterable[Flavor],
    datasets: Iterable[Dataset],
    default: BudgetUse | Refusal | None,
    others: Iterable[BudgetUse],
    reaches: Reaches,
    rule: BudgetRule,
    now: datetime.datetime,
    unknown: Iterable[str] = (),
) -> Offer:
    """The whole answer for one user. `default`: the budget a create naming none draws on (or why
    there is none: select_budget's refusal; None: budgets are not checked); `others`: the group
    budgets the user may name in spec.budget; `reaches`: the enabled backends."""
    flavor_list = sorted(flavors, key=lambda flavor: flavor.name)
    offered_flavors = tuple(
        decide_flavor(flavor, user, user_groups, identity, reaches, default, rule, now) for flavor in flavor_list
    )
    offered_datasets = tuple(
        decide_dataset(dataset, user, user_groups, reaches, now)
        for dataset in sorted(datasets, key=lambda dataset: dataset.name)
    )
    uses = [(default, True)] if isinstance(default, BudgetUse) else []
    uses += [
        (use, False)
        for use in sorted(others, key=lambda use: use.budget.name)
        if use.budget.name != default_name(default)
    ]
    budgets = tuple(
        BudgetOffer(
            use,
            is_default,
            {
                flavor.name: refusal
                for flavor in flavor_list
                if (refusal := budget_refusal(use, flavor, rule, now)) is not None
            },
        )
        for use, is_default in uses
    )
    no_budget = default if isinstance(default, Refusal) else None
    missing = tuple(Refusal("DatasetNotFound", resolve(name, "", EMPTY_CATALOGUE)[1], subject=name) for name in unknown)
    return Offer(user, now, identity, offered_flavors, offered_datasets, budgets, no_budget, missing)


def default_name(default: BudgetUse | Refusal | None) -> str:
    return default.budget.name if isinstance(default, BudgetUse) else ""


# ---------------------------------------------------------------- the JSON answer


def reason_of(refusal: Refusal) -> dict[str, str]:
    return {"reason": refusal.reason, "message": refusal.message}


def flavor_document(offer: FlavorOffer) -> dict[str, Any]:
    flavor = offer.flavor
    document: dict[str, Any] = {
        "name": flavor.name,
        "displayName": flavor.display_name or flavor.name,
        "backend": flavor.backend,
        "resources": {"cpu": flavor.resources.cpu, "memory": flavor.resources.memory, "gpu": flavor.resources.gpu},
        "maxLifetime": format_duration(flavor.max_lifetime),
        "allowCustomImage": flavor.allow_custom_image,
        "allowed": offer.refusal is None,
    }
    if offer.budget:
        document["budget"] = offer.budget
    if offer.refusal is not None:
        document.update(reason_of(offer.refusal))
    return document


def dataset_document(offer: DatasetOffer) -> dict[str, Any]:
    dataset = offer.dataset
    document: dict[str, Any] = {
        "name": dataset.name,
        "pid": dataset.pid,
        "title": dataset.title,
        "readable": offer.refusal is None,
        "embargoEnds": format_time(offer.embargo_ends) if offer.embargo_ends else None,
        "backends": list(offer.backends),
    }
    if offer.refusal is None:
        document["grounds"] = offer.grounds
    else:
        document.update(reason_of(offer.refusal))
    return document


def budget_document(offer: BudgetOffer) -> dict[str, Any]:
    budget = offer.use.budget
    limits = {
        key: limit
        for key in ("cpuHours", "gpuHours", "maxEnvironments", "maxGpus")
        if (limit := budget.limit(key)) is not None
    }
    used: dict[str, float] = {key: round(budget.used(key), 6) for key in RESOURCES}
    used.update(environments=offer.use.environments, gpus=offer.use.gpus)
    held = {"maxEnvironments": "environments", "maxGpus": "gpus"}
    remaining = {
        held.get(key, key): round(max(0.0, limit - used[held.get(key, key)]), 6) for key, limit in limits.items()
    }
    document: dict[str, Any] = {
        "name": budget.name,
        "default": offer.default,
        "limits": limits,
        "used": used,
        "remaining": remaining,
        "validUntil": format_time(budget.valid_until) if budget.valid_until else None,
        "refuses": [{"flavor": name, **reason_of(refusal)} for name, refusal in sorted(offer.refusals.items())],
    }
    document["user" if budget.user else "group"] = budget.user or budget.group
    return document


def offer_document(offer: Offer) -> dict[str, Any]:
    """The answer of GET /api/v1/offer (README: "For the portal: what may this user do?")."""
    document: dict[str, Any] = {
        "user": offer.user,
        "at": format_time(offer.at),
        "identity": {"usable": offer.identity is None, **(reason_of(offer.identity) if offer.identity else {})},
        "flavors": [flavor_document(each) for each in offer.flavors],
        "datasets": [dataset_document(each) for each in offer.datasets]
        + [{"name": refusal.subject, "readable": False, **reason_of(refusal)} for refusal in offer.unknown],
        "budgets": [budget_document(each) for each in offer.budgets],
    }
    if offer.budget_refusal is not None:
        document["budget"] = reason_of(offer.budget_refusal)
    return document
