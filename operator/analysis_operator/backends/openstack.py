"""OpenStack backend: remote-desktop VMs as Nova servers, through openstacksdk.

The desired server is a pure function of the environment (`build_server_request`);
the backend finds the server by its identity metadata (never by name alone:
two namespaces may hold environments with the same name), creates it when
missing, and maps Nova's status onto an Observation. openstacksdk blocks, so
every call runs in this backend's own bounded thread pool: a slow or dead
cloud ties up those threads only, never kopf's loop or its default executor.

The VM's desktop opens in the browser: cloud-init starts a VNC desktop on localhost and
noVNC (websockify) on NOVNC_PORT; an ACTIVE server reports that port at its best address as
its `Upstream`, so the engine routes the facility's gateway to it (engine/routes.py).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime
import functools
import logging
import re
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from analysis_operator.backends.base import (
    BackendUnavailable,
    Charging,
    Launch,
    ManagedObject,
    Observation,
    State,
    Upstream,
)
from analysis_operator.infra.render import render_text
from analysis_operator.model.domain import MANAGER, BackendKind, Dataset, Environment, Flavor, Mount
from analysis_operator.model.identity import PosixIdentity
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import Settings

logger = logging.getLogger(__name__)

# Nova metadata keys allow only [A-Za-z0-9-_:. ], so no Kubernetes-style "/".
META_MANAGED_BY = "analysis.panosc.eu:managed-by"
META_NAMESPACE = "analysis.panosc.eu:namespace"
META_NAME = "analysis.panosc.eu:name"
META_UID = "analysis.panosc.eu:uid"
META_OWNER = "analysis.panosc.eu:owner"
# A server tag lets list_managed ask Nova for our servers only.
MANAGED_TAG = MANAGER
NOVA_METADATA_VALUE_MAX = 255
API_TIMEOUT_SECONDS = 30
DESKTOP_USER = "analysis"
# The desktop opens in the browser: noVNC and its websocket (websockify) on NOVNC_PORT, which the
# facility's network lets the gateway reach (and nobody else); the VNC server of display
# VNC_DISPLAY listens on localhost only (templates/cloud-init.yaml.j2 says why and how).
NOVNC_PORT = 6080
VNC_DISPLAY = 1
# What OPEN shows, relative to the environment's base path ("{path}": that path without its leading
# "/"): noVNC's page, connecting at once to the websocket under the same base path, the desktop
# resized to the browser window. noVNC serves at "/", so the gateway strips the base path.
NOVNC_LANDING = "vnc.html?path={path}websockify&autoconnect=true&resize=remote"
STARTING = ("BUILD", "REBOOT", "HARD_REBOOT")  # Nova statuses on the way to ACTIVE
GONE = ("DELETED", "SOFT_DELETED")  # Nova statuses of a server that no longer runs

T = TypeVar("T")


# ---------------------------------------------------------------- pure builders


def build_identity_metadata(environment: Environment) -> dict[str, str]:
    """Nova metadata that ties a server to its environment (values capped at Nova's 255)."""
    metadata = {
        META_MANAGED_BY: MANAGER,
        META_NAMESPACE: environment.namespace,
        META_NAME: environment.name,
        META_UID: environment.uid,
        META_OWNER: environment.owner,
    }
    return {key: value[:NOVA_METADATA_VALUE_MAX] for key, value in metadata.items()}


def build_dataset_mounts(mounts: Sequence[Mount]) -> list[dict[str, str]]:
    """The granted datasets as NFS shares (the policy grants only datasets that have one)
    and where each appears in the VM; cloud-init mounts them read-only."""
    return [
        {"name": mount.dataset.name, "source": mount.dataset.storage.nfs_share, "mount_path": mount.path}
        for mount in mounts
    ]


def build_desktop_account(identity: PosixIdentity | None) -> dict[str, Any] | None:
    """The desktop user as the owner: their account name, uid, primary gid and the gids that grant
    their data, each group created with that gid (named after its FacilityGroup) if the image
    lacks it. None: the image's shared DESKTOP_USER, as before identities."""
    if identity is None:
        return None
    return {
        "name": identity.user,
        "uid": identity.uid,
        "gid": identity.gid,
        "groups": [
            {"gid": identity.gid, "name": identity.user},
            *({"gid": gid, "name": name} for gid, name in identity.named_groups()),
        ],
        "supplementary": ",".join(str(gid) for gid in identity.groups),
    }


def build_user_data(
    environment: Environment,
    token: str,
    settings: Settings,
    mounts: Sequence[Mount] = (),
    identity: PosixIdentity | None = None,
) -> str:
    account = build_desktop_account(identity)
    return render_text(
        settings.templates_dir,
        "cloud-init.yaml.j2",
        hostname=environment.child_name,
        identity={
            "namespace": environment.namespace,
            "name": environment.name,
            "uid": environment.uid,
            "owner": environment.owner,
        },
        desktop_user=account["name"] if account else DESKTOP_USER,
        account=account,
        token=token,
        datasets=build_dataset_mounts(mounts),
        vnc_display=VNC_DISPLAY,
        novnc_port=NOVNC_PORT,
    )


def build_server_request(
    environment: Environment,
    flavor: Flavor,
    token: str,
    settings: Settings,
    mounts: Sequence[Mount] = (),
    identity: PosixIdentity | None = None,
) -> dict[str, Any]:
    """What to ask Nova for; flavor, image and network are names, resolved by the backend."""
    image = (
        environment.image
        if (flavor.allow_custom_image and environment.image)
        else (flavor.openstack.image or flavor.image)
    )
    return {
        "name": environment.child_name,
        "flavor": flavor.openstack.flavor,
        "image": image,
        "network": flavor.openstack.network,
        "key_name": flavor.openstack.key_name,
        "metadata": build_identity_metadata(environment),
        "tags": [MANAGED_TAG],
        "user_data": build_user_data(environment, token, settings, mounts, identity),
    }


_GPU_RESOURCE = re.compile(r"^resources\d*:(VGPU|PGPU|CUSTOM_\w*GPU\w*)$")


def gpus_from_extra_specs(extra_specs: Mapping[str, str]) -> int:
    """GPUs a Nova flavor asks for: vGPU/custom GPU resources plus PCI passthrough aliases."""
    total = 0
    for key, value in extra_specs.items():
        if _GPU_RESOURCE.match(key):
            total += int(value)
        elif key == "pci_passthrough:alias":
            total += sum(int(part.split(":")[1]) if ":" in part else 1 for part in str(value).split(",") if part)
    return total


def best_address(addresses: Mapping[str, list[Mapping[str, Any]]]) -> str:
    """The address to reach the server at: a floating one first, then any fixed one ("" if none)."""
    found = [entry for entries in addresses.values() for entry in entries]
    found.sort(key=lambda entry: entry.get("OS-EXT-IPS:type") != "floating")
    return str(found[0]["addr"]) if found else ""


def connection_url(address: str) -> str:
    """noVNC at the server itself, for a site without a gateway (the browser then asks for the
    access token as the password); with a gateway, the engine shows the gateway's URL instead."""
    if not address:
        return ""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{NOVNC_PORT}/vnc.html?autoconnect=true&resize=remote"


def desktop_upstream(address: str) -> Upstream | None:
    """Where the gateway sends the environment's traffic: noVNC on the server's address."""
    if not address:
        return None
    return Upstream(port=NOVNC_PORT, address=address, landing=NOVNC_LANDING, strip_prefix=True)


def observe_server(server: Any) -> Observation:
    """Map a Nova server (or None) onto the backend-neutral Observation."""
    if server is None or server.status in GONE:
        return Observation(State.GONE, reason="ServerGone", message="no server exists")
    status = server.status
    addresses = server.addresses or {}
    reference = {
        "id": server.id,
        "state": status,
        "addresses": [entry["addr"] for entries in addresses.values() for entry in entries],
    }
    if status == "ACTIVE" and server.task_state:
        # e.g. shelving or rebooting: still holds its resources, but not usable as is.
        return Observation(
            State.PROVISIONING,
            reason="Server" + _camel(server.task_state),
            message=f"Nova task {server.task_state} in progress",
            reference=reference,
            cpus=float(server.flavor.vcpus or 0),
            gpus=gpus_from_extra_specs(server.flavor.extra_specs or {}),
        )
    if status == "ACTIVE":
        flavor = server.flavor
        address = best_address(addresses)
        message = "remote desktop ready" if address else "server ACTIVE but has no network address"
        return Observation(
            State.READY,
            reason="ServerActive",
            message=message,
            reference=reference,
            url=connection_url(address),
            cpus=float(flavor.vcpus or 0),
            gpus=gpus_from_extra_specs(flavor.extra_specs or {}),
            upstream=desktop_upstream(address),
        )
    if status == "ERROR":
        fault = (server.fault or {}).get("message") or "Nova reports ERROR without a fault message"
        return Observation(State.FAILED, reason="ServerError", message=fault.strip(), reference=reference)
    if status in ("SHELVED", "SHELVED_OFFLOADED"):
        return Observation(
            State.SUSPENDED,
            reason="Shelved",
            message=f"server {status}, disk kept; unshelve to resume",
            reference=reference,
        )
    # Starting (again): routed from the moment an address is known, the endpoint made ready at Ready.
    starting = desktop_upstream(best_address(addresses)) if status in STARTING else None
    if status == "BUILD":
        return Observation(
            State.PROVISIONING,
            reason="ServerBuilding",
            message="Nova is building the server",
            reference=reference,
            upstream=starting,
        )
    return Observation(
        State.PROVISIONING,
        reason="Server" + _camel(status),
        message=f"server is {status}",
        reference=reference,
        upstream=starting,
    )


def _camel(text: str) -> str:
    return "".join(part.title() for part in text.split("_"))


def _unreachable_message(cloud: str, error: Exception) -> str:
    """Say which endpoint failed without echoing anything that might hold a secret."""
    match = re.search(r"https?://(?:[^@/\s]*@)?([^/\s]+)", str(error))
    where = f" at {match.group(1)}" if match else ""
    return f"OpenStack cloud {cloud!r} unreachable{where} ({type(error).__name__}); will retry"


def _translate_errors(cloud: str, call: Callable[[], T]) -> T:
    """Run one blocking sdk call; turn "cannot reach or log in to the cloud" into BackendUnavailable."""
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as sdk

    try:
        return call()
    except (ksa.ConnectionError, ksa.DiscoveryFailure, ksa.EndpointNotFound, sdk.ServiceDiscoveryException) as error:
        raise BackendUnavailable(_unreachable_message(cloud, error)) from None
    except (ksa.http.HttpError, sdk.HttpException) as error:
        status = getattr(error, "status_code", None) or getattr(error, "http_status", None)
        if status == 401:
            raise BackendUnavailable(
                f"OpenStack cloud {cloud!r} refused the operator's credentials (401); "
                f"check the clouds.yaml / application credential"
            ) from None
        if status in (502, 503, 504):
            raise BackendUnavailable(_unreachable_message(cloud, error)) from None
        raise


class OpenStackBackend:
    """Remote-desktop VMs as Nova servers. One instance per operator process."""

    kind = BackendKind.OPENSTACK
    needs_finalizer = True  # a server outside Kubernetes: deleted before the environment goes
    polled = True  # Nova pushes nothing: the sweep observes every round
    charging = Charging.ALLOCATION  # the Nova flavor's vCPUs and GPUs, while the server holds them

    def __init__(self, settings: Settings, connect: Callable[[], Any] | None = None) -> None:
        self._settings = settings
        self._cloud = settings.openstack.cloud
        self._connect = connect or self._connect_from_clouds_yaml
        self._connection: Any = None
        self._connection_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.openstack.executor_workers, thread_name_prefix="openstack"
        )

    # -------------------------------------------------------------- plumbing

    def _connect_from_clouds_yaml(self) -> Any:
        from openstack import config as sdk_config
        from openstack import connection

        files = [self._settings.openstack.clouds_yaml] if self._settings.openstack.clouds_yaml else None
        # A file named in settings is the one read: openstacksdk would otherwise put OS_CLIENT_CONFIG_FILE
        # (and OS_* variables) before it, and an operator configured for one cloud would talk to another.
        region = sdk_config.OpenStackConfig(config_files=files, load_envvars=files is None).get_one(
            cloud=self._cloud, api_timeout=API_TIMEOUT_SECONDS
        )
        return connection.Connection(config=region)

    def _compute(self) -> Any:
        # Built lazily in a worker thread: loading clouds.yaml is I/O, and a
        # Connection shares one keystone session (and token) across threads.
        with self._connection_lock:
            if self._connection is None:
                self._connection = self._connect()
            return self._connection

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        call = functools.partial(_translate_errors, self._cloud, functools.partial(function, *args))
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def forget(self, uids: Collection[str]) -> None:
        """Nothing is kept per environment here."""

    async def repair(self, live: Collection[str]) -> None:
        """Nothing is set up per namespace here."""

    # ------------------------------------------------- blocking sdk helpers

    def _find_servers(self, environment: Environment) -> list[Any]:
        """Our servers for this environment, matched on the uid metadata; oldest first, and by id within
        the second Nova's created_at counts in, so that every replica keeps the same one."""
        compute = self._compute().compute
        candidates = compute.servers(details=True, name=f"^{re.escape(environment.child_name)}$", tags=MANAGED_TAG)
        servers = [server for server in candidates if (server.metadata or {}).get(META_UID) == environment.uid]
        return sorted(servers, key=lambda server: (server.created_at or "", server.id))

    def _find_server(self, environment: Environment) -> Any:
        """The environment's server: the oldest that is not deleted or being deleted. Any other is
        deleted on sight (`_delete_duplicates`)."""
        servers = self._find_servers(environment)
        alive = [server for server in servers if server.status not in GONE and server.task_state != "deleting"]
        server = alive[0] if alive else (servers[0] if servers else None)
        if len(alive) > 1:
            self._delete_duplicates(environment, alive[0], alive[1:])
        if server is not None and server.status == "ERROR" and not server.fault:
            # Nova's list view can leave the fault out; the single-server view has it.
            server = self._compute().compute.get_server(server.id)
        return server

    def _delete_duplicates(self, environment: Environment, kept: Any, duplicates: list[Any]) -> None:
        """Never two: a create whose answer was lost and was sent again, or one made by each replica
        across a failover, leaves a second server that would run (uncharged: the environment reports
        one) until the environment is deleted; the orphan sweep leaves what a live environment owns.
        A delete Nova refuses (a locked server) is asked again at the next look."""
        from openstack import exceptions as sdk

        logger.warning(
            "environment %s/%s has %d servers; keeping the oldest %s, deleting %s",
            environment.namespace,
            environment.name,
            len(duplicates) + 1,
            kept.id,
            ", ".join(duplicate.id for duplicate in duplicates),
        )
        for duplicate in duplicates:
            try:
                self._compute().compute.delete_server(duplicate.id, ignore_missing=True)
            except sdk.HttpException as error:
                logger.warning(
                    "could not delete duplicate server %s of %s/%s: %s",
                    duplicate.id,
                    environment.namespace,
                    environment.name,
                    _first_line(error),
                )

    def _create_server(self, request: Mapping[str, Any]) -> Any:
        connection = self._compute()
        nova_flavor = connection.compute.find_flavor(request["flavor"], ignore_missing=False)
        image = connection.image.find_image(request["image"], ignore_missing=False)
        networks: Any = "none"
        if request["network"]:
            network = connection.network.find_network(request["network"], ignore_missing=False)
            networks = [{"uuid": network.id}]
        arguments = dict(
            name=request["name"],
            flavor_id=nova_flavor.id,
            image_id=image.id,
            networks=networks,
            metadata=request["metadata"],
            tags=request["tags"],
            user_data=base64.b64encode(request["user_data"].encode()).decode(),
        )
        if request["key_name"]:
            arguments["key_name"] = request["key_name"]
        return connection.compute.create_server(**arguments)

    def _ensure_blocking(self, environment: Environment, request: Mapping[str, Any]) -> Observation:
        from openstack import exceptions as sdk

        server = self._find_server(environment)
        if server is None:
            try:
                created = self._create_server(request)
            except (sdk.NotFoundException, sdk.BadRequestException, sdk.ForbiddenException) as error:
                # A missing flavor/image/network or a quota refusal will not fix itself.
                return Observation(State.FAILED, reason="ServerRequestRefused", message=_first_line(error))
            logger.info("created server %s for %s/%s", created.id, environment.namespace, environment.name)
            server = self._compute().compute.get_server(created.id)
        return observe_server(server)

    def _delete_blocking(self, environment: Environment) -> bool:
        servers = self._find_servers(environment)
        for server in servers:
            if server.task_state != "deleting":
                self._compute().compute.delete_server(server.id, ignore_missing=True)
        # Confirmed gone only when a later look finds nothing.
        return not servers

    def _shelve_blocking(self, environment: Environment, shelve: bool) -> Observation:
        server = self._find_server(environment)
        if server is None:
            return observe_server(None)
        compute = self._compute().compute
        if shelve and server.status in ("ACTIVE", "SHUTOFF", "PAUSED", "SUSPENDED") and not server.task_state:
            compute.shelve_server(server.id)
        elif not shelve and server.status in ("SHELVED", "SHELVED_OFFLOADED") and not server.task_state:
            compute.unshelve_server(server.id)
        return observe_server(compute.get_server(server.id))

    def _list_managed_blocking(self) -> list[ManagedObject]:
        managed = []
        for server in self._compute().compute.servers(details=True, tags=MANAGED_TAG):
            metadata = server.metadata or {}
            if metadata.get(META_MANAGED_BY) != MANAGER:
                continue
            managed.append(
                ManagedObject(
                    namespace=metadata.get(META_NAMESPACE, ""),
                    name=metadata.get(META_NAME, ""),
                    uid=metadata.get(META_UID, ""),
                    backend_id=server.id,
                )
            )
        return managed

    # ------------------------------------------------------ the Backend API

    def validate(self, environment: Environment, flavor: Flavor) -> Refusal | None:
        return None  # flavor and image are resolved by Nova, which says what it misses

    def dataset_problem(self, dataset: Dataset) -> str | None:
        if not dataset.storage.nfs_share:
            return f"dataset {dataset.name!r} has no spec.storage.nfs share that VMs could mount"
        return None

    async def ensure(self, launch: Launch) -> Observation:
        """Adopt the environment's server or create it; an ERROR server is reported, not replaced."""
        request = build_server_request(
            launch.environment, launch.flavor, launch.token, self._settings, launch.mounts, launch.identity
        )
        return await self._run(self._ensure_blocking, launch.environment, request)

    async def observe(self, environment: Environment) -> Observation:
        server = await self._run(self._find_server, environment)
        return observe_server(server)

    async def delete(self, environment: Environment) -> bool:
        return await self._run(self._delete_blocking, environment)

    async def suspend(self, environment: Environment) -> Observation:
        """Shelve: the disk is kept, the host's CPUs and GPUs are freed once offloaded."""
        return await self._run(self._shelve_blocking, environment, True)

    async def resume(self, launch: Launch) -> Observation:
        """Unshelve: scheduled again, so it can fail with "No valid host" if GPUs are gone."""
        return await self._run(self._shelve_blocking, launch.environment, False)

    async def extend(self, environment: Environment, until: datetime.datetime) -> bool:
        return False  # a server has no time limit of its own: the engine ends it at expiresAt

    async def list_managed(self) -> list[ManagedObject]:
        return await self._run(self._list_managed_blocking)


def _first_line(error: Exception) -> str:
    text = getattr(error, "details", None) or str(error)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(error).__name__
