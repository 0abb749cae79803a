"""Operator start and stop: kopf settings, clients, backends, and the one
periodic sweep (expiry; later accounting) over the environments index,
instead of a timer per object."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf
import structlog

from analysis_operator.backends.kubernetes import KubernetesBackend
from analysis_operator.domain import GROUP, TERMINAL_PHASES
from analysis_operator.handlers.environments import apply, now
from analysis_operator.handlers.indexes import EnvironmentRecord, first
from analysis_operator.kube import KubeClient
from analysis_operator.reconcile import Context, converge, expiry
from analysis_operator.settings import Settings

log = structlog.get_logger("analysis_operator.lifecycle")
TERMINAL = {phase.value for phase in TERMINAL_PHASES}


@kopf.on.startup()
async def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, pods: kopf.Index,
                     environments: kopf.Index, flavors: kopf.Index, **_: Any) -> None:
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

    kube = KubeClient(config.kube_workers)
    memo.context = Context(kube=kube, backends={"kubernetes": KubernetesBackend(kube, config, pods)})
    memo.sweeper = asyncio.create_task(sweep_forever(memo, environments, flavors, config.sweep_interval_seconds))
    log.info("operator.started", namespace=config.namespace or "*", standalone=config.standalone)


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await memo.sweeper
    memo.context.kube.close()


def due(record: EnvironmentRecord, flavors: kopf.Index, moment) -> bool:
    """Does the sweep need to act on this environment now? (pure)"""
    if record.status.get("phase") in TERMINAL or not record.status.get("phase"):
        return False
    flavor = first(flavors, record.environment.flavor)
    return flavor is not None and expiry(record.environment, flavor, record.status, moment)[1] <= moment


async def sweep(memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index) -> int:
    moment = now()
    records = [first(environments, key) for key in list(environments)]
    acted = 0
    for record in records:
        if record is None or not due(record, flavors, moment):
            continue
        environment = record.environment
        outcome = await converge(memo.context, environment, record.status, first(flavors, environment.flavor), moment)
        await apply(memo.context, environment, outcome)
        acted += 1
    return acted


async def sweep_forever(memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep(memo, environments, flavors)
        except Exception:  # one bad sweep must not end the loop; the next one retries
            log.exception("sweep.failed")
