"""Operator start and stop: kopf settings, clients, backends, and the one
periodic sweep (expiry; later accounting) over the environments index,
instead of a timer per object."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import pathlib
import random
from typing import Any

import kopf
import structlog

from analysis_operator.backends.base import Backend, GrantedMounts
from analysis_operator.backends.kubernetes import KubernetesBackend
from analysis_operator.certificates import ensure_certificates
from analysis_operator.domain import GROUP, TERMINAL_PHASES, Environment
from analysis_operator.handlers.budgets import gate_for, warn_expiring
from analysis_operator.handlers.datasets import DataAccess
from analysis_operator.handlers.environments import apply, now
from analysis_operator.handlers.indexes import EnvironmentRecord, first
from analysis_operator.kube import KubeClient
from analysis_operator.metrics import start_metrics
from analysis_operator.reconcile import Context, converge, expiry
from analysis_operator.settings import Settings

log = structlog.get_logger("analysis_operator.lifecycle")
TERMINAL = {phase.value for phase in TERMINAL_PHASES}


@kopf.on.startup()
async def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, pods: kopf.Index,
                     environments: kopf.Index, flavors: kopf.Index, **indexes: Any) -> None:
    config: Settings = memo.config
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.loggers = False          # Events only where we post them, not one per log line
    settings.posting.level = logging.INFO
    settings.batching.batch_window = 0.01     # react in milliseconds, not the default 100 ms
    settings.watching.server_timeout = 600
    settings.networking.request_timeout = 60

    configure_peering(settings, config)
    memo.peering_priority = settings.peering.priority
    configure_admission(settings, config)

    kube = KubeClient(config.kube_workers)
    access = DataAccess(kube, indexes)   # the reconcile gate, and what backends mount
    memo.context = Context(kube=kube, backends=build_backends(config, kube, pods, access.granted),
                           gates=(access, gate_for(kube, config.budgets, indexes)))
    start_metrics(config.metrics_port, indexes["budgets"], environments, config.metrics_address)
    memo.sweeper = asyncio.create_task(sweep_forever(memo, environments, flavors, config.sweep_interval_seconds))
    log.info("operator.started", namespace=config.namespace or "*", standalone=config.standalone)


def outranked(peers: dict[str, Any], own_priority: int, moment: datetime.datetime) -> bool:
    """Is a live peer ahead of us? Then kopf has paused this replica (pure)."""
    for peer in peers.values():
        if not isinstance(peer, dict) or int(peer.get("priority", 0)) <= own_priority:
            continue
        lastseen = datetime.datetime.fromisoformat(str(peer.get("lastseen")))
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=datetime.timezone.utc)
        if lastseen + datetime.timedelta(seconds=int(peer.get("lifetime", 60))) > moment:
            return True
    return False


async def is_active(memo: kopf.Memo) -> bool:
    """Standalone, or the peer kopf lets run. A paused standby must not sweep: its indexes
    stopped updating when kopf paused it (its accounting daemons are stopped by kopf itself)."""
    config: Settings = memo.config
    if config.standalone:
        return True
    peers = await memo.context.kube.peers(config.peering_name, config.namespace)
    return not outranked(peers, memo.peering_priority, now())


def configure_peering(settings: kopf.OperatorSettings, config: Settings) -> None:
    """One active replica: the live peer with the highest priority; the others wait until
    its keep-alive is older than the lifetime (a crash) or it leaves (a clean stop)."""
    settings.peering.priority = config.peering_priority or random.SystemRandom().randint(1, 2**31 - 1)

    settings.peering.lifetime = config.peering_lifetime_seconds
    settings.peering.stealth = True           # no log line per keep-alive
    # But do say when this replica pauses or takes over (kopf logs that at INFO).
    logging.getLogger("kopf._core.engines.peering").setLevel(logging.INFO)


def configure_admission(settings: kopf.OperatorSettings, config: Settings) -> None:
    """Serve the webhooks over TLS. With admission.host set (local stacks) kopf registers
    them itself at https://host:port with a CA made here; otherwise the Helm chart
    registers them and mounts the certificate. kopf needs a server whenever webhook
    handlers exist, so admission.enabled=false still serves, but registers nothing."""
    admission = config.admission
    cert_dir = pathlib.Path(admission.cert_dir)
    registered = bool(admission.enabled and admission.host)
    if registered or not (cert_dir / "tls.crt").exists():
        cafile, certfile, pkeyfile = ensure_certificates(admission.cert_dir, (admission.host or "localhost",))
    else:
        cafile, certfile, pkeyfile = cert_dir / "ca.crt", cert_dir / "tls.crt", cert_dir / "tls.key"
    if registered:
        settings.admission.managed = admission.managed_name
    settings.admission.server = kopf.WebhookServer(
        addr=admission.listen_address, port=admission.port, host=admission.host if registered else None,
        certfile=str(certfile), pkeyfile=str(pkeyfile), cafile=str(cafile) if cafile.exists() else None)


def build_backends(config: Settings, kube: KubeClient, pods: kopf.Index,
                   granted: GrantedMounts) -> dict[str, Backend]:
    """The enabled backends; `granted` gives each the datasets an environment may mount."""
    backends: dict[str, Backend] = {"kubernetes": KubernetesBackend(kube, config, pods, granted)}
    if config.slurm.enabled:
        from analysis_operator.backends.slurm import SlurmBackend
        backends["slurm"] = SlurmBackend(config.slurm, config.templates_dir, granted)
    if config.openstack.enabled:
        from analysis_operator.backends.openstack import OpenStackBackend
        backends["openstack"] = OpenStackBackend(config, granted=granted)
    return backends


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await memo.sweeper
    for backend in memo.context.backends.values():
        if hasattr(backend, "close"):
            backend.close()
    memo.context.kube.close()


def due(record: EnvironmentRecord, flavors: kopf.Index, moment) -> bool:
    """Does the sweep need to act on this environment now? (pure)

    Kubernetes environments only when their lifetime is over (pod events do
    the rest); Slurm jobs and VMs on every sweep, since nothing pushes their
    state to us.
    """
    if record.status.get("phase") in TERMINAL or not record.status.get("phase"):
        return False
    flavor = first(flavors, record.environment.flavor)
    if flavor is None:
        return False
    return flavor.backend.value != "kubernetes" or expiry(record.environment, flavor, record.status, moment)[1] <= moment


async def sweep(memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index, parallel: int = 8) -> int:
    moment = now()
    records = [first(environments, key) for key in list(environments)]
    due_records = [record for record in records if record is not None and due(record, flavors, moment)]
    limit = asyncio.Semaphore(parallel)

    async def one(record: EnvironmentRecord) -> None:
        async with limit:
            environment = record.environment
            outcome = await converge(memo.context, environment, record.status,
                                     first(flavors, environment.flavor), moment)
            await apply(memo.context, environment, outcome)

    results = await asyncio.gather(*(one(record) for record in due_records), return_exceptions=True)
    for record, result in zip(due_records, results):
        if isinstance(result, Exception):
            log.error("sweep.environment_failed", environment=f"{record.environment.namespace}/"
                      f"{record.environment.name}", error=repr(result))
    return len(due_records)


async def sweep_orphans(memo: kopf.Memo, environments: kopf.Index) -> int:
    """Remove jobs and VMs whose environment no longer exists (deleted while the operator was down)."""
    known = {record.environment.uid for key in list(environments) if (record := first(environments, key))}
    removed = 0
    for kind, backend in memo.context.backends.items():
        for managed in await backend.list_managed():
            if managed.uid in known:
                continue
            # The index may lag; only the API server's answer makes it an orphan.
            if await memo.context.kube.environment_exists(managed.namespace, managed.name, managed.uid):
                continue
            orphan = Environment(managed.namespace, managed.name, managed.uid, owner="", flavor="")
            await backend.delete(orphan)
            log.warning("orphan.removed", backend=kind, environment=f"{managed.namespace}/{managed.name}",
                        backend_id=managed.backend_id)
            removed += 1
    return removed


async def sweep_forever(memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index, interval: float,
                        orphan_every: int = 10) -> None:
    rounds = 0
    while True:
        await asyncio.sleep(interval)
        rounds += 1
        try:
            if not await is_active(memo):
                continue
            await sweep(memo, environments, flavors)
            await warn_expiring(memo, environments, flavors, now())
            if rounds % orphan_every == 0:
                await sweep_orphans(memo, environments)
        except Exception:  # one bad sweep must not end the loop; the next one retries
            log.exception("sweep.failed")
