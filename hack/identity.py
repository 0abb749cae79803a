#!/usr/bin/env python3
"""A stand-in for the facility's identity provider, for the local stack and the tests.

In production the scientist signs in at the facility's SSO (Keycloak, ...) and the
gateway request carries the ID token it issued (oauth2-proxy passes it as a bearer
header, or the portal sets it as the session cookie). Here a key pair in DIR plays
the issuer: the operator verifies tokens against DIR/jwks.json exactly as it would
against the issuer's published keys.

  hack/identity.py init DIR           make the signing key (DIR/issuer.key, 0600) and DIR/jwks.json
  hack/identity.py token DIR USER     print an ID token for USER (valid --minutes, default 480)
  hack/identity.py env DIR            print the operator's settings as export lines
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://idp.analysis.localhost"
AUDIENCE = "analysis-operator"
KEY_ID = "local-1"


def init(directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "issuer.key"
    if not key_path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = {"keys": [{**public, "kid": KEY_ID, "use": "sig", "alg": "RS256"}]}
    (directory / "jwks.json").write_text(json.dumps(jwks, indent=1))


def token(directory: pathlib.Path, user: str, minutes: float = 480) -> str:
    key = serialization.load_pem_private_key((directory / "issuer.key").read_bytes(), password=None)
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"local:{user}",
        "preferred_username": user,
        "iat": now,
        "exp": now + int(minutes * 60),
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KEY_ID})


def env(directory: pathlib.Path) -> str:
    settings = {
        "ANALYSIS_OPERATOR_GATEWAY_OIDC_ISSUER": ISSUER,
        "ANALYSIS_OPERATOR_GATEWAY_OIDC_AUDIENCE": AUDIENCE,
        "ANALYSIS_OPERATOR_GATEWAY_OIDC_JWKS_FILE": str(directory / "jwks.json"),
    }
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in settings.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["init", "token", "env"])
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("user", nargs="?")
    parser.add_argument("--minutes", type=float, default=480)
    arguments = parser.parse_args()
    if arguments.command == "init":
        init(arguments.directory)
    elif arguments.command == "token":
        if not arguments.user:
            parser.error("token needs a USER")
        print(token(arguments.directory, arguments.user, arguments.minutes))
    else:
        print(env(arguments.directory), end="")


if __name__ == "__main__":
    main()
