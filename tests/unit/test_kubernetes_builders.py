"""The Kubernetes backend's pure parts: pod, service, token secret, URL, pod observation."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from analysis_operator.backends.base import State
from analysis_operator.backends.kubernetes import build_pod, build_service, build_url, observe_pod, summarize_pod
from analysis_operator.engine.tokens import TOKEN_KEY, build_token_secret, new_token
from analysis_operator.infra import render
from analysis_operator.model.domain import (
    API_VERSION,
    LABEL_ENVIRONMENT,
    LABEL_ENVIRONMENT_UID,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    MANAGER,
    BackendKind,
    Environment,
    Flavor,
    Resources,
)
from analysis_operator.settings import Settings

SETTINGS = Settings()
GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}

HOSTILE = [
    'a"b: {c}\n- d',
    "x\n  securityContext: {privileged: true}",
    "'; rm -rf / #",
    "{{ 7 * 7 }} {% raw %}",
    "key: value\n- item\n# comment",
    "&anchor *alias !!python/object:os.system",
    "ünïcödé\ttab\r\n\u2028\u0085\x7f\x00",
    '\\"\\n',
    "</script>&<>",
    "",
]


def make_environment(**overrides) -> Environment:
    values = dict(namespace="team-a", name="lab", uid="0b1c-uid", owner="alice", flavor="small")
    values.update(overrides)
    return Environment(**values)


def make_flavor(cpu="2", memory="8Gi", gpu=0, image="jupyter/scipy-notebook:2024-01", **overrides) -> Flavor:
    return Flavor(
        name="small",
        backend=BackendKind.KUBERNETES,
        image=image,
        resources=Resources(cpu=cpu, memory=memory, gpu=gpu),
        **overrides,
    )


def container_of(pod: dict) -> dict:
    [container] = pod["spec"]["containers"]
    return container


def env_of(pod: dict) -> dict:
    return {entry["name"]: entry for entry in container_of(pod)["env"]}


@pytest.mark.parametrize(
    "environment_image, flavor_image, expected",
    [
        ("", "jupyter/scipy-notebook:2024-01", "jupyter/scipy-notebook:2024-01"),
        ("registry.facility.eu/custom:1", "jupyter/scipy-notebook:2024-01", "registry.facility.eu/custom:1"),
        ("registry.facility.eu/custom:1", "", "registry.facility.eu/custom:1"),
    ],
)
def test_pod_image_is_the_environments_else_the_flavors(environment_image, flavor_image, expected):
    pod = build_pod(make_environment(image=environment_image), make_flavor(image=flavor_image), SETTINGS)
    assert container_of(pod)["image"] == expected


@pytest.mark.parametrize(
    "cpu, memory, gpu, expected",
    [
        ("2", "8Gi", 0, {"cpu": "2", "memory": "8Gi"}),
        ("500m", "512Mi", 0, {"cpu": "500m", "memory": "512Mi"}),
        ("8", "64Gi", 1, {"cpu": "8", "memory": "64Gi", GPU: "1"}),
        ("16", "128Gi", 4, {"cpu": "16", "memory": "128Gi", GPU: "4"}),
    ],
)
def test_pod_requests_and_limits_come_from_the_flavor(cpu, memory, gpu, expected):
    pod = build_pod(make_environment(), make_flavor(cpu=cpu, memory=memory, gpu=gpu), SETTINGS)
    resources = container_of(pod)["resources"]
    assert resources["requests"] == expected
    assert resources["limits"] == expected
    tolerations = pod["spec"].get("tolerations", [])
    assert (GPU_TOLERATION in tolerations) is (gpu > 0)
    assert tolerations == ([GPU_TOLERATION] if gpu else [])


def test_pod_token_comes_from_the_secret_only():
    environment = make_environment()
    token = new_token()
    secret = build_token_secret(environment, token)
    pod = build_pod(environment, make_flavor(), SETTINGS)
    jupyter_token = env_of(pod)["JUPYTER_TOKEN"]
    assert jupyter_token == {
        "name": "JUPYTER_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": environment.child_name, "key": TOKEN_KEY}},
    }
    assert secret["metadata"]["name"] == environment.child_name  # the pod points at the secret that holds it
    rendered = json.dumps(pod)
    assert token not in rendered and secret["data"][TOKEN_KEY] not in rendered


def test_pod_identity_owner_reference_and_hardening():
    environment = make_environment()
    pod = build_pod(environment, make_flavor(), SETTINGS)
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    assert pod["metadata"]["name"] == "aenv-lab"
    assert pod["metadata"]["namespace"] == "team-a"
    assert pod["metadata"]["labels"] == environment.identity_labels
    assert pod["metadata"]["ownerReferences"] == [
        {
            "apiVersion": API_VERSION,
            "kind": "AnalysisEnvironment",
            "name": "lab",
            "uid": "0b1c-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    container = container_of(pod)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["ports"] == [{"name": "http", "containerPort": SETTINGS.jupyter_port}]
    assert f"--ServerApp.port={SETTINGS.jupyter_port}" in container["args"]


def test_pod_port_follows_settings():
    pod = build_pod(make_environment(), make_flavor(), Settings(jupyter_port=9999))
    assert container_of(pod)["ports"][0]["containerPort"] == 9999
    assert "--ServerApp.port=9999" in container_of(pod)["args"]


def test_pod_mounts_the_given_dataset_volumes():
    volume = {"name": "ds-1", "persistentVolumeClaim": {"claimName": "ds-1", "readOnly": True}}
    mount = {"name": "ds-1", "mountPath": "/data/ds-1", "readOnly": True}
    pod = build_pod(make_environment(), make_flavor(), SETTINGS, (volume,), (mount,))
    assert pod["spec"]["volumes"][2:] == [volume]  # after home and the operator's extension
    assert container_of(pod)["volumeMounts"][2:] == [mount]


def assert_pod_structure(pod: dict, environment: Environment, image: str) -> None:
    assert sorted(pod) == ["apiVersion", "kind", "metadata", "spec"]
    assert sorted(pod["metadata"]) == ["labels", "name", "namespace", "ownerReferences"]
    assert pod["metadata"]["name"] == environment.child_name
    assert pod["metadata"]["labels"] == environment.identity_labels
    assert pod["metadata"]["ownerReferences"][0]["name"] == environment.name
    assert "privileged" not in json.dumps(pod["spec"]["securityContext"])
    assert pod["spec"]["automountServiceAccountToken"] is False
    container = container_of(pod)
    assert container["image"] == image
    assert [entry["name"] for entry in container["env"]] == [
        "JUPYTER_TOKEN",
        "ANALYSIS_ENVIRONMENT",
        "ANALYSIS_OWNER",
        "PYTHONPATH",
        "JUPYTER_CONFIG_PATH",
    ]
    env = env_of(pod)
    assert env["ANALYSIS_OWNER"] == {"name": "ANALYSIS_OWNER", "value": environment.owner}
    assert env["ANALYSIS_ENVIRONMENT"] == {"name": "ANALYSIS_ENVIRONMENT", "value": environment.name}
    assert env["JUPYTER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == environment.child_name
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_text_cannot_change_the_pod_structure(hostile):
    environment = make_environment(owner=hostile, name=hostile, image=f"img:{hostile}")
    pod = build_pod(environment, make_flavor(), SETTINGS)
    assert_pod_structure(pod, environment, f"img:{hostile}")


# Every Basic Multilingual Plane character except surrogates, weighted towards YAML and Jinja syntax.
BMP_TEXT = st.text(
    st.one_of(
        st.sampled_from(list(":{}[]-#&*!|>'\"%@`,?\\\n\r\t ")),
        st.characters(max_codepoint=0xFFFF, blacklist_categories=("Cs",)),
    )
)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(owner=BMP_TEXT, name=BMP_TEXT, image=BMP_TEXT)
@example(owner='a"b: {c}\n- d', name="lab", image="img: {x}\n- y")
def test_any_text_reaches_the_pod_unchanged(owner, name, image):
    environment = make_environment(owner=owner, name=name, image=image)
    pod = build_pod(environment, make_flavor(image="fallback"), SETTINGS)
    assert_pod_structure(pod, environment, image or "fallback")


@pytest.mark.parametrize("owner", ["\U0001f600", "scientist-\U0001d4b6"])
def test_text_beyond_the_basic_plane_reaches_the_pod_unchanged(owner):
    # tojson writes astral characters as \ud83d\ude00 surrogate escapes and PyYAML
    # decodes each half separately, so the value comes back as two lone surrogates.
    pod = build_pod(make_environment(owner=owner), make_flavor(), SETTINGS)
    assert env_of(pod)["ANALYSIS_OWNER"]["value"] == owner


@pytest.mark.parametrize("uid", ["0b1c-uid", "other-uid"])
def test_service_selects_the_pod_by_environment_uid(uid):
    environment = make_environment(uid=uid)
    service = build_service(environment, SETTINGS)
    pod = build_pod(environment, make_flavor(), SETTINGS)
    assert service["spec"]["selector"] == {LABEL_ENVIRONMENT_UID: uid}
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["metadata"]["name"] == environment.child_name
    assert service["metadata"]["labels"] == environment.identity_labels
    assert service["metadata"]["ownerReferences"][0]["uid"] == uid
    assert service["spec"]["ports"] == [
        {"name": "http", "port": SETTINGS.jupyter_port, "targetPort": "http", "protocol": "TCP"}
    ]


@pytest.mark.parametrize("token", ["s3cr3t", new_token(), "ünï/+=", ""])
def test_token_secret_round_trips(token):
    environment = make_environment()
    secret = build_token_secret(environment, token)
    assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
    assert base64.b64decode(secret["data"][TOKEN_KEY]).decode() == token
    assert secret["metadata"]["name"] == environment.child_name
    assert secret["metadata"]["namespace"] == environment.namespace
    assert secret["metadata"]["labels"] == {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_ENVIRONMENT: "lab",
        LABEL_ENVIRONMENT_UID: "0b1c-uid",
    }
    assert secret["metadata"]["ownerReferences"][0]["controller"] is True
    assert "stringData" not in secret


def test_new_tokens_differ_and_are_long():
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20
    assert min(len(token) for token in tokens) >= 40


@pytest.mark.parametrize(
    "settings, expected",
    [
        (Settings(), "http://aenv-lab.team-a.svc.cluster.local:8888/env/team-a/lab/lab"),
        (
            Settings(cluster_domain="k8s.facility.eu", jupyter_port=9000),
            "http://aenv-lab.team-a.svc.k8s.facility.eu:9000/env/team-a/lab/lab",
        ),
    ],
)
def test_url_is_the_service_dns_name(settings, expected):
    assert build_url(make_environment(), settings) == expected


def make_pod(phase="Pending", node="", conditions=(), deleting=False, message="", reason="", containers=None) -> dict:
    metadata = {"name": "aenv-lab", "namespace": "team-a", "labels": {LABEL_ENVIRONMENT_UID: "0b1c-uid"}}
    if deleting:
        metadata["deletionTimestamp"] = "2024-03-01T12:00:00Z"
    spec = {
        "containers": containers
        if containers is not None
        else [{"name": "jupyterlab", "resources": {"requests": {"cpu": "500m", "memory": "1Gi", GPU: "2"}}}]
    }
    if node:
        spec["nodeName"] = node
    status = {
        "phase": phase,
        "conditions": [{"type": kind, "status": value, **extra} for kind, value, extra in conditions],
    }
    if message:
        status["message"] = message
    if reason:
        status["reason"] = reason
    return {"metadata": metadata, "spec": spec, "status": status}


UNSCHEDULED = ("PodScheduled", "False", {"reason": "Unschedulable", "message": "0/3 nodes have enough nvidia.com/gpu"})
SCHEDULED = ("PodScheduled", "True", {})
READY = ("Ready", "True", {})
NOT_READY = ("Ready", "False", {"reason": "ContainersNotReady"})


@pytest.mark.parametrize(
    "pod, expected",
    [
        (None, (State.GONE, "PodMissing", 0.0, 0, "")),
        (
            make_pod("Running", "node-1", [SCHEDULED, READY], deleting=True),
            (State.PROVISIONING, "PodTerminating", 0.0, 0, ""),
        ),
        (make_pod("Pending", "", [UNSCHEDULED]), (State.PENDING, "Unschedulable", 0.0, 0, "")),
        (make_pod("Pending", "", [("PodScheduled", "False", {})]), (State.PENDING, "Unschedulable", 0.0, 0, "")),
        (make_pod("Pending", "", []), (State.PROVISIONING, "PodStarting", 0.0, 0, "")),
        (make_pod("Pending", "node-1", [SCHEDULED]), (State.PROVISIONING, "PodStarting", 0.5, 2, "")),
        (make_pod("Running", "node-1", [SCHEDULED, NOT_READY]), (State.PROVISIONING, "PodStarting", 0.5, 2, "")),
        (make_pod("Running", "node-1", [SCHEDULED, READY]), (State.READY, "PodReady", 0.5, 2, "http://x/lab")),
        (
            make_pod(
                "Running",
                "node-1",
                [SCHEDULED, READY],
                containers=[
                    {"resources": {"requests": {"cpu": "2"}}},
                    {"resources": {"requests": {"cpu": "250m", GPU: "1"}}},
                    {},
                ],
            ),
            (State.READY, "PodReady", 2.25, 1, "http://x/lab"),
        ),
        (
            make_pod("Failed", "node-1", [SCHEDULED], message="OOMKilled", reason="Evicted"),
            (State.FAILED, "Evicted", 0.0, 0, ""),
        ),
        (make_pod("Failed", "node-1", [SCHEDULED]), (State.FAILED, "PodFailed", 0.0, 0, "")),
        (make_pod("Succeeded", "node-1", [SCHEDULED]), (State.FAILED, "PodSucceeded", 0.0, 0, "")),
    ],
)
def test_observe_pod(pod, expected):
    observation = observe_pod(pod, url="http://x/lab")
    state, reason, cpus, gpus, url = expected
    assert observation.state is state
    assert observation.reason == reason
    assert (observation.cpus, observation.gpus) == (pytest.approx(cpus), gpus)
    assert observation.url == url
    assert observation.message  # always something for people


@pytest.mark.parametrize(
    "pod, words",
    [
        (None, ["does not exist"]),
        (make_pod("Pending", "", [UNSCHEDULED]), ["0/3 nodes have enough nvidia.com/gpu"]),
        (make_pod("Pending", "", [("PodScheduled", "False", {})]), ["waiting for a node"]),
        (make_pod("Running", "node-7", [SCHEDULED, READY]), ["node-7"]),
        (
            make_pod("Failed", "node-1", [], message="The node was low on resource: memory."),
            ["The node was low on resource: memory."],
        ),
        (make_pod("Failed", "node-1", []), ["Failed"]),
    ],
)
def test_observation_message_says_what_happened(pod, words):
    message = observe_pod(pod).message
    assert all(word in message for word in words), message


def test_observation_reference_names_pod_and_node():
    observation = observe_pod(make_pod("Running", "node-1", [SCHEDULED, READY]))
    assert observation.reference == {"name": "aenv-lab", "state": "Running", "node": "node-1"}


def test_a_freshly_built_pod_is_provisioning():
    pod = build_pod(make_environment(), make_flavor(gpu=1), SETTINGS)
    observation = observe_pod(pod)
    assert observation.state is State.PROVISIONING
    assert (observation.cpus, observation.gpus) == (0.0, 0)  # nothing held before a node is assigned


@pytest.mark.parametrize(
    "labels, expected_uid",
    [
        ({LABEL_ENVIRONMENT_UID: "0b1c-uid"}, "0b1c-uid"),
        ({}, ""),
        (None, ""),
    ],
)
def test_summarize_pod(labels, expected_uid):
    pod = make_pod("Running", "node-1", [SCHEDULED, READY])
    pod["metadata"]["labels"] = labels
    summary = summarize_pod(pod)
    assert summary.environment_uid == expected_uid
    assert summary.observation == observe_pod(pod)
    assert summary.observation.state is State.READY
    assert summary.observation.url == ""  # the index never stores a URL; the backend adds it


def make_mount(name: str, path: str, **storage):
    from analysis_operator.model.domain import Dataset, DatasetStorage, Mount

    return Mount(Dataset(name=name, pid=f"10.5072/{name}", storage=DatasetStorage(**storage)), path, "public")


def test_dataset_volumes_are_read_only_twice_and_one_per_dataset():
    from analysis_operator.backends.kubernetes import build_dataset_volumes

    volumes, mounts = build_dataset_volumes(
        (
            make_mount(
                "raw",
                "/data/raw",
                claim_name="facility-data",
                sub_path="p11/raw",
                nfs_server="nfs",
                nfs_path="/exports/raw",
            ),
            make_mount("ref", "/data/ref", nfs_server="nfs.facility.eu", nfs_path="/exports/ref"),
            make_mount("whole", "/data/whole", claim_name="whole-claim"),
        )
    )
    assert volumes == (
        {"name": "dataset-0", "persistentVolumeClaim": {"claimName": "facility-data", "readOnly": True}},
        {"name": "dataset-1", "nfs": {"server": "nfs.facility.eu", "path": "/exports/ref", "readOnly": True}},
        {"name": "dataset-2", "persistentVolumeClaim": {"claimName": "whole-claim", "readOnly": True}},
    )
    assert mounts == (
        {"name": "dataset-0", "mountPath": "/data/raw", "readOnly": True, "subPath": "p11/raw"},
        {"name": "dataset-1", "mountPath": "/data/ref", "readOnly": True},
        {"name": "dataset-2", "mountPath": "/data/whole", "readOnly": True},
    )


def test_pod_with_datasets_keeps_home_as_its_only_writable_volume():
    from analysis_operator.backends.kubernetes import build_dataset_volumes

    volumes, mounts = build_dataset_volumes((make_mount("ref", "/data/ref", nfs_server="n", nfs_path="/e"),))
    pod = build_pod(make_environment(), make_flavor(), SETTINGS, volumes, mounts)
    writable = [mount["mountPath"] for mount in container_of(pod)["volumeMounts"] if not mount.get("readOnly")]
    assert writable == ["/home/jovyan"]
    assert [volume["name"] for volume in pod["spec"]["volumes"]] == ["home", "aenv-jupyter", "dataset-0"]


def test_every_pod_runs_the_operators_jupyter_extension_read_only_from_its_namespaces_config_map():
    """OPEN: the extension that closes an unshared viewer's websockets (analysis_operator/jupyter/)."""
    import json

    from analysis_operator import jupyter
    from analysis_operator.backends.kubernetes import EXTENSION_DIR, build_extension_config_map

    pod = build_pod(make_environment(namespace="beamline-7"), make_flavor(), SETTINGS)
    (volume,) = [volume for volume in pod["spec"]["volumes"] if volume["name"] == "aenv-jupyter"]
    config_map = build_extension_config_map("beamline-7")
    assert config_map["metadata"]["namespace"] == "beamline-7"
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    files = {item["path"]: config_map["data"][item["key"]] for item in volume["configMap"]["items"]}
    assert "def _load_jupyter_server_extension" in files["aenv_viewers.py"]
    config = json.loads(files["config/jupyter_server_config.d/aenv_viewers.json"])
    assert config == {"ServerApp": {"jpserver_extensions": {jupyter.MODULE: True}}}
    (mount,) = [mount for mount in container_of(pod)["volumeMounts"] if mount["name"] == "aenv-jupyter"]
    assert mount == {"name": "aenv-jupyter", "mountPath": EXTENSION_DIR, "readOnly": True}
    env = env_of(pod)
    assert env["PYTHONPATH"]["value"] == EXTENSION_DIR
    assert env["JUPYTER_CONFIG_PATH"]["value"] == f"{EXTENSION_DIR}/config"


def test_home_is_per_environment_scratch_unless_per_user_claims_are_on():
    import dataclasses as dc

    from analysis_operator.backends.kubernetes import build_home_claim, home_claim_name
    from analysis_operator.settings import HomeSettings

    scratch = build_pod(make_environment(owner="alice"), make_flavor(), SETTINGS)
    assert scratch["spec"]["volumes"][0] == {"name": "home", "emptyDir": {"sizeLimit": "10Gi"}}

    settings = dc.replace(SETTINGS, home=HomeSettings(claims=True, size="50Gi", storage_class="cephfs"))
    pod = build_pod(make_environment(owner="alice"), make_flavor(), settings)
    assert pod["spec"]["volumes"][0] == {
        "name": "home",
        "persistentVolumeClaim": {"claimName": home_claim_name("alice")},
    }
    claim = build_home_claim(make_environment(owner="alice"), settings)
    assert claim["metadata"]["name"] == home_claim_name("alice")
    assert "ownerReferences" not in claim["metadata"]  # outlives the environment
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "50Gi"}},
        "storageClassName": "cephfs",
    }


@pytest.mark.parametrize(
    "owner, labelled",
    [
        ("alice", "alice"),
        ("alice@facility.eu", "sha256_"),  # '@' is no label character: the API server refused the claim (422)
        ("a" * 64, "sha256_"),  # nor over 63 characters
    ],
)
def test_a_home_claim_is_labelled_with_its_owner_as_environments_are(owner, labelled):
    """The owner label of a home claim is the one admission gives the owner's environments (label_text):
    an owner that is no label value made the claim a 422, and the environment stayed RefusedByCluster."""
    import dataclasses as dc
    import re

    from analysis_operator.backends.kubernetes import build_home_claim
    from analysis_operator.handlers.admission import selection_labels
    from analysis_operator.settings import HomeSettings

    settings = dc.replace(SETTINGS, home=HomeSettings(claims=True))
    value = build_home_claim(make_environment(owner=owner), settings)["metadata"]["labels"][LABEL_OWNER]
    assert value.startswith(labelled) and value == selection_labels(owner, [])[LABEL_OWNER]
    assert len(value) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", value)


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}", fullmatch=True))
def test_home_claim_names_are_valid_and_distinct_per_user(owner):
    import re

    from analysis_operator.backends.kubernetes import home_claim_name

    name = home_claim_name(owner)
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert home_claim_name(owner.swapcase()) != name or owner.swapcase() == owner


@pytest.mark.parametrize(
    "image, flavor_image, refused", [("", "", True), ("custom:1", "", False), ("", "jupyter", False)]
)
def test_a_pod_needs_an_image_from_the_environment_or_the_flavor(image, flavor_image, refused):
    from analysis_operator.backends.kubernetes import KubernetesBackend

    backend = KubernetesBackend(None, SETTINGS, {})
    environment = Environment(namespace="n", name="lab", uid="u", owner="alice", flavor="small", image=image)
    refusal = backend.validate(
        environment, Flavor(name="small", backend=BackendKind.KUBERNETES, image=flavor_image, allow_custom_image=True)
    )
    assert (refusal.reason if refusal else None) == ("ImageMissing" if refused else None)
    if refusal:
        assert "'small'" in refusal.message and "spec.image" in refusal.message


@pytest.mark.parametrize(
    "said, reason, words",
    [
        (
            '0/3 nodes are available: persistentvolumeclaim "raw-data" not found. not found',
            "ClaimNotFound",
            ["PersistentVolumeClaim 'raw-data'", "namespace 'team-a'", "nothing is charged", "scheduler: 0/3 nodes"],
        ),
        (
            '0/3 nodes are available: persistentvolumeclaim "a" not found, persistentvolumeclaim "b" not found.',
            "ClaimNotFound",
            ["'a', 'b'"],
        ),
        ("0/3 nodes have enough nvidia.com/gpu", "Unschedulable", ["0/3 nodes have enough nvidia.com/gpu"]),
    ],
)
def test_a_missing_claim_is_named_with_the_schedulers_own_words(said, reason, words):
    pod = make_pod("Pending", "", [("PodScheduled", "False", {"reason": "Unschedulable", "message": said})])
    observation = observe_pod(pod)
    assert (observation.state, observation.reason) == (State.PENDING, reason)
    assert all(word in observation.message for word in words), observation.message


def waiting(reason, message="", image="registry.example.org/xrd/jupyter:nope", **container) -> dict:
    return {
        "name": "jupyterlab",
        "image": image,
        "ready": False,
        "state": {"waiting": {"reason": reason, "message": message}},
        **container,
    }


@pytest.mark.parametrize(
    "statuses, reason, words",
    [
        (
            [waiting("ErrImagePull", "pull access denied")],
            "ImagePullFailed",
            ["'registry.example.org/xrd/jupyter:nope'"],
        ),
        (
            [waiting("ImagePullBackOff", 'Back-off pulling image "x"')],
            "ImagePullFailed",
            ["spec.image", "keeps trying"],
        ),
        ([waiting("InvalidImageName", "bad")], "ImagePullFailed", ["is not valid"]),
        (
            [waiting("CreateContainerConfigError", 'secret "aenv-lab" not found')],
            "ContainerNotCreated",
            ['secret "aenv-lab" not found'],
        ),
        (
            [waiting("CrashLoopBackOff", "back-off 40s", lastState={"terminated": {"exitCode": 127}})],
            "ServerCrashing",
            ["last exit code 127", "starts a JupyterLab server"],
        ),
        ([waiting("ContainerCreating")], "PodStarting", ["is starting"]),  # every start: nothing wrong
        ([], "PodStarting", ["is starting"]),
    ],
)
def test_a_container_the_node_cannot_start_is_named_with_what_a_person_can_do(statuses, reason, words):
    pod = make_pod("Pending", "kwok-cpu-0", [("PodScheduled", "True", {})])
    pod["status"]["containerStatuses"] = statuses
    observation = observe_pod(pod)
    assert (observation.state, observation.reason) == (State.PROVISIONING, reason)
    assert observation.attention == (reason != "PodStarting")
    assert all(word in observation.message for word in words), observation.message
    assert observation.cpus == 0.5  # scheduled: it holds its node's resources (charged only once Ready)


def test_the_kubelets_retries_of_a_pull_change_nothing_a_status_would_show():
    """ErrImagePull and ImagePullBackOff alternate for as long as the node retries, each with its own
    words: one observation for both, so a stuck pod costs one status write, not one per retry."""
    observations = set()
    for said in ("ErrImagePull", "ImagePullBackOff", "ErrImagePull"):
        pod = make_pod("Pending", "kwok-cpu-0", [("PodScheduled", "True", {})])
        pod["status"]["containerStatuses"] = [waiting(said, f"{said}: rpc error {len(observations)}")]
        observation = observe_pod(pod)
        observations.add((observation.reason, observation.message))
    assert len(observations) == 1


def test_pods_of_one_flavor_are_parsed_once_and_each_has_its_own_values():
    """infra/render.py parses a template's YAML once for all renders whose values differ only where each
    is a whole value: the package's pod template is written so for everything that differs per environment."""
    render._masked_tree.cache_clear()
    environments = [
        make_environment(name=f"env-{index}", uid=f"uid-{index}", owner=f"user-{index}") for index in range(4)
    ]
    pods = [build_pod(environment, make_flavor(), SETTINGS) for environment in environments]
    info = render._masked_tree.cache_info()
    assert (info.misses, info.hits) == (1, 3)
    for index, pod in enumerate(pods):
        assert pod["metadata"]["name"].endswith(f"env-{index}")
        container = container_of(pod)
        assert any(arg.startswith("--ServerApp.base_url=") and f"/env-{index}/" in arg for arg in container["args"])
        assert container["readinessProbe"]["httpGet"]["path"].endswith(f"/env-{index}/api")
        assert env_of(pod)["ANALYSIS_OWNER"]["value"] == f"user-{index}"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == f"uid-{index}"
