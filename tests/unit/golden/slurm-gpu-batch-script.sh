#!/bin/bash
# Rendered by analysis-operator from templates/sbatch.sh.j2. The access token,
# port and dataset paths arrive through the job's environment, so nothing a
# user typed is part of this text. The job runs as its owner's Unix account
# (in single-token mode, as the operator's one account).
set -euo pipefail
umask 077

# HOME is the job's working directory, where Python and JupyterLab run what they find (user
# site-packages, Jupyter and IPython config and startup files): nothing starts unless it is this
# account's alone, a directory of its own (not a link) that no one else can write to. In both modes:
# in single-token mode too, where files someone else put in a HOME such as /tmp would run as the one
# account, in every environment, beside each one's token and data. This script makes none: Slurm
# opens the job's output file in it before the script starts, and where it is missing Slurm either
# makes it as the job's account (25.05 does where it may, mode 0755) or fails the job.
# Its parents may be anyone's (root's, a storage administrator's, nobody's on a root-squashed NFS)
# and writable by a group (a project's setgid directory): whoever can write to a parent can move
# HOME away after this check and put another directory in its place, and the facility chooses who
# that is. Refused: a parent everyone can write to, unless it is sticky (as /tmp), where anyone could.
case ${HOME:-} in
  /*) ;;
  *)
    echo "analysis-operator: refusing to start JupyterLab: HOME (${HOME:-unset}) is not an absolute path" >&2
    exit 78
    ;;
esac
home_parents=() home_parent=$HOME
while [ "$home_parent" != / ]; do
  home_parent=$(dirname -- "$home_parent")
  home_parents+=("$home_parent")
done
if [ -L "$HOME" ] || [ ! -d "$HOME" ] || [ ! -O "$HOME" ] \
  || [ -n "$(find "$HOME" -maxdepth 0 -perm /022 -print)" ] \
  || [ -n "$(find -H "${home_parents[@]}" -maxdepth 0 -perm -0002 ! -perm -1000 -print -quit)" ]; then
  echo "analysis-operator: refusing to start JupyterLab: the working directory $HOME (HOME) must be" \
    "a directory owned by $(id -un) (uid $(id -u)), not a link, not writable by group or others," \
    "not below a directory everyone can write to without the sticky bit;" \
    "ask the cluster's administrators (slurm.working_directory)" >&2
  exit 78
fi

token_variable=JUPYTER_TOKEN
if [ -z "${!token_variable:-}" ]; then
  echo "analysis-operator: no access token in \$$token_variable; refusing to start a server without one" >&2
  exit 1
fi
# JupyterLab reads its token from JUPYTER_TOKEN, never from its command line
# (where every user on the node could read it in ps).
export JUPYTER_TOKEN="${!token_variable}"

# Environment modules need the login profile; their scripts trip `set -u`.
command -v module >/dev/null 2>&1 || . /etc/profile
set +u
module load cuda/12.2
module load anaconda3/2024.02
set -u

# The datasets granted to this environment, and only those, linked into one
# directory; their paths arrive through the job's environment (AENV_DATASET_*).
# The directory is named after the environment, so the links of whatever ran
# under that name before (a deleted environment's other datasets) go first;
# anything else in it is the user's and stays.
if [ -n "${AENV_DATA_DIR:-}" ] && [ -d "$AENV_DATA_DIR" ]; then
  find "$AENV_DATA_DIR" -type l -delete
fi
if [ "${AENV_DATASET_COUNT:-0}" -gt 0 ]; then
  mkdir -p "$AENV_DATA_DIR"
  for ((i = 0; i < AENV_DATASET_COUNT; i++)); do
    path_variable="AENV_DATASET_${i}_PATH" link_variable="AENV_DATASET_${i}_LINK"
    link="$AENV_DATA_DIR/${!link_variable}"
    mkdir -p "$(dirname "$link")"
    ln -sfn "${!path_variable}" "$link"
  done
  export AENV_DATA_DIR
else
  unset AENV_DATA_DIR
fi

# Where JupyterLab listens: every IPv4 address of this node, so also the one
# Slurm knows for it (NodeAddr), where the operator and the gateway connect;
# and the port the operator chose (JUPYTER_PORT, in the job's environment).
# The operator reads the node from Slurm, so nothing this job writes tells it
# where to connect. JUPYTER_BASE_URL: the path it serves under, the same
# through the gateway and on the node (/env/<namespace>/<name>/).
if [ -z "${JUPYTER_PORT:-}" ]; then
  echo "analysis-operator: no JUPYTER_PORT in the job's environment" >&2
  exit 1
fi
JUPYTER_HOST=0.0.0.0
JUPYTER_BASE_URL=${JUPYTER_BASE_URL:-/}
export JUPYTER_HOST JUPYTER_PORT JUPYTER_BASE_URL

# OPEN: a jupyter_server extension of the operator's (aenv_viewers): it closes the websockets of
# someone the environment is no longer shared with, when the operator asks. Written to a private
# directory of this job and turned on by a config file there (whatever the command line). The
# directory goes when this script ends, however it ends short of SIGKILL.
aenv_dir=$(mktemp -d "${TMPDIR:-/tmp}/aenv-jupyter.XXXXXX")
trap 'rm -rf "$aenv_dir"' EXIT
mkdir -p "$aenv_dir/config/jupyter_server_config.d"
cat > "$aenv_dir/aenv_viewers.py" <<'AENV_EXTENSION_END'
"""A jupyter_server extension the operator adds to every JupyterLab it starts (OPEN, sharing).

It runs inside JupyterLab, not in the operator: standard library, tornado and jupyter_server only.
The gateway checks each new request and each new websocket with the operator's forward-auth, but a
websocket it already proxies stays open however the sharing changes. So this extension remembers
whose each open websocket is (X-Forwarded-User: the gateway sets it from the operator's answer and
replaces whatever a browser sent), and the operator, when someone may no longer open the
environment (unshared, left a group), asks it through the server's own port, with the server's
token, to close that person's websockets. JupyterLab then tries to reconnect, and the gateway
refuses them.

    GET  <base_url>aenv/viewers            -> {"viewers": {"alice": 2, "bob": 1}}  (open websockets)
    POST <base_url>aenv/viewers {"close": ["bob"]} -> {"closed": 1}

Both refuse a request that came through the gateway (it carries X-Forwarded-User): a viewer may use
the server, not decide who else may.

It also keeps what JupyterLab serves a viewer (its pages, its cookies) free of the server's
credentials. The gateway adds the server's token to every request it passes on (websockets too), so
a browser needs none of its own; yet JupyterLab writes the token into every page it serves (its page
config, jupyter_server's own pages such as a 404), and jupyter_server answers a token-authenticated
request with a signed login cookie (`username-<host>`, valid 31 days), signed with a key it keeps in
$HOME/.local/share/jupyter/runtime (which every job of the same user shares and a pod's home volume
keeps) or one set in the user's own config: a sharee's cookie would open the owner's other and later
servers, unshared or not, whatever their token. So, on each server start:
- the token is blanked where JupyterLab's and Notebook 7's handlers build the page config (whatever
  page_config_hook another extension installs after this one) and in jupyter_server's template
  namespace, as JupyterHub does;
- no login cookie is set, and none is accepted (every request through the gateway carries the token);
- the cookie secret is random bytes of this start, held in memory (set when the extension is linked,
  before jupyter_server reads or writes that file, and again when it is loaded, over whatever a config
  file set in between).
Each is applied on its own, after the viewers endpoint: one that this jupyter_server lacks (1.x has
no identity_provider) is logged and skipped, never stopping the others.

This is about what pages and cookies hand a viewer, nothing more: a viewer who runs code in the
session runs it as the owner and can read $JUPYTER_TOKEN, /proc, or the runtime files in the owner's
HOME (sharing hands over the account), and the owner's own config (~/.jupyter) can switch this
extension off, which exposes only the owner.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import weakref
from collections.abc import Callable
from typing import Any

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web, websocket

VIEWER_HEADER = "X-Forwarded-User"
CLOSE_CODE = 4403  # an application code (4000-4999): refused, as HTTP's 403
_OPEN: weakref.WeakSet[websocket.WebSocketHandler] = weakref.WeakSet()
_original_get = websocket.WebSocketHandler.get


async def _get(self: websocket.WebSocketHandler, *args: Any, **kwargs: Any) -> None:
    """Every websocket's upgrade (kernels, terminals, collaboration) passes here: tornado's own."""
    if self.request.headers.get(VIEWER_HEADER):
        _OPEN.add(self)
    await _original_get(self, *args, **kwargs)


def _viewer(handler: websocket.WebSocketHandler) -> str:
    return handler.request.headers.get(VIEWER_HEADER, "")


def _open() -> list[websocket.WebSocketHandler]:
    return [handler for handler in list(_OPEN) if handler.ws_connection is not None]


class ViewersHandler(JupyterHandler):
    def prepare(self) -> Any:
        if self.request.headers.get(VIEWER_HEADER):
            raise web.HTTPError(403, "only the operator asks this, on the server's own port")
        return super().prepare()

    def check_xsrf_cookie(self) -> None:
        return None  # token-authenticated API calls only (no browser ever reaches it: see prepare)

    @web.authenticated
    def get(self) -> None:
        viewers: dict[str, int] = {}
        for handler in _open():
            viewers[_viewer(handler)] = viewers.get(_viewer(handler), 0) + 1
        self.finish(json.dumps({"viewers": viewers}))

    @web.authenticated
    def post(self) -> None:
        try:
            close = json.loads(self.request.body or b"{}").get("close")
        except (ValueError, AttributeError):
            close = None
        if not isinstance(close, list) or not all(isinstance(user, str) for user in close):
            raise web.HTTPError(400, 'expected {"close": ["<user>", ...]}')
        closed = 0
        for handler in _open():
            if _viewer(handler) in close:
                handler.close(CLOSE_CODE, "no longer allowed to open this environment")
                closed += 1
        self.log.info("aenv_viewers: closed %d websocket(s) of %s", closed, ", ".join(close))
        self.finish(json.dumps({"closed": closed}))


def _no_login_cookie(handler: Any, user: Any) -> None:
    """In place of IdentityProvider.set_login_cookie: the gateway authenticates every request."""


def _no_cookie_user(handler: Any) -> None:
    """In place of IdentityProvider.get_user_cookie: no one is logged in by a cookie, whoever signed
    it (a cookie secret set in the user's own config would let its reader forge one)."""
    return None


def _without_token(handler: Any, page_config: dict[str, Any], previous: Any = None) -> dict[str, Any]:
    """The page_config_hook (jupyterlab_server): the page's config without the server's token, so
    JupyterLab sends none itself (a copy: the dict is the server's own, shared by all pages)."""
    if previous is not None:
        page_config = previous(handler, page_config)
    return {**page_config, "token": ""}


def _token_blanked(get_page_config: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A handler's get_page_config whose answer never carries the token, whatever page_config_hook it
    applied inside (an extension loaded after this one may replace the hook without chaining it)."""
    if getattr(get_page_config, "_aenv_token_blanked", False):
        return get_page_config

    @functools.wraps(get_page_config)
    def get_page_config_without_token(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**get_page_config(self, *args, **kwargs), "token": ""}

    get_page_config_without_token._aenv_token_blanked = True  # type: ignore[attr-defined]
    return get_page_config_without_token


# Where a page's config is built, when the image has it: JupyterLab's (every subclass too, e.g. its
# 404 page) and Notebook 7's
PAGE_CONFIG_HANDLERS = (("jupyterlab_server.handlers", "LabHandler"), ("notebook.app", "NotebookBaseHandler"))


def _blank_page_config_tokens(module_name: str, class_name: str) -> list[str]:
    """Wraps get_page_config of the handler class, and of each of its subclasses that defines its
    own; the names of those wrapped ([] when the image lacks the class)."""
    try:
        base = getattr(importlib.import_module(module_name), class_name)
    except Exception:  # not in this image (no Notebook 7, another version)
        return []
    if not callable(getattr(base, "get_page_config", None)):
        raise AttributeError(f"{module_name}.{class_name} has no get_page_config")
    wrapped = []
    classes, seen = [base], set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        classes.extend(cls.__subclasses__())
        if "get_page_config" in vars(cls):
            cls.get_page_config = _token_blanked(vars(cls)["get_page_config"])
            wrapped.append(f"{cls.__module__}.{cls.__qualname__}")
    return wrapped


_original_namespace: Any = getattr(JupyterHandler, "template_namespace", None)  # a property


@property  # type: ignore[misc]
def _namespace(self: JupyterHandler) -> dict[str, Any]:
    """jupyter_server's own pages (page.html: login, logout, errors) put a logged-in viewer's token
    in data-jupyter-api-token: given none."""
    return {**_original_namespace.fget(self), "token": ""}


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "aenv_viewers"}]


def _link_jupyter_server_extension(serverapp: Any) -> None:
    """Linked before the web app is made, the first of the usual extensions (they link in the
    order of their names): jupyter_server then neither reads nor writes its cookie secret file in
    HOME, unless a config file sets one (_load_jupyter_server_extension replaces that in the web app)."""
    serverapp.cookie_secret = os.urandom(32)


def _viewers_endpoint(serverapp: Any) -> None:
    websocket.WebSocketHandler.get = _get
    base_url = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base_url, "aenv/viewers"), ViewersHandler)])


def _page_config_handlers(serverapp: Any) -> None:
    for module_name, class_name in PAGE_CONFIG_HANDLERS:
        wrapped = _blank_page_config_tokens(module_name, class_name)
        serverapp.log.debug("aenv_viewers: token blanked in the page config of %s", wrapped)


def _page_config_hook(serverapp: Any) -> None:
    """Also for any other page that applies the hook (as long as no later extension replaces it)."""
    settings = serverapp.web_app.settings
    previous = settings.get("page_config_hook")
    settings["page_config_hook"] = lambda handler, page_config: _without_token(handler, page_config, previous)


def _template_namespace(serverapp: Any) -> None:
    if not isinstance(_original_namespace, property):
        raise AttributeError("JupyterHandler.template_namespace is not a property here")
    JupyterHandler.template_namespace = _namespace


def _cookie_secret(serverapp: Any) -> None:
    serverapp.web_app.settings["cookie_secret"] = os.urandom(32)


def _login_cookies(serverapp: Any) -> None:
    if not hasattr(serverapp, "identity_provider"):
        raise AttributeError("no identity_provider (jupyter_server < 2): its login cookies are left as they are")
    serverapp.identity_provider.set_login_cookie = _no_login_cookie
    serverapp.identity_provider.get_user_cookie = _no_cookie_user


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """The viewers endpoint first (the operator needs it to close an unshared viewer's websockets), then
    each protection on its own: one this jupyter_server cannot take is logged and the others still apply."""
    _viewers_endpoint(serverapp)
    protections = (_page_config_handlers, _page_config_hook, _template_namespace, _cookie_secret, _login_cookies)
    for protection in protections:
        try:
            protection(serverapp)
        except Exception as error:  # a missing piece never stops the others
            serverapp.log.warning("aenv_viewers: %s not applied: %s", protection.__name__.strip("_"), error)
AENV_EXTENSION_END
cat > "$aenv_dir/config/jupyter_server_config.d/aenv_viewers.json" <<'AENV_EXTENSION_END'
{"ServerApp": {"jpserver_extensions": {"aenv_viewers": true}}}
AENV_EXTENSION_END
# TLS: the key and certificate of this job's server, made by the operator for this job alone
# (infra/server_tls.py), from the job's environment into files only this account can read (umask 077,
# in $aenv_dir), and out of the environment before JupyterLab starts. The gateway and the operator
# check the server against that certificate: a process of someone else that listens on this port
# after the server has ended is sent nothing. In jupyter_server_config.json of the first entry of
# JUPYTER_CONFIG_PATH (below), which wins over every other config file (jupyter_core >= 5 reads it
# before ~/.jupyter); jupyter_server reads its .d directories for extensions only.
if [ -n "${AENV_TLS_KEY:-}" ]; then
  case $aenv_dir in
    *'"'* | *'\'*)
      echo "analysis-operator: refusing a private directory whose path JSON would have to escape: $aenv_dir" >&2
      exit 1
      ;;
  esac
  printf '%s\n' "$AENV_TLS_CERT" > "$aenv_dir/server.crt"
  printf '%s\n' "$AENV_TLS_KEY" > "$aenv_dir/server.key"
  printf '{"ServerApp": {"certfile": "%s", "keyfile": "%s"}}\n' "$aenv_dir/server.crt" "$aenv_dir/server.key" \
    > "$aenv_dir/config/jupyter_server_config.json"
fi
unset AENV_TLS_CERT AENV_TLS_KEY
export PYTHONPATH="$aenv_dir${PYTHONPATH:+:$PYTHONPATH}"
export JUPYTER_CONFIG_PATH="$aenv_dir/config${JUPYTER_CONFIG_PATH:+:$JUPYTER_CONFIG_PATH}"

# JupyterLab runs as a child, not exec'd, so this script is still there to remove $aenv_dir. Slurm
# signals every process of the job (scancel, time limit); a signal to this script alone goes on to
# the server, and the script waits for the server to end before it ends itself. The command on a
# line of its own (a comment at its end ends there), exec'd in the child: $! is the server. A signal
# that comes before $! is known is passed on as soon as it is.
server='' stopping=''
trap 'stopping=1; [ -z "$server" ] || kill -TERM "$server" 2>/dev/null || true' TERM INT HUP
{
  exec jupyter lab --no-browser --ip="$JUPYTER_HOST" --port="$JUPYTER_PORT" --ServerApp.port_retries=0 --ServerApp.base_url="$JUPYTER_BASE_URL" --ServerApp.allow_remote_access=True --ServerApp.trust_xheaders=True
} &
server=$!
[ -z "$stopping" ] || kill -TERM "$server" 2>/dev/null || true
# A trapped signal ends `wait` early (with 128+signal): wait until the server has ended (and been
# reaped), then ask its status (bash keeps it), which is the job's.
while kill -0 "$server" 2>/dev/null; do
  wait "$server" || true
done
status=0
wait "$server" || status=$?
# bash can lose the status of a child reaped while a trapped signal interrupted `wait` (it answers
# -1, an exit of 255): the server was asked to stop, and it has.
if [ "$status" -lt 0 ] && [ -n "$stopping" ]; then status=0; fi
exit "$status"
