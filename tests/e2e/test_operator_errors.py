"""Provisioning failures: each cause has its own reason and message, is retried with backoff,
recovers once fixed, and never shows a password in status, Events or the operator's log."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from resultstore_devtools.procs import free_port
from tests.e2e.operator_support import (
    Admin,
    OpEnv,
    create_admin,
    eventually,
    make_openv,
    no_secret_in,
)


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    yield from make_openv(kube, api_client, namespace, postgres, pg_database)


def test_each_failure_has_a_distinct_reason_and_no_password_leaks(env: OpEnv) -> None:
    wrong = Admin(env.admin.username, "not-the-password-" + env.admin.password[:6])
    weak = create_admin(env.pg, env.database, createrole=False)
    env.cluster.admin_secret(env.namespace, wrong, "wrong-admin")
    env.cluster.admin_secret(env.namespace, weak, "weak-admin")
    admin_ref = {"adminSecretRef": {"name": "pg-admin"}}

    def db(**over: Any) -> dict[str, Any]:
        spec = env.spec("x")["database"]
        spec.update(over)
        return spec

    env.create("missing", "s_missing", database=db(adminSecretRef={"name": "no-such"}))
    env.create("wrongpw", "s_wrongpw", database=db(adminSecretRef={"name": "wrong-admin"}))
    env.create("unreach", "s_unreach", database=db(port=free_port(), **admin_ref))
    env.create("weak", "s_weak", database=db(adminSecretRef={"name": "weak-admin"}))
    expected = {"missing": "AdminSecretMissing", "wrongpw": "AdminAuthFailed",
                "unreach": "DatabaseUnreachable", "weak": "AdminCannotCreateRole"}
    messages = {}
    for name, reason in expected.items():
        cond = env.cluster.wait_condition(env.namespace, name, "Ready", "False", reason=reason,
                                          timeout=45)
        messages[name] = cond["message"]
        warnings = [e for e in env.cluster.events(env.namespace, name)
                    if e.get("type") == "Warning" and e.get("reason") == reason]
        assert warnings, f"no Warning event {reason} for {name}"
    assert len(set(expected.values())) == 4
    assert "no-such" in messages["missing"]
    assert "password authentication failed" in messages["wrongpw"]
    assert "CREATEROLE" in messages["weak"]

    # retried with a growing delay
    def retry_delays() -> list[float] | None:
        found = [float(d) for d in re.findall(
            r"wrongpw: reconcile failed .*? retrying in (\d+)s", env.operator.text())]
        return found if len(found) >= 4 else None

    delays = eventually(retry_delays, 30, "four retries of the failing store")
    assert len(delays) >= 3 and delays == sorted(delays) and delays[-1] > delays[0], delays

    # fixing the cause is enough: the retries pick it up
    env.cluster.admin_secret(env.namespace, env.admin, "no-such")
    env.cluster.admin_secret(env.namespace, env.admin, "wrong-admin")
    env.query(f"ALTER ROLE {weak.username} CREATEROLE")
    for name in ("missing", "wrongpw", "weak"):
        env.ready(name, timeout=60)

    # no password anywhere: status, events, operator log
    everything = [json.dumps(env.cluster.store(env.namespace, n)) for n in expected]
    everything += [json.dumps(e) for e in env.cluster.events(env.namespace)]
    everything.append(env.operator.text())
    secrets = [env.admin.password, wrong.password, weak.password]
    secrets += [env.binding(n)["password"] for n in ("missing", "wrongpw", "weak")]
    for text in everything:
        no_secret_in(text, *secrets)


def test_invalid_spec_is_a_permanent_failure_until_edited(env: OpEnv) -> None:
    """What the CRD cannot express (here: a missing CA Secret) is reported, not retried
    forever in a tight loop; an edit of the spec is picked up."""
    env.create("ca", "s_ca", database={**env.spec("x")["database"],
                                        "caSecretRef": {"name": "no-ca"}})
    cond = env.cluster.wait_condition(env.namespace, "ca", "Ready", "False",
                                      reason="CASecretMissing", timeout=45)
    assert "no-ca" in cond["message"]
    env.cluster.patch_store(env.namespace, "ca", {"spec": {"database": {"caSecretRef": None}}})
    env.ready("ca", timeout=60)
