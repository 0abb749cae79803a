"""The chart's webhook certificate, rendered with `helm template`, no server. By default the
operator makes the certificate at run time (infra/certificates.py): the chart renders no key
material and no random value, so two renders are byte-identical (Argo CD renders with `helm
template` on every sync, and a new certificate each time would never be in sync); it tells the
operator which Secret, names and webhook configurations, and grants exactly that. cert-manager
stays the alternative. The run-time side against a real API server: tests/integration/test_chart.py."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.packaging.test_chart_gateway import (
    CHART,
    ENABLED,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    REPO,
    env_of,
    find,
    grants,
    helm,
    render,
    settings_of,
)

SECRET = f"{FULLNAME}-webhook-tls"
SERVICE = f"{FULLNAME}-webhook"
EVERYTHING = {
    **ENABLED,
    "replicaCount": 3,
    "networkPolicy": {"enabled": True, "namespaces": ["environments"], "ingressFrom": [{"podSelector": {}}]},
    "flavors": {"lab": next(yaml.safe_load_all((REPO / "examples/flavors.yaml").read_text()))["spec"]},
}


@pytest.mark.parametrize("values", [{}, EVERYTHING, {"certManager": {"enabled": True}}], ids=["default", "all", "cm"])
def test_two_renders_are_byte_identical(tmp_path, values):
    first = render(tmp_path, values)
    second = render(tmp_path, values)
    assert first == second
    path = tmp_path / "values.yaml"
    outputs = [
        helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", str(path)).stdout for _ in range(2)
    ]
    assert outputs[0] == outputs[1]


def test_no_template_makes_keys_or_random_values():
    """What made every render differ (genCA, genSignedCert) or depend on the cluster (lookup, which
    `helm template` answers with nothing) is gone, and nothing else like it came in."""
    nondeterministic = re.compile(
        r"\b(genCA|genSignedCert|genSelfSignedCert|genPrivateKey|rand\w*|uuidv4|now|lookup)\b"
    )
    for template in sorted((CHART / "templates").iterdir()):
        found = nondeterministic.findall(template.read_text())
        assert not found, f"{template.name}: {found}"


def test_default_renders_no_key_material_and_tells_the_operator_what_to_keep(tmp_path):
    objects = render(tmp_path, {})
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert not [o for o in objects if o["kind"] in ("Certificate", "Issuer")]
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        configuration = find(objects, kind, FULLNAME)
        assert all("caBundle" not in hook["clientConfig"] for hook in configuration["webhooks"])
        assert "annotations" not in configuration["metadata"]
    admission = settings_of(objects).admission
    assert (admission.tls_secret, admission.tls_secret_namespace) == (SECRET, NAMESPACE)
    assert admission.webhook_configuration == FULLNAME
    assert admission.tls_hosts == (f"{SERVICE}.{NAMESPACE}.svc", f"{SERVICE}.{NAMESPACE}.svc.cluster.local")
    assert admission.tls_check_interval_seconds == 30.0  # the rotation window: see values.yaml
    assert find(objects, "Service", SERVICE)["metadata"]["namespace"] == NAMESPACE
    # Written where the pod may write (the tmp emptyDir; the root filesystem is read-only).
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert admission.cert_dir.startswith(mounts["tmp"] + "/") and "webhook-tls" not in mounts
    assert "checksum/webhook-tls" not in find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]


def test_default_grants_that_secret_and_those_two_configurations_only(tmp_path):
    objects = render(tmp_path, {})
    role = find(objects, "Role", SECRET)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert grants(role["rules"]) == {
        ("", "secrets", "create", ()),  # RBAC cannot name the object of a create
        ("", "secrets", "get", (SECRET,)),
        ("", "secrets", "update", (SECRET,)),
    }
    binding = find(objects, "RoleBinding", SECRET)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    cluster = grants(find(objects, "ClusterRole", FULLNAME)["rules"])
    webhooks = {g for g in cluster if g[0] == "admissionregistration.k8s.io"}
    assert webhooks == {
        ("admissionregistration.k8s.io", kind, verb, (FULLNAME,))
        for kind in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")
        for verb in ("get", "patch")
    }


def test_cert_manager_mode_mounts_its_secret_and_the_operator_keeps_nothing(tmp_path):
    objects = render(tmp_path, {"certManager": {"enabled": True}})
    certificate = find(objects, "Certificate", f"{FULLNAME}-webhook")
    assert certificate["spec"]["secretName"] == SECRET
    admission = settings_of(objects).admission
    assert admission.tls_secret == "" and admission.cert_dir == "/etc/analysis-operator/webhook-tls"
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "webhook-tls", "secret": {"secretName": SECRET}} in pod["volumes"]
    assert not [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == SECRET]
    cluster = grants(find(objects, "ClusterRole", FULLNAME)["rules"])
    assert not {g for g in cluster if g[0] == "admissionregistration.k8s.io"}


def test_without_admission_nothing_to_patch(tmp_path):
    objects = render(tmp_path, {"admission": {"enabled": False}})
    assert not [o for o in objects if o["kind"].endswith("WebhookConfiguration")]
    admission = settings_of(objects).admission
    assert admission.tls_secret == SECRET and admission.webhook_configuration == ""  # still serves (kopf needs it)
    cluster = grants(find(objects, "ClusterRole", FULLNAME)["rules"])
    assert not {g for g in cluster if g[0] == "admissionregistration.k8s.io"}


def test_check_interval_is_a_value_and_validity_days_is_gone(tmp_path):
    objects = render(tmp_path, {"certificates": {"checkIntervalSeconds": 600}})
    assert env_of(objects)["ANALYSIS_OPERATOR_ADMISSION_TLS_CHECK_INTERVAL_SECONDS"] == "600"
    for values, complaint in [
        ("certificates.checkIntervalSeconds=1", "checkIntervalSeconds"),
        ("certificates.validityDays=365", "additional properties 'validityDays'"),
    ]:
        result = helm("template", RELEASE, str(CHART), "--set", values, check=False)
        assert result.returncode != 0 and complaint in result.stderr, result.stderr


def test_the_chart_registers_the_webhooks_with_the_match_conditions_the_operator_would(tmp_path):
    """Registered by the chart or by the operator itself (kopf, the local stack): the same matchConditions."""
    from analysis_operator.handlers.admission import match_conditions

    objects = render(tmp_path, {})
    registered = {
        hook["name"].removesuffix(".analysis.panosc.eu"): hook.get("matchConditions")
        for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
        for hook in find(objects, kind)["webhooks"]
    }
    assert {name: conditions for name, conditions in registered.items() if conditions} == match_conditions()
