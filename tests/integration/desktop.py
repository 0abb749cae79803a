"""A stand-in for a remote-desktop VM: the fake virt driver's servers run nothing, so the tests run
what the server's cloud-init would start, at the server's address (a network namespace,
tests/integration/netns.py), from the user data Nova holds for it:

  - the VNC server, with the server options of the `aenv-desktop@` unit (localhost only, no VNC
    password), but as a bare Xvnc on a display of its own (displays are machine-wide) answering on
    the unit's port, and without a desktop session (no Xfce here: a black screen);
  - websockify exactly as the `aenv-novnc` unit starts it (its web root prepared by the unit's
    ExecStartPre: noVNC's files and api/; the auth plugin and the access token the user data
    writes), the token and its runtime directory handed over as systemd would (CREDENTIALS_DIRECTORY,
    RUNTIME_DIRECTORY);
  - the desktop activity agent as the `aenv-activity` unit starts it (every `activity_seconds`
    here instead of 20), reporting desktop connections in api/status.
The web root lives in the test's directory instead of /var/lib/analysis-environment/web.

Needs the Debian packages tigervnc-standalone-server, novnc and websockify."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shlex
import signal
import subprocess
import time

import yaml

from tests.integration.netns import Netns

DESKTOP_UNIT = "/etc/systemd/system/aenv-desktop@.service"
NOVNC_UNIT = "/etc/systemd/system/aenv-novnc.service"
ACTIVITY_UNIT = "/etc/systemd/system/aenv-activity.service"


def unit_settings(text: str) -> dict[str, str]:
    lines = (line.strip() for line in text.splitlines())
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _free_display() -> int:
    for display in range(40 + os.getpid() % 50, 200):
        if (
            not pathlib.Path(f"/tmp/.X{display}-lock").exists()
            and not pathlib.Path(f"/tmp/.X11-unix/X{display}").exists()
        ):
            return display
    raise RuntimeError("no free X display number")


class DesktopStandIn:
    def __init__(self, netns: Netns, user_data: str, workdir: pathlib.Path, activity_seconds: float = 1) -> None:
        self.netns, self.workdir, self.activity_seconds = netns, workdir, activity_seconds
        self.files = {entry["path"]: entry["content"] for entry in yaml.safe_load(user_data)["write_files"]}
        self.desktop = unit_settings(self.files[DESKTOP_UNIT])
        self.novnc = unit_settings(self.files[NOVNC_UNIT])
        self.activity = unit_settings(self.files[ACTIVITY_UNIT])
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> DesktopStandIn:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Each process runs in a session of its own: its whole group goes (websockify forks one
        process per connection, which outlive the parent)."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.processes.clear()

    def _start(self, name: str, command: list[str], **environment: str) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            variables = [f"{key}={value}" for key, value in environment.items()]
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns.name, "env", *variables, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for stop()
            )
        self.processes.append(process)

    def _wait_inside(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        probe = ["ip", "netns", "exec", self.netns.name, "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, f"nothing listens on localhost:{port} (see {self.workdir}/xvnc.log)"
            time.sleep(0.2)

    def vnc_port(self) -> int:
        display = shlex.split(self.desktop["ExecStart"])[1]
        assert display.startswith(":"), self.desktop["ExecStart"]
        return 5900 + int(display[1:])

    def start(self) -> None:
        # The VNC server: the unit's options, translated from tigervncserver's to Xvnc's spelling.
        words = shlex.split(self.desktop["ExecStart"])
        assert words[words.index("-localhost") + 1] == "yes" and words[words.index("-SecurityTypes") + 1] == "None"
        self._start(
            "xvnc",
            [
                "Xvnc",
                f":{_free_display()}",
                "-rfbport",
                str(self.vnc_port()),
                "-localhost=1",
                "-SecurityTypes",
                "None",
                "-AlwaysShared=1",
                "-geometry",
                "1280x800",
                "-depth",
                "24",
            ],
        )
        # websockify: the unit's command line as it is, the plugin and the token where the unit says.
        library = self.workdir / "lib"
        credentials = self.workdir / "credentials"
        library.mkdir(exist_ok=True)
        credentials.mkdir(exist_ok=True, mode=0o700)
        python_path = self.novnc["Environment"].removeprefix("PYTHONPATH=")
        for path, content in self.files.items():
            if path.startswith(python_path + "/"):
                (library / path.removeprefix(python_path + "/")).write_text(content)
        name, _, source = self.novnc["LoadCredential"].partition(":")
        (credentials / name).write_text(self.files[source])
        # the activity agent (a file of the user data) and the web root it prepares, here
        agent, _, web = self.novnc["ExecStartPre"].removeprefix("+").partition(" --prepare ")
        local_agent, local_web = self.workdir / "aenv-activity", self.workdir / "web"
        local_agent.write_text(self.files[agent])
        local_agent.chmod(0o755)
        subprocess.run([str(local_agent), "--prepare", str(local_web)], check=True)
        command = shlex.split(self.novnc["ExecStart"])
        at = command.index("--web") + 1
        assert command[at] == web, (command, web)  # websockify serves what the agent prepared
        command[at] = str(local_web)
        runtime = self.workdir / "run" / self.novnc["RuntimeDirectory"]  # systemd's /run/<RuntimeDirectory>
        runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._start(
            "websockify",
            command,
            PYTHONPATH=str(library),
            CREDENTIALS_DIRECTORY=str(credentials),
            RUNTIME_DIRECTORY=str(runtime),
        )
        agent_words = shlex.split(self.activity["ExecStart"])
        assert agent_words[:2] == [agent, web], self.activity["ExecStart"]
        self._start("activity", [str(local_agent), str(local_web), agent_words[2], str(self.activity_seconds)])
        self._wait_inside(self.vnc_port())  # on the namespace's own localhost: not reachable from here
        self.netns.wait_listening(self.novnc_port(), timeout=30)

    def novnc_port(self) -> int:
        listen = shlex.split(self.novnc["ExecStart"])[-2]
        return int(listen.rpartition(":")[2])
