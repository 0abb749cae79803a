"""KubernetesBackend's aenv-jupyter ConfigMap, applied once per namespace (infra/per_namespace.py; pure
asyncio, the API answered by a stand-in that counts; the calls themselves are tested against a real
API server in tests/integration)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from analysis_operator.backends.base import Launch
from analysis_operator.backends.kubernetes import (
    EXTENSION_CONFIG_MAP,
    KubernetesBackend,
    PodSummary,
    observe_pod,
    summarize_pod,
)
from analysis_operator.model.domain import (
    LABEL_ENVIRONMENT,
    LABEL_ENVIRONMENT_UID,
    MANAGED_SELECTOR,
    BackendKind,
    Environment,
    Flavor,
)
from analysis_operator.settings import Settings

FLAVOR = Flavor(name="small", backend=BackendKind.KUBERNETES, image="jupyter")


class Kube:
    """Creates succeed; each ConfigMap apply waits until `release` is set, then fails while `failing`."""

    def __init__(self) -> None:
        self.applied: list[str] = []  # namespace of each apply made
        self.release = asyncio.Event()
        self.failing = False
        self.deleted: set[str] = set()  # namespaces whose ConfigMap someone deleted since its last apply
        self.listed = 0
        self.created: list[str] = []  # kind/namespace/name of each create
        self.services: list[tuple[str, str, str]] = []  # the Services listed: (namespace, environment, uid)
        self.terminating: set[str] = set()  # namespaces where creates fail

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        if namespace in self.terminating:
            raise RuntimeError(f"namespace {namespace} is being terminated")
        self.created.append(f"{kind}/{namespace}/{body['metadata']['name']}")
        return True

    async def labelled_metadata(self, kind: str, selector: str) -> list[dict[str, Any]]:
        assert (kind, selector) == ("Service", MANAGED_SELECTOR)
        return [
            {
                "namespace": namespace,
                "name": f"aenv-{name}",
                "labels": {LABEL_ENVIRONMENT: name, LABEL_ENVIRONMENT_UID: uid},
            }
            for namespace, name, uid in self.services
        ]

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        assert body["kind"] == "ConfigMap" and body["metadata"]["name"] == EXTENSION_CONFIG_MAP
        self.applied.append(body["metadata"]["namespace"])
        await self.release.wait()
        if self.failing:
            raise RuntimeError("the API server said no")
        self.deleted.discard(body["metadata"]["namespace"])
        return body

    async def present(self, api_version: str, kind: str, selector: str, fields: str = "") -> set[tuple[str, str]]:
        assert (kind, selector, fields) == ("ConfigMap", MANAGED_SELECTOR, f"metadata.name={EXTENSION_CONFIG_MAP}")
        self.listed += 1
        return {(namespace, EXTENSION_CONFIG_MAP) for namespace in set(self.applied) - self.deleted}

    async def delete_owned(self, *_: Any) -> bool:
        return True


def launch(namespace: str, name: str) -> Launch:
    environment = Environment(namespace=namespace, name=name, uid=f"uid-{name}", owner="alice", flavor="small")
    return Launch(environment, FLAVOR, token="t")


async def start(backend: KubernetesBackend, kube: Kube, *launches: Launch) -> list[Any]:
    """ensure() for every launch at once, the applies held until all of them wait on one."""
    started = [asyncio.ensure_future(backend.ensure(each)) for each in launches]
    await asyncio.sleep(0.01)
    kube.release.set()
    return await asyncio.gather(*started, return_exceptions=True)


def test_a_burst_into_one_namespace_applies_its_configmap_once_and_every_start_waits_for_it():
    async def scenario() -> None:
        kube = Kube()
        backend = KubernetesBackend(kube, Settings(), {})
        answers = await start(backend, kube, *(launch("team-a", f"lab-{i}") for i in range(20)), launch("team-b", "x"))
        assert not [answer for answer in answers if isinstance(answer, BaseException)]
        assert sorted(kube.applied) == ["team-a", "team-b"]
        await backend.ensure(launch("team-a", "later"))  # applied already in this run
        assert sorted(kube.applied) == ["team-a", "team-b"]

    asyncio.run(scenario())


def test_a_failed_apply_fails_every_start_waiting_on_it_and_the_next_start_applies_again():
    async def scenario() -> None:
        kube = Kube()
        kube.failing = True
        backend = KubernetesBackend(kube, Settings(), {})
        answers = await start(backend, kube, *(launch("team-a", f"lab-{i}") for i in range(5)))
        assert all(isinstance(answer, RuntimeError) for answer in answers)  # each reconcile retries
        assert kube.applied == ["team-a"]
        kube.failing = False
        await backend.ensure(launch("team-a", "lab-0"))
        assert kube.applied == ["team-a", "team-a"]

    asyncio.run(scenario())


def test_a_start_given_up_on_does_not_cancel_the_apply_the_others_wait_for():
    async def scenario() -> None:
        kube = Kube()
        backend = KubernetesBackend(kube, Settings(), {})
        impatient = asyncio.ensure_future(backend.ensure(launch("team-a", "a")))
        patient = asyncio.ensure_future(backend.ensure(launch("team-a", "b")))
        await asyncio.sleep(0.01)
        impatient.cancel()
        kube.release.set()
        await patient
        with pytest.raises(asyncio.CancelledError):
            await impatient
        assert kube.applied == ["team-a"]

    asyncio.run(scenario())


def test_the_configmap_is_applied_again_once_every_environment_started_in_its_namespace_is_gone():
    """A namespace deleted with its environments and made again under its name has no ConfigMap. Gone:
    the object deleted (forget, on its DELETED event); one that ended (delete) is still there, and so is
    its namespace."""

    async def scenario() -> None:
        kube = Kube()
        kube.release.set()
        backend = KubernetesBackend(kube, Settings(), {})
        first, second = launch("team-a", "a"), launch("team-a", "b")
        await backend.ensure(first)
        await backend.ensure(second)
        backend.forget({"uid-a"})
        assert await backend.delete(second.environment)  # b ended: its object is still in team-a
        await backend.ensure(launch("team-a", "c"))
        assert kube.applied == ["team-a"]
        backend.forget({"uid-b", "uid-c", "uid-a"})  # each counted once
        await backend.ensure(launch("team-a", "d"))
        assert kube.applied == ["team-a", "team-a"]
        await backend.ensure(launch("team-b", "e"))
        backend.forget({"uid-e"})
        await backend.ensure(launch("team-a", "f"))  # another namespace's environments going changes nothing
        assert kube.applied == ["team-a", "team-a", "team-b"]

    asyncio.run(scenario())


def test_a_configmap_deleted_under_live_environments_is_applied_again_by_the_repair():
    """Someone deletes aenv-jupyter in a namespace with environments: their next pods could not mount
    it. The repair lists the ConfigMaps and applies the missing one again, only where environments
    this process set it up for are left, and only the missing one."""

    async def scenario() -> None:
        kube = Kube()
        kube.release.set()
        backend = KubernetesBackend(kube, Settings(), {})
        await backend.repair(set())
        assert kube.listed == 0  # nothing set up yet: nothing to list
        for namespace, name in (("team-a", "a"), ("team-b", "b"), ("team-c", "c")):
            await backend.ensure(launch(namespace, name))
        await backend.repair(set())
        assert sorted(kube.applied) == ["team-a", "team-b", "team-c"]  # all there: nothing applied
        kube.deleted = {"team-a", "team-c"}
        backend.forget({"uid-c"})  # team-c's last environment is gone (and maybe the namespace)
        await backend.repair(set())
        assert sorted(kube.applied) == ["team-a", "team-a", "team-b", "team-c"]
        await backend.ensure(launch("team-a", "later"))  # set up again already
        assert sorted(kube.applied) == ["team-a", "team-a", "team-b", "team-c"]

    asyncio.run(scenario())


def test_a_repair_that_cannot_apply_leaves_the_namespace_to_the_next_start():
    async def scenario() -> None:
        kube = Kube()
        kube.release.set()
        backend = KubernetesBackend(kube, Settings(), {})
        await backend.ensure(launch("team-a", "a"))
        kube.deleted, kube.failing = {"team-a"}, True  # the namespace being deleted meanwhile, say
        await backend.repair(set())  # logged, not raised: the other namespaces' repairs go on
        assert kube.applied == ["team-a", "team-a"]
        kube.failing = False
        await backend.ensure(launch("team-a", "b"))
        assert kube.applied == ["team-a", "team-a", "team-a"]

    asyncio.run(scenario())


def test_the_service_of_a_running_pod_deleted_by_someone_is_created_again_by_the_repair():
    """OPEN reaches JupyterLab through the pod's Service; a pod event never tells of the Service going.
    The repair creates it again by the Services the orphan sweep listed, only for pods that run or
    start and belong to a live environment; none when the sweep listed nothing since the last repair."""
    running = {"metadata": {}, "spec": {"nodeName": "n"}, "status": {"phase": "Running"}}
    ended = {"metadata": {}, "spec": {}, "status": {"phase": "Failed"}}
    pods = {
        ("team-a", "kept"): [PodSummary("uid-kept", observe_pod(running))],
        ("team-a", "lost"): [PodSummary("uid-lost", observe_pod(running))],
        ("team-a", "ended"): [PodSummary("uid-ended", observe_pod(ended))],
        ("team-b", "orphan"): [PodSummary("uid-orphan", observe_pod(running))],  # its environment is gone
    }
    live = {"uid-kept", "uid-lost", "uid-ended"}

    async def scenario() -> None:
        kube = Kube()
        backend = KubernetesBackend(kube, Settings(), pods)
        await backend.repair(live)
        assert kube.created == []  # no list from an orphan sweep yet: nothing to compare with
        kube.services = [("team-a", "kept", "uid-kept")]
        await backend.list_managed()
        await backend.repair(live)
        assert kube.created == ["Service/team-a/aenv-lost"]
        await backend.repair(live)  # the next repair waits for the next sweep's list
        assert kube.created == ["Service/team-a/aenv-lost"]

    asyncio.run(scenario())


def test_a_pod_indexed_while_the_services_are_listed_is_not_given_its_service_again():
    """In a burst, environments start while the orphan sweep reads the Services (10,000 take seconds):
    their Services are made after the list's snapshot, their pods indexed before the repair. Only the
    pods indexed before the list began are compared with it; the others were created again (409) each."""
    running = {"metadata": {}, "spec": {"nodeName": "n"}, "status": {"phase": "Running"}}
    pods = {("team-a", "before"): [PodSummary("uid-before", observe_pod(running))]}

    class Burst(Kube):
        async def labelled_metadata(self, kind: str, selector: str) -> list[dict[str, Any]]:
            listed = await super().labelled_metadata(kind, selector)  # the snapshot: before "during" started
            pods[("team-a", "during")] = [PodSummary("uid-during", observe_pod(running))]
            return listed

    async def scenario() -> None:
        kube = Burst()
        backend = KubernetesBackend(kube, Settings(), pods)
        kube.services = [("team-a", "before", "uid-before")]
        await backend.list_managed()
        await backend.repair({"uid-before", "uid-during"})
        assert kube.created == []
        await backend.list_managed()  # the next sweep: "during" is compared now, and its Service was deleted
        await backend.repair({"uid-before", "uid-during"})
        assert kube.created == ["Service/team-a/aenv-during"]

    asyncio.run(scenario())


def test_a_service_that_cannot_be_made_again_leaves_the_others_to_be_made():
    running = {"metadata": {}, "spec": {"nodeName": "n"}, "status": {"phase": "Running"}}
    pods = {(namespace, "lab"): [PodSummary(f"uid-{namespace}", observe_pod(running))] for namespace in ("a", "b")}

    async def scenario() -> None:
        kube = Kube()
        kube.terminating = {"a"}
        backend = KubernetesBackend(kube, Settings(), pods)
        await backend.list_managed()  # lists no Service at all
        await backend.repair({"uid-a", "uid-b"})  # logged for a, not raised
        assert kube.created == ["Service/b/aenv-lab"]

    asyncio.run(scenario())


def test_a_pod_the_node_ended_is_replaced_a_few_times_then_the_environment_fails_in_the_nodes_words():
    """Evicted (memory pressure), or stopped by a node's shutdown: the pod is deleted and a new one made (its
    deletion's event converges again), told as PodReplaced for a person; a node that ends every pod makes
    no loop: after REPLACEMENTS the observation is FAILED, which ends the environment. The count is kept on
    the pod, so a new operator process (a new backend, reading the same pods) does not start it again."""
    from analysis_operator.backends.base import State
    from analysis_operator.backends.kubernetes import ANNOTATION_REPLACED, REPLACEMENTS

    ended = {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
    pods: dict[tuple[str, str], list[PodSummary]] = {}
    lab = launch("team-a", "lab")

    class Kubelet(Kube):
        """The index follows the pods made and deleted, as kopf's pod index would."""

        def __init__(self) -> None:
            super().__init__()
            self.made: list[dict[str, Any]] = []

        async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
            if kind == "Pod":
                self.made.append(body)
            return await super().create(kind, namespace, body)

        async def delete_owned(self, kind: str, namespace: str, name: str, label: str, uid: str) -> bool:
            self.created.append(f"deleted {kind}/{namespace}/{name}")
            pods.pop((namespace, "lab"), None)  # its DELETED event
            return True

    def the_node_ends_the_last_pod() -> None:
        pod = {**kube.made[-1], "spec": {"nodeName": "n"}, "status": ended}
        pods[("team-a", "lab")] = [summarize_pod(pod)]

    kube = Kubelet()
    kube.release.set()

    async def scenario() -> None:
        backend = KubernetesBackend(kube, Settings(), pods)
        await backend.ensure(lab)
        assert "annotations" not in kube.made[0]["metadata"]  # the first pod: nothing to count
        for replaced in range(1, REPLACEMENTS + 1):
            the_node_ends_the_last_pod()
            seen = await backend.observe(lab.environment)
            assert seen.state is State.GONE  # the engine then calls ensure
            told = await backend.ensure(lab)
            assert (told.state, told.reason, told.attention) == (State.PROVISIONING, "PodReplaced", True)
            assert "(Evicted: The node was low on resource: memory.)" in told.message
            assert "same URL and token" in told.message and told.upstream is not None
            assert kube.created[-1] == "deleted Pod/team-a/aenv-lab"
            made = await backend.ensure(lab)  # converged again after the deletion: a new pod
            assert made.state is State.PROVISIONING and kube.created[-1] == "Pod/team-a/aenv-lab"
            assert kube.made[-1]["metadata"]["annotations"] == {ANNOTATION_REPLACED: str(replaced)}
            backend = KubernetesBackend(kube, Settings(), pods)  # the operator restarted: nothing in memory
        the_node_ends_the_last_pod()
        given_up = await backend.observe(lab.environment)
        assert (given_up.state, given_up.reason) == (State.FAILED, "Evicted")
        assert given_up.message.endswith(f"(the node ended its JupyterLab pod {REPLACEMENTS + 1} times)")
        assert (await backend.ensure(lab)).state is State.FAILED and kube.created[-1] == "Pod/team-a/aenv-lab"

    asyncio.run(scenario())


@pytest.mark.parametrize("written", [None, "", "x", "-1", "2"])
def test_the_replacement_count_is_read_from_the_pod_and_nothing_else_counts(written):
    from analysis_operator.backends.kubernetes import ANNOTATION_REPLACED

    annotations = {} if written is None else {ANNOTATION_REPLACED: written}
    pod = {"metadata": {"annotations": annotations}, "status": {"phase": "Running"}}
    assert summarize_pod(pod).replaced == (2 if written == "2" else 0)
