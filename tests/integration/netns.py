"""A process at an address of its own, as a pod, compute node or VM has: a network namespace with
a veth pair to the host (the gateway, on the host, reaches it; EndpointSlices refuse loopback).
Tests create these themselves and delete them afterwards; nothing leaves the machine."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time

_COUNTER = itertools.count(1)

ECHO_SERVER = r"""
import http.server, json, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        body = json.dumps({"path": self.path, "method": self.command, "headers": dict(self.headers)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _answer
    def log_message(self, *arguments):
        pass
class Server(http.server.ThreadingHTTPServer):
    # A real server's listen backlog (tornado's is 128): socketserver's default of 5 drops connections in a
    # burst, and each dropped SYN costs the client a 1 s retransmission.
    request_queue_size = 1024
    daemon_threads = True
Server((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
"""


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True)


class Netns:
    def __init__(self, address: str) -> None:
        number = next(_COUNTER) + os.getpid() % 200
        self.address, self.name = address, f"aenv-t{os.getpid()}-{number}"
        self.host_side, self.inside = f"ah{os.getpid() % 10000}x{number}"[:15], f"an{os.getpid() % 10000}x{number}"[:15]
        self.host_address = f"169.254.{number % 250 + 1}.1"
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Netns:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_side, "type", "veth", "peer", "name", self.inside)
            _ip("link", "set", self.inside, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/32", "dev", self.host_side)
            _ip("link", "set", self.host_side, "up")
            _ip("route", "add", f"{self.address}/32", "dev", self.host_side, "src", self.host_address)
            inside = ["netns", "exec", self.name, "ip"]
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "addr", "add", f"{self.address}/32", "dev", self.inside)
            _ip(*inside, "link", "set", self.inside, "up")
            _ip(*inside, "route", "add", f"{self.host_address}/32", "dev", self.inside)
        except Exception:
            self.__exit__()
            raise
        return self

    def run(self, *command: str) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *command], stdout=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def echo_server(self, port: int) -> None:
        """An HTTP server answering every request with what it received (path, headers) as JSON."""
        import sys

        self.run(sys.executable, "-c", ECHO_SERVER, self.address, str(port))
        self.wait_listening(port)

    def wait_listening(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.address, port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        subprocess.run(["ip", "link", "del", self.host_side], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
