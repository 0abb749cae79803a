"""In-memory views kopf keeps current from its watch streams.

Handlers read these instead of listing: flavors by name, environments by
(namespace, name). The operator's pods by (namespace, environment) are read
here too, for the operator's own watch of them (infra/watch.py), not kopf's.
Values are small frozen records, so 10,000 environments stay cheap.

No index function raises: an object that cannot be read at all is left out of
its index (kopf would do the same, but retry and log it at every event), and
one read on the safe side is kept with its problems; either way one structured
line (logger analysis_operator.indexes) says so once, and no other object is
affected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, cast

import kopf
import structlog

from analysis_operator.backends.kubernetes import PodSummary, summarize_pod
from analysis_operator.engine.terms import indexed_status
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.infra.metrics import observe_ready
from analysis_operator.model.domain import (
    GROUP,
    LABEL_ENVIRONMENT,
    VERSION,
    Environment,
    Flavor,
)

PodKey = tuple[str, str]  # (namespace, environment name)
log = structlog.get_logger("analysis_operator.indexes")
# (index, object uid) -> the problem last logged for it, so each is logged once, not at every event.
_REPORTED: dict[tuple[str, str], str] = {}
_REPORTED_MAX = 10_000


def report_problems(index: str, body: Mapping[str, Any], problems: Iterable[str], indexed: bool = True) -> None:
    """Log an object's problems once (again only when they change); forget it once it reads cleanly."""
    metadata = body.get("metadata") or {}
    key = (index, str(metadata.get("uid") or metadata.get("name") or ""))
    problem = "; ".join(problems)
    if not problem:
        _REPORTED.pop(key, None)
        return
    if _REPORTED.get(key) == problem:
        return
    if len(_REPORTED) >= _REPORTED_MAX:
        _REPORTED.clear()
    _REPORTED[key] = problem
    log.warning(
        "index.unreadable",
        index=index,
        namespace=metadata.get("namespace"),
        name=metadata.get("name"),
        uid=metadata.get("uid"),
        problem=problem,
        indexed=indexed,
    )


class Indexer(Protocol):
    """What `never_raises` makes: kopf awaits it; `read` is the same function, called directly."""

    __name__: str

    def read(self, **kwargs: Any) -> Any: ...

    async def __call__(self, **kwargs: Any) -> Any: ...


def never_raises(index: str) -> Callable[[Callable[..., Any]], Indexer]:
    """An index function that never raises: an object it cannot read is left out, and logged once.

    kopf runs a plain function in a thread of its executor, one hand-over per watch event (about a
    tenth of the operator's CPU in a burst, bench/RESULTS.md); what is given to kopf here is a
    coroutine function calling it on the loop (reading a body takes microseconds, and never waits).
    Tests and benchmarks call the function itself as `read`."""

    def decorate(function: Callable[..., Any]) -> Indexer:
        def read(**kwargs: Any) -> Any:
            try:
                return function(**kwargs)
            except Exception as error:  # one unreadable object must not poison the index
                report_problems(index, kwargs.get("body") or {}, [f"{type(error).__name__}: {error}"], indexed=False)
                return None

        async def indexed(**kwargs: Any) -> Any:
            return read(**kwargs)

        # kopf names the index after the function; no __wrapped__: kopf would follow it and take a
        # plain function to run in a thread
        indexed.__name__, indexed.__qualname__, indexed.__doc__ = (
            function.__name__,
            function.__qualname__,
            function.__doc__,
        )
        indexed.read = read  # type: ignore[attr-defined]
        return cast(Indexer, indexed)

    return decorate


@kopf.index(GROUP, VERSION, "environmentflavors")
@never_raises("flavors")
def flavors(name: str, spec: Mapping[str, Any], body: kopf.Body, **_: Any) -> dict[str, Flavor]:
    flavor = Flavor.from_body(name, spec)
    report_problems("flavors", body, flavor.problems)
    return {name: flavor}


@kopf.index(GROUP, VERSION, "analysisenvironments")
@never_raises("environments")
def environments(body: kopf.Body, **_: Any) -> dict[tuple[str, str], EnvironmentRecord]:
    environment = Environment.from_body(body)
    report_problems("environments", body, environment.problems)
    observe_ready(body)  # creation-to-Ready, once per environment (infra/metrics.py)
    record = EnvironmentRecord(environment, indexed_status(body.get("status")))
    return {(environment.namespace, environment.name): record}


@kopf.index(GROUP, VERSION, "facilitygroups")
@never_raises("groups")
def groups(name: str, spec: Mapping[str, Any], **_: Any) -> dict[str, frozenset[str]]:
    """FacilityGroup name -> its members: the one source of group membership."""
    return {name: frozenset(member for member in spec.get("members") or () if isinstance(member, str))}


@never_raises("pods")
def pods(namespace: str, labels: Mapping[str, str], body: Mapping[str, Any], **_: Any) -> dict[PodKey, PodSummary]:
    return {(namespace, labels.get(LABEL_ENVIRONMENT, "")): summarize_pod(body)}


def read_pod(body: Mapping[str, Any]) -> tuple[PodKey, PodSummary] | None:
    """A pod of the operator's watch (infra/watch.py) as the Kubernetes backend reads it
    (backends/kubernetes.py): by (namespace, environment name); None for one it cannot read."""
    metadata = body.get("metadata") or {}
    found = pods.read(namespace=metadata.get("namespace", ""), labels=metadata.get("labels") or {}, body=body)
    return next(iter(found.items())) if found else None
