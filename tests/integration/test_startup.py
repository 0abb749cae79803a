"""The operator's startup against the real API server when a step fails midway (kopf then runs the startup
again from the beginning, with new clients): what the failed attempt opened is closed, not left behind
once per attempt."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket

import kopf
import kubernetes
import pytest

from analysis_operator.engine import routes as routes_module
from analysis_operator.handlers import lifecycle
from analysis_operator.infra.kube import KubeClient
from analysis_operator.settings import GatewaySettings, Settings

pytestmark = pytest.mark.integration


def test_a_startup_that_fails_midway_closes_every_client_it_opened(kubeconfig, monkeypatch, tmp_path, namespace):
    """The forward-auth's port is taken (another process on it): the startup fails after the pods' watch,
    the routes' verdicts watch and the API clients were opened and used. Every client is closed again."""
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    made: list[KubeClient] = []
    closed: list[KubeClient] = []

    class Recorded(KubeClient):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        async def close(self) -> None:
            closed.append(self)
            await super().close()

    monkeypatch.setattr(lifecycle, "KubeClient", Recorded)
    monkeypatch.setattr(routes_module, "KubeClient", Recorded)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    gateway = GatewaySettings(
        enabled=True, url="https://analysis.example.org/", auth_listen_address="127.0.0.1", auth_port=port
    )
    config = dataclasses.replace(
        Settings(),
        namespace=namespace,
        gateway=gateway,
        metrics_port=0,
        admission=dataclasses.replace(Settings().admission, cert_dir=str(tmp_path / "tls"), host=""),
    )
    indexes = collections.defaultdict(dict)
    memo = kopf.Memo(config=config)

    async def startup() -> None:
        await lifecycle.on_startup(
            settings=kopf.OperatorSettings(),
            memo=memo,
            environments={},
            flavors={},
            **{
                name: indexes[name]
                for name in (
                    "datasets",
                    "dataset_pids",
                    "groups",
                    "facility_users",
                    "budgets",
                    "personal_budgets",
                    "ledger_entries",
                    "group_gids",
                )
            },
        )

    try:
        with pytest.raises(OSError):
            asyncio.run(startup())
    finally:
        taken.close()
    assert len(made) >= 3, made  # the operator's, the pods' watch's, the routes' watch's
    assert sorted(map(id, closed)) == sorted(map(id, made)), f"{len(made) - len(closed)} of {len(made)} left open"
