"""The operator's webhook port answers only the API server: a client certificate from the CA the
API server's admission configuration uses (hack/cluster.sh), checked by the operator."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest

from tests.integration.conftest import CLUSTER_STATE

pytestmark = pytest.mark.integration
REVIEW = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}).encode()


def post_review(port: int, certificate: tuple[str, str] | None, tls: list[tuple[str, bool]] | None = None) -> int:
    context = ssl.create_default_context(cafile=None)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the server's certificate is not the point
    if certificate:
        context.load_cert_chain(*certificate)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("POST", "/environment-admission", body=REVIEW, headers={"Content-Type": "application/json"})
        sock = connection.sock  # http.client lets go of it when the answer closes the connection
        response = connection.getresponse()
        if tls is not None:  # TLS 1.3 tickets come after the handshake: there by now if at all
            tls.append((sock.version(), sock.session.has_ticket))
        return response.status
    finally:
        connection.close()


def test_the_webhook_port_refuses_clients_without_the_api_servers_certificate(operator, environments):
    pki = CLUSTER_STATE / "pki"
    assert (pki / "webhook-client-ca.crt").exists(), "hack/cluster.sh makes the webhook client CA"
    for certificate in (None, (str(pki / "admin.crt"), str(pki / "admin.key"))):  # nothing; a cluster admin's
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
            post_review(operator.webhook_port, certificate)
    # The API server's own certificate gets through TLS (the empty review is then refused by kopf, in HTTP).
    status = post_review(operator.webhook_port, (str(pki / "webhook-client.crt"), str(pki / "webhook-client.key")))
    assert 200 <= status < 600
    environments.create("through-the-api-server", flavor="jupyter-basic")  # and the API server's calls work
    environments.wait_phase("through-the-api-server", "Ready")


def test_the_webhook_port_gives_no_session_tickets(operator):
    """The API server keeps no TLS session cache for webhooks: a ticket would be CPU for nothing."""
    pki = CLUSTER_STATE / "pki"
    tls: list[tuple[str, bool]] = []
    post_review(operator.webhook_port, (str(pki / "webhook-client.crt"), str(pki / "webhook-client.key")), tls)
    assert tls == [("TLSv1.3", False)]  # the version the API server speaks, where num_tickets applies
