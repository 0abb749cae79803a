"""kopf's webhook server with every admission request timed and counted (infra/metrics.py).

Apart from metrics.py because it needs kopf, which the engine (importing metrics) must not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kopf

from analysis_operator.infra.metrics import metered


def known_webhooks() -> frozenset[str]:
    """The ids of the registered webhook handlers (kopf keeps them in its default registry): the
    only `webhook` label values, since the path a request names is the caller's choice."""
    return frozenset(str(handler.id) for handler in kopf.get_default_registry()._webhooks.get_all_handlers())


class MeteredWebhookServer(kopf.WebhookServer):
    """kopf's webhook server, every request through `metered`: latency, result, refusals."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async for client_config in super().__call__(metered(fn, known_webhooks)):
            yield client_config
