"""Operator start and stop: kopf settings, clients, backends, and the one
periodic sweep (expiry, polled backends, lifetime warnings, orphans, repairs) over the
environments index, instead of a timer per object."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import gc
import logging
import os
import pathlib
import random
import ssl
from typing import Any

import kopf
import structlog

from analysis_operator.backends.kubernetes import PodSummary
from analysis_operator.backends.registry import build_backends
from analysis_operator.engine.budget_gate import build_budget_gate
from analysis_operator.engine.converge import Context
from analysis_operator.engine.data_access import DataAccess, Sharing
from analysis_operator.engine.identity import DirectoryIdentities
from analysis_operator.engine.idle import GatewayActivity, IdleChecker
from analysis_operator.engine.reconciler import Reconciler, utcnow
from analysis_operator.engine.routes import GatewayRoutes, NoRoutes, Routes
from analysis_operator.engine.sweep import sweep, sweep_orphans, warn_expiring
from analysis_operator.engine.viewers import Disconnector
from analysis_operator.engine.views import first, values
from analysis_operator.handlers.admission import match_conditions
from analysis_operator.handlers.environments import pod_changed, remove_held_ones
from analysis_operator.handlers.gateway import Authorizer, start_server
from analysis_operator.handlers.indexes import PodKey, read_pod
from analysis_operator.handlers.kopf_storage import MemoryDiffBaseStorage, ProgressStorage
from analysis_operator.infra import kopf_patches
from analysis_operator.infra.certificates import WebhookCertificates, ensure_certificates
from analysis_operator.infra.kube import LIST_PAGE, WATCH_SECONDS, KubeClient
from analysis_operator.infra.logs import allocator, full_collection_due
from analysis_operator.infra.metrics import start_metrics
from analysis_operator.infra.oidc import TokenVerifier
from analysis_operator.infra.watch import Summaries, Watch
from analysis_operator.infra.webhooks import MeteredWebhookServer
from analysis_operator.model.domain import FINALIZER, GROUP, MANAGED_SELECTOR
from analysis_operator.settings import Settings

log = structlog.get_logger("analysis_operator.lifecycle")
FLUSH_SECONDS = 5.0  # at shutdown, for the quiet first statuses still held (engine/reconciler.Reconciler.flush)


@kopf.on.startup()
async def on_startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    environments: kopf.Index,
    flavors: kopf.Index,
    **indexes: Any,
) -> None:
    config: Settings = memo.config
    settings.persistence.finalizer = FINALIZER
    # kopf's own records cost no PATCH of an environment that converges at once (handlers/kopf_storage.py)
    settings.persistence.progress_storage = ProgressStorage()
    memo.diffbase = settings.persistence.diffbase_storage = MemoryDiffBaseStorage()
    settings.posting.loggers = False  # Events only where we post them, not one per log line
    settings.posting.level = logging.INFO
    configure_watching(settings)
    settings.networking.request_timeout = 60

    configure_peering(settings, config)
    memo.peering_priority = settings.peering.priority
    # What this startup opens (clients, watches, servers) is closed again if a later step fails: kopf then
    # tries the startup again from the beginning, with new ones.
    async with contextlib.AsyncExitStack() as undo:
        await _start_parts(memo, config, settings, environments, flavors, indexes, undo)
        undo.pop_all()  # started: on_cleanup closes them
    memo.idle = IdleChecker(
        memo.context, config, environments, flavors, memo.activity, acting=functools.partial(acting, memo)
    )
    memo.idler = (
        asyncio.create_task(idle_forever(memo, config.idle.check_interval_seconds)) if config.idle.enabled else None
    )
    start_metrics(
        config.metrics_port,
        indexes["budgets"],
        environments,
        config.metrics_address,
        active=lambda: bool(memo.active),
        backends=memo.context.backends,
    )
    memo.pods.follow()
    if isinstance(memo.context.routes, GatewayRoutes):
        memo.context.routes.follow()
    memo.sweeper = asyncio.create_task(sweep_forever(memo, config.sweep_interval_seconds))
    pod = os.environ.get("POD_ID", "")
    memo.role_labeller = (
        asyncio.create_task(label_role_forever(memo, config.pod_namespace, pod))
        if not config.standalone and config.pod_namespace and pod
        else None
    )
    log.info("operator.started", namespace=config.namespace or "*", standalone=config.standalone, allocator=allocator())


async def _start_parts(
    memo: kopf.Memo,
    config: Settings,
    settings: kopf.OperatorSettings,
    environments: kopf.Index,
    flavors: kopf.Index,
    indexes: dict[str, Any],
    undo: contextlib.AsyncExitStack,
) -> None:
    """The clients, watches and servers the handlers use, each registered with `undo` as it is opened."""
    kube = KubeClient(config.kube_workers, config.namespace)
    undo.push_async_callback(kube.close)
    # The operator's pods, watched by the operator rather than by kopf (infra/watch.py), on a connection of
    # their own; listed before kopf's handlers first run (they read them), followed once all is set up.
    pods: Summaries[PodKey, PodSummary] = Summaries(read_pod)
    memo.pods = Watch(KubeClient(1, config.namespace), "Pod", MANAGED_SELECTOR, pods, functools.partial(on_pod, memo))
    undo.push_async_callback(memo.pods.stop)
    await memo.pods.start()
    memo.certificates = await start_webhook_certificates(config, kube)
    if memo.certificates is not None:
        undo.callback(memo.certificates.cancel)
    configure_admission(settings, config, memo.certificates is not None)

    memo.access = DataAccess(kube, indexes)
    memo.sharing = Sharing(kube, indexes, memo.access.catalogue)
    memo.budget_gate = build_budget_gate(kube, config.budgets, indexes)
    memo.identities = DirectoryIdentities(kube, config.identity, indexes, environments)
    routes: Routes = NoRoutes()
    memo.gateway = None
    memo.viewers = None  # OPEN: closes the open connections of people an environment is no longer shared with
    memo.active = True  # kept by the sweep loop: a paused standby answers from the API server, culls nothing
    memo.active_at = -ACTIVE_FOR  # when a pod change last asked (acting)
    memo.activity = activity = GatewayActivity()
    written: dict[str, str] = {}  # the phase this process last wrote per environment (Context.written)
    if config.gateway.enabled:  # OPEN: routes through the gateway, and its forward-auth answered here
        gateway_routes = GatewayRoutes(kube, config.gateway)
        undo.push_async_callback(gateway_routes.shutdown)
        await gateway_routes.start(config.namespace)  # the gateway's word on each route, read before converges
        routes, loop = gateway_routes, asyncio.get_running_loop()
        memo.gateway_kube = KubeClient(4, config.namespace)  # its own connections: never behind reconciles
        undo.push_async_callback(memo.gateway_kube.close)
        # (the forward-auth's thread closes its own session with its loop)
        authorizer = Authorizer(
            config.gateway,
            memo.gateway_kube,
            environments,
            memo.access.catalogue,
            TokenVerifier(config.gateway),
            active=lambda: bool(memo.active),
            activity=activity,
            written=written,
            # The forward-auth runs on a thread of its own (handlers/gateway.py): routes live on this loop.
            probe_passed=functools.partial(loop.call_soon_threadsafe, gateway_routes.probe_passed),
        )
        memo.gateway = await start_server(authorizer, config.gateway.auth_listen_address, config.gateway.auth_port)
        undo.push_async_callback(memo.gateway.cleanup)
        memo.viewers = Disconnector(kube, config, environments, memo.access.catalogue)
        undo.push_async_callback(memo.viewers.close)
    backends = build_backends(config, kube, pods)
    for backend in backends.values():
        undo.callback(backend.close)
    memo.context = Context(
        written=written,
        kube=kube,
        backends=backends,
        access=memo.access,
        gates=(memo.budget_gate,),
        identities=memo.identities,
        routes=routes,
        quiet_start=config.quiet_start_seconds,
    )
    # Its timers converge only while this replica acts (a standby's are asked again later)
    memo.reconciler = Reconciler(memo.context, environments, flavors, acting=functools.partial(acting, memo))
    if isinstance(routes, GatewayRoutes):
        routes.converge = memo.reconciler.wake  # Ready once the gateway serves its route


def outranked(peers: dict[str, Any], own_priority: int, moment: datetime.datetime) -> bool:
    """Is a live peer ahead of us? Then kopf has paused this replica (pure)."""
    for peer in peers.values():
        if not isinstance(peer, dict) or int(peer.get("priority", 0)) <= own_priority:
            continue
        lastseen = datetime.datetime.fromisoformat(str(peer.get("lastseen")))
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=datetime.UTC)
        if lastseen + datetime.timedelta(seconds=int(peer.get("lifetime", 60))) > moment:
            return True
    return False


async def on_pod(memo: kopf.Memo, key: PodKey) -> None:
    """A pod of an environment whose start this replica is deciding (kopf ran its handler here, so this
    replica was let act) asks again when the last answer said standby: right after a takeover that
    answer may be from a moment before it, and the pod's Ready would wait for the quiet start's timer."""
    record = first(memo.reconciler.environments, key)
    started = record is not None and memo.reconciler.started(record.environment.uid)
    if await acting(memo, fresh=started and not memo.active):
        await pod_changed(memo, key)


ACTIVE_FOR = 1.0  # seconds a pod change takes the last answer of is_active as still true


async def acting(memo: kopf.Memo, fresh: bool = False) -> bool:
    """Does this replica act on a pod change now? kopf pauses its own handlers on a standby at once, but
    not the pod watch (infra/watch.py); the sweep asks only every sweep interval, so a pod change asks
    again when the last answer is older than ACTIVE_FOR."""
    if memo.config.standalone:
        return True
    loop = asyncio.get_running_loop()
    if fresh or loop.time() - memo.active_at > ACTIVE_FOR:
        # One read of the peering record at a time, shared by all who ask meanwhile (a thousand timers due
        # together ask once).
        asking = getattr(memo, "asking", None)
        if asking is None:
            asking = memo.asking = loop.create_task(_ask_role(memo, loop.time()))
        await asyncio.shield(asking)
    return bool(memo.active)


async def _ask_role(memo: kopf.Memo, at: float) -> None:
    try:
        now_active(memo, await is_active(memo))
        memo.active_at = at
    finally:
        memo.asking = None


def now_active(memo: kopf.Memo, active: bool) -> None:
    """What the peering record says of this replica now. Acting again after a pause, it converges the
    environments that may wait on a retry another replica held (engine/reconciler.Reconciler.acting_again)."""
    if active and getattr(memo, "active", True) is False and getattr(memo, "reconciler", None) is not None:
        memo.reconciler.acting_again()
    memo.active = active


async def is_active(memo: kopf.Memo) -> bool:
    """Standalone, or the peer kopf lets run. A paused standby must not sweep: its indexes
    stopped updating when kopf paused it (its accounting daemons are stopped by kopf itself)."""
    config: Settings = memo.config
    if config.standalone:
        return True
    peers = await memo.context.kube.peers(config.peering_name, config.namespace)
    return not outranked(peers, memo.peering_priority, utcnow())


def configure_watching(settings: kopf.OperatorSettings) -> None:
    """How kopf lists and watches: in pages (a restart with 10,000 environments read them in one
    answer, parsed whole before the first was handled: bench/RESULTS.md, the restart's peak). kopf
    does not watch pods: the operator's own watch does (infra/watch.py, on_startup)."""
    settings.watching.server_timeout = WATCH_SECONDS
    settings.watching.chunk_size = LIST_PAGE


def configure_peering(settings: kopf.OperatorSettings, config: Settings) -> None:
    """One active replica: the live peer with the highest priority; the others wait until
    its keep-alive is older than the lifetime (a crash) or it leaves (a clean stop)."""
    settings.peering.priority = config.peering_priority or random.SystemRandom().randint(1, 2**31 - 1)

    settings.peering.lifetime = config.peering_lifetime_seconds
    settings.peering.stealth = True  # no log line per keep-alive
    # But do say when this replica pauses or takes over (kopf logs that at INFO).
    logging.getLogger("kopf._core.engines.peering").setLevel(logging.INFO)


async def start_webhook_certificates(config: Settings, kube: KubeClient) -> asyncio.Task[None] | None:
    """admission.tls_secret set (the Helm chart's default): the certificate made or read and
    renewed here (infra/certificates.py) before the server starts, then checked periodically."""
    admission = config.admission
    if not admission.tls_secret:
        return None
    certificates = WebhookCertificates(
        kube,
        admission.tls_secret,
        admission.tls_secret_namespace,
        admission.tls_hosts,
        admission.webhook_configuration,
        admission.cert_dir,
    )
    await certificates.ensure(utcnow())
    return asyncio.create_task(certificates.keep(admission.tls_check_interval_seconds, utcnow))


def configure_admission(settings: kopf.OperatorSettings, config: Settings, self_managed: bool = False) -> None:
    """Serve the webhooks over TLS. With admission.host set (local stacks) kopf registers
    them itself at https://host:port with a CA made here; otherwise the Helm chart
    registers them, and the certificate is the operator's own (self_managed: tls.pem in
    cert_dir, kept by start_webhook_certificates) or mounted (cert-manager). kopf re-reads
    the files and restarts the server when they change. kopf needs a server whenever
    webhook handlers exist, so admission.enabled=false still serves, but registers nothing."""
    admission = config.admission
    cert_dir = pathlib.Path(admission.cert_dir)
    registered = bool(admission.enabled and admission.host)
    if self_managed:
        cafile, certfile, pkeyfile = cert_dir / "ca.crt", cert_dir / "tls.pem", cert_dir / "tls.pem"
    elif registered or not (cert_dir / "tls.crt").exists():
        cafile, certfile, pkeyfile = ensure_certificates(admission.cert_dir, (admission.host or "localhost",))
    else:
        cafile, certfile, pkeyfile = cert_dir / "ca.crt", cert_dir / "tls.crt", cert_dir / "tls.key"
    if registered:
        settings.admission.managed = admission.managed_name
        kopf_patches.with_match_conditions(match_conditions())  # as the chart registers them
    client_check: dict[str, Any] = {}
    if admission.client_ca_file:  # only the API server may call the webhooks
        client_check = {"verify_mode": ssl.CERT_REQUIRED, "verify_cafile": admission.client_ca_file}
    settings.admission.server = MeteredWebhookServer(  # kopf's, timed and counted (infra/metrics.py)
        addr=admission.listen_address,
        port=admission.port,
        host=admission.host if registered else None,
        certfile=str(certfile),
        pkeyfile=str(pkeyfile),
        cafile=str(cafile) if cafile.exists() else None,
        # How soon a renewed certificate is served (kopf re-reads its files this often).
        file_check_interval=min(60.0, admission.tls_check_interval_seconds),
        **client_check,
    )


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    try:
        await asyncio.wait_for(memo.reconciler.flush(), timeout=FLUSH_SECONDS)
    except TimeoutError:
        log.warning("operator.flush_timeout", unwritten=len(memo.context.unwritten))
    await memo.pods.stop()
    for task in (memo.sweeper, memo.certificates, memo.role_labeller):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if memo.idler is not None:
        memo.idler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await memo.idler
    await memo.idle.close()
    if memo.viewers is not None:
        await memo.viewers.close()
    if memo.gateway is not None:
        await memo.gateway.cleanup()
        await memo.gateway_kube.close()  # its session on this loop (token reviews)
    if isinstance(memo.context.routes, GatewayRoutes):
        await memo.context.routes.shutdown()
    memo.reconciler.close()
    for backend in memo.context.backends.values():
        backend.close()
    await memo.context.kube.close()


REPLICA_LABEL = f"{GROUP}/replica"


async def label_role_forever(memo: kopf.Memo, namespace: str, pod: str, interval: float = ACTIVE_FOR) -> None:
    """Label this replica's pod active or standby (REPLICA_LABEL) as it changes, asking the peering
    record every `interval`: the chart's offer Service selects the active replica, so the portal is
    never sent to a standby (whose views are paused: it answers 503). A label that could not be
    written is tried again at the next round; until the takeover's first round, no pod is labelled
    active and the Service has no endpoint (the peering lifetime after a crash, about a second on a
    clean stop)."""
    labelled = ""
    while True:
        try:
            # Not memo.active_at: a pod change asks for itself (acting) unless it asked a moment ago, so
            # one arriving just after a takeover is not dropped on this loop's answer of before.
            now_active(memo, await is_active(memo))
            role = "active" if memo.active else "standby"
            if role != labelled:
                if await memo.context.kube.label_pod(namespace, pod, {REPLICA_LABEL: role}):
                    log.info("replica.labelled", pod=f"{namespace}/{pod}", role=role)
                else:
                    log.warning("replica.pod_not_found", pod=f"{namespace}/{pod}", role=role)
                labelled = role
        except Exception as error:  # the API server away a moment: ask again next round
            log.warning("replica.label_failed", pod=f"{namespace}/{pod}", error=repr(error))
        await asyncio.sleep(interval)


async def sweep_forever(memo: kopf.Memo, interval: float, orphan_every: int = 10) -> None:
    reconciler: Reconciler = memo.reconciler
    config: Settings = memo.config
    rounds = 0
    while True:
        await asyncio.sleep(interval)
        rounds += 1
        active = False
        try:
            if full_collection_due(reconciler.forgotten, len(reconciler.environments)):
                reconciler.forgotten = 0
                gc.collect()  # what the deleted environments left (infra/logs.py); its pause is logged
            memo.context.decisions.prune()
            now_active(memo, active := await is_active(memo))
            if not active:
                continue
            await sweep(reconciler, utcnow(), unheld=memo.budget_gate.unheld)  # and budgets gone from under them
            await remove_held_ones(reconciler)  # environments kept after their deletion
            await warn_expiring(reconciler, config.budgets.expiry_warning_seconds, utcnow())
        except Exception:  # one bad sweep must not end the loop; the next one retries
            log.exception("sweep.failed")
        if active and rounds % orphan_every == 0:  # whatever the sweep met: the orphans' turn is rare
            await collect_orphans(memo)


async def collect_orphans(memo: kopf.Memo) -> None:
    """The orphan sweep, then what rests on the live environments (the records of the deleted ones
    dropped, what someone deleted under the live ones made again). Each part runs whatever the one
    before met: one failure skipping the rest kept them waiting as long as a backend stayed down."""
    reconciler: Reconciler = memo.reconciler
    try:
        await sweep_orphans(reconciler)  # each backend and each removal fails on its own (engine/sweep.py)
    except Exception:
        log.exception("orphan.sweep_failed")
    try:
        live = {record.environment.uid for record in values(reconciler.environments)}
        memo.diffbase.retain(live)
        reconciler.retain(live)
        await memo.context.repair(live)  # each backend's repair fails on its own (Context.repair)
    except Exception:
        log.exception("orphan.retain_failed")


async def idle_forever(memo: kopf.Memo, interval: float) -> None:
    """Idle culling (engine/idle.py): one round per interval start to start (a round that took
    longer is followed at once), on the active replica only."""
    checker: IdleChecker = memo.idle
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        await asyncio.sleep(max(0.0, began + interval - loop.time()))
        began = loop.time()
        try:
            if await acting(memo, fresh=True):
                await checker.check()
        except Exception:  # one bad round must not end the loop
            log.exception("idle.round_failed")
