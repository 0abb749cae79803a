"""Kubernetes backend: a JupyterLab pod, its Service and its token Secret.

Builders are pure (`build_*`); `KubernetesBackend` applies them. Children
carry owner references, so the garbage collector removes them with the
environment; no finalizer is needed for this backend.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import structlog

from analysis_operator import jupyter
from analysis_operator.backends.base import Charging, Launch, ManagedObject, Observation, Retry, State, Upstream
from analysis_operator.infra import render
from analysis_operator.infra.kube import KubeClient
from analysis_operator.infra.per_namespace import PerNamespace
from analysis_operator.model.domain import (
    GROUP,
    LABEL_ENVIRONMENT,
    LABEL_ENVIRONMENT_UID,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    MANAGED_SELECTOR,
    MANAGER,
    BackendKind,
    Dataset,
    Environment,
    Flavor,
    Mount,
    label_text,
    parse_quantity,
)
from analysis_operator.model.identity import PosixIdentity
from analysis_operator.policy.opening import base_path
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import Settings

log = structlog.get_logger("analysis_operator.kubernetes")


def build_dataset_volumes(mounts: Sequence[Mount]) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """One read-only volume and one read-only mount per granted dataset, nothing else.

    Both flags: the volume's readOnly makes the kubelet mount the source
    read-only, the mount's makes the container's view read-only, so neither a
    writable claim nor a writable export lets the user change facility data.
    """
    volumes, volume_mounts = [], []
    for index, mount in enumerate(mounts):
        name = f"dataset-{index}"
        storage = mount.dataset.storage
        volume_mount: dict[str, Any] = {"name": name, "mountPath": mount.path, "readOnly": True}
        if storage.claim_name:
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": storage.claim_name, "readOnly": True}})
            if storage.sub_path:
                volume_mount["subPath"] = storage.sub_path
        else:
            volumes.append(
                {"name": name, "nfs": {"server": storage.nfs_server, "path": storage.nfs_path, "readOnly": True}}
            )
        volume_mounts.append(volume_mount)
    return tuple(volumes), tuple(volume_mounts)


def home_claim_name(owner: str) -> str:
    """home-<owner>, made a valid object name; the hash keeps 'Alice' and 'alice' apart."""
    readable = re.sub(r"[^a-z0-9-]+", "-", owner.lower()).strip("-")[:40] or "user"
    return f"home-{readable}-{hashlib.sha256(owner.encode()).hexdigest()[:8]}"


def build_home_claim(environment: Environment, settings: Settings) -> dict[str, Any]:
    """The owner's home volume: not owned by the environment, so it outlives it (pure). Labelled with
    its owner as environments are (label_text: an owner with '@' or over 63 characters as its hash)."""
    home = settings.home
    spec: dict[str, Any] = {"accessModes": [home.access_mode], "resources": {"requests": {"storage": home.size}}}
    if home.storage_class:
        spec["storageClassName"] = home.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": home_claim_name(environment.owner),
            "namespace": environment.namespace,
            "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_OWNER: label_text(environment.owner)},
        },
        "spec": spec,
    }


def build_pod_identity(identity: PosixIdentity | None, settings: Settings) -> dict[str, Any] | None:
    """The pod's securityContext ids for the owner (None: the image's jovyan, uid 1000 / gid 100).

    supplementalGroups are exactly the gids policy granted (policy/identity.py), and with
    supplementalGroupsPolicy Strict the image's /etc/group adds none. fsGroup only with home
    claims: the kubelet then gives a fresh claim the owner's primary group (setgid, group-writable)
    so they can write their home; an emptyDir home is world-writable already, dataset volumes are
    read-only and NFS is never chowned, so elsewhere it would only add a recursive chgrp at each
    start. It is the primary gid, so it grants nothing the owner does not have.
    """
    if identity is None:
        return None
    return {
        "uid": identity.uid,
        "gid": identity.gid,
        "groups": list(identity.groups),
        "strict_groups": settings.identity.strict_supplemental_groups,
        "fs_group": identity.gid if settings.home.claims else None,
    }


def build_pod(
    environment: Environment,
    flavor: Flavor,
    settings: Settings,
    dataset_volumes: tuple[dict[str, Any], ...] = (),
    dataset_mounts: tuple[dict[str, Any], ...] = (),
    identity: PosixIdentity | None = None,
    replaced: int = 0,
) -> dict[str, Any]:
    """The JupyterLab pod; `replaced`: how many pods of this environment the node ended before it."""
    resources = flavor.resources
    requests = {"cpu": resources.cpu, "memory": resources.memory}
    limits = dict(requests)
    if resources.gpu:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(resources.gpu)
    base_url = base_path(settings.gateway.path_prefix, environment.namespace, environment.name)
    pod: dict[str, Any] = render.render_yaml(
        settings.templates_dir,
        "pod.yaml.j2",
        name=environment.child_name,
        namespace=environment.namespace,
        labels=environment.identity_labels,
        owner_references=environment.owner_references,
        image=environment.image or flavor.image,
        port=settings.jupyter_port,
        base_url=base_url,
        base_url_argument=f"--ServerApp.base_url={base_url}",
        readiness_path=f"{base_url}api",
        secret_name=environment.child_name,
        environment_name=environment.name,
        owner=environment.owner,
        requests=requests,
        limits=limits,
        gpu=resources.gpu,
        dataset_volumes=list(dataset_volumes),
        dataset_mounts=list(dataset_mounts),
        home_claim=home_claim_name(environment.owner) if settings.home.claims else "",
        identity=build_pod_identity(identity, settings),
        extension_dir=EXTENSION_DIR,
        extension_config_map=EXTENSION_CONFIG_MAP,
        extension_items=[{"key": key, "path": path} for key, path in jupyter.FILES.items()],
    )
    if replaced:
        pod["metadata"]["annotations"] = {ANNOTATION_REPLACED: str(replaced)}
    return pod


# OPEN: the operator's jupyter_server extension (analysis_operator/jupyter/), one ConfigMap per namespace
EXTENSION_CONFIG_MAP = "aenv-jupyter"
EXTENSION_DIR = "/opt/analysis-environment"


def build_extension_config_map(namespace: str) -> dict[str, Any]:
    """What every JupyterLab pod of a namespace mounts at EXTENSION_DIR (applied with the first one there)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": EXTENSION_CONFIG_MAP,
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGER},
        },
        "data": dict(zip(jupyter.FILES, (jupyter.extension_source(), jupyter.CONFIG), strict=True)),
    }


def build_service(environment: Environment, settings: Settings) -> dict[str, Any]:
    service: dict[str, Any] = render.render_yaml(
        settings.templates_dir,
        "service.yaml.j2",
        name=environment.child_name,
        namespace=environment.namespace,
        labels=environment.identity_labels,
        owner_references=environment.owner_references,
        selector={LABEL_ENVIRONMENT_UID: environment.uid},
        port=settings.jupyter_port,
    )
    return service


def build_url(environment: Environment, settings: Settings) -> str:
    """Where JupyterLab answers inside the cluster (under the same base path as behind the gateway)."""
    host = f"{environment.child_name}.{environment.namespace}.svc.{settings.cluster_domain}"
    path = base_path(settings.gateway.path_prefix, environment.namespace, environment.name)
    return f"http://{host}:{settings.jupyter_port}{path}lab"


def build_upstream(environment: Environment, settings: Settings) -> Upstream:
    """The gateway reaches a pod through its Service; JupyterLab serves under the base path itself."""
    return Upstream(port=settings.jupyter_port, service=environment.child_name, landing="lab")


def observe_pod(pod: Mapping[str, Any] | None, url: str = "") -> Observation:
    """What a pod says about its environment (pure)."""
    if pod is None:
        return Observation(State.GONE, "PodMissing", "the JupyterLab pod does not exist")
    metadata, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status") or {}
    node = spec.get("nodeName", "")
    reference = {"name": metadata.get("name", ""), "state": status.get("phase", ""), "node": node}
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    if metadata.get("deletionTimestamp"):
        return Observation(State.PROVISIONING, "PodTerminating", "the JupyterLab pod is being deleted", reference)
    phase = status.get("phase", "Pending")
    if phase in ("Failed", "Succeeded"):
        message = status.get("message") or f"the JupyterLab pod ended ({phase})"
        return Observation(State.FAILED, status.get("reason") or f"Pod{phase}", message, reference)
    scheduled = conditions.get("PodScheduled", {})
    if scheduled.get("status") == "False":
        reason, message = unscheduled(scheduled, metadata.get("namespace", ""))
        return Observation(State.PENDING, reason, message, reference)
    cpus, gpus = _held_resources(spec)
    if phase == "Running" and conditions.get("Ready", {}).get("status") == "True":
        return Observation(
            State.READY, "PodReady", f"JupyterLab is running on {node}", reference, url, cpus, gpus, runs=True
        )
    reason, message = stuck(status)
    attention = reason != "PodStarting"
    # Running and not Ready: JupyterLab starting, or its server stopped by the owner (`kill -STOP`)
    # while the rest of the container goes on; not a container that cannot start or keeps crashing
    runs = phase == "Running" and not attention
    return Observation(State.PROVISIONING, reason, message, reference, "", cpus, gpus, attention=attention, runs=runs)


# What the kubelet says of a container that cannot start, as a reason a person can act on. Its
# retries go on (the pod may still start, and holds its node's resources meanwhile); the words stay
# the same from one retry to the next (ErrImagePull and ImagePullBackOff alternate), so a stuck pod
# costs one status write, not one per retry.
_PULL = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"})
_NOT_CREATED = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})


def stuck(status: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, message) of a pod that runs no ready JupyterLab yet (pure): PodStarting, or why the
    kubelet cannot start it (the first container that says so)."""
    for container in [*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        said, image = str(waiting.get("reason") or ""), container.get("image") or "?"
        if said == "InvalidImageName":
            return "ImagePullFailed", f"the image name {image!r} is not valid: correct spec.image or the flavor's image"
        if said in _PULL:
            return (
                "ImagePullFailed",
                f"the node cannot pull the image {image!r}: check its name (spec.image or the flavor's image) and that "
                "the registry lets the cluster pull it; the node keeps trying, and it starts once the image comes",
            )
        if said in _NOT_CREATED:
            return "ContainerNotCreated", f"the node cannot start JupyterLab ({said}): {waiting.get('message') or said}"
        if said == "CrashLoopBackOff":
            ended = ((container.get("lastState") or {}).get("terminated") or {}).get("exitCode")
            code = f" (last exit code {ended})" if ended is not None else ""
            return (
                "ServerCrashing",
                f"JupyterLab exits as soon as it starts{code} and the node restarts it with a growing delay: check "
                f"that the image {image!r} starts a JupyterLab server",
            )
    return "PodStarting", "JupyterLab is starting"


_MISSING_CLAIM = re.compile(r'persistentvolumeclaim "([^"]+)" not found')


def unscheduled(condition: Mapping[str, Any], namespace: str) -> tuple[str, str]:
    """(reason, message) of a pod the scheduler cannot place, in its words (pure). A dataset's
    PersistentVolumeClaim missing from the namespace is the one case a scientist can act on through
    someone else, so it gets its own reason and a sentence; the scheduler's text is kept after it."""
    said = str(condition.get("message") or "waiting for a node")
    missing = sorted(set(_MISSING_CLAIM.findall(said)))
    if missing:
        claims = ", ".join(repr(claim) for claim in missing)
        return (
            "ClaimNotFound",
            f"the storage of a mounted dataset (PersistentVolumeClaim {claims}) does not exist in namespace "
            f"{namespace!r}, so JupyterLab cannot start and nothing is charged: it starts by itself once the claim "
            f"exists; ask the facility's data team to provide it, or remove the dataset (scheduler: {said})",
        )
    return str(condition.get("reason") or "Unschedulable"), said


def _held_resources(spec: Mapping[str, Any]) -> tuple[float, int]:
    if not spec.get("nodeName"):
        return 0.0, 0
    cpus, gpus = 0.0, 0
    for container in spec.get("containers") or ():
        requests = (container.get("resources") or {}).get("requests") or {}
        cpus += parse_quantity(requests.get("cpu", 0))
        gpus += int(requests.get("nvidia.com/gpu", 0))
    return cpus, gpus


@dataclasses.dataclass(frozen=True)
class PodSummary:
    """What the pod index keeps per pod: enough to decide, small enough for 10,000."""

    environment_uid: str
    observation: Observation
    replaced: int = 0  # pods of its environment the node ended before this one (ANNOTATION_REPLACED)


def summarize_pod(pod: Mapping[str, Any]) -> PodSummary:
    metadata = pod.get("metadata", {})
    labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
    replaced = annotations.get(ANNOTATION_REPLACED, "0")
    return PodSummary(
        labels.get(LABEL_ENVIRONMENT_UID, ""), observe_pod(pod), int(replaced) if replaced.isdigit() else 0
    )


# A pod the node ended (evicted for memory or disk pressure, stopped by a node's shutdown, refused by the
# kubelet): with restartPolicy Always nothing in the environment ends its pod, so it is replaced, as a
# Deployment's would be, keeping Service, URL and token. At most this many times per environment, so that a
# node refusing every pod makes no loop; then the environment is Failed, in the node's words. The count is
# kept on the pod (ANNOTATION_REPLACED), so a restart of the operator does not start it again; only between
# deleting the ended pod and creating the next (one converge) is it held in memory.
REPLACEMENTS = 3
ANNOTATION_REPLACED = f"{GROUP}/replaced"


class KubernetesBackend:
    """Pods and Services through the API; what exists is read from kopf's pod index."""

    kind = BackendKind.KUBERNETES
    needs_finalizer = False  # owner references: the garbage collector removes pod, Service and Secret
    polled = False  # pod events push every change (handlers/environments.py)
    charging = Charging.FLAVOR

    def __init__(self, kube: KubeClient, settings: Settings, pods_index: Mapping[Any, Any]) -> None:
        self._kube = kube
        self._settings = settings
        self._pods = pods_index  # kopf index: (namespace, environment name) -> [PodSummary]
        self._extension = PerNamespace(lambda namespace: kube.apply(build_extension_config_map(namespace)))
        # (namespace, environment name, uid) of the pods whose Service the last orphan sweep did not list,
        # until a repair
        self._unserved: set[tuple[str, str, str]] = set()
        self._replacing: dict[str, int] = {}  # environment uid -> pods the node ended, until the next is created

    def validate(self, environment: Environment, flavor: Flavor) -> Refusal | None:
        if not (environment.image or flavor.image):
            return Refusal("ImageMissing", f"flavor {flavor.name!r} has no image: set spec.image")
        return None

    def dataset_problem(self, dataset: Dataset) -> str | None:
        storage = dataset.storage
        if not (storage.claim_name or storage.nfs_share):
            return f"dataset {dataset.name!r} has no spec.storage.persistentVolumeClaim or nfs for Kubernetes pods"
        return None

    def _summary(self, environment: Environment) -> PodSummary | None:
        for summary in self._pods.get((environment.namespace, environment.name), ()):
            if summary.environment_uid == environment.uid:
                return summary  # type: ignore[no-any-return]
        return None

    def _indexed(self, environment: Environment) -> Observation | None:
        if (summary := self._summary(environment)) is not None:
            observation: Observation = summary.observation
            if observation.state.holds:  # its Service exists from the start: routable while it starts
                observation = dataclasses.replace(observation, upstream=build_upstream(environment, self._settings))
            if observation.state is State.READY:
                observation = dataclasses.replace(observation, url=build_url(environment, self._settings))
            if observation.state is State.FAILED:  # the node ended it: replaced (ensure), a few times
                if summary.replaced < REPLACEMENTS:
                    return dataclasses.replace(observation, state=State.GONE)
                times = summary.replaced + 1
                message = f"{observation.message} (the node ended its JupyterLab pod {times} times)"
                return dataclasses.replace(observation, message=message)
            return observation
        return None

    async def ensure(self, launch: Launch) -> Observation:
        environment, flavor = launch.environment, launch.flavor
        observation = self._indexed(environment)
        if observation is not None and observation.state is State.GONE:
            return await self._replace(environment, observation)
        if observation is not None:
            return observation
        dataset_volumes, dataset_mounts = build_dataset_volumes(launch.mounts)
        await self._create_own("Service", environment, build_service(environment, self._settings))
        if self._settings.home.claims:  # exists already after the user's first environment
            await self._kube.create(
                "PersistentVolumeClaim", environment.namespace, build_home_claim(environment, self._settings)
            )
        await self._extension.ensure(environment.namespace, environment.uid)
        replaced = self._replacing.get(environment.uid, 0)
        pod = build_pod(environment, flavor, self._settings, dataset_volumes, dataset_mounts, launch.identity, replaced)
        await self._create_own("Pod", environment, pod)
        self._replacing.pop(environment.uid, None)  # the new pod carries the count
        # routable from now on (its Service exists): the gateway has the route before the pod is Ready
        return dataclasses.replace(observe_pod(pod), upstream=build_upstream(environment, self._settings))

    async def _replace(self, environment: Environment, ended: Observation) -> Observation:
        """Delete the pod the node ended (terminal: the API server removes it at once); its deletion's
        event converges the environment again, which creates the new pod (REPLACEMENTS)."""
        summary = self._summary(environment)
        await self._delete_own("Pod", environment)
        self._replacing[environment.uid] = (summary.replaced if summary else 0) + 1
        log.warning(
            "pod.replaced",
            environment=f"{environment.namespace}/{environment.name}",
            reason=ended.reason,
            node=ended.reference.get("node", ""),
        )
        home = "files in the home directory are kept" if self._settings.home.claims else "and so is its home directory"
        return Observation(
            State.PROVISIONING,
            "PodReplaced",
            f"the node ended the JupyterLab pod ({ended.reason}: {ended.message}); a new one is starting, with the "
            f"same URL and token (what ran in the old one, such as kernels, is lost; {home})",
            ended.reference,
            upstream=build_upstream(environment, self._settings),
            attention=True,
        )

    async def _create_own(self, kind: str, environment: Environment, body: dict[str, Any]) -> None:
        """Create, or keep what is there if it is this environment's. A leftover of an earlier
        environment of the same name (its children orphaned by `kubectl delete --cascade=orphan`)
        is removed first, never adopted."""
        if await self._kube.create(kind, environment.namespace, body):
            return
        metadata = await self._kube.read_metadata(kind, environment.namespace, environment.child_name) or {}
        if (metadata.get("labels") or {}).get(LABEL_ENVIRONMENT_UID) == environment.uid:
            return
        await self._kube.delete(kind, environment.namespace, environment.child_name, uid=metadata.get("uid", ""))
        raise Retry(f"removed a leftover {kind} {environment.child_name!r} of an earlier environment", delay=1)

    async def observe(self, environment: Environment) -> Observation:
        return self._indexed(environment) or observe_pod(None)

    async def suspend(self, environment: Environment) -> Observation:
        """Remove the pod, keep Service and Secret so resuming keeps URL and token."""
        await self._delete_own("Pod", environment)
        return await self.observe(environment)

    async def resume(self, launch: Launch) -> Observation:
        return await self.ensure(launch)

    async def extend(self, environment: Environment, until: datetime.datetime) -> bool:
        return False  # a pod has no time limit of its own: the engine ends it at expiresAt

    async def delete(self, environment: Environment) -> bool:
        """Pod and Service of exactly this environment (by its uid label: never a namesake's)."""
        for kind in ("Pod", "Service"):
            await self._delete_own(kind, environment)
        return self._indexed(environment) is None

    def forget(self, uids: Collection[str]) -> None:
        """The namespace's aenv-jupyter ConfigMap is applied again once none of its environments is left."""
        self._extension.forget(uids)
        for uid in uids:
            self._replacing.pop(uid, None)

    async def repair(self, live: Collection[str]) -> None:
        """What someone deleted under live environments, made again: the aenv-jupyter ConfigMap of a
        namespace (pods that start meanwhile wait for it to mount), and the Service of a pod that runs
        or starts (OPEN reaches JupyterLab through it), of the pods whose Service the orphan sweep did
        not find a moment before (list_managed)."""
        unserved, self._unserved = self._unserved, set()
        for namespace, name, uid in sorted(unserved):
            environment = Environment(namespace, name, uid, owner="", flavor="")
            summary = self._summary(environment)
            if uid in live and summary is not None and summary.observation.state.holds:
                await self._restore_service(environment)
        if done := self._extension.done:  # the namespaces set up before the list: it has their ConfigMap
            found = await self._kube.present(
                "v1", "ConfigMap", MANAGED_SELECTOR, f"metadata.name={EXTENSION_CONFIG_MAP}"
            )
            await self._extension.restore(done - {namespace for namespace, _ in found}, "ConfigMap")

    async def _restore_service(self, environment: Environment) -> None:
        where = f"{environment.namespace}/{environment.name}"
        try:
            made = await self._kube.create("Service", environment.namespace, build_service(environment, self._settings))
        except Exception as error:  # its namespace being deleted, say: the others are made still
            log.warning("service.restore_failed", environment=where, error=repr(error))
            return
        if made:
            log.warning("service.restored", environment=where)

    async def _delete_own(self, kind: str, environment: Environment) -> None:
        await self._kube.delete_owned(
            kind, environment.namespace, environment.child_name, LABEL_ENVIRONMENT_UID, environment.uid
        )

    async def list_managed(self) -> list[ManagedObject]:
        """Pods and Services the operator made. Owner references let the garbage collector remove them
        with their environment, except when a user deleted it with --cascade=orphan."""
        # The pods indexed before the Services are listed: each one's Service was made before it
        # (ensure), so the listing has it unless someone deleted it. Pods indexed later are not asked
        # about: in a burst, a Service made while the list was read would be created again (409).
        pods = {
            (namespace, name, summary.environment_uid)
            for (namespace, name), summaries in list(self._pods.items())
            for summary in summaries
        }
        found = {key: f"Pod/{key[0]}/{key[1]}" for key in pods}
        services = set()
        for metadata in await self._kube.labelled_metadata("Service", MANAGED_SELECTOR):
            labels = metadata.get("labels") or {}
            key = (
                metadata.get("namespace", ""),
                labels.get(LABEL_ENVIRONMENT, ""),
                labels.get(LABEL_ENVIRONMENT_UID, ""),
            )
            services.add(key)
            found.setdefault(key, f"Service/{metadata.get('namespace')}/{metadata.get('name')}")
        self._unserved = pods - services  # for the repair that follows (a pod whose Service was deleted)
        return [
            ManagedObject(namespace, name, uid, backend_id)
            for (namespace, name, uid), backend_id in found.items()
            if uid
        ]

    def close(self) -> None:
        """Nothing of its own: the Kubernetes client belongs to the operator."""
