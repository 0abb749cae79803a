"""The startup gate kopf uses (a ToggleSet) with edge-triggered waiters: same answers, linear cost."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import tomllib

import kopf
import pytest
from kopf._cogs.aiokits import aiotoggles
from kopf._cogs.clients import watching
from kopf._cogs.structs import bodies, patches
from kopf._core.actions import execution
from kopf._core.engines import admission
from packaging.requirements import Requirement

from analysis_operator.infra.kopf_patches import (
    CHECKED_VERSIONS,
    Cause,
    EdgeToggleSet,
    Refused,
    apply,
    views_on_demand,
    watch_without_managed_fields,
    with_match_conditions,
)

# What apply() changes in kopf's body and patch classes (views_on_demand), restored after each test.
VIEW_CLASSES = (bodies.Body, bodies.Meta, patches.Patch, patches.MetaPatch)


def restore_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiotoggles, "ToggleSet", aiotoggles.ToggleSet)
    monkeypatch.setattr(admission, "build_response", admission.build_response)
    monkeypatch.setattr(watching, "infinite_watch", watching.infinite_watch)
    monkeypatch.setattr(admission, "build_webhooks", admission.build_webhooks)
    for cls in VIEW_CLASSES:
        for name, value in list(vars(cls).items()):
            if name == "__init__" or isinstance(value, property):
                monkeypatch.setattr(cls, name, value)


@pytest.mark.parametrize("cls", [aiotoggles.ToggleSet, EdgeToggleSet])
def test_all_set_waits_until_every_toggle_is_on_or_dropped(cls):
    async def scenario():
        toggles = cls(all)
        first, second = await toggles.make_toggle(name="a"), await toggles.make_toggle(name="b")
        waiter = asyncio.create_task(toggles.wait_for(True))
        await asyncio.sleep(0)
        await first.turn_to(True)
        await asyncio.sleep(0)
        assert not waiter.done() and toggles.is_off()
        await toggles.drop_toggle(second)
        await asyncio.wait_for(waiter, 1)
        assert toggles.is_on()
        await first.turn_to(False)  # and back: wait_for(False) resolves again
        await asyncio.wait_for(toggles.wait_for(False), 1)

    asyncio.run(scenario())


@pytest.mark.parametrize("cls", [aiotoggles.ToggleSet, EdgeToggleSet])
def test_any_set_is_on_while_one_toggle_is_on(cls):
    async def scenario():
        paused = cls(any)
        assert paused.is_off()
        conflict = await paused.make_toggle(True, name="peer")
        await asyncio.wait_for(paused.wait_for(True), 1)
        resumed = asyncio.create_task(paused.wait_for(False))
        await asyncio.sleep(0)
        assert not resumed.done()
        await conflict.turn_to(False)
        await asyncio.wait_for(resumed, 1)

    asyncio.run(scenario())


def _startup(cls, objects: int) -> int:
    """What kopf does per indexed object at startup: a toggle, dropped once indexed, then a wait.
    Returns how often the set's state was evaluated: the work the wake-ups cost."""
    evaluations = 0

    class Counting(cls):
        def is_on(self) -> bool:
            nonlocal evaluations
            evaluations += 1
            return super().is_on()

    async def scenario() -> None:
        indexed = Counting(all)
        blocker = await indexed.make_toggle(name="orchestration blocker")
        toggles = [await indexed.make_toggle(name=str(index)) for index in range(objects)]

        async def worker(toggle) -> None:
            await indexed.drop_toggle(toggle)
            await indexed.wait_for(True)

        workers = []
        for toggle in toggles:  # objects arrive one by one from the watch stream
            workers.append(asyncio.create_task(worker(toggle)))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await indexed.drop_toggle(blocker)
        await asyncio.wait_for(asyncio.gather(*workers), 60)

    asyncio.run(scenario())
    return evaluations


def test_startup_gate_work_grows_linearly_not_quadratically():
    """kopf's gate re-checks the set on every waiter for every change (1.2 s for 1,000 objects and
    25 s for 4,000 on the 2-core machine); the patched one once per change and per flip."""
    assert _startup(EdgeToggleSet, 2000) <= 5 * 2000  # about 4 per object
    assert _startup(aiotoggles.ToggleSet, 500) >= 500 * 500 // 4


@pytest.fixture
def unpatched(monkeypatch):
    """kopf's own ToggleSet, build_response and body classes back in place after the test, whatever apply() did."""
    restore_kopf(monkeypatch)


@pytest.mark.parametrize("version", CHECKED_VERSIONS)
def test_the_patch_is_applied_to_checked_kopf_versions(unpatched, version):
    assert apply(version, environ={}) and aiotoggles.ToggleSet is EdgeToggleSet


def test_the_installed_kopf_is_a_checked_one(unpatched):
    assert apply(environ={}) and aiotoggles.ToggleSet is EdgeToggleSet


@pytest.mark.parametrize("version", ["1.44.6", "1.45.3", "1.46.0", "2.0.0", "1.45"])
def test_another_kopf_version_stops_the_start_and_says_what_to_do(unpatched, version):
    with pytest.raises(RuntimeError) as error:
        apply(version, environ={})
    message = str(error.value)
    assert f"kopf {version} is installed" in message
    assert "1.45.0, 1.45.1, 1.45.2" in message
    assert "re-check the patch" in message and "ANALYSIS_OPERATOR_KOPF_PATCHES=off" in message
    assert aiotoggles.ToggleSet is not EdgeToggleSet


@pytest.mark.parametrize("version", ["1.45.2", "1.46.0"])
def test_switched_off_the_patch_is_not_applied_on_any_version(unpatched, version):
    assert not apply(version, environ={"ANALYSIS_OPERATOR_KOPF_PATCHES": "off"})
    assert aiotoggles.ToggleSet is not EdgeToggleSet


def test_pyproject_pins_kopf_to_the_checked_versions():
    """pip must never install a kopf the operator then refuses to start with."""
    pyproject = tomllib.loads((pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    [kopf] = [Requirement(line) for line in pyproject["project"]["dependencies"] if Requirement(line).name == "kopf"]
    assert all(kopf.specifier.contains(version) for version in CHECKED_VERSIONS)
    assert not any(
        kopf.specifier.contains(version, prereleases=True)
        for version in ["1.44.6", "1.45.3", "1.45.3rc1", "1.46.0", "2.0.0"]
    )


# --- refusals with their causes (kopf's build_response, wrapped) -------------------------------------


@pytest.fixture
def unwrapped(monkeypatch):
    """kopf's own build_response back in place after the test."""
    restore_kopf(monkeypatch)


def _answer(*errors: Exception) -> dict:
    outcomes = {f"h{n}": execution.Outcome(final=True, exception=error) for n, error in enumerate(errors)}
    request = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u"}}
    return admission.build_response(request=request, outcomes=outcomes, warnings=[], jsonpatch=[])


def test_a_refusal_is_answered_with_its_reason_and_causes(unwrapped):
    refusal = Refused("2 are running", [Cause("TooManyEnvironments", "spec.budget", "2 are running")])
    assert _answer(refusal)["response"]["status"] == {"message": "2 are running", "code": 403}  # kopf alone
    apply(environ={})
    assert _answer(refusal)["response"] == {
        "uid": "u",
        "allowed": False,
        "status": {
            "message": "2 are running",
            "code": 403,
            "reason": "Forbidden",
            "details": {
                "causes": [{"reason": "TooManyEnvironments", "field": "spec.budget", "message": "2 are running"}]
            },
        },
    }
    wrapped = admission.build_response
    apply(environ={})  # applied twice (tests, a second start): wrapped once
    assert admission.build_response is wrapped


def test_other_errors_and_admissions_are_answered_as_kopf_does(unwrapped):
    apply(environ={})
    assert _answer(kopf.AdmissionError("no", code=422))["response"]["status"] == {"message": "no", "code": 422}
    assert _answer(ValueError("boom"))["response"]["status"] == {"message": "boom", "code": 500}
    assert "status" not in _answer()["response"] and _answer()["response"]["allowed"]
    # With several outcomes, the one kopf answered with is the one described.
    chosen = Refused("first", [Cause("NotOwner", "spec.owner", "first")], code=403)
    answer = _answer(ValueError("other"), chosen)["response"]["status"]
    assert answer["message"] == "first" and answer["details"]["causes"][0]["reason"] == "NotOwner"


# --- kopf's Body and Patch without reference cycles (views_on_demand) ---------------------------------


def _one_event() -> tuple:
    """What kopf does with each watch event: a Body around the raw object, a Patch for the handlers."""
    raw = {"metadata": {"name": "x", "labels": {"a": "1"}, "annotations": {"n": "v"}}, "spec": {"k": 1}}
    body = bodies.Body(raw)
    patch = patches.Patch(body=body)
    patch.meta.labels["b"] = "2"
    patch.metadata.annotations["m"] = None
    patch.status["phase"] = "Ready"
    patch.spec["k"] = 2
    return (
        body.meta.name,
        dict(body.metadata.labels),
        dict(body.meta.annotations),
        dict(body.spec),
        dict(body.status),
        dict(patch),
    )


def _garbage_of(events: int) -> int:
    gc.collect()
    gc.disable()
    try:
        for _ in range(events):
            _one_event()
        return gc.collect()
    finally:
        gc.enable()


def test_kopf_bodies_and_patches_leave_no_cyclic_garbage(unpatched):
    """kopf keeps each view on the object it views, so every event's Body and Patch (with the raw object)
    waited for the cyclic collector; on demand, reference counting frees them at once."""
    before = _one_event()
    assert _garbage_of(100) >= 100 * 10  # kopf as it is: the test can fail
    views_on_demand()
    assert _garbage_of(100) == 0
    assert (
        _one_event()
        == before
        == (
            "x",
            {"a": "1"},
            {"n": "v"},
            {"k": 1},
            {},
            {
                "metadata": {"labels": {"b": "2"}, "annotations": {"m": None}},
                "status": {"phase": "Ready"},
                "spec": {"k": 2},
            },
        )
    )


def test_views_made_on_demand_still_follow_the_body_and_fill_the_patch(unpatched):
    apply(environ={})
    body = bodies.Body({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"v": 1}})
    spec, meta, labels = body.spec, body.meta, body.meta.labels
    body._replace_with({"metadata": {"name": "b", "labels": {"x": "2"}}, "spec": {"v": 2}, "status": {"s": 1}})
    assert (spec["v"], meta.name, labels["x"], body.status["s"]) == (2, "b", "2", 1)  # kopf replaces after a patch
    assert (
        isinstance(body.meta, kopf.Meta) and isinstance(body.spec, kopf.Spec) and isinstance(body.status, kopf.Status)
    )

    patch = kopf.Patch(body=body, fns=[lambda raw: raw])
    patch.status["phase"] = "Ready"
    patch.meta.annotations["a"] = "b"
    copied = kopf.Patch(patch)
    assert dict(copied) == {"status": {"phase": "Ready"}, "metadata": {"annotations": {"a": "b"}}}
    assert len(copied.fns) == 1 and bool(kopf.Patch(fns=[lambda raw: raw])) and not kopf.Patch()
    assert sorted(patch.as_json_patch(), key=lambda op: op["path"]) == [
        {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}},
        {"op": "add", "path": "/status/phase", "value": "Ready"},  # the body's status is there to add to
    ]
    assert "_meta" not in vars(patch) and "_meta" not in vars(body)


# --- what kopf watches, without managedFields -----------------------------------------------------------


def test_kopf_gets_every_listed_and_watched_object_without_managed_fields(unpatched, monkeypatch):
    closed = []
    fields = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]

    async def infinite_watch(**kwargs):  # what kopf's watch yields: listed objects, a mark, events
        try:
            yield {"type": None, "object": {"metadata": {"name": "a", "managedFields": fields}, "spec": {"x": 1}}}
            yield watching.Bookmark.LISTED
            yield {"type": "MODIFIED", "object": {"metadata": {"name": "a", "managedFields": fields, "uid": "u"}}}
            yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}}
            yield {"type": "ERROR", "object": {"code": 410}}
            yield {"type": "ADDED", "object": {"metadata": {"name": "b"}}}
            yield {"type": "ADDED", "object": {"metadata": {"name": "c", "managedFields": fields}}}
        finally:
            closed.append(kwargs)

    monkeypatch.setattr(watching, "infinite_watch", infinite_watch)
    watch_without_managed_fields()
    watch_without_managed_fields()  # applied twice (tests, a second start): wrapped once
    assert watching.infinite_watch.__name__ == "infinite_watch" and watching.infinite_watch is not infinite_watch

    async def read(first: int | None = None):
        events = []
        stream = watching.infinite_watch(settings="s", resource="r", namespace=None, operator_paused=None)
        async for event in stream:
            events.append(event)
            if len(events) == first:
                await stream.aclose()  # kopf's watcher cancelled: the wrapped watch is closed with it
                break
        return events

    events = asyncio.run(read())
    assert events == [
        {"type": None, "object": {"metadata": {"name": "a"}, "spec": {"x": 1}}},
        watching.Bookmark.LISTED,
        {"type": "MODIFIED", "object": {"metadata": {"name": "a", "uid": "u"}}},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}},
        {"type": "ERROR", "object": {"code": 410}},
        {"type": "ADDED", "object": {"metadata": {"name": "b"}}},
        {"type": "ADDED", "object": {"metadata": {"name": "c"}}},
    ]
    assert closed == [{"settings": "s", "resource": "r", "namespace": None, "operator_paused": None}]
    assert len(asyncio.run(read(first=2))) == 2 and len(closed) == 2


# --- matchConditions on the webhooks kopf registers ----------------------------------------------------


def _registered(**kwargs) -> dict[str, dict]:
    """The webhooks kopf would register for the operator's admission handlers, by name."""
    from kopf._cogs.structs import references

    from analysis_operator import handlers  # noqa: F401  (registers the handlers)

    resource = references.Resource("analysis.panosc.eu", "v1alpha1", "analysisenvironments")
    handlers_ = kopf.get_default_registry()._webhooks.get_all_handlers()
    config = {"url": "https://127.0.0.1:9443"}
    built = admission.build_webhooks(
        iter(handlers_), resources=[resource], name_suffix="x", client_config=config, **kwargs
    )  # an iterator, as kopf may pass one: read once by kopf's builder
    return {webhook["name"]: webhook for webhook in built}


def test_kopf_registers_its_webhooks_with_the_match_conditions_given(unwrapped):
    plain = _registered()
    assert not [webhook for webhook in plain.values() if "matchConditions" in webhook]  # kopf alone
    owner = [{"name": "c", "expression": "true"}]
    with_match_conditions({"environment-owner": owner, "no-such-webhook": owner})
    conditioned = _registered()
    assert conditioned["environment-owner.x"]["matchConditions"] == owner
    assert [name for name, hook in conditioned.items() if "matchConditions" in hook] == ["environment-owner.x"]
    # Everything else as kopf builds it.
    assert {
        name: {k: v for k, v in hook.items() if k != "matchConditions"} for name, hook in conditioned.items()
    } == plain
    # Given again (a second start): replaced, and kopf's builder wrapped once.
    with_match_conditions({"environment-admission": owner})
    again = _registered()
    assert "matchConditions" not in again["environment-owner.x"]
    assert again["environment-admission.x"]["matchConditions"] == owner
    assert _registered(persistent_only=True).keys() <= plain.keys()
    original = admission.build_webhooks  # switched off: left as it is
    with_match_conditions({"environment-owner": owner}, environ={"ANALYSIS_OPERATOR_KOPF_PATCHES": "off"})
    assert admission.build_webhooks is original
