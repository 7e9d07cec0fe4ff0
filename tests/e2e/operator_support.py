"""Not tests: helpers for the operator's end-to-end tests.

The operator runs as a real process (`resultstore-operator`) against the test control plane,
watching only the test's namespace. There is no kubelet, so the tests do its part: they
materialise the operator-written Secret into a kubelet-style directory and re-materialise it
when it changes (SecretMirror, the devtools one the demo uses too), then run real Celery code
against `resultstore:///<dir>`.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from kubernetes import client
from kubernetes.client.exceptions import ApiException

# SecretMirror (re-exported for the tests): the kubelet's part, shared with the demo's client.
from resultstore_devtools.kubelet import SecretMirror as SecretMirror
from resultstore_devtools.kubelet import api_fetcher
from resultstore_devtools.procs import free_port, http_ok
from resultstore_operator.builders.ownership import ADMIN_CREDENTIALS_LABEL
from resultstore_operator.crd import build_crd
from resultstore_operator.spec import GROUP, PLURAL, VERSION
from tests.helpers.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_BIN = Path(sys.executable).parent / "resultstore-operator"


def ensure_crd(api: client.ApiClient) -> None:
    """Create or update the CRD from crd.py and wait until it is served."""
    ext = client.ApiextensionsV1Api(api)
    body = build_crd()
    name = body["metadata"]["name"]
    try:
        live = ext.read_custom_resource_definition(name)
        assert live.metadata is not None
        body["metadata"]["resourceVersion"] = live.metadata.resource_version
        ext.replace_custom_resource_definition(
            name, client.V1CustomResourceDefinition.model_validate(body))
    except ApiException as exc:
        if exc.status != 404:
            raise
        ext.create_custom_resource_definition(
            client.V1CustomResourceDefinition.model_validate(body))

    def established() -> bool:
        crd = ext.read_custom_resource_definition(name)
        conditions = (crd.status.conditions if crd.status else None) or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    eventually(established, 30, "the ResultStore CRD to be established")


# --- the operator process ------------------------------------------------------------------

#: Log files of the operator processes the tests started. tests/e2e/conftest.py removes a
#: test's logs after it passed and names them after a failure (where they are what one
#: reads first), so /tmp does not fill with a log per test.
OPERATOR_LOGS: set[Path] = set()


def _new_log() -> Path:
    path = Path(tempfile.mkstemp(prefix="resultstore-operator-", suffix=".log")[1])
    OPERATOR_LOGS.add(path)
    return path


def discard_operator_logs(paths: set[Path], keep: bool) -> list[Path]:
    """Forget `paths` (logs of processes that have stopped); delete them unless `keep` (a
    failure). Returns the kept paths that exist."""
    OPERATOR_LOGS.difference_update(paths)
    if keep:
        return sorted(p for p in paths if p.exists())
    for path in paths:
        path.unlink(missing_ok=True)
    return []


@dataclass
class OperatorProcess:
    kubeconfig: Path
    namespaces: tuple[str, ...]
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_path: Path = field(default_factory=_new_log)
    proc: subprocess.Popen[bytes] | None = None
    health_port: int = 0
    #: Command-line arguments; without --no-plugins the rollout (a Secret watch) runs too.
    args: tuple[str, ...] = ("--no-plugins",)
    #: The process's TMPDIR, made at start and removed at stop: the kubernetes client writes
    #: the admin kubeconfig's client key and certificates to temp files it deletes only at a
    #: clean exit, so every SIGKILLed operator (the crash tests) left them in /tmp.
    tmp_dir: Path | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSTORE_")}
        self.health_port = free_port()
        env.update({
            "KUBECONFIG": str(self.kubeconfig),
            "RESULTSTORE_WATCH_NAMESPACES": ",".join(self.namespaces),
            "RESULTSTORE_TICK_INTERVAL": "0.5",
            "RESULTSTORE_DRIFT_INTERVAL": "2",
            "RESULTSTORE_RETRY_BACKOFF_BASE": "0.5",
            "RESULTSTORE_RETRY_BACKOFF_MAX": "4",
            "RESULTSTORE_ROTATION_GRACE": "3",
            "RESULTSTORE_DB_CONNECT_TIMEOUT": "3",
            "RESULTSTORE_HEALTH_ADDRESS": f"127.0.0.1:{self.health_port}",
            "RESULTSTORE_WEBHOOK_ENABLED": "false",
            "RESULTSTORE_CLEANUP_IMAGE": "celery-resultstore:e2e",
        })
        if self.tmp_dir is not None:
            env["TMPDIR"] = str(self.tmp_dir)
        env.update(self.extra_env)
        return env

    def start(self) -> OperatorProcess:
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="resultstore-operator-tmp-"))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(OPERATOR_BIN), *self.args], env=self.env(), cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        eventually(self._healthy, 60, "the operator's liveness endpoint")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM lets Kopf exit cleanly; SIGKILL simulates a crash."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        finally:
            if self.tmp_dir is not None and (self.proc is None or self.proc.poll() is not None):
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
                self.tmp_dir = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


# --- PostgreSQL side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Admin:
    username: str
    password: str


def create_admin(pg: Any, database: str, *, createrole: bool = True,
                 create_on_db: bool = True) -> Admin:
    """A non-superuser admin, as a DBA would hand to the operator."""
    name = "adm_" + secrets.token_hex(4)
    password = secrets.token_urlsafe(16)
    with psycopg.connect(pg.dsn(database), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN {'CREATEROLE' if createrole else ''} "
                     f"PASSWORD '{password}'")
        if create_on_db:
            conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO {name}')
    return Admin(name, password)


def superuser_query(pg: Any, database: str, query: str,
                    params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(database), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return list(cur.fetchall()) if cur.description else []


def can_login(binding: Mapping[str, str], password: str | None = None) -> bool:
    try:
        with psycopg.connect(host=binding["host"], port=int(binding["port"]),
                             dbname=binding["database"], user=binding["username"],
                             password=password or binding["password"], connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def connect_as(binding: Mapping[str, str]) -> psycopg.Connection[Any]:
    return psycopg.connect(binding["uri"], autocommit=True)


# --- Kubernetes side -----------------------------------------------------------------------


class Cluster:
    """Thin typed-enough wrappers over the API for the tests."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        #: Secret/ConfigMap data by (kind, namespace, name), decoded: what SecretMirror reads.
        self.fetch = api_fetcher(api)
        self.core: Any = client.CoreV1Api(api)
        self.batch: Any = client.BatchV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)

    def admin_secret(self, namespace: str, admin: Admin, name: str = "pg-admin",
                     opt_in: bool = True) -> None:
        """The admin Secret; `opt_in` sets the label without which the operator reads none."""
        labels = {ADMIN_CREDENTIALS_LABEL: "true"} if opt_in else {}
        body = {"metadata": {"name": name, "labels": labels},
                "stringData": {"username": admin.username, "password": admin.password}}
        try:
            self.core.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_secret(name, namespace, body)

    def create_store(self, namespace: str, name: str, spec: Mapping[str, Any],
                     annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResultStore",
                "metadata": {"name": name, "annotations": dict(annotations or {})},
                "spec": dict(spec)}
        return dict(self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body))

    def store(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_store(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, dict(patch),
            _content_type="application/merge-patch+json")

    def patch_store_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
            _content_type="application/merge-patch+json")

    def delete_store(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
        obj = self.store(namespace, name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("type") == type_:
                return dict(cond)
        return None

    def wait_condition(self, namespace: str, name: str, type_: str = "Ready",
                       status: str = "True", reason: str | None = None,
                       timeout: float = 60) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            cond = self.condition(namespace, name, type_)
            if cond and cond.get("status") == status and (reason is None
                                                          or cond.get("reason") == reason):
                return cond
            return None

        return eventually(probe, timeout, f"{name}: {type_}={status} ({reason or 'any'})")

    def wait_ready(self, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
        self.wait_condition(namespace, name, "Ready", "True", timeout=timeout)
        obj = self.store(namespace, name)
        assert obj is not None
        return obj

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            raw = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.api.sanitize_for_serialization(raw))

    def binding(self, namespace: str, store: str) -> dict[str, str]:
        secret = self.secret(namespace, f"{store}-resultstore")
        assert secret is not None, f"Secret of {store} missing"
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def cronjob(self, namespace: str, store: str) -> dict[str, Any] | None:
        try:
            raw = self.batch.read_namespaced_cron_job(f"{store}-resultstore-cleanup", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.api.sanitize_for_serialization(raw))

    def events(self, namespace: str, store: str | None = None) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(namespace).items
        out = [dict(self.api.sanitize_for_serialization(e)) for e in items]
        if store is not None:
            out = [e for e in out if (e.get("involvedObject") or {}).get("name") == store]
        return sorted(out, key=lambda e: e.get("firstTimestamp") or e.get("eventTime") or "")

    def reasons(self, namespace: str, store: str) -> list[str]:
        return [str(e.get("reason")) for e in self.events(namespace, store)]

    def remove_all_stores(self, namespace: str, operator_running: bool) -> None:
        """Teardown: let the running operator finalise, else strip the finalizers."""
        listing = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        for item in listing.get("items", []):
            name = item["metadata"]["name"]
            if operator_running:
                self.patch_store(namespace, name, {"metadata": {"annotations": {
                    f"{GROUP}/skip-database-cleanup": "true"}}})
                self.delete_store(namespace, name)
        deadline = time.monotonic() + (20 if operator_running else 0)
        while time.monotonic() < deadline:
            if not self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL).get("items"):
                return
            time.sleep(0.3)
        for item in self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL).get("items", []):
            name = item["metadata"]["name"]
            try:
                self.patch_store(namespace, name, {"metadata": {"finalizers": None}})
                self.delete_store(namespace, name)
            except ApiException:
                pass


def store_spec(pg: Any, db_name: str, schema: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "database": {"host": pg.host, "port": pg.port, "name": db_name, "sslMode": "disable",
                     "adminSecretRef": {"name": "pg-admin"}},
        "schema": schema,
    }
    spec.update(extra)
    return spec


@contextmanager
def operator_running(kubeconfig: Path, namespace: str,
                     extra_env: Mapping[str, str] | None = None) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, (namespace,), dict(extra_env or {})).start()
    try:
        yield op
    finally:
        op.stop()


def no_secret_in(text: str, *values: str) -> None:
    for value in values:
        assert value and value not in text, "a password leaked into operator output/status"


class CeleryWorker:
    """`celery worker -P threads -c <concurrency>` as the pod's command would run it, its
    result backend configured from the mounted Secret in ``config_dir``."""

    def __init__(self, config_dir: Path, broker: str, queue: str, log: Path, *,
                 concurrency: int) -> None:
        env = dict(os.environ, CELERY_BROKER_URL=broker,
                   CELERY_RESULT_BACKEND=f"resultstore://{config_dir}", RS_QUEUE=queue)
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.e2e.operator_worker_app",
                 "worker", "-P", "threads", "-c", str(concurrency), "-Q", queue,
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- fixtures (imported by the test modules) -------------------------------------------------


@dataclass
class OpEnv:
    """One test's world: namespace, database, admin Secret and a running operator."""

    cluster: Cluster
    namespace: str
    pg: Any
    database: str
    admin: Admin
    kubeconfig: Path
    operator: OperatorProcess

    def spec(self, schema: str, **extra: Any) -> dict[str, Any]:
        return store_spec(self.pg, self.database, schema, **extra)

    def create(self, name: str, schema: str, annotations: Mapping[str, str] | None = None,
               **extra: Any) -> dict[str, Any]:
        return self.cluster.create_store(self.namespace, name, self.spec(schema, **extra),
                                         annotations)

    def ready(self, name: str, timeout: float = 60) -> dict[str, Any]:
        return self.cluster.wait_ready(self.namespace, name, timeout)

    def binding(self, name: str) -> dict[str, str]:
        return self.cluster.binding(self.namespace, name)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return superuser_query(self.pg, self.database, sql, params)

    def admin_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """As the admin role the operator uses (objects it creates are owned by it)."""
        dsn = self.pg.dsn(self.database, self.admin.username, self.admin.password)
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def restart_operator(self, crash: bool = False,
                         between: Callable[[], None] | None = None) -> None:
        self.operator.stop(signal.SIGKILL if crash else signal.SIGTERM)
        if between is not None:
            between()
        self.operator = OperatorProcess(self.kubeconfig, (self.namespace,),
                                        self.operator.extra_env, self.operator.log_path).start()


def make_openv(kube: Any, api_client: client.ApiClient, namespace: str, postgres: Any,
               pg_database: Any, extra_env: Mapping[str, str] | None = None
               ) -> Iterator[OpEnv]:
    ensure_crd(api_client)
    cluster = Cluster(api_client)
    admin = create_admin(postgres, pg_database.name)
    cluster.admin_secret(namespace, admin)
    op = OperatorProcess(Path(kube.kubeconfig), (namespace,), dict(extra_env or {})).start()
    env = OpEnv(cluster, namespace, postgres, pg_database.name, admin, Path(kube.kubeconfig), op)
    try:
        yield env
    finally:
        running = env.operator.proc is not None and env.operator.proc.poll() is None
        try:
            cluster.remove_all_stores(namespace, operator_running=running)
        finally:
            env.operator.stop()
