"""The operator's own watch of its pods (infra/watch.py) against the real API server: the first list,
the changes after it, pods that are not the operator's, and a watch that lost its place."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
import pytest

from analysis_operator.handlers.indexes import read_pod
from analysis_operator.infra import kube as kube_module
from analysis_operator.infra.kube import Expired, KubeClient
from analysis_operator.infra.watch import Summaries, Watch
from analysis_operator.model.domain import LABEL_ENVIRONMENT, LABEL_ENVIRONMENT_UID

# The watch's selector here: a label of the test's own, not the operator's (an operator running beside the
# tests would take pods with its label and no environment for orphans, and the namespace's invariant fails).
SELECTED_KEY, SELECTED_VALUE = "watch.analysis-test/selected", "yes"
SELECTOR = f"{SELECTED_KEY}={SELECTED_VALUE}"


def pod(name: str, environment: str, managed: bool = True) -> dict[str, Any]:
    labels = {LABEL_ENVIRONMENT: environment, LABEL_ENVIRONMENT_UID: f"uid-{environment}"}
    if managed:
        labels[SELECTED_KEY] = SELECTED_VALUE
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/jupyter:1"}]},
    }


@pytest.fixture
def client(kubeconfig, monkeypatch, namespace) -> KubeClient:
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    return KubeClient(1, namespace)


async def until(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "not within the time limit"
        await asyncio.sleep(0.05)


def test_the_first_list_then_every_change_of_the_operators_pods_only(client, namespace, core, monkeypatch):
    monkeypatch.setattr(kube_module, "LIST_PAGE", 2)  # the first list in pages
    for index in range(3):
        core.create_namespaced_pod(namespace, pod(f"aenv-{index}", f"env-{index}"))
    core.create_namespaced_pod(namespace, pod("foreign", "env-9", managed=False))
    told: list[tuple[str, str]] = []

    async def changed(key: tuple[str, str]) -> None:
        told.append(key)

    async def scenario() -> None:
        summaries = Summaries(read_pod)
        watch = Watch(client, "Pod", SELECTOR, summaries, changed)
        try:
            await watch.start()
            watch.follow()
            assert sorted(summaries) == [(namespace, f"env-{index}") for index in range(3)]  # not the foreign one
            assert summaries[(namespace, "env-1")][0].environment_uid == "uid-env-1"
            assert told == []  # the first list is told to no one: the handlers read it when they first run
            core.create_namespaced_pod(namespace, pod("aenv-3", "env-3"))
            await until(lambda: (namespace, "env-3") in summaries)
            core.delete_namespaced_pod("aenv-0", namespace, grace_period_seconds=0)
            await until(lambda: (namespace, "env-0") not in summaries)
            # a pod relabelled out of the selector leaves it, as if deleted
            core.patch_namespaced_pod("aenv-1", namespace, {"metadata": {"labels": {SELECTED_KEY: None}}})
            await until(lambda: (namespace, "env-1") not in summaries)
            core.create_namespaced_pod(namespace, pod("foreign-2", "env-8", managed=False))
            core.patch_namespaced_pod("aenv-2", namespace, {"metadata": {"labels": {LABEL_ENVIRONMENT: "env-7"}}})
            await until(lambda: (namespace, "env-7") in summaries)
            assert (namespace, "env-2") not in summaries  # it moved with its label
            assert sorted(summaries) == [(namespace, "env-3"), (namespace, "env-7")]
            await until(lambda: {(namespace, "env-2"), (namespace, "env-7")} <= set(told))
            assert {key[1] for key in told} == {"env-0", "env-1", "env-2", "env-3", "env-7"}  # never a foreign pod
        finally:
            await watch.stop()

    asyncio.run(scenario())


def test_the_first_list_is_read_into_summaries_page_by_page(client, namespace, core, monkeypatch):
    """Each page's pods are read into summaries before the next page is asked for: the whole list of
    10,000 pods parsed at once was a restart's peak (bench/RESULTS.md, stop 34)."""
    monkeypatch.setattr(kube_module, "LIST_PAGE", 2)
    for index in range(5):
        core.create_namespaced_pod(namespace, pod(f"aenv-{index}", f"env-{index}"))
    steps: list[str] = []
    request = client._request

    async def page(method: str, path: str, *args: Any, **query: Any) -> Any:
        steps.append("page")
        return await request(method, path, *args, **query)

    monkeypatch.setattr(client, "_request", page)
    summaries = Summaries(read_pod)
    read = summaries.read

    def counted(body: Any) -> Any:
        steps.append("read")
        return read(body)

    summaries.read = counted  # type: ignore[method-assign]

    async def scenario() -> None:
        watch = Watch(client, "Pod", SELECTOR, summaries, lambda key: asyncio.sleep(0))
        try:
            await watch.start()
        finally:
            await watch.stop()

    asyncio.run(scenario())
    assert steps == ["page", "read", "read", "page", "read", "read", "page", "read"]
    assert sorted(summaries) == [(namespace, f"env-{index}") for index in range(5)]


def test_a_watch_that_lost_its_place_lists_again_and_tells_what_changed_meanwhile(client, namespace, core):
    """The API server answers 410 Gone to a watch from a version it no longer serves (compacted away on a
    long-running cluster; this fresh one serves every version, so the answer is given here by wrapping
    the client's watch once). The list read again is the real server's."""
    core.create_namespaced_pod(namespace, pod("aenv-a", "env-a"))
    core.create_namespaced_pod(namespace, pod("aenv-b", "env-b"))
    told: list[tuple[str, str]] = []
    lists: list[str] = []

    async def changed(key: tuple[str, str]) -> None:
        told.append(key)

    async def scenario() -> None:
        summaries = Summaries(read_pod)
        watch = Watch(client, "Pod", SELECTOR, summaries, changed)
        labelled, watched = client.labelled, client.watch

        async def counted(*arguments: Any) -> Any:
            lists.append("list")
            async for page in labelled(*arguments):
                yield page

        async def gone_once(kind: str, selector: str, version: str) -> Any:
            client.watch = watched
            raise Expired(f"{kind} {version}")
            yield  # an async generator, as the client's

        client.labelled = counted
        try:
            await watch.start()
            watch.follow()
            assert sorted(summaries) == [(namespace, "env-a"), (namespace, "env-b")]
            watch._task.cancel()  # away: what happens now is not seen
            with pytest.raises(asyncio.CancelledError):
                await watch._task
            core.delete_namespaced_pod("aenv-a", namespace, grace_period_seconds=0)
            core.create_namespaced_pod(namespace, pod("aenv-c", "env-c"))
            told.clear()
            client.watch = gone_once
            watch._task = asyncio.create_task(watch._follow())
            await until(lambda: (namespace, "env-c") in summaries and (namespace, "env-a") not in summaries)
            await until(lambda: set(told) >= {(namespace, "env-a"), (namespace, "env-c")})
            assert lists == ["list", "list"]  # the first, and once after the 410
            core.create_namespaced_pod(namespace, pod("aenv-d", "env-d"))  # and it goes on watching
            await until(lambda: (namespace, "env-d") in summaries)
            assert sorted(summaries) == [(namespace, "env-b"), (namespace, "env-c"), (namespace, "env-d")]
        finally:
            await watch.stop()

    asyncio.run(scenario())
