"""kopf's webhook server with every admission request timed and counted (infra/metrics.py).

Apart from metrics.py because it needs kopf, which the engine (importing metrics) must not."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import kopf

from analysis_operator.infra.metrics import metered


def known_webhooks() -> frozenset[str]:
    """The ids of the registered webhook handlers (kopf keeps them in its default registry): the
    only `webhook` label values, since the path a request names is the caller's choice."""
    return frozenset(str(handler.id) for handler in kopf.get_default_registry()._webhooks.get_all_handlers())


class MeteredWebhookServer(kopf.WebhookServer):
    """kopf's webhook server, every request through `metered`: latency, result, refusals; and no
    TLS session tickets."""

    def _build_ssl(self) -> tuple[bytes | None, ssl.SSLContext | None]:
        """kopf's context, built afresh on every (re)start as kopf does, with no TLS 1.3 session
        tickets: the API server keeps no session cache for webhooks, so each ticket (two per
        connection by default, each a copy of the session with the client's certificate in it) is
        a quarter of a new connection's CPU spent for nothing (bench/logs/webhook-tls-stop42.md).
        tests/integration/test_webhook_access.py fails if kopf stops building it here."""
        cadata, context = super()._build_ssl()
        if context is not None:
            context.num_tickets = 0
        return cadata, context

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async for client_config in super().__call__(metered(fn, known_webhooks)):
            yield client_config
