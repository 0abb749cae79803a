"""Is an environment request acceptable for its flavor? (pure)"""
from __future__ import annotations

from dataclasses import dataclass

from analysis_operator.domain import Environment, Flavor, Phase


@dataclass(frozen=True)
class Rejection:
    reason: str   # CamelCase, for status and Events
    message: str  # says what to do
    phase: Phase = Phase.REJECTED  # where the environment ends (e.g. Stopped when access is revoked)


def _format(delta) -> str:
    """8h, 1h30m, 8h0m30s: the CRD's duration syntax, exact to the second."""
    hours, rest = divmod(int(delta.total_seconds()), 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{hours}h" if hours else ""
    if minutes or seconds:
        text += f"{minutes}m"
    if seconds:
        text += f"{seconds}s"
    return text or "0s"


def check_request(environment: Environment, flavor: Flavor) -> Rejection | None:
    if environment.image and not flavor.allow_custom_image:
        return Rejection(
            "CustomImageNotAllowed",
            f"flavor {flavor.name!r} does not allow custom images: remove spec.image "
            f"or choose a flavor with allowCustomImage: true",
        )
    if flavor.backend.value == "kubernetes" and not (environment.image or flavor.image):
        return Rejection("ImageMissing", f"flavor {flavor.name!r} has no image: set spec.image")
    if environment.lifetime is not None and environment.lifetime > flavor.max_lifetime:
        return Rejection(
            "LifetimeTooLong",
            f"spec.lifetime {_format(environment.lifetime)} is longer than flavor {flavor.name!r} allows "
            f"({_format(flavor.max_lifetime)}): ask for at most that",
        )
    return None
