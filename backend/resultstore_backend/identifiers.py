"""Validation and quoting of SQL identifiers (schema, table and role names).

Identifiers come from user input (the ResultStore spec, ``?schema=`` in a URL,
``celery.json``), so every one that reaches SQL text is validated against the
conservative PostgreSQL unquoted-identifier grammar first and then quoted.
Rejecting odd names up front keeps error messages clear and makes quoting a
belt-and-braces measure rather than the only defence.
"""

from __future__ import annotations

import re

__all__ = [
    "InvalidIdentifier",
    "MAX_IDENTIFIER_LENGTH",
    "is_valid_identifier",
    "qualify",
    "quote_ident",
    "validate_identifier",
]

#: PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
MAX_IDENTIFIER_LENGTH = 63

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class InvalidIdentifier(ValueError):
    """An identifier that may not be used as a schema, table or role name."""


def is_valid_identifier(name: object) -> bool:
    """Return whether ``name`` is an acceptable identifier (see :func:`validate_identifier`)."""
    return (
        isinstance(name, str)
        and 0 < len(name.encode("utf-8")) <= MAX_IDENTIFIER_LENGTH
        and _IDENT_RE.match(name) is not None
        and not name.lower().startswith("pg_")
    )


def validate_identifier(name: object, what: str = "identifier") -> str:
    """Return ``name`` if it is a safe identifier, else raise :class:`InvalidIdentifier`.

    Accepted: ASCII letters, digits and underscores, not starting with a digit,
    at most 63 bytes, and not starting with ``pg_`` (reserved for system
    schemas and roles in PostgreSQL).
    """
    if not isinstance(name, str):
        raise InvalidIdentifier(f"{what} must be a string, got {type(name).__name__}")
    if not is_valid_identifier(name):
        raise InvalidIdentifier(
            f"invalid {what} {name!r}: use letters, digits and underscores, "
            f"not starting with a digit or 'pg_', at most {MAX_IDENTIFIER_LENGTH} characters"
        )
    return name


def quote_ident(name: str) -> str:
    """Validate ``name`` and return it double-quoted for use in SQL text."""
    validate_identifier(name)
    return '"' + name.replace('"', '""') + '"'


def qualify(schema: str | None, name: str) -> str:
    """Return ``"schema"."name"`` (or ``"name"`` without a schema), validated and quoted."""
    if schema is None:
        return quote_ident(name)
    return f"{quote_ident(schema)}.{quote_ident(name)}"
