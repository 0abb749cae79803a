"""GET /api/v1/offer: what may this user do? The pure answer (policy/offer.py) and who may ask
(handlers/offer.py), with real signed tokens; the answer agreeing with admission is tested
against the real API server in tests/integration/test_offer.py."""

from __future__ import annotations

import asyncio
import datetime
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.data_access import IndexCatalogue
from analysis_operator.engine.ledger import Ledger, Views
from analysis_operator.handlers.offer import Denied, OfferService
from analysis_operator.infra.oidc import TokenVerifier
from analysis_operator.model.domain import Dataset, Flavor
from analysis_operator.policy.access import may_read
from analysis_operator.policy.budgets import Budget
from analysis_operator.policy.offer import BudgetRule, BudgetUse, build_offer, decide_dataset, offer_document
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import AdmissionSettings, BudgetSettings, GatewaySettings, Settings

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ISSUER, AUDIENCE = "https://sso.example.org", "analysis"

BASIC = Flavor.from_body("basic", {"backend": "kubernetes", "resources": {"cpu": "1", "memory": "4Gi"}})
GPU = Flavor.from_body("gpu", {"backend": "kubernetes", "resources": {"cpu": "1", "memory": "4Gi", "gpu": 1}})
STAFF = Flavor.from_body("staff-only", {"backend": "kubernetes", "access": {"groups": ["staff"]}})
VM = Flavor.from_body("vm", {"backend": "openstack"})
OPEN_DATA = Dataset.from_body("open", {"pid": "10.5072/open", "access": {"level": "public"}, "storage": {"path": "/d"}})
EMBARGOED = Dataset.from_body(
    "p11",
    {
        "pid": "10.5072/p11",
        "access": {"level": "embargoed", "embargoedUntil": "2026-12-01", "groups": ["p11-team"]},
        "storage": {"nfs": {"server": "nas", "path": "/p11"}},
    },
)
REACHES = {"kubernetes": lambda dataset: None if dataset.storage.nfs_share else "no nfs share"}


def budget(name, user="", group="", entries=None, **limits):
    body = {"metadata": {"name": name}, "spec": {"user": user, "group": group, "limits": limits}}
    body["status"] = {"environments": entries or {}}
    return Budget.from_body(body)


# ---------------------------------------------------------------- the pure answer


@pytest.mark.parametrize(
    ("flavor", "groups", "identity", "default", "reason"),
    [
        (BASIC, frozenset(), None, BudgetUse(budget("b", user="alice")), None),
        (STAFF, frozenset(), None, BudgetUse(budget("b", user="alice")), "FlavorNotAllowed"),
        (STAFF, frozenset({"staff"}), None, BudgetUse(budget("b", user="alice")), None),
        (VM, frozenset(), None, BudgetUse(budget("b", user="alice")), "BackendNotEnabled"),
        (BASIC, frozenset(), Refusal("NoPosixIdentity", "no FacilityUser"), None, "NoPosixIdentity"),
        (BASIC, frozenset(), None, BudgetUse(budget("b", user="alice", maxEnvironments=1), 1), "TooManyEnvironments"),
        (GPU, frozenset(), None, BudgetUse(budget("b", user="alice", gpuHours=0)), "GpuHoursExhausted"),
        (BASIC, frozenset(), None, BudgetUse(budget("b", user="alice", gpuHours=0)), None),
        (GPU, frozenset(), None, BudgetUse(budget("b", user="alice", maxGpus=1), 1, 1), "TooManyGpus"),
        (BASIC, frozenset(), None, Refusal("NoBudget", "user 'alice' has no ComputeBudget"), "NoBudget"),
    ],
)
def test_a_card_is_refused_as_admission_refuses_it_first_refusal_wins(flavor, groups, identity, default, reason):
    offer = build_offer("alice", groups, identity, [flavor], [], default, [], REACHES, BudgetRule(), NOW)
    refusal = offer.flavors[0].refusal
    assert (refusal.reason if refusal else None) == reason


def test_no_budget_is_no_refusal_when_budgets_are_not_required_or_not_checked():
    no_budget = Refusal("NoBudget", "none")
    for rule in (BudgetRule(require_budget=False), BudgetRule(enforced=False)):
        offer = build_offer("alice", frozenset(), None, [BASIC], [], no_budget, [], REACHES, rule, NOW)
        assert offer.flavors[0].refusal is None


def test_the_refusal_is_the_sentence_admission_gives():
    offer = build_offer("bob", frozenset(), None, [STAFF], [], None, [], REACHES, BudgetRule(), NOW)
    assert offer.flavors[0].refusal.message.startswith("flavor 'staff-only' is restricted (spec.access) to group staff")


@pytest.mark.parametrize(
    ("user", "groups", "now", "readable", "ends"),
    [
        ("bob", frozenset(), NOW, False, "2026-12-01T00:00:00Z"),
        ("bob", frozenset({"p11-team"}), NOW, True, "2026-12-01T00:00:00Z"),
        ("bob", frozenset(), datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC), True, None),  # ended: read at `now`
    ],
)
def test_datasets_are_decided_by_may_read_at_the_moment_asked(user, groups, now, readable, ends):
    document = offer_document(
        build_offer(user, groups, None, [], [EMBARGOED, OPEN_DATA], None, [], REACHES, BudgetRule(), now)
    )
    p11 = next(entry for entry in document["datasets"] if entry["name"] == "p11")
    assert p11["readable"] is readable and p11["embargoEnds"] == ends
    assert p11["readable"] == (not isinstance(may_read(EMBARGOED, user, groups, now), Refusal))
    if not readable:
        assert p11["reason"] == "DatasetEmbargoed" and "ask the experiment's principal investigator" in p11["message"]


def test_datasets_name_the_backends_that_can_mount_them():
    assert decide_dataset(EMBARGOED, "a", frozenset(), REACHES, NOW).backends == ("kubernetes",)
    assert decide_dataset(OPEN_DATA, "a", frozenset(), REACHES, NOW).backends == ()  # no share pods can mount


def test_budgets_show_limits_used_remaining_and_what_each_refuses():
    entries = {"u1": {"namespace": "n", "name": "lab", "cpus": 1, "gpus": 1, "cpuHours": 2.5, "gpuHours": 2.5}}
    own = BudgetUse(budget("alice-budget", user="alice", entries=entries, cpuHours=10, maxEnvironments=2), 1, 1)
    team = BudgetUse(budget("p11-budget", group="p11-team", gpuHours=1, maxGpus=1), 0, 0)
    document = offer_document(
        build_offer("alice", frozenset({"p11-team"}), None, [BASIC, GPU], [], own, [team], REACHES, BudgetRule(), NOW)
    )
    mine, theirs = document["budgets"]
    assert mine["name"] == "alice-budget" and mine["default"] is True and mine["user"] == "alice"
    assert mine["limits"] == {"cpuHours": 10.0, "maxEnvironments": 2.0}
    assert mine["used"] == {"cpuHours": 2.5, "gpuHours": 2.5, "environments": 1, "gpus": 1}
    assert mine["remaining"] == {"cpuHours": 7.5, "environments": 1.0}
    assert mine["refuses"] == []
    assert theirs["group"] == "p11-team" and theirs["default"] is False
    assert [entry["flavor"] for entry in theirs["refuses"]] == []  # 0 of 1 GPU-hours used: room
    assert all(entry["budget"] == "alice-budget" for entry in document["flavors"])


# ---------------------------------------------------------------- who may ask (handlers/offer.py)


def token(user, **claims):
    body = {"preferred_username": user, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, KEY, algorithm="RS256", headers={"kid": "k1"})


class Reviews:
    """The API server's TokenReview, as a table: token -> the user it authenticates."""

    def __init__(self, known):
        self.known, self.asked = known, 0

    async def __call__(self, token):
        self.asked += 1
        user = self.known.get(token)
        return {"authenticated": True, "user": user} if user else {"authenticated": False}


class Identities:
    async def admit(self, owner):
        return None if owner != "nobody" else Refusal("NoPosixIdentity", f"user {owner!r} has no FacilityUser")


@pytest.fixture
def clock():
    return [NOW]


@pytest.fixture
def service(tmp_path, clock):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    gateway = GatewaySettings(
        enabled=True, oidc_jwks_file=str(tmp_path / "jwks.json"), oidc_issuer=ISSUER, oidc_audience=AUDIENCE
    )
    settings = Settings(gateway=gateway, admission=AdmissionSettings(trusted_groups=("analysis-portal",)))
    groups = {"p11-team": [frozenset({"alice"})], "staff": [frozenset({"carol"})]}
    budgets = {"alice-budget": [budget("alice-budget", user="alice", maxEnvironments=3)]}
    catalogue = IndexCatalogue({"p11": [EMBARGOED]}, {}, groups)
    gate = BudgetGate(BudgetSettings(), Ledger(None, Views(budgets, {"alice": ["alice-budget"]}, groups)))
    reviews = Reviews(
        {
            "portal-sa-token": {"username": "system:serviceaccount:portal:portal", "groups": ["analysis-portal"]},
            "bob-k8s-token": {"username": "bob", "groups": ["facility-users"]},
        }
    )
    flavors = {"basic": [BASIC], "staff-only": [STAFF]}
    return OfferService(
        settings,
        reviews,
        TokenVerifier(gateway),
        flavors,
        {},
        {"p11": [EMBARGOED]},
        {},
        catalogue,
        gate,
        Identities(),
        REACHES,
        clock=lambda: clock[0],
    )


def ask(service, query=None, **headers):
    return asyncio.run(service.answer(headers, query or {}))


def denied(service, query=None, **headers):
    with pytest.raises(Denied) as caught:
        ask(service, query, **headers)
    return caught.value.status, caught.value.reason


def test_a_person_asks_about_themselves_by_bearer_or_session_cookie(service):
    for headers in ({"Authorization": f"Bearer {token('alice')}"}, {"Cookie": f"aenv_session={token('alice')}"}):
        caller, document = ask(service, **headers)
        assert caller.user == document["user"] == "alice" and not caller.portal
        assert {flavor["name"]: flavor["allowed"] for flavor in document["flavors"]} == {
            "basic": True,
            "staff-only": False,
        }
        assert document["datasets"][0]["readable"] is True  # alice is in p11-team
        assert document["budgets"][0]["name"] == "alice-budget"
    assert ask(service, {"user": "alice"}, Authorization=f"Bearer {token('alice')}")[1]["user"] == "alice"


def test_bob_asking_for_alice_without_being_the_portal_is_403(service):
    assert denied(service, {"user": "alice"}, Authorization=f"Bearer {token('bob')}") == (403, "NotPortal")
    # a Kubernetes identity admission does not trust is no portal either
    assert denied(service, {"user": "alice"}, Authorization="Bearer bob-k8s-token") == (403, "NotPortal")


def test_an_oidc_token_never_makes_its_holder_the_portal_whatever_it_claims(service):
    forged = token("system:serviceaccount:portal:portal", groups=["analysis-portal"])
    assert denied(service, {"user": "alice"}, Authorization=f"Bearer {forged}") == (403, "NotPortal")


def test_the_portal_asks_for_a_user_with_its_kubernetes_token(service):
    caller, document = ask(service, {"user": "carol"}, Authorization="Bearer portal-sa-token")
    assert caller.portal and document["user"] == "carol"
    assert document["datasets"][0]["readable"] is False and document["datasets"][0]["reason"] == "DatasetEmbargoed"
    assert document["budget"]["reason"] == "NoBudget"  # carol has none: every card says so (she is staff)
    assert {flavor["name"]: flavor["reason"] for flavor in document["flavors"]} == {
        "basic": "NoBudget",
        "staff-only": "NoBudget",
    }


def test_no_credential_and_forged_user_headers_are_401(service):
    assert denied(service) == (401, "NotSignedIn")
    forged = {"X-Forwarded-User": "alice", "X-Auth-Request-User": "alice", "X-Remote-User": "alice"}
    assert denied(service, {"user": "alice"}, **forged) == (401, "NotSignedIn")
    assert denied(service, Authorization="Bearer not-a-token-anyone-knows") == (401, "NotSignedIn")
    expired = token("alice", exp=int(time.time()) - 3600)
    assert denied(service, Cookie=f"aenv_session={expired}") == (401, "NotSignedIn")


def test_a_token_review_is_reused_not_asked_per_request(service):
    for _ in range(5):
        ask(service, {"user": "alice"}, Authorization="Bearer portal-sa-token")
    assert service.review.asked == 1
    for _ in range(3):
        denied(service, Authorization="Bearer nothing")
    assert service.review.asked == 2  # a refused token is remembered too (briefly)


def test_the_clock_is_read_per_request_an_embargo_that_ended_is_ended(service, clock):
    bob = {"Authorization": f"Bearer {token('bob')}"}
    assert ask(service, **bob)[1]["datasets"][0]["readable"] is False
    clock[0] = datetime.datetime(2026, 12, 1, 0, 0, 1, tzinfo=datetime.UTC)
    after = ask(service, **bob)[1]["datasets"][0]
    assert after["readable"] is True and after["grounds"].startswith("embargo ended") and after["embargoEnds"] is None


def test_a_user_without_a_posix_identity_is_told_so_on_every_card(service):
    document = ask(service, {"user": "nobody"}, Authorization="Bearer portal-sa-token")[1]
    assert document["identity"]["usable"] is False and document["identity"]["reason"] == "NoPosixIdentity"
    assert {flavor["reason"] for flavor in document["flavors"]} == {"NoPosixIdentity"}


def test_a_standby_does_not_answer_from_paused_views(service):
    service.active = lambda: False
    assert denied(service, Authorization=f"Bearer {token('alice')}") == (503, "Standby")


def test_the_route_answers_json_never_cached_and_503_until_wired(service):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from analysis_operator.handlers.offer import OFFER_PATH, OFFER_SLOT, add_offer_routes

    async def scenario():
        app = web.Application()
        add_offer_routes(app)
        async with TestClient(TestServer(app)) as client:
            starting = await client.get(OFFER_PATH, headers={"Authorization": f"Bearer {token('alice')}"})
            assert starting.status == 503 and (await starting.json())["reason"] == "Starting"
            assert starting.headers["Retry-After"] == "2"
            app[OFFER_SLOT].service, app[OFFER_SLOT].loop = service, asyncio.get_running_loop()
            anonymous = await client.get(OFFER_PATH)
            assert anonymous.status == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
            answer = await client.get(OFFER_PATH, headers={"Authorization": f"Bearer {token('alice')}"})
            assert answer.status == 200 and answer.headers["Cache-Control"] == "no-store"
            assert (await answer.json())["user"] == "alice"
            named = await client.get(
                OFFER_PATH,
                params=[("dataset", "p11"), ("dataset", "x")],
                headers={"Cookie": f"aenv_session={token('alice')}"},
            )
            assert [entry["name"] for entry in (await named.json())["datasets"]] == ["p11", "x"]
            other = await client.get(
                OFFER_PATH, params={"user": "carol"}, headers={"Cookie": f"aenv_session={token('alice')}"}
            )
            assert other.status == 403 and (await other.json())["reason"] == "NotPortal"

    asyncio.run(scenario())


def test_an_api_server_that_cannot_review_is_503_and_lets_nobody_in(service):
    async def broken(token):
        raise ConnectionError("API server unreachable")

    service.review = broken
    assert denied(service, {"user": "alice"}, Authorization="Bearer portal-sa-token") == (503, "ReviewUnavailable")
    assert ask(service, Authorization=f"Bearer {token('alice')}")[1]["user"] == "alice"  # people need no review


def test_a_flood_of_unknown_tokens_is_bounded(service):
    async def slow(token):
        await asyncio.sleep(0.2)
        return {"authenticated": False}

    service.review = slow

    async def flood():
        asks = [service.answer({"Authorization": f"Bearer junk-{i}"}, {}) for i in range(40)]
        return await asyncio.gather(*asks, return_exceptions=True)

    answers = asyncio.run(flood())
    reasons = sorted({answer.reason for answer in answers})
    assert reasons == ["Busy", "NotSignedIn"]
    assert sum(answer.reason == "Busy" for answer in answers) == 8  # 32 reviewed at once, the rest turned away


def test_the_portal_may_ask_about_named_datasets_only(service):
    headers = {"Authorization": f"Bearer {token('bob')}"}
    document = asyncio.run(service.answer(headers, {}, ["p11", "no-such", "p11"]))[1]
    assert [entry["name"] for entry in document["datasets"]] == ["p11", "no-such"]
    missing = document["datasets"][1]
    assert missing["readable"] is False and missing["reason"] == "DatasetNotFound"
    assert missing["message"].startswith("dataset 'no-such' does not exist")  # admission's sentence
    assert document["flavors"] and document["budgets"] == []  # the rest of the answer is whole
    with pytest.raises(Denied) as caught:
        asyncio.run(service.answer(headers, {}, [f"d{i}" for i in range(201)]))
    assert caught.value.reason == "TooManyDatasets"
