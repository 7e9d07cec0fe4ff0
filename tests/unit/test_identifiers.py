from __future__ import annotations

import pytest

from resultstore_backend.identifiers import (
    InvalidIdentifier,
    is_valid_identifier,
    qualify,
    quote_ident,
    validate_identifier,
)


@pytest.mark.parametrize("name", ["results", "team_a", "_x", "A1", "a" * 63])
def test_valid_identifiers(name: str) -> None:
    assert validate_identifier(name) == name
    assert quote_ident(name) == f'"{name}"'


@pytest.mark.parametrize(
    "name", ["", "1abc", "a-b", 'a"b', "a b", "pg_catalog", "PG_x", "a" * 64, "ä", "x;drop"]
)
def test_invalid_identifiers(name: str) -> None:
    assert not is_valid_identifier(name)
    with pytest.raises(InvalidIdentifier):
        validate_identifier(name)
    with pytest.raises(InvalidIdentifier):
        quote_ident(name)


def test_non_string_rejected() -> None:
    with pytest.raises(InvalidIdentifier, match="must be a string"):
        validate_identifier(3)


def test_qualify() -> None:
    assert qualify("s", "t") == '"s"."t"'
    assert qualify(None, "t") == '"t"'
