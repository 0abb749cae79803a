"""GET /api/v1/offer against the real operator and API server: the answer for each user agrees
with what a server-side dry-run create decides (admission itself), card by card and dataset by
dataset; an embargo that ends is read as ended at the next request; a dry run holds nothing; and
nobody but the portal (a ServiceAccount admission trusts, checked by TokenReview) asks for others."""

from __future__ import annotations

import datetime
import json
import pathlib
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

import kubernetes
import pytest

from tests.integration.conftest import CLUSTER_STATE, GROUP, REPO, VERSION, identity_provider, impersonating, kubectl
from tests.waiting import wait_for

PORTAL_NAMESPACE = "offer-portal"
PORTAL = f"system:serviceaccount:{PORTAL_NAMESPACE}:portal"
SUFFIX = uuid.uuid4().hex[:6]
ALICE, BOB, CAROL, DAVE = (f"off-{name}-{SUFFIX}" for name in ("alice", "bob", "carol", "dave"))
TEAM, STAFF = f"off-team-{SUFFIX}", f"off-staff-{SUFFIX}"
OPEN, EMBARGOED, ENDED, SOON = (f"off-{name}-{SUFFIX}" for name in ("open", "embargoed", "ended", "soon"))
STAFF_FLAVOR = f"off-staff-{SUFFIX}"
NFS = {"nfs": {"server": "nas.example.org", "path": "/data/x"}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apply(*objects: dict) -> None:
    kubectl_binary = pathlib.Path(CLUSTER_STATE.joinpath("bin").read_text().strip()) / "kubectl"
    subprocess.run(
        [str(kubectl_binary), "apply", "--server-side", "--force-conflicts", "-f", "-"],
        input="\n---\n".join(json.dumps(item) for item in objects),
        text=True,
        check=True,
        capture_output=True,
    )


def obj(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}


def catalogue(soon: datetime.datetime) -> list[dict]:
    access_embargoed = {"level": "embargoed", "embargoedUntil": "2031-01-01", "groups": [TEAM]}
    return [
        *(obj("FacilityUser", user, {"uid": 31000 + i, "gid": 31000 + i}) for i, user in enumerate((ALICE, BOB, DAVE))),
        obj("FacilityGroup", TEAM, {"members": [ALICE]}),
        obj("FacilityGroup", STAFF, {"members": [BOB]}),
        obj(
            "EnvironmentFlavor",
            STAFF_FLAVOR,
            {
                "backend": "kubernetes",
                "image": "quay.io/jupyter/base-notebook:2025-10-20",
                "resources": {"cpu": 1, "memory": "2Gi"},
                "access": {"groups": [STAFF]},
            },
        ),
        obj("Dataset", OPEN, {"pid": f"10.5072/{OPEN}", "storage": NFS, "access": {"level": "public"}}),
        obj("Dataset", EMBARGOED, {"pid": f"10.5072/{EMBARGOED}", "storage": NFS, "access": access_embargoed}),
        obj(
            "Dataset",
            ENDED,
            {
                "pid": f"10.5072/{ENDED}",
                "storage": NFS,
                "access": {"level": "embargoed", "embargoedUntil": "2020-01-01"},
            },
        ),
        obj(
            "Dataset",
            SOON,
            {
                "pid": f"10.5072/{SOON}",
                "storage": NFS,
                "access": {
                    "level": "embargoed",
                    "embargoedUntil": soon.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "groups": [TEAM],
                },
            },
        ),
        obj("ComputeBudget", f"off-alice-{SUFFIX}", {"user": ALICE, "limits": {"cpuHours": 100, "maxEnvironments": 5}}),
        obj("ComputeBudget", f"off-bob-{SUFFIX}", {"user": BOB, "limits": {"cpuHours": 100, "gpuHours": 0}}),
        obj("ComputeBudget", f"off-team-{SUFFIX}", {"group": TEAM, "limits": {"gpuHours": 10, "maxGpus": 1}}),
        obj("ComputeBudget", f"off-carol-{SUFFIX}", {"user": CAROL, "limits": {"cpuHours": 100}}),
    ]


class OfferApi:
    def __init__(self, url: str, identity_dir, portal_token: str, other_token: str) -> None:
        self.url, self.identity_dir = url, identity_dir
        self.portal_token, self.other_token = portal_token, other_token

    def oidc(self, user: str) -> str:
        return subprocess.run(
            [sys.executable, str(REPO / "hack/identity.py"), "token", str(self.identity_dir), user],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def get(self, headers: dict[str, str], **query: str | list[str]) -> tuple[int, dict]:
        url = self.url + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def for_user(self, user: str) -> dict:
        status, document = self.get({"Authorization": f"Bearer {self.portal_token}"}, user=user)
        assert status == 200, document
        return document


@pytest.fixture(scope="module")
def offer_api(operator, kubeconfig, tmp_path_factory):
    identity_dir = tmp_path_factory.mktemp("offer-idp")
    oidc = identity_provider(identity_dir)
    kubectl("create", "namespace", PORTAL_NAMESPACE, check=False)
    for account in ("portal", "not-portal"):
        kubectl("create", "serviceaccount", account, "-n", PORTAL_NAMESPACE, check=False)
    portal_token = kubectl("create", "token", "portal", "-n", PORTAL_NAMESPACE, "--duration", "1h").stdout.strip()
    other_token = kubectl("create", "token", "not-portal", "-n", PORTAL_NAMESPACE, "--duration", "1h").stdout.strip()
    port = _free_port()
    saved = dict(operator.settings)
    operator.configure(
        **oidc,
        ANALYSIS_OPERATOR_GATEWAY_ENABLED="true",
        ANALYSIS_OPERATOR_GATEWAY_AUTH_LISTEN_ADDRESS="127.0.0.1",
        ANALYSIS_OPERATOR_GATEWAY_AUTH_PORT=str(port),
        ANALYSIS_OPERATOR_GATEWAY_SESSION_COOKIE="aenv_session",
        ANALYSIS_OPERATOR_ADMISSION_TRUSTED_USERS=PORTAL,
        # the production defaults: no FacilityUser, no budget: refused (conftest turns them off)
        ANALYSIS_OPERATOR_BUDGETS_REQUIRE_BUDGET="true",
        ANALYSIS_OPERATOR_IDENTITY_REQUIRE_POSIX_IDENTITY="true",
    )
    api = OfferApi(f"http://127.0.0.1:{port}/api/v1/offer", identity_dir, portal_token, other_token)
    wait_for(lambda: api.get({"Authorization": f"Bearer {portal_token}"}, user="x")[0] == 200, timeout=30, what="offer")
    yield api
    operator.settings = saved
    operator.restart()


@pytest.fixture(scope="module")
def facility(offer_api, kubeconfig):
    soon = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(seconds=25)
    objects = catalogue(soon)
    apply(*objects)
    # the operator's indexes follow the watch: wait until it knows the last object made
    wait_for(
        lambda: any(d["name"] == SOON for d in offer_api.for_user(ALICE)["datasets"]),
        timeout=20,
        what="the catalogue in the operator's indexes",
    )
    wait_for(
        lambda: any(b["name"] == f"off-carol-{SUFFIX}" for b in offer_api.for_user(CAROL)["budgets"]),
        timeout=20,
        what="the budgets in the operator's indexes",
    )
    yield soon
    for item in reversed(objects):
        kubectl(
            "delete", f"{item['kind'].lower()}s.{GROUP}", item["metadata"]["name"], "--ignore-not-found", check=False
        )


def dry_run(kubeconfig: str, namespace: str, owner: str, flavor: str, datasets: list[str] = ()) -> str | None:
    """A server-side dry-run create by the portal for `owner`: None if admitted, else the first cause's reason."""
    api = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, PORTAL, "analysis-portal"))
    spec = {"owner": owner, "flavor": flavor, "lifetime": "1h"}
    if datasets:
        spec["datasets"] = [{"name": name} for name in datasets]
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": "probe"},
        "spec": spec,
    }
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", body, dry_run="All")
        return None
    except kubernetes.client.ApiException as error:
        answer = json.loads(error.body)
        causes = (answer.get("details") or {}).get("causes") or []
        assert causes, answer
        return causes[0]["reason"]


def test_every_card_agrees_with_a_dry_run_create(offer_api, facility, kubeconfig, namespace):
    expected = {
        (ALICE, STAFF_FLAVOR): "FlavorNotAllowed",
        (BOB, STAFF_FLAVOR): None,
        (BOB, "jupyter-gpu"): "GpuHoursExhausted",
        (CAROL, "jupyter-basic"): "NoPosixIdentity",
        (DAVE, "jupyter-basic"): "NoBudget",
        (ALICE, "jupyter-basic"): None,
    }
    compared = 0
    for user in (ALICE, BOB, CAROL, DAVE):
        document = offer_api.for_user(user)
        for card in document["flavors"]:
            decided = dry_run(kubeconfig, namespace, user, card["name"])
            assert card["allowed"] == (decided is None), (user, card, decided)
            assert card.get("reason") == decided, (user, card, decided)
            if (user, card["name"]) in expected:
                assert decided == expected[(user, card["name"])]
            compared += 1
            if card["backend"] != "kubernetes" and user != CAROL:  # not enabled here: refused at admission
                assert card["reason"] == "BackendNotEnabled"
    assert compared >= 32  # 4 users x every card of the catalogue (9 here)


def test_every_dataset_agrees_with_a_dry_run_create(offer_api, facility, kubeconfig, namespace):
    for user in (ALICE, BOB):
        document = offer_api.for_user(user)
        mine = {entry["name"]: entry for entry in document["datasets"] if entry["name"].endswith(SUFFIX)}
        assert set(mine) == {OPEN, EMBARGOED, ENDED, SOON}
        for name, entry in mine.items():
            decided = dry_run(kubeconfig, namespace, user, "jupyter-basic", [name])
            assert entry["readable"] == (decided is None), (user, entry, decided)
            assert entry.get("reason") == decided
            assert entry["backends"] == ["kubernetes"]
    alice = {entry["name"]: entry for entry in offer_api.for_user(ALICE)["datasets"]}
    bob = {entry["name"]: entry for entry in offer_api.for_user(BOB)["datasets"]}
    assert alice[EMBARGOED]["readable"] and alice[EMBARGOED]["grounds"] == f"member of group {TEAM}"
    assert not bob[EMBARGOED]["readable"] and bob[EMBARGOED]["reason"] == "DatasetEmbargoed"
    assert bob[EMBARGOED]["embargoEnds"] == "2031-01-01T00:00:00Z" and bob[ENDED]["embargoEnds"] is None


def test_named_datasets_only_and_an_unknown_one_as_admission_words_it(offer_api, facility, kubeconfig, namespace):
    missing = f"off-nothing-{SUFFIX}"
    status, document = offer_api.get(
        {"Authorization": f"Bearer {offer_api.portal_token}"}, user=BOB, dataset=[EMBARGOED, missing]
    )
    assert status == 200 and [entry["name"] for entry in document["datasets"]] == [EMBARGOED, missing]
    for entry in document["datasets"]:
        assert entry.get("reason") == dry_run(kubeconfig, namespace, BOB, "jupyter-basic", [entry["name"]])
    assert document["datasets"][1]["reason"] == "DatasetNotFound"


def test_an_embargo_that_ends_is_read_as_ended_at_the_next_request(offer_api, facility, kubeconfig, namespace):
    soon = facility
    if datetime.datetime.now(datetime.UTC) < soon:  # still embargoed: bob may not read it, by both answers
        entry = next(e for e in offer_api.for_user(BOB)["datasets"] if e["name"] == SOON)
        if datetime.datetime.now(datetime.UTC) < soon - datetime.timedelta(seconds=1):
            assert entry["readable"] is False and entry["embargoEnds"] == soon.strftime("%Y-%m-%dT%H:%M:%SZ")
    wait_for(
        lambda: next(e for e in offer_api.for_user(BOB)["datasets"] if e["name"] == SOON)["readable"],
        timeout=40,
        what="the embargo's end read at request time",
    )
    after = next(e for e in offer_api.for_user(BOB)["datasets"] if e["name"] == SOON)
    assert after["grounds"].startswith("embargo ended") and after["embargoEnds"] is None
    assert datetime.datetime.now(datetime.UTC) >= soon  # not before it ended
    assert dry_run(kubeconfig, namespace, BOB, "jupyter-basic", [SOON]) is None


def test_budgets_and_a_dry_run_holds_nothing(offer_api, facility, kubeconfig, namespace):
    before = offer_api.for_user(ALICE)
    budgets = {budget["name"]: budget for budget in before["budgets"]}
    own, team = budgets[f"off-alice-{SUFFIX}"], budgets[f"off-team-{SUFFIX}"]
    assert own["default"] and own["user"] == ALICE and own["limits"] == {"cpuHours": 100.0, "maxEnvironments": 5.0}
    assert own["remaining"]["environments"] == 5 and own["used"]["environments"] == 0
    assert team["group"] == TEAM and not team["default"] and team["remaining"]["gpus"] == 1
    assert f"off-bob-{SUFFIX}" not in budgets  # nobody else's budget
    for _ in range(3):
        assert dry_run(kubeconfig, namespace, ALICE, "jupyter-basic") is None
    after = offer_api.for_user(ALICE)
    assert next(b for b in after["budgets"] if b["default"])["used"]["environments"] == 0


def test_only_the_portal_asks_for_someone_else(offer_api, facility):
    bob = {"Authorization": f"Bearer {offer_api.oidc(BOB)}"}
    status, answer = offer_api.get(bob, user=ALICE)
    assert (status, answer["reason"]) == (403, "NotPortal")
    status, answer = offer_api.get({"Authorization": f"Bearer {offer_api.other_token}"}, user=ALICE)
    assert (status, answer["reason"]) == (403, "NotPortal")  # a ServiceAccount admission does not trust
    status, answer = offer_api.get(bob)
    assert status == 200 and answer["user"] == BOB
    status, answer = offer_api.get({"Cookie": f"aenv_session={offer_api.oidc(BOB)}"})
    assert status == 200 and answer["user"] == BOB
    assert offer_api.get({"Authorization": f"Bearer {offer_api.portal_token}"}, user=ALICE)[0] == 200


def test_no_token_or_a_forged_header_is_401(offer_api, facility):
    status, answer = offer_api.get({})
    assert (status, answer["reason"]) == (401, "NotSignedIn")
    forged = {"X-Forwarded-User": ALICE, "X-Auth-Request-User": ALICE, "X-Remote-User": ALICE}
    assert offer_api.get(forged)[0] == 401
    assert offer_api.get(forged, user=ALICE)[0] == 401
    assert offer_api.get({"Authorization": "Bearer " + offer_api.portal_token[:-4] + "AAAA"}, user=ALICE)[0] == 401
