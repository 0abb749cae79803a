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

It also keeps the server's credentials out of the viewers' browsers. The gateway adds the server's
token to every request it passes on (websockets too), so a browser needs none of its own; yet
jupyter_server answers a token-authenticated request with a signed login cookie (`username-<host>`,
valid 31 days), signed with a key it keeps in $HOME/.local/share/jupyter/runtime, which every job
of the same user shares and a pod's home volume keeps: a sharee's cookie would open the owner's other
and later servers, unshared or not, whatever their token. So each server start signs with random
bytes of its own, held in memory only (set when the extension is linked, before jupyter_server reads
or writes that file), and sets no login cookie at all. And JupyterLab writes the token into every
page it serves (page_config, and jupyter_server's own pages such as a 404): blanked, as JupyterHub
does, so that opening a shared environment hands no viewer the owner's token.
"""

from __future__ import annotations

import json
import os
import weakref
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


def _without_token(handler: Any, page_config: dict[str, Any], previous: Any = None) -> dict[str, Any]:
    """The page_config_hook (jupyterlab_server): the page's config without the server's token, so
    JupyterLab sends none itself (a copy: the dict is the server's own, shared by all pages)."""
    if previous is not None:
        page_config = previous(handler, page_config)
    return {**page_config, "token": ""}


_original_namespace = JupyterHandler.template_namespace


@property  # type: ignore[misc]
def _namespace(self: JupyterHandler) -> dict[str, Any]:
    """jupyter_server's own pages (page.html: login, logout, errors) put a logged-in viewer's token
    in data-jupyter-api-token: given none."""
    return {**_original_namespace.fget(self), "token": ""}


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "aenv_viewers"}]


def _link_jupyter_server_extension(serverapp: Any) -> None:
    """Linked before the web app is made, the first of the usual extensions (they link in the
    order of their names): the cookie secret set here is never read from HOME nor written there."""
    serverapp.cookie_secret = os.urandom(32)


def _load_jupyter_server_extension(serverapp: Any) -> None:
    websocket.WebSocketHandler.get = _get
    JupyterHandler.template_namespace = _namespace
    serverapp.identity_provider.set_login_cookie = _no_login_cookie
    settings = serverapp.web_app.settings
    previous = settings.get("page_config_hook")
    settings["page_config_hook"] = lambda handler, page_config: _without_token(handler, page_config, previous)
    base_url = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base_url, "aenv/viewers"), ViewersHandler)])
