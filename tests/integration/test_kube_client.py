"""The operator's own client (infra/kube.py) against the real API server: its answers, its refusals,
and its connections, which it keeps (a new TLS connection per call costs both the operator and
kube-apiserver a handshake; the blocking client it replaced made one for most calls under load)."""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid

import kubernetes
import pytest

from analysis_operator.infra import kube as kube_module
from analysis_operator.infra.kube import KubeClient
from tests.integration.sockets import own_connections


@pytest.fixture
def kube(kubeconfig, monkeypatch) -> KubeClient:
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    return KubeClient(4)


def test_hundreds_of_concurrent_calls_share_a_few_kept_connections(kube, namespace, core):
    port = urllib.parse.urlsplit(core.api_client.configuration.host).port or 443
    before = own_connections(port)  # the test's own blocking client
    involved = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "namespace": namespace}}

    async def burst() -> tuple[set, set, list[bool], list[bool]]:
        try:
            await asyncio.gather(*(kube.read_secret(namespace, f"absent-{index}") for index in range(200)))  # 404s
            first = own_connections(port) - before
            secret = {"metadata": {"name": "s"}, "stringData": {"k": "v"}}
            created = await asyncio.gather(*(kube.create("Secret", namespace, secret) for _ in range(50)))  # 409s
            await asyncio.gather(*(kube.post_event(involved, "Normal", "Test", "x") for _ in range(100)))
            names = [f"c-{index}" for index in range(50)]
            made = await asyncio.gather(
                *(kube.create("Secret", namespace, {"metadata": {"name": name}}) for name in names)
            )
            return first, own_connections(port) - before, created, made
        finally:
            await kube.close()

    first, then, created, made = asyncio.run(burst())
    assert 1 <= len(first) <= 4, f"200 calls on a client of 4 connections opened {len(first)}"
    assert then == first, "the same connections served the 404s, 409s, Events and creates that followed"
    assert created.count(True) == 1 and created.count(False) == 49  # one made it, 49 found it there
    assert all(made)
    assert len(core.list_namespaced_event(namespace).items) == 100


def test_refusals_raise_with_their_status_and_answers_come_back_as_json(kube, namespace, core):
    async def calls() -> dict:
        try:
            absent = await kube.get_environment(namespace, "absent")
            assert await kube.read_metadata("Pod", namespace, "absent") is None
            assert await kube.delete("Secret", namespace, "absent") is False
            with pytest.raises(kubernetes.client.ApiException) as invalid:
                await kube.create("Secret", namespace, {"metadata": {"name": "Not_A_Name"}})
            with pytest.raises(kubernetes.client.ApiException) as missing:
                await kube.create("Secret", f"t-absent-{uuid.uuid4().hex[:6]}", {"metadata": {"name": "s"}})
            assert await kube.create("Secret", namespace, {"metadata": {"name": "s", "labels": {"a": "b"}}})
            metadata = await kube.read_metadata("Secret", namespace, "s")
            other = await kube.delete("Secret", namespace, "s", uid="not-its-uid")  # 409: another object
            mine = await kube.delete("Secret", namespace, "s", uid=metadata["uid"])
            return {"absent": absent, "invalid": invalid.value, "missing": missing.value, "labels": metadata["labels"],
                    "other": other, "mine": mine}  # fmt: skip
        finally:
            await kube.close()

    answers = asyncio.run(calls())
    assert answers["absent"] is None
    assert answers["invalid"].status == 422 and "Not_A_Name" in answers["invalid"].body
    assert answers["missing"].status == 404
    assert answers["labels"] == {"a": "b"}
    assert answers["other"] is False and answers["mine"] is True
    assert not [secret for secret in core.list_namespaced_secret(namespace).items if secret.metadata.name == "s"]


def _slow_call(client: KubeClient, namespace: str, seconds: int):
    """A call the real API server answers after `seconds`: a watch of an empty namespace's secrets."""
    path = f"/api/v1/namespaces/{namespace}/secrets"
    return client._request("GET", path, watch="true", timeoutSeconds=str(seconds))


def test_waiting_for_a_kept_connection_is_not_part_of_a_calls_time_limit(kubeconfig, monkeypatch, namespace):
    """Under a burst, calls queue for the kept connections: each must still get its answer. One connection,
    a limit of 3 s per call and four calls the server answers after 1 s each: the last waits 3 s for the
    connection and is answered 4 s after it was made (a limit on the whole call failed 265 of the calls
    that made 10,000 environments, bench/RESULTS.md)."""
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    client = KubeClient(1, timeout=3)

    async def queued() -> tuple[list, float]:
        started = asyncio.get_running_loop().time()
        try:
            calls = [_slow_call(client, namespace, 1) for _ in range(4)]
            answers = await asyncio.gather(*calls, return_exceptions=True)
            return answers, asyncio.get_running_loop().time() - started
        finally:
            await client.close()

    answers, took = asyncio.run(queued())
    assert [answer for answer in answers if isinstance(answer, BaseException)] == []
    assert [status for status, _ in answers] == [200] * 4
    assert took >= 4 - 0.5, f"the four calls shared one connection, one after another ({took:.1f} s)"


def test_urgent_calls_do_not_queue_behind_a_busy_pool(kubeconfig, monkeypatch, namespace):
    """What an admission webhook waits for (the budget gate's confirmation) has connections of its own:
    with the one common connection held for 3 s, an urgent read is answered at once, a common one waits."""
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    client = KubeClient(1)

    async def busy() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        try:
            held = loop.create_task(_slow_call(client, namespace, 3))
            await asyncio.sleep(0.2)  # the slow call has the connection
            started = loop.time()
            assert await client.get_environment(namespace, "absent", urgent=True) is None
            urgent = loop.time() - started
            assert await client.get_environment(namespace, "absent") is None
            common = loop.time() - started
            await held
            return urgent, common
        finally:
            await client.close()

    urgent, common = asyncio.run(busy())
    assert urgent < 1.0, f"the urgent read waited {urgent:.1f} s"
    assert common >= 2.0, f"the common read did not wait for the held connection ({common:.1f} s)"


def test_a_server_that_does_not_answer_within_the_limit_fails_the_call(kubeconfig, monkeypatch, namespace):
    """The limit still holds for a call that has its connection: the server keeps it 5 s, the limit is 1 s."""
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    client = KubeClient(1, timeout=1)

    async def silent() -> float:
        started = asyncio.get_running_loop().time()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await _slow_call(client, namespace, 5)
            return asyncio.get_running_loop().time() - started
        finally:
            await client.close()

    assert asyncio.run(silent()) < 3


def test_labelled_objects_are_read_in_pages_of_metadata_only(kubeconfig, monkeypatch, namespace, core):
    """The orphan sweep's list: every labelled object, over several pages, without spec, data or
    managedFields (at 10,000 environments the one-answer list of Services timed out after 60 s)."""
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    monkeypatch.setattr(kube_module, "LIST_PAGE", 2)
    for index in range(5):
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": f"mine-{index}", "labels": {"sweep": "me"}}, "stringData": {"k": "secret"}}
        )
    core.create_namespaced_secret(namespace, {"metadata": {"name": "other", "labels": {"sweep": "no"}}})
    client = KubeClient(2, namespace)
    pages = []
    request = client._request

    async def counted(method, path, *args, **query):
        pages.append(query.get("continue", ""))
        return await request(method, path, *args, **query)

    monkeypatch.setattr(client, "_request", counted)

    async def listed():
        try:
            return await client.labelled_metadata("Secret", "sweep=me")
        finally:
            await client.close()

    found = asyncio.run(listed())
    assert sorted(metadata["name"] for metadata in found) == [f"mine-{index}" for index in range(5)]
    assert len(pages) == 3 and pages[0] == "" and all(pages[1:])  # 2 + 2 + 1, each after the last one's token
    assert all(set(metadata) >= {"name", "namespace", "labels", "uid"} for metadata in found)
    assert not any("managedFields" in metadata for metadata in found)
    assert all(metadata["labels"] == {"sweep": "me"} for metadata in found)


def test_an_owners_environments_are_one_list_by_the_crds_selectable_field(kubeconfig, monkeypatch, environments):
    """The budget gate's confirmation: spec.owner is a selectable field of the CRD, so the API server
    answers "alice's environments in this namespace" itself, in pages, and nobody else's."""
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    monkeypatch.setattr(kube_module, "LIST_PAGE", 2)
    for index in range(3):
        environments.create(f"alice-{index}", owner="alice", flavor="test-short", suspend=True)
    environments.create("bob-0", owner="bob", flavor="test-short", suspend=True)
    environments.create("alicex-0", owner="alicex", flavor="test-short", suspend=True)  # a prefix is not her
    client = KubeClient(2)

    async def listed():
        try:
            return await client.environments_of(environments.namespace, "alice"), await client.environments_of(
                environments.namespace, "nobody"
            )
        finally:
            await client.close()

    alices, nobodys = asyncio.run(listed())
    assert sorted(item["metadata"]["name"] for item in alices) == ["alice-0", "alice-1", "alice-2"]
    assert all(item["spec"]["owner"] == "alice" and item["metadata"]["uid"] for item in alices)  # whole objects
    assert nobodys == []
