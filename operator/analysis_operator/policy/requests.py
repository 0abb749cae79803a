"""Is an environment request acceptable for its flavor? (pure)"""

from __future__ import annotations

import datetime

from analysis_operator.model.domain import Environment, Flavor
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
