"""Is an environment request acceptable for its flavor, and may a BudgetRequest be filed? (pure)"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Collection

from analysis_operator.model.domain import Environment, Flavor
from analysis_operator.policy.budgets import Budget
from analysis_operator.policy.refusal import Refusal


def format_duration(delta: datetime.timedelta) -> str:
    """8h, 1h30m, 8h0m30s: the CRD's duration syntax, exact to the second."""
    hours, rest = divmod(int(delta.total_seconds()), 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{hours}h" if hours else ""
    if minutes or seconds:
        text += f"{minutes}m"
    if seconds:
        text += f"{seconds}s"
    return text or "0s"


def check_request(environment: Environment, flavor: Flavor) -> Refusal | None:
    """What every backend requires alike; a backend adds its own checks (Backend.validate)."""
    if environment.image and not flavor.allow_custom_image:
        return Refusal(
            "CustomImageNotAllowed",
            f"flavor {flavor.name!r} does not allow custom images: remove spec.image "
            f"or choose a flavor with allowCustomImage: true",
        )
    if environment.lifetime is not None and environment.lifetime > flavor.max_lifetime:
        return Refusal(
            "LifetimeTooLong",
            f"spec.lifetime {format_duration(environment.lifetime)} is longer than flavor {flavor.name!r} allows "
            f"({format_duration(flavor.max_lifetime)}): ask for at most that",
        )
    return None


# What each shipped backend runs, in the words of the people who choose a flavor.
_BACKEND_WORDS = {
    "kubernetes": "JupyterLab on the facility's Kubernetes cluster",
    "slurm": "a batch job on the facility's Slurm cluster",
    "openstack": "a virtual machine in the facility's OpenStack cloud",
}


def backend_refusal(flavor: Flavor, enabled: Collection[str]) -> Refusal | None:
    """A flavor whose backend this operator does not run: nothing of it could ever start (pure).
    The same answer on every replica and for dry runs: it depends on the operator's settings only."""
    backend = str(flavor.backend)
    if backend in enabled:
        return None
    runs = _BACKEND_WORDS.get(backend, f"the {backend!r} backend")
    return Refusal(
        "BackendNotEnabled",
        f"flavor {flavor.name!r} runs {runs}, which is not offered here at the moment: choose another "
        f"flavor (ask the facility's IT if you need this one: the operator's {backend} backend is not enabled)",
        subject=flavor.name,
    )


# --------------------------------------------------------------------- BudgetRequests: who files for whom


def requested_for(on_behalf_of: str, me: str, trusted: bool) -> str | Refusal:
    """The scientist a BudgetRequest is filed for (pure): the requester themselves, or, for a trusted
    identity (the portal), the user it names in the on-behalf-of annotation. Anyone else naming
    another user is refused: a request records who asked, and only the portal asks for others."""
    if not on_behalf_of or on_behalf_of == me:
        return me
    if trusted:
        return on_behalf_of
    return Refusal(
        "NotOwner",
        f"you ({me!r}) may not file a request on behalf of {on_behalf_of!r}: only the portal acts for other "
        f"users; remove the annotation to file it as yourself",
        subject=on_behalf_of,
    )


def filing_refusal(
    scientist: str,
    budget_name: str,
    budget: Budget | None,
    is_member: Callable[[str, str], bool],
    environment_owner: str | None,
) -> Refusal | None:
    """May `scientist` file this request (pure)? `budget_name`: its spec.budget ("" if none), `budget`
    that ComputeBudget (None if it does not exist); `environment_owner`: the owner of its
    spec.environment ("" if that does not exist, None if none is named). Only a budget's user or a
    member of its group may ask to raise it, only an environment's owner may ask to run it longer."""
    if budget_name and budget is None:
        return Refusal(
            "BudgetNotFound",
            f"ComputeBudget {budget_name!r} (spec.budget) does not exist: name one of your budgets "
            f"(the portal lists them)",
            subject=budget_name,
        )
    if budget is not None and not (budget.user == scientist or (budget.group and is_member(budget.group, scientist))):
        return Refusal(
            "NotBudgetMember",
            f"{scientist!r} may not ask for more of the budget of {budget.label}: only "
            f"{'its user' if budget.user else 'members of the group'} may; ask for more of a budget of yours",
            subject=budget.name,
        )
    if environment_owner is not None and environment_owner != scientist:
        if not environment_owner:
            return Refusal(
                "EnvironmentNotFound",
                "the environment named in spec.environment does not exist in this namespace: name one of yours",
            )
        return Refusal(
            "NotEnvironmentOwner",
            f"{scientist!r} may not ask for a longer lifetime of an environment of {environment_owner!r}: "
            f"only its owner may",
            subject=environment_owner,
        )
    return None
