"""The access token of an environment: a Secret in its namespace, whatever the backend.

The pod, job or VM is given the token; the Secret keeps it, so a resumed or
re-created environment keeps its URL and token. Owned by the environment:
garbage collection removes it with the object.
"""

from __future__ import annotations

import base64
import collections
import secrets
import threading
from collections.abc import Iterable
from typing import Any

from kubernetes.client.rest import ApiException

from analysis_operator.backends.base import Retry
from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import LABEL_ENVIRONMENT_UID, Environment

TOKEN_KEY = "token"
TOKENS_KEPT = 50_000
# environment uid -> its token, as this process made or read it: the gateway's forward-auth hands it
# on without an API call (a token never changes for an environment uid; its Secret is the record).
# Written from the operator's loop and the forward-auth's thread (handlers/gateway.py): under a lock.
KNOWN: collections.OrderedDict[str, str] = collections.OrderedDict()
_KNOWN_LOCK = threading.Lock()


def remember(uid: str, token: str) -> str:
    with _KNOWN_LOCK:
        KNOWN[uid] = token
        KNOWN.move_to_end(uid)
        if len(KNOWN) > TOKENS_KEPT:
            KNOWN.popitem(last=False)
    return token


def forget(uids: Iterable[str]) -> None:
    """Environments that are gone: their tokens are not kept for them any longer."""
    with _KNOWN_LOCK:
        for uid in uids:
            KNOWN.pop(uid, None)


def known_uids() -> list[str]:
    with _KNOWN_LOCK:
        return list(KNOWN)


def token_lost(environment: Environment) -> str:
    """What to say of a running environment whose token is known nowhere: its Secret was deleted
    (this process never read it, or it restarted since). Only a new start gives it a new one."""
    return (
        f"its access token is gone (Secret {environment.child_name} was deleted), so no one can open it: "
        "suspend and resume it to start it with a new one"
    )


def new_token() -> str:
    return secrets.token_urlsafe(32)


def build_token_secret(environment: Environment, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": environment.child_name,
            "namespace": environment.namespace,
            "labels": environment.identity_labels,
            "ownerReferences": environment.owner_references,
        },
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


async def ensure_token(kube: KubeClient, environment: Environment) -> str:
    """The environment's token, creating its Secret on first use. A Secret of the same name left by an
    earlier environment (orphaned by `kubectl delete --cascade=orphan`) is never adopted: its token
    was someone else's."""
    token = new_token()
    secret = build_token_secret(environment, token)
    try:
        made = await kube.create("Secret", environment.namespace, secret)
    except ApiException as error:  # a refusal's words go to status and logs: never with the token in them
        if isinstance(error.body, str):
            error.body = error.body.replace(token, "[token]").replace(secret["data"][TOKEN_KEY], "[token]")
        raise
    if made:
        return remember(environment.uid, token)
    metadata = await kube.read_metadata("Secret", environment.namespace, environment.child_name) or {}
    if (metadata.get("labels") or {}).get(LABEL_ENVIRONMENT_UID) != environment.uid:
        await kube.delete("Secret", environment.namespace, environment.child_name, uid=metadata.get("uid", ""))
        raise Retry(f"replaced a leftover Secret {environment.child_name!r} of an earlier environment", delay=0.5)
    existing = await kube.read_secret_value(environment.namespace, environment.child_name, TOKEN_KEY)
    return remember(environment.uid, existing or token)


async def delete_token(kube: KubeClient, environment: Environment) -> None:
    """This environment's token Secret (a namesake's is left alone)."""
    with _KNOWN_LOCK:
        KNOWN.pop(environment.uid, None)
    await kube.delete_owned(
        "Secret", environment.namespace, environment.child_name, LABEL_ENVIRONMENT_UID, environment.uid
    )


async def read_token(kube: KubeClient, environment: Environment) -> str | None:
    """This environment's token (never a namesake's), for the gateway to hand its server; None if none."""
    known = KNOWN.get(environment.uid)  # one lookup: the forward-auth thread reads while the operator writes
    if known is not None:
        return known
    secret = await kube.read_secret(environment.namespace, environment.child_name)
    if (
        secret is None
        or ((secret.get("metadata") or {}).get("labels") or {}).get(LABEL_ENVIRONMENT_UID) != environment.uid
    ):
        return None
    encoded = (secret.get("data") or {}).get(TOKEN_KEY)
    return remember(environment.uid, base64.b64decode(encoded).decode()) if encoded else None
