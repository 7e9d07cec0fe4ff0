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
    """Kopf's parts only: the webhook and metrics are services of every replica (serve)."""
    assert [n for n, _ in main.parts(True)] == ["handlers", "watching", "rollout"]
    assert [n for n, _ in main.parts(False)] == ["handlers", "watching"]
    ids = registered_ids(True)
    assert {"resultstore-rollout-secret", "resultstore-watching", "resultstore-configure"} <= ids
    assert not {i for i in ids if "webhook" in i or "metrics" in i}, ids


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


def test_leader_election_flag_overrides_the_environment() -> None:
    on = main.build_settings(main.parse_args(["--leader-election"]), {})
    assert on.leader.enabled
    off = main.build_settings(main.parse_args(["--no-leader-election"]),
                              {"RESULTSTORE_LEADER_ELECTION": "true"})
    assert not off.leader.enabled
    assert main.build_settings(main.parse_args([]),
                               {"RESULTSTORE_LEADER_ELECTION": "1"}).leader.enabled


def test_watch_timeouts_are_set_after_the_handlers() -> None:
    """The watch-stream timeouts (watching.py) win over any set by an earlier part."""
    from resultstore_operator import watching

    settings = kopf.OperatorSettings()
    watching.configure_watching(settings.watching)
    assert settings.watching.server_timeout == watching.SERVER_TIMEOUT
    assert settings.watching.client_timeout == watching.CLIENT_TIMEOUT > watching.SERVER_TIMEOUT
    assert settings.watching.connect_timeout == watching.CONNECT_TIMEOUT
    assert settings.watching.inactivity_timeout == watching.INACTIVITY_TIMEOUT
    names = [n for n, _ in main.parts(True)]
    assert names.index("watching") > names.index("handlers")


def test_drain_waits_for_running_handler_threads() -> None:
    """A stopping leader releases the Lease only after its handler threads finished."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    finished: list[str] = []
    pool = ThreadPoolExecutor(1)

    def handler() -> None:
        release.wait(30)
        finished.append("reconcile")

    pool.submit(handler)
    assert main.drain([pool], timeout=0.2) is False  # still running: not drained
    release.set()
    assert main.drain([pool], timeout=30) is True
    assert finished == ["reconcile"]
