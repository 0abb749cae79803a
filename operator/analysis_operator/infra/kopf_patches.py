"""Five changes to kopf's internals, applied at start (cli.py; the fifth, matchConditions on the
webhooks kopf registers, by handlers/lifecycle.py from match_conditions.yaml), until kopf has them.

1. The startup gate (below). 2. Refusals a client can read: kopf answers an admission
refusal with a message and a code only; `Refused` (an AdmissionError) also carries the
Kubernetes reason and `details.causes` ([{reason, field, message}]), which the API server
passes on to the client unchanged. The patch wraps kopf's `build_response` and only adds
to the status it built, for a `Refused` it chose; any other error is answered as before.
3. Bodies and patches without reference cycles (`views_on_demand`). 4. What kopf lists and
watches without managedFields (`watch_without_managed_fields`). 3 and 4 are about memory:
each watch event's raw body lived until the cyclic collector found it, and at a restart
kopf holds every listed body, half of it managedFields, until all indexes are filled.

The startup gate:

kopf holds every handler back at startup until all indexes are filled: each
object of an indexed resource adds a toggle to one ToggleSet, drops it once
indexed, and then waits on the set's asyncio.Condition until all are gone.
Every drop wakes every waiter, and each re-checks the whole set: with the
20,000 pods and environments of 10,000 environments that is hundreds of
millions of wake-ups, and a restart spent over 15 minutes on it
(bench/RESULTS.md). Here the waiters sleep on an Event per aggregate state
instead, set only when the set's state actually flips: one check per change.

Semantics are kopf's (same toggles, same `all`/`any` aggregate, same
condition shared with the member toggles); only who is woken changes.
tests/unit/test_kopf_patches.py checks both.

The patch replaces a private class, so it is tied to the kopf releases it was
checked against (CHECKED_VERSIONS, and the same pin in pyproject.toml). On any
other version the operator refuses to start rather than run without it (a
restart would silently turn quadratic again) or with it unchecked. To move to
a new kopf: read its kopf/_cogs/aiokits/aiotoggles.py and where ToggleSet is
made (kopf/_core/reactor/), kopf/_cogs/structs/ (bodies, patches, dicts),
kopf/_cogs/clients/watching.py and how kopf/_core/reactor/queueing.py calls
infinite_watch, run tests/unit/test_kopf_patches.py, bench/restart.py and
bench/heap.py against it, then add the version here and to the pin.
ANALYSIS_OPERATOR_KOPF_PATCHES=off runs without the patch on any version.
The same changes as patches to kopf itself, to propose upstream: hack/kopf-upstream/
(0001: the gate; 0002: the views; 0003: managedFields, as a setting; 0004: match_conditions=
on kopf.on.validate/mutate).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf
import structlog
from kopf._cogs.aiokits import aiotoggles
from kopf._cogs.clients import watching
from kopf._cogs.structs import bodies, dicts, patches
from kopf._core.engines import admission

log = structlog.get_logger("analysis_operator.infra.kopf_patches")
# aiotoggles.py and the code that makes ToggleSets are identical across these releases. The
# build_response wrapper relies only on kopf calling it with keywords, `outcomes` among them
# (outcome.exception), and returning the response dict (tests/unit/test_kopf_patches.py).
CHECKED_VERSIONS = ("1.45.0", "1.45.1", "1.45.2")
SWITCH = "ANALYSIS_OPERATOR_KOPF_PATCHES"


class _NotifyingCondition(asyncio.Condition):
    """The set's condition (shared with its toggles): every notify_all also re-evaluates the set."""

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__()
        self._changed = changed

    def notify_all(self) -> None:
        super().notify_all()
        self._changed()


class EdgeToggleSet(aiotoggles.ToggleSet):
    """kopf's ToggleSet, but waiters are woken only when the aggregate state flips."""

    def __init__(self, fn: Callable[[Iterable[bool]], bool]) -> None:
        super().__init__(fn)
        self._on, self._off = asyncio.Event(), asyncio.Event()
        self._condition = _NotifyingCondition(self._update)
        self._update()

    def _update(self) -> None:
        on = self.is_on()
        (self._on if on else self._off).set()
        (self._off if on else self._on).clear()

    async def wait_for(self, __state: bool) -> None:
        wanted = bool(__state)
        while self.is_on() != wanted:
            await (self._on if wanted else self._off).wait()


@dataclass(frozen=True)
class Cause:
    """One thing wrong with the request: a Kubernetes StatusCause."""

    reason: str  # stable and machine-readable (CamelCase), e.g. TooManyEnvironments
    field: str  # the field it concerns, e.g. spec.datasets[1].name
    message: str  # the sentence for people


# The Kubernetes StatusReason of each HTTP code a refusal is given with.
STATUS_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid"}


class Refused(kopf.AdmissionError):
    """An admission refusal with its causes: the answer's status gets reason (Forbidden, Invalid)
    and details.causes, as the API server's own refusals have them."""

    def __init__(self, message: str, causes: Sequence[Cause], code: int = 403) -> None:
        super().__init__(message, code=code)
        self.causes = tuple(causes)

    def status(self) -> dict[str, Any]:
        """What is added to the AdmissionReview response's status."""
        return {
            "reason": STATUS_REASONS.get(int(self.code or 500), "Forbidden"),
            "details": {
                "causes": [
                    {"reason": cause.reason, "field": cause.field, "message": cause.message} for cause in self.causes
                ]
            },
        }


def _with_causes(build: Callable[..., Any]) -> Callable[..., Any]:
    """kopf's build_response, plus the reason and causes of the Refused it answered with."""

    def build_response(**kwargs: Any) -> Any:
        response = build(**kwargs)
        status = (response.get("response") or {}).get("status")
        if status:
            for outcome in (kwargs.get("outcomes") or {}).values():
                error = getattr(outcome, "exception", None)
                if isinstance(error, Refused) and status.get("message") == (str(error) or repr(error)):
                    status.update(error.status())
                    break
        return response

    build_response.patched = True  # type: ignore[attr-defined]
    return build_response


def _init(field: str | None) -> Callable[..., None]:
    """An __init__ setting what kopf's MappingView.__init__ sets (source, parsed path), and nothing more."""
    path = dicts.parse_field(field)

    def init(self: dicts.MappingView[str, Any], src: Any) -> None:
        self._src, self._path = src, path

    return init


def _patch_init(init: Callable[..., None]) -> Callable[..., None]:
    def patch_init(self: patches.Patch, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name in ("_meta", "_spec", "_status"):  # each a view of self: made when asked for instead
            self.__dict__.pop(name, None)

    patch_init.patched = True  # type: ignore[attr-defined]
    return patch_init


def _view(cls: type[Any], field: str) -> property:
    """A property making a `cls` view of its object's `field` each time it is read: what kopf's
    MappingView.__init__ sets, with the path parsed once (a view is read many times per event)."""
    path = dicts.parse_field(field)

    def view(source: Any) -> Any:
        made = object.__new__(cls)
        made._src, made._path = source, path
        return made

    return property(view)


def views_on_demand() -> None:
    """kopf's Body and Patch without reference cycles: their views (meta, spec, status, and meta's
    labels and annotations) are made when asked for, not kept on the object they view. Each kept
    view pointed back at its object, so every watch event's Body and Patch, with the raw body they
    hold, was cyclic garbage that only the collector could free (bench/RESULTS.md, stop 33). The
    views hold no state of their own: a new one sees what a kept one did, also after kopf's
    Body._replace_with."""
    for cls, sub, meta, spec, status in (
        (bodies.Body, dicts.MappingView, bodies.Meta, bodies.Spec, bodies.Status),
        (patches.Patch, dicts.MutableMappingView, patches.MetaPatch, patches.SpecPatch, patches.StatusPatch),
    ):
        cls.metadata = cls.meta = _view(meta, "metadata")  # type: ignore[assignment, method-assign]
        cls.spec = _view(spec, "spec")  # type: ignore[assignment, method-assign]
        cls.status = _view(status, "status")  # type: ignore[assignment, method-assign]
        meta.__init__ = _init("metadata")  # type: ignore[method-assign]  # kopf's also made and kept the two below
        meta.labels = _view(sub, "labels")  # type: ignore[assignment, method-assign]
        meta.annotations = _view(sub, "annotations")  # type: ignore[assignment, method-assign]
    bodies.Body.__init__ = _init(None)  # type: ignore[method-assign]
    if not getattr(patches.Patch.__init__, "patched", False):
        patches.Patch.__init__ = _patch_init(patches.Patch.__init__)  # type: ignore[method-assign]


def _without_managed_fields(watch: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., AsyncIterator[Any]]:
    async def infinite_watch(**kwargs: Any) -> AsyncIterator[Any]:
        async with contextlib.aclosing(watch(**kwargs)) as events:
            async for event in events:
                if isinstance(event, dict):
                    metadata = (event.get("object") or {}).get("metadata")
                    if isinstance(metadata, dict):
                        metadata.pop("managedFields", None)
                yield event

    infinite_watch.patched = True  # type: ignore[attr-defined]
    return infinite_watch


def watch_without_managed_fields() -> None:
    """Every object kopf lists or watches, without metadata.managedFields, dropped as it arrives:
    neither kopf nor any handler here reads them, and they are over half of an environment's
    parsed body (10 of 18 KiB). kopf holds every listed body until all indexes are filled, so a
    restart with 10,000 environments held 100 MiB of them at once (bench/RESULTS.md, stop 33)."""
    if not getattr(watching.infinite_watch, "patched", False):  # queueing looks it up per watcher
        watching.infinite_watch = _without_managed_fields(watching.infinite_watch)  # type: ignore[arg-type]


def with_match_conditions(
    conditions: Mapping[str, Sequence[Mapping[str, str]]], environ: Mapping[str, str] = os.environ
) -> None:
    """The webhooks kopf registers itself get matchConditions, by handler id (kopf has no such
    option): the API server then skips a call whose answer is known (handlers/admission.py,
    match_conditions.yaml). Wraps kopf's build_webhooks, looked up at every registration; calling
    this again replaces the conditions. Only what the API server calls changes, never an answer.
    Not with the patches switched off (SWITCH): kopf's webhooks as kopf builds them."""
    if environ.get(SWITCH, "on") == "off":
        return
    build = getattr(admission.build_webhooks, "original", admission.build_webhooks)
    wanted = {key: [dict(condition) for condition in value] for key, value in conditions.items()}

    def build_webhooks(handlers: Iterable[Any], **kwargs: Any) -> list[dict[str, Any]]:
        handlers = list(handlers)  # read twice: by kopf, and here to pair each webhook with its id
        webhooks = build(handlers, **kwargs)
        built = [handler for handler in handlers if not kwargs.get("persistent_only") or handler.persistent]
        for handler, webhook in zip(built, webhooks, strict=True):
            if wanted.get(handler.id):
                webhook["matchConditions"] = [dict(condition) for condition in wanted[handler.id]]
        return webhooks

    build_webhooks.original = build  # type: ignore[attr-defined]
    admission.build_webhooks = build_webhooks  # type: ignore[assignment]


def apply(version: str | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Patch kopf (True), or not when switched off (False); RuntimeError on an unchecked kopf."""
    if environ.get(SWITCH, "on") == "off":  # the escape hatch (and for measuring)
        log.warning("kopf_patches.off")
        return False
    version = version or getattr(kopf, "__version__", "") or _installed_version()
    if version not in CHECKED_VERSIONS:
        raise RuntimeError(
            f"kopf {version} is installed, but analysis_operator/infra/kopf_patches.py was checked only "
            f"against kopf {', '.join(CHECKED_VERSIONS)}: it replaces kopf's private ToggleSet, and "
            f"without it a restart with many objects takes quadratic time. Install a checked kopf "
            f"(pip install -e . follows the pin in pyproject.toml), or re-check the patch against "
            f"kopf {version} and add it to CHECKED_VERSIONS and the pin (how: the module's docstring), "
            f"or set {SWITCH}=off to run without the patch, accepting slow restarts with many objects."
        )
    aiotoggles.ToggleSet = EdgeToggleSet  # type: ignore[misc]  # kopf looks it up at operator start
    if not getattr(admission.build_response, "patched", False):  # looked up at every request
        admission.build_response = _with_causes(admission.build_response)
    views_on_demand()
    watch_without_managed_fields()
    return True


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kopf")
    except PackageNotFoundError:
        return "(version unknown)"
