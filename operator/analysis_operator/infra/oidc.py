"""Who a browser's request comes from: an OIDC ID token signed by the facility's identity provider.

The token arrives as `Authorization: Bearer <jwt>` (what an authenticating proxy such as
oauth2-proxy passes on with --set-authorization-header / --pass-authorization-header) or in
the session cookie named in settings (set by the portal after single sign-on). It is
accepted only if its signature verifies against the issuer's published keys (JWKS, from
the issuer's jwks_uri or a file), it has not expired, and issuer and audience are the
configured ones. A header that merely names a user (X-Forwarded-User, X-Auth-Request-User)
is never believed: anyone who can reach the gateway could send one.

A browser sends the same token with every request (JupyterLab polls every few seconds): a token
verified once is remembered (in memory, at most VERIFIED_BOUND of them) until it expires or for
VERIFIED_SECONDS, whichever is sooner, so a key the issuer withdraws stops being honoured within
that time, as with the JWKS cache itself. Verifying is most of a forward-auth decision's CPU.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jwt

from analysis_operator.settings import GatewaySettings

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
LEEWAY_SECONDS = 30
VERIFIED_SECONDS = 300.0  # as long as the JWKS client keeps keys
VERIFIED_BOUND = 10_000


def cookie_pairs(header: str) -> list[tuple[str, str]]:
    """The `name=value` pairs of a Cookie header, in order, each as sent. Read pair by pair (split at
    ';', then at the first '='), not with http.cookies, which stops at the first pair it cannot parse
    (`prefs={"a":1}`, `x=a b`, `a[1]=2`): a cookie that any server on the gateway's host set would
    otherwise hide the session cookie after it, and sign its viewer out of every environment. A piece
    without '=' or without a name is left out."""
    pairs = []
    for piece in header.split(";"):
        name, equals, value = piece.partition("=")
        if equals and name.strip():
            pairs.append((name.strip(), value.strip()))
    return pairs


class NotSignedIn(Exception):
    """No credential, or one that does not verify: the message says which (never the token)."""


class TokenVerifier:
    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._keys: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        if settings.oidc_jwks_file:
            self._keys = jwt.PyJWKSet.from_dict(json.loads(pathlib.Path(settings.oidc_jwks_file).read_text()))
        elif settings.oidc_jwks_url:
            self._client = jwt.PyJWKClient(settings.oidc_jwks_url, cache_keys=True, lifespan=300, timeout=5)
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (user, good until: epoch seconds)

    @property
    def configured(self) -> bool:
        return self._keys is not None or self._client is not None

    def credential(self, headers: Mapping[str, str]) -> str:
        """The ID token a request carries (bearer header first, then the session cookie), or ""."""
        authorization = headers.get("Authorization", "")
        if authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        sessions = [
            value for name, value in cookie_pairs(headers.get("Cookie", "")) if name == self._settings.session_cookie
        ]
        if not sessions:
            return ""
        # The last, as http.cookies took it: browsers send cookies of longer paths first, so one that a
        # server under /env/ set for its path comes before the portal's.
        value = sessions[-1]
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value

    async def _key(self, token: str) -> Any:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as error:
            raise NotSignedIn(f"the session token is not a JWT ({type(error).__name__})") from None
        if self._keys is not None:
            for key in self._keys.keys:
                if kid is None or key.key_id == kid:
                    return key.key
            raise NotSignedIn("the session token is signed with a key the identity provider does not publish")
        if self._client is None:
            raise NotSignedIn("no identity provider is configured (gateway.oidc_jwks_url or oidc_jwks_file)")
        client = self._client
        try:  # urllib, blocking: cached after the first fetch of each key
            signing_key = await asyncio.get_running_loop().run_in_executor(None, client.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientError as error:
            raise NotSignedIn(f"the identity provider's keys cannot verify the session token: {error}") from None
        return signing_key.key

    async def user(self, token: str) -> str:
        """The facility user ID the token was issued to; raises NotSignedIn."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]
        user, expires = await self._verify(token)
        if len(self._verified) >= VERIFIED_BOUND:
            self._verified.clear()
        self._verified[token] = (user, min(expires + LEEWAY_SECONDS, time.time() + VERIFIED_SECONDS))
        return user

    async def _verify(self, token: str) -> tuple[str, float]:
        key = await self._key(token)
        settings = self._settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=settings.oidc_audience or None,
                issuer=settings.oidc_issuer or None,
                options={
                    "require": ["exp", "iss"] if settings.oidc_issuer else ["exp"],
                    "verify_aud": bool(settings.oidc_audience),
                },
                leeway=LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise NotSignedIn("the session has expired: sign in again") from None
        except jwt.PyJWTError as error:
            raise NotSignedIn(f"the session token is not valid ({type(error).__name__})") from None
        name = claims.get(settings.oidc_username_claim)
        if not isinstance(name, str) or not name:
            raise NotSignedIn(f"the session token has no {settings.oidc_username_claim!r} claim")
        return settings.oidc_username_prefix + name, float(claims["exp"])
