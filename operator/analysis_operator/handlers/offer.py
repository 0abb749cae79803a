"""The portal's question, asked of the operator: what may this user do? (GET /api/v1/offer)

Served read-only on the forward-auth server (handlers/gateway.py, gateway.auth_port), decided
in memory from kopf's indexes by policy/offer.py (admission's own rule functions), clock read
per request. Who asks:
  - a person, by the facility's OIDC ID token (bearer or session cookie, infra/oidc.py, as the
    gateway): the answer is about themselves; `?user=` may only name themselves;
  - the portal acting for a person, `?user=alice`: a Kubernetes bearer token (the portal's
    ServiceAccount token) that the API server vouches for (TokenReview), of an identity that
    admission trusts to act on behalf of others (admission.trusted_users / trusted_groups,
    policy/identity.py `is_trusted`): one list decides both. A person's OIDC token never makes
    them the portal, whatever its name says; a header naming a user is never believed.
Answers: 200 JSON (policy/offer.py offer_document); 401 no or bad credential; 403 asking for
someone else without being the portal; 503 not ready (starting, or a standby replica, whose
indexes are paused: retry). Every error is JSON {reason, message}, and no answer is cached.
The caller reads nobody else's memberships: only the user's own groups go into the answer.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf
import structlog
from aiohttp import web

from analysis_operator.engine.budget_gate import SLOT_REASONS, BudgetGate
from analysis_operator.engine.data_access import IndexCatalogue
from analysis_operator.engine.identity import DirectoryIdentities
from analysis_operator.engine.ledger import BUDGETS
from analysis_operator.engine.reconciler import utcnow
from analysis_operator.engine.views import Index, first, values
from analysis_operator.handlers.indexes import never_raises
from analysis_operator.infra.oidc import NotSignedIn, TokenVerifier
from analysis_operator.model.domain import GROUP, VERSION, Dataset, Flavor
from analysis_operator.policy.budgets import Budget
from analysis_operator.policy.identity import is_trusted, requester
from analysis_operator.policy.offer import (
    BudgetRule,
    BudgetUse,
    Offer,
    Reaches,
    budget_refusal,
    build_offer,
    offer_document,
)
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import Settings

log = structlog.get_logger("analysis_operator.offer")
OFFER_PATH = "/api/v1/offer"
REVIEW_SECONDS = 60.0  # a TokenReview answer is reused this long (the API server's own webhook cache: 2 min)
REFUSED_REVIEW_SECONDS = 10.0
_REVIEWS_MAX = 10_000
REVIEWS_PENDING_MAX = 32
MAX_NAMED_DATASETS = 200


@kopf.index(GROUP, VERSION, BUDGETS, when=lambda spec, **_: bool(spec.get("group")))
@never_raises("group_budgets")
def group_budgets(name: str, spec: kopf.Spec, **_: Any) -> dict[str, str]:
    """FacilityGroup -> the names of the budgets of that group (its members may draw on them)."""
    return {str(spec["group"]): name}


# Token -> the API server's TokenReview status ({authenticated, user: {username, groups}}).
Review = Callable[[str], Awaitable[Mapping[str, Any]]]


class Denied(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Caller:
    user: str  # the facility user ID the caller is ("" for a Kubernetes identity that is not one)
    name: str  # as authenticated, for the log
    portal: bool  # may ask for others


class OfferService:
    """Decides GET /api/v1/offer: who asks, for whom, and the answer (policy/offer.py)."""

    def __init__(
        self,
        settings: Settings,
        review: Review,
        verifier: TokenVerifier,
        flavors: Index,
        environments: Index,
        datasets: Index,
        group_budgets_index: Index,
        catalogue: IndexCatalogue,
        gate: BudgetGate,
        identities: DirectoryIdentities,
        reaches: Reaches,
        active: Callable[[], bool] = lambda: True,
        clock: Callable[[], datetime.datetime] = utcnow,
    ) -> None:
        self.settings, self.review, self.verifier = settings, review, verifier
        self.flavors, self.environments, self.datasets = flavors, environments, datasets
        self.group_budgets = group_budgets_index
        self.catalogue, self.gate, self.identities, self.reaches = catalogue, gate, identities, reaches
        self.active, self.clock = active, clock
        budgets = settings.budgets
        self.rule = BudgetRule(budgets.enabled and budgets.check_at_admission, budgets.require_budget)
        self._reviews: dict[str, tuple[float, Caller | None]] = {}
        self._reviewing = 0  # TokenReviews in flight

    async def caller(self, headers: Mapping[str, str]) -> Caller:
        """Who asks: a person by OIDC ID token, else a Kubernetes identity by TokenReview; raises Denied(401)."""
        token = self.verifier.credential(headers)
        if not token:
            raise Denied(401, "NotSignedIn", "no credential: send the OIDC ID token (Authorization: Bearer)")
        try:
            user = await self.verifier.user(token)
            return Caller(user, user, portal=False)
        except NotSignedIn as error:
            why = str(error)
        bearer = headers.get("Authorization", "")[:7].lower() == "bearer "
        reviewed = await self._reviewed(token) if bearer else None
        if reviewed is None:
            raise Denied(401, "NotSignedIn", f"{why}; nor is it a Kubernetes token the API server accepts")
        return reviewed

    async def _reviewed(self, token: str) -> Caller | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._reviews.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self._reviewing >= REVIEWS_PENDING_MAX:  # a flood of unknown tokens: the API server is not its target
            raise Denied(503, "Busy", "too many credentials being checked at once: ask again in a moment")
        self._reviewing += 1
        try:
            status = await self.review(token)
        except Exception as error:  # the API server unreachable or refusing: nobody is let in on a guess
            log.warning("offer.token_review_failed", error=repr(error))
            raise Denied(
                503, "ReviewUnavailable", "the API server cannot check the credential now: ask again"
            ) from None
        finally:
            self._reviewing -= 1
        caller: Caller | None = None
        if status.get("authenticated"):
            userinfo = dict(status.get("user") or {})
            username = str(userinfo.get("username") or "")
            caller = Caller(
                requester(userinfo, self.settings.admission), username, is_trusted(userinfo, self.settings.admission)
            )
        if len(self._reviews) >= _REVIEWS_MAX:
            self._reviews.clear()
        self._reviews[key] = (now + (REVIEW_SECONDS if caller else REFUSED_REVIEW_SECONDS), caller)
        return caller

    async def answer(
        self, headers: Mapping[str, str], query: Mapping[str, str], datasets: Sequence[str] = ()
    ) -> tuple[Caller, dict[str, Any]]:
        """`datasets`: only these (by name; ?dataset=a&dataset=b), else every Dataset."""
        caller = await self.caller(headers)
        user = query.get("user") or caller.user
        if not user:
            raise Denied(400, "NoUser", f"{caller.name!r} is not a facility user: name one with ?user=")
        if user != caller.user and not caller.portal:
            raise Denied(
                403,
                "NotPortal",
                f"{caller.name!r} may ask only about themselves, not about {user!r}: only the portal acts for others",
            )
        if not self.active():
            raise Denied(503, "Standby", "this replica is a standby (its views are paused): ask again")
        if len(datasets) > MAX_NAMED_DATASETS:
            raise Denied(400, "TooManyDatasets", f"name at most {MAX_NAMED_DATASETS} datasets, or none for all")
        offer = await self.offer(user, self.clock(), datasets)
        return caller, offer_document(offer)

    async def offer(self, user: str, now: datetime.datetime, named: Sequence[str] = ()) -> Offer:
        """The answer for `user` at `now`: the indexes, one admission identity check, and the budget
        confirmation admission makes before refusing for want of a slot."""
        groups = self.catalogue.groups_of(user)
        identity = await self.identities.admit(user)
        flavors: list[Flavor] = list(values(self.flavors))
        default = self._default(user)
        if isinstance(default, BudgetUse) and self.rule.enforced:
            short = any(
                (refusal := self._slot_refusal(default, flavor, now)) is not None and refusal.reason in SLOT_REASONS
                for flavor in flavors
            )
            if short and await self.gate.confirm(default.budget, self.environments):
                default = self._use(default.budget)
        others = [
            self._use(budget)
            for group in sorted(groups)
            for name in self.group_budgets.get(group, ())
            if (budget := first(self.gate.ledger.views.budgets, name)) is not None
        ]
        if named:
            found = {name: first(self.datasets, name) for name in dict.fromkeys(named)}
            datasets: Iterable[Dataset] = [dataset for dataset in found.values() if dataset is not None]
            unknown = [name for name, dataset in found.items() if dataset is None]
        else:
            datasets, unknown = values(self.datasets), []
        return build_offer(
            user, groups, identity, flavors, datasets, default, others, self.reaches, self.rule, now, unknown
        )

    def _default(self, user: str) -> BudgetUse | Refusal | None:
        if not self.rule.enforced:
            return None
        selected = self.gate.ledger.views.select(user, "")
        return selected if isinstance(selected, Refusal) else self._use(selected)

    def _use(self, budget: Budget) -> BudgetUse:
        environments, gpus = self.gate.in_use(budget, self.environments)
        return BudgetUse(budget, environments, gpus)

    def _slot_refusal(self, use: BudgetUse, flavor: Flavor, now: datetime.datetime) -> Refusal | None:
        return budget_refusal(use, flavor, self.rule, now)


class OfferSlot:
    """Where the running operator's OfferService is put once it is built (on_offer_startup)."""

    service: OfferService | None = None
    # The operator's loop, where the service's budget gate and identities live: the server itself
    # runs on the forward-auth's thread (handlers/gateway.py AuthServer).
    loop: asyncio.AbstractEventLoop | None = None

    async def answer(self, request: web.Request) -> tuple[Caller, dict[str, Any]]:
        if self.service is None or self.loop is None:
            raise Denied(503, "Starting", "the operator is starting: ask again in a moment")
        asked = self.service.answer(request.headers, request.query, request.query.getall("dataset", []))
        if self.loop is asyncio.get_running_loop():
            return await asked
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(asked, self.loop))


OFFER_SLOT = web.AppKey("offer", OfferSlot)


def add_offer_routes(app: web.Application) -> None:
    """Registered by handlers/gateway.py's build_app: GET /api/v1/offer on the forward-auth server."""
    app[OFFER_SLOT] = OfferSlot()

    async def offer(request: web.Request) -> web.Response:
        started = time.perf_counter()
        caller: Caller | None = None
        try:
            caller, document = await request.app[OFFER_SLOT].answer(request)
            status, body = 200, document
        except Denied as denied:
            status, body = denied.status, {"reason": denied.reason, "message": denied.message}
        log.info(
            "offer.answered",
            caller=caller.name if caller else None,
            user=request.query.get("user") or (caller.user if caller else None),
            status=status,
            reason=body.get("reason"),
            seconds=round(time.perf_counter() - started, 6),
        )
        headers = {"Cache-Control": "no-store"}
        if status in (503,):
            headers["Retry-After"] = "2"
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="analysis-operator"'
        return web.json_response(body, status=status, headers=headers)

    app.router.add_get(OFFER_PATH, offer)


@kopf.on.startup(id="offer-api")
async def on_offer_startup(memo: kopf.Memo, flavors: kopf.Index, environments: kopf.Index, **indexes: Any) -> None:
    """Wire the OfferService into the forward-auth server. That server, the budget gate and the
    backends are made by handlers/lifecycle.py's startup handler, which kopf runs after this one
    (registration order): the wiring waits for them in a task of its own; until then the route
    answers 503 Starting."""
    config: Settings = memo.config
    if config.gateway.enabled:
        memo.offer_wiring = asyncio.create_task(wire_offer(memo, flavors, environments, indexes))
        memo.offer_wiring.add_done_callback(_wiring_done)


def _wiring_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("offer.wiring_failed", error=repr(task.exception()))  # the route keeps answering 503


async def wire_offer(
    memo: kopf.Memo, flavors: kopf.Index, environments: kopf.Index, indexes: Mapping[str, Any]
) -> None:
    while memo.get("gateway") is None or "context" not in memo:
        await asyncio.sleep(0.02)
    config: Settings = memo.config
    service = OfferService(
        config,
        # TokenReview (the operator's ServiceAccount needs `create tokenreviews`, as in system:auth-delegator),
        # on the forward-auth's own connections; answers are cached, so a portal costs one review a minute
        memo.gateway_kube.review_token,
        TokenVerifier(config.gateway),
        flavors,
        environments,
        indexes["datasets"],
        indexes["group_budgets"],
        memo.access.catalogue,
        memo.budget_gate,
        memo.identities,
        {kind: backend.dataset_problem for kind, backend in memo.context.backends.items()},
        active=lambda: bool(memo.active),
    )
    slot = memo.gateway.app[OFFER_SLOT]
    slot.loop, slot.service = asyncio.get_running_loop(), service
    log.info("offer.serving", path=OFFER_PATH, port=config.gateway.auth_port)


@kopf.on.cleanup(id="offer-api-cleanup")
async def on_offer_cleanup(memo: kopf.Memo, **_: Any) -> None:
    wiring: asyncio.Task[None] | None = memo.get("offer_wiring")
    if wiring is not None and not wiring.done():
        wiring.cancel()
