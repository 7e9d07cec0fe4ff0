"""main.py registers every part of the operator explicitly, through one signature."""

from __future__ import annotations

import kopf
import pytest

from resultstore_operator import main
from resultstore_operator.settings import OperatorSettings, SettingsError


def registered_ids(with_optional: bool) -> set[str]:
    registry = kopf.OperatorRegistry()
    for _name, register in main.parts(with_optional):
        register(registry, OperatorSettings.from_env({}))
    return ({h.id for h in registry._activities.get_all_handlers()}
            | {h.id for h in registry._watching.get_all_handlers()})


def test_every_part_is_registered_in_order() -> None:
    assert [n for n, _ in main.parts(True)] == ["handlers", "metrics", "webhook", "rollout"]
    assert [n for n, _ in main.parts(False)] == ["handlers", "metrics"]
    ids = registered_ids(True)
    assert {"resultstore-webhook-start", "resultstore-rollout-secret",
            "resultstore-metrics-start", "resultstore-configure"} <= ids


def test_no_plugins_leaves_the_optional_parts_out() -> None:
    ids = registered_ids(False)
    assert "resultstore-configure" in ids
    assert not {i for i in ids if "webhook" in i or "rollout" in i}, ids


def test_webhook_settings_are_parsed_with_the_operators() -> None:
    """A malformed RESULTSTORE_WEBHOOK_* fails at start-up like any other setting."""
    settings = OperatorSettings.from_env({"RESULTSTORE_WEBHOOK_PORT": "18443",
                                          "RESULTSTORE_OPERATOR_NAMESPACE": "ops"})
    assert settings.webhook.listen_port == 18443
    assert settings.webhook.operator_namespace == "ops"
    with pytest.raises(SettingsError, match="RESULTSTORE_WEBHOOK_ENABLED"):
        OperatorSettings.from_env({"RESULTSTORE_WEBHOOK_ENABLED": "maybe"})
    args = main.parse_args([])
    with pytest.raises(SettingsError):
        main.build_settings(args, {"RESULTSTORE_WEBHOOK_TIMEOUT_SECONDS": "31"})
