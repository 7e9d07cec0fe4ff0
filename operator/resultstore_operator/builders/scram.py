"""SCRAM-SHA-256 password verifiers computed client-side.

`ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'` stores the verifier as given, so the clear
password never travels to the server and cannot end up in its statement log (log_statement
= ddl would otherwise record it). The format is PostgreSQL's (RFC 5802/7677 parameters).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ITERATIONS = 4096
SALT_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scram_verifier(password: str, salt: bytes | None = None,
                   iterations: int = ITERATIONS) -> str:
    """PostgreSQL's stored form of a SCRAM-SHA-256 secret for `password`.

    Passwords here are ASCII (generate_password), for which SASLprep is the identity.
    """
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def generate_password() -> str:
    """256 bits, URL-safe alphabet: no escaping needed in URIs, files or libpq strings."""
    return secrets.token_urlsafe(32)
