#!/usr/bin/env python3
"""What a new connection to the webhook port costs the operator, against a request on a kept one.

The API server keeps 25 idle connections to a webhook and opens a new one, a full TLS handshake
with its client certificate checked, for every call beyond them (bench/budget_race.py samples how
many: 76-321 in a race of 1,000 creates). This starts the operator as its own process, makes
COUNT connections with the API server's client certificate (hack/cluster.sh), each closed after its
handshake, then COUNT requests on one kept connection, alternated ROUNDS times, and reports the
operator's CPU per connection and per request (utime + stime from /proc).

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/webhook_tls.py --count 300 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import socket
import ssl
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.integration.conftest import CLUSTER_STATE, OperatorProcess  # noqa: E402

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: webhook\r\n\r\n"  # answered 404 by kopf's server: no handler runs


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_context() -> ssl.SSLContext:
    pki = CLUSTER_STATE / "pki"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the server's certificate is not the point
    context.load_cert_chain(pki / "webhook-client.crt", pki / "webhook-client.key")
    return context


def per_call(pid: int, count: int, call) -> float:
    """The operator's CPU milliseconds per call, over `count` calls."""
    before = cpu_seconds(pid)
    for _ in range(count):
        call()
    time.sleep(0.2)  # the operator closes its side
    return 1000 * (cpu_seconds(pid) - before) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}, {ssl.OPENSSL_VERSION}"
    )
    log_dir = REPO / "bench/logs"
    log_dir.mkdir(exist_ok=True)
    operator = OperatorProcess(os.environ["KUBECONFIG"], log_dir / "webhook-tls-operator.log")
    operator.start()
    time.sleep(3)  # its start settled
    context, address = client_context(), ("127.0.0.1", operator.webhook_port)
    kept = context.wrap_socket(socket.create_connection(address))

    def handshake() -> None:
        with socket.create_connection(address) as raw, context.wrap_socket(raw):
            pass

    def request() -> None:
        kept.sendall(REQUEST)
        kept.recv(65536)

    results: dict[str, list[float]] = {"new connection (handshake)": [], "request on a kept connection": []}
    try:
        for round_ in range(arguments.rounds):
            results["new connection (handshake)"].append(per_call(operator.process.pid, arguments.count, handshake))
            results["request on a kept connection"].append(per_call(operator.process.pid, arguments.count, request))
            print(f"round {round_ + 1}: " + ", ".join(f"{key} {values[-1]:.2f} ms" for key, values in results.items()))
    finally:
        kept.close()
        operator.stop()
    for key, values in results.items():
        print(f"{key}: median {statistics.median(values):.2f} ms of operator CPU ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
