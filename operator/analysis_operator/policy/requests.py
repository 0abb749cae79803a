"""Is an environment request acceptable for its flavor? (pure)"""
from __future__ import annotations

from dataclasses import dataclass

from analysis_operator.domain import Environment, Flavor


@dataclass(frozen=True)
class Rejection:
    reason: str   # CamelCase, for status and Events
    message: str  # says what to do


def _format(delta) -> str:
    hours, rest = divmod(int(delta.total_seconds()), 3600)
    minutes = rest // 60
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"


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
