"""Who is asking, and may they name this owner? (pure)

The owner of an environment is a facility user ID. It comes from the
admission request's userInfo, which the API server authenticated: an
ordinary user may only create environments owned by themselves; a trusted
identity (the portal's ServiceAccount, a platform engineer's group) may
create them on behalf of a named user.
"""
from __future__ import annotations

from typing import Any, Mapping

from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import AdmissionSettings


def requester(userinfo: Mapping[str, Any], settings: AdmissionSettings) -> str:
    """The facility user ID of the authenticated requester."""
    username = str(userinfo.get("username") or "")
    if settings.username_prefix and username.startswith(settings.username_prefix):
        return username[len(settings.username_prefix):]
    return username


def is_trusted(userinfo: Mapping[str, Any], settings: AdmissionSettings) -> bool:
    groups = set(userinfo.get("groups") or ())
    return userinfo.get("username") in settings.trusted_users or bool(groups & set(settings.trusted_groups))


def owner_refusal(owner: str, userinfo: Mapping[str, Any], settings: AdmissionSettings) -> Refusal | None:
    """Why this requester may not create an environment for this owner, or None."""
    if is_trusted(userinfo, settings):
        return None
    me = requester(userinfo, settings)
    if owner == me:
        return None
    return Refusal("NotOwner", f"spec.owner {owner!r} is not you ({me!r}): you may only create environments you own; "
                   f"only the portal acts on behalf of other users", subject=owner)
