"""The operator's jupyter_server extension (operator/analysis_operator/jupyter/aenv_viewers.py) in the
real JupyterLab the Slurm tests run (hack/install-deps.sh installs it; SLURM_JUPYTERLAB, as for
hack/slurm.sh, names another), started here on a local port with the config a job gives it, and
with what the owner's own config and another extension may add: neither puts the token back in a
page nor makes a cookie log anyone in. No cluster needed."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from analysis_operator import jupyter
from tests.integration.conftest import REPO
from tests.waiting import wait_for

VERSION = re.search(r"^jupyterlab_version=(\S+)$", (REPO / "hack/install-deps.sh").read_text(), re.M)[1]
JUPYTERLAB = Path(os.environ.get("SLURM_JUPYTERLAB") or f"/opt/analysis-operator/jupyterlab-{VERSION}")
# An extension loaded after aenv_viewers (alphabetically) that installs a page_config_hook of its own
# without chaining the one before it: the page config it returns still holds the token.
LATER_HOOK = """
def _jupyter_server_extension_points():
    return [{"module": "zz_page_config_hook"}]

def _load_jupyter_server_extension(serverapp):
    serverapp.web_app.settings["page_config_hook"] = lambda handler, page_config: page_config
"""
SECRET = b"a cookie secret the owner's config sets" * 2


def installed() -> None:
    if not (JUPYTERLAB / "bin/jupyter-lab").exists():
        pytest.skip(f"no JupyterLab at {JUPYTERLAB}: run hack/install-deps.sh")


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def signed(python: Path, secret: bytes, name: str, value: str) -> str:
    """A cookie value tornado (jupyter_server's) takes as signed with secret (its own code, in python)."""
    code = "import sys, tornado.web; print(tornado.web.create_signed_value(*map(str.encode, sys.argv[1:])).decode())"
    return subprocess.run(
        [str(python), "-c", code, secret.decode(), name, value], check=True, capture_output=True, text=True
    ).stdout.strip()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def get(url: str, **headers: str) -> tuple[int, dict[str, list[str]], bytes]:
    """status (0: nothing listening yet), Set-Cookie headers, body: redirects not followed, no proxy."""
    cookies = urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    opener = urllib.request.build_opener(NoRedirect, cookies, urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
            status, answer, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, answer, body = error.code, error.headers, error.read()
    except urllib.error.URLError:
        return 0, {"Set-Cookie": []}, b""
    return status, {"Set-Cookie": answer.get_all("Set-Cookie") or []}, body


@pytest.fixture
def lab(tmp_path):
    """JupyterLab as a job starts it (the extension on PYTHONPATH, turned on in JUPYTER_CONFIG_PATH),
    with a later extension's page_config_hook and the owner's ~/.jupyter setting a cookie secret."""
    installed()
    modules, config, home = tmp_path / "modules", tmp_path / "config", tmp_path / "home"
    (config / "jupyter_server_config.d").mkdir(parents=True)
    (home / ".jupyter").mkdir(parents=True)
    modules.mkdir()
    (modules / f"{jupyter.MODULE}.py").write_text(jupyter.extension_source())
    (modules / "zz_page_config_hook.py").write_text(LATER_HOOK)
    (config / jupyter.CONFIG_FILE).write_text(jupyter.CONFIG)
    (config / "jupyter_server_config.d/zz_page_config_hook.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"zz_page_config_hook": True}}})
    )
    (home / ".jupyter/jupyter_server_config.py").write_text(f"c.ServerApp.cookie_secret = {SECRET!r}\n")
    token, port = secrets.token_hex(24), free_port()
    environment = {
        "PATH": f"{JUPYTERLAB}/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "JUPYTER_TOKEN": token,
        "PYTHONPATH": str(modules),
        "JUPYTER_CONFIG_PATH": str(config),
    }
    command = [
        str(JUPYTERLAB / "bin/jupyter-lab"),
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.base_url=/env/ns/lab/",
        *(["--allow-root"] if os.geteuid() == 0 else []),  # the tests' own user (jobs never run as root)
    ]
    log = tmp_path / "jupyter.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, env=environment, cwd=home, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/env/ns/lab/"
    try:
        wait_for(
            lambda: get(url + "api/status", Authorization=f"token {token}")[0] == 200 or server.poll() is not None,
            timeout=60,
            what=lambda: f"JupyterLab to start: {log.read_text()[-2000:]}",
        )
        assert server.poll() is None, log.read_text()
        yield url, token, port, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_no_page_and_no_cookie_hands_over_what_opens_the_server(lab):
    url, token, port, log = lab
    assert "zz_page_config_hook" in log.read_text()  # the later extension was loaded
    status, headers, page = get(url + "lab", Authorization=f"token {token}")
    assert status == 200
    (config,) = re.findall(rb'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
    # the later extension's hook replaced the one aenv_viewers installed; the token is still blanked
    assert json.loads(config)["token"] == "" and token.encode() not in page
    assert not [cookie for cookie in headers["Set-Cookie"] if cookie.startswith("username-")]
    _, _, page = get(url + "lab/no/such/page", Authorization=f"token {token}")
    assert b"jupyter-config-data" in page and token.encode() not in page  # JupyterLab's not-found page

    # A login cookie signed with the cookie secret the owner's config sets (whoever could write that
    # config could forge it) opens nothing: no one is logged in by a cookie
    name = re.sub(r"[^A-Za-z0-9]", "-", f"username-127.0.0.1:{port}")
    user = dict(username="alice", name="alice", display_name="alice", initials="A", avatar_url=None, color=None)
    forged = signed(JUPYTERLAB / "bin/python", SECRET, name, json.dumps(user))
    assert get(url + "api/status")[0] == 403
    status, _, body = get(url + "api/status", Cookie=f"{name}={forged}")
    assert status == 403, body


WITHOUT_IDENTITY_PROVIDER = """
import json, logging, sys, types
import tornado.web
import aenv_viewers
warnings = []
log = logging.getLogger("t")
log.warning = lambda message, *args: warnings.append(message % args)
web_app = tornado.web.Application([], base_url="/b/")
serverapp = types.SimpleNamespace(web_app=web_app, log=log)  # jupyter_server 1.x: no identity_provider
aenv_viewers._load_jupyter_server_extension(serverapp)
routes = [rule.matcher.regex.pattern for host in web_app.default_router.rules for rule in host.target.rules]
print(json.dumps({"routes": routes, "warnings": warnings, "secret": len(web_app.settings["cookie_secret"])}))
"""


def test_a_jupyter_server_without_identity_provider_still_gets_the_viewers_endpoint(tmp_path):
    """jupyter_server 1.x has no identity_provider: the login cookie part is logged as not applied,
    and the viewers endpoint (the operator closes an unshared viewer's websockets with it), the cookie
    secret and the page protections are there all the same."""
    installed()
    (tmp_path / f"{jupyter.MODULE}.py").write_text(jupyter.extension_source())
    loaded = subprocess.run(
        [str(JUPYTERLAB / "bin/python"), "-c", WITHOUT_IDENTITY_PROVIDER],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr
    answer = json.loads(loaded.stdout)
    assert [route for route in answer["routes"] if route.startswith("/b/aenv/viewers")], answer
    assert answer["secret"] == 32
    (warning,) = answer["warnings"]
    assert "login_cookies not applied" in warning and "identity_provider" in warning
