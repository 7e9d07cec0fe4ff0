"""The demo's pure parts: examples pointed at the demo's services, the in-cluster install,
the database address seen from this machine, the in-cluster PostgreSQL/Redis, pod status."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from resultstore_devtools.demo_args import parse_args
from resultstore_devtools.demo_cluster import project_version, render_install
from resultstore_devtools.demo_services import build_postgres, build_redis, service_host
from resultstore_devtools.demo_story import Broker, Database, examples, point_examples
from resultstore_devtools.node import pod_status

ROOT = Path(__file__).resolve().parents[2]

IN_CLUSTER = Database("postgres.demo.svc.cluster.local", 5432, "127.0.0.1", 40001, "celery",
                      "resultstore_admin", "s3cret")
DIRECT = Database("db.example", 5433, "db.example", 5433, "celery", "admin", "pw")


def _binding(host: str, port: int) -> dict[str, str]:
    netloc = f"rs_a:pw@{host}:{port}"
    return {"host": host, "port": str(port), "username": "rs_a", "password": "pw",
            "uri": f"postgresql://{netloc}/celery?sslmode=disable",
            "result_backend": f"db+postgresql+psycopg://{netloc}/celery?sslmode=disable",
            "schema": "orders_results"}


def test_localize_rewrites_every_address_key_to_the_forwarded_port() -> None:
    local = IN_CLUSTER.localize(_binding("postgres.demo.svc.cluster.local", 5432))
    assert local["host"] == "127.0.0.1" and local["port"] == "40001"
    for key in ("uri", "result_backend"):
        assert "@127.0.0.1:40001/celery" in local[key], local[key]
        assert "svc.cluster.local" not in local[key]
    assert local["schema"] == "orders_results" and local["password"] == "pw"


def test_localize_leaves_a_directly_reachable_database_alone() -> None:
    data = _binding("db.example", 5433)
    assert DIRECT.localize(data) == data


def test_point_examples_targets_the_demo_services_without_touching_the_files() -> None:
    docs = examples()
    before = yaml.safe_dump_all(docs)
    broker = Broker("redis://redis.demo.svc.cluster.local:6379/0", "redis://127.0.0.1:1/0")
    out = {d["kind"]: d for d in point_examples(docs, IN_CLUSTER, broker)}
    assert yaml.safe_dump_all(docs) == before, "point_examples mutated its input"
    assert out["Secret"]["stringData"] == {"username": "resultstore_admin", "password": "s3cret"}
    db = out["ResultStore"]["spec"]["database"]
    assert (db["host"], db["port"], db["name"]) == ("postgres.demo.svc.cluster.local", 5432,
                                                    "celery")
    # a rerun on the same PostgreSQL re-attaches to the schema the last run retained
    assert out["ResultStore"]["spec"]["schemaPolicy"] == "AdoptExisting"
    container = out["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CELERY_BROKER_URL"] == broker.cluster_url


@pytest.mark.parametrize("host_network", [False, True])
def test_point_examples_puts_cleanup_jobs_on_the_host_network_when_asked(
        host_network: bool) -> None:
    """A node whose pods reach PostgreSQL only on loopback (the real node, --host-network)
    gets the store's spec.cleanupJob.hostNetwork; the spec parses with it either way."""
    from resultstore_operator.spec import parse_spec

    broker = Broker("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0")
    docs = point_examples(examples(), DIRECT, broker, cleanup_host_network=host_network)
    store = next(d for d in docs if d["kind"] == "ResultStore")
    assert (store["spec"].get("cleanupJob") or {}).get("hostNetwork", False) is host_network
    assert parse_spec(store["spec"]).cleanup_job.host_network is host_network


@pytest.mark.parametrize(("argv", "host_network"), [
    ([], False), (["--host-network"], True)])
def test_demo_targets_say_where_cleanup_jobs_run(argv: list[str], host_network: bool) -> None:
    """The real node's target sets the option, the stand-in's does not; a cluster target
    follows --host-network (all three only record it: nothing is started here)."""
    import contextlib

    from resultstore_devtools.demo_args import parse_args
    from resultstore_devtools.demo_cluster import ClusterTarget
    from resultstore_devtools.demo_local import LocalTarget
    from resultstore_devtools.demo_realnode import RealNodeTarget

    work = Path("/nonexistent")
    with contextlib.ExitStack() as stack:
        assert LocalTarget(False, stack, work).cleanup_host_network is False
        assert RealNodeTarget(False, stack, work).cleanup_host_network is True
        cluster = ClusterTarget(parse_args(["--kubeconfig", "/nonexistent", *argv]),
                                stack, work)
        assert cluster.cleanup_host_network is host_network


@pytest.mark.parametrize(("argv", "host_network"), [
    ([], False), (["--host-network"], True)])
def test_demo_operators_allow_the_host_network_their_stores_ask_for(
        argv: list[str], host_network: bool) -> None:
    """Each target's operator env, parsed as the operator parses it, allows
    spec.cleanupJob.hostNetwork exactly when that target's store asks for it (otherwise the
    store would be refused: CleanupJobNotAllowed)."""
    import contextlib

    from resultstore_devtools.demo_cluster import ClusterTarget
    from resultstore_devtools.demo_local import LocalTarget
    from resultstore_devtools.demo_realnode import DEMO_OPERATOR_ENV, RealNodeTarget
    from resultstore_operator.settings import OperatorSettings

    work = Path("/nonexistent")
    with contextlib.ExitStack() as stack:
        real_node = RealNodeTarget(False, stack, work)
        targets: list[LocalTarget | ClusterTarget] = [
            LocalTarget(False, stack, work), real_node,
            ClusterTarget(parse_args(["--kubeconfig", "/nonexistent", *argv]), stack, work)]
        for target in targets:
            settings = OperatorSettings.from_env(target.operator_env())
            assert settings.cleanup_allow_host_network is target.cleanup_host_network, target
        real = real_node.operator_env()
        assert {k: real[k] for k in DEMO_OPERATOR_ENV} == DEMO_OPERATOR_ENV
        # --operator-env still reaches the Deployment, and wins over the demo's choice
        cluster = ClusterTarget(parse_args([
            "--kubeconfig", "/nonexistent", *argv, "--operator-env",
            "RESULTSTORE_TICK_INTERVAL=1", "--operator-env",
            "RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK=false"]), stack, work)
        assert cluster.operator_env() == {"RESULTSTORE_TICK_INTERVAL": "1",
                                          "RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK": "false"}


@pytest.mark.parametrize("extra", [{}, {"RESULTSTORE_ROTATION_GRACE": "5",
                                        "RESULTSTORE_WEBHOOK_PORT": "10443"}])
def test_render_install_sets_image_cleanup_image_and_env(extra: dict[str, str]) -> None:
    import subprocess

    from resultstore_devtools.binaries import cached_binaries

    kubectl = cached_binaries().kubectl
    if kubectl.exists():
        rendered = subprocess.run([str(kubectl), "kustomize", str(ROOT / "manifests")],
                                  capture_output=True, text=True, check=True).stdout
    else:  # the plain files are what kustomize renders, less the image tag
        rendered = "\n---\n".join(
            (ROOT / "manifests" / name).read_text()
            for name in ("crd.yaml", "namespace.yaml", "serviceaccount.yaml", "rbac.yaml",
                         "deployment.yaml", "webhook.yaml"))
    docs = render_install(rendered, "registry.example/rs:1.2", extra)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/rs:1.2"
    env = {e["name"]: e for e in container["env"]}
    assert env["RESULTSTORE_CLEANUP_IMAGE"]["value"] == "registry.example/rs:1.2"
    for key, value in extra.items():
        assert env[key] == {"name": key, "value": value}
    assert "fieldRef" in env["RESULTSTORE_OPERATOR_NAMESPACE"]["valueFrom"]
    assert len(env) == len(container["env"]), "an env name appears twice"


def test_in_cluster_services_reference_each_other_consistently() -> None:
    objs = build_postgres("demo", "celery", "super", "admin-pw") + build_redis("demo")
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    pg = by[("Deployment", "postgres")]["spec"]["template"]
    container = pg["spec"]["containers"][0]
    secret_keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]
                   if "valueFrom" in e}
    assert secret_keys <= set(by[("Secret", "postgres")]["stringData"])
    volumes = {v["name"] for v in pg["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert "CREATEROLE" in by[("ConfigMap", "postgres-init")]["data"]["10-resultstore-admin.sh"]
    assert "SUPERUSER" not in by[("ConfigMap", "postgres-init")]["data"][
        "10-resultstore-admin.sh"]
    for name in ("postgres", "redis"):
        service = by[("Service", name)]
        labels = by[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
    assert service_host("postgres", "demo") == "postgres.demo.svc.cluster.local"


def test_pod_status_reports_ready_on_loopback() -> None:
    pod = {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b"}]}}
    status = pod_status(pod, ready=True)
    assert status["phase"] == "Running" and status["podIP"] == "127.0.0.1"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True"
    assert [c["ready"] for c in status["containerStatuses"]] == [True, False]
    crashed = pod_status(pod, ready=False, restarts=2)
    assert {c["type"]: c["status"] for c in crashed["conditions"]}["Ready"] == "False"
    assert crashed["containerStatuses"][0]["restartCount"] == 2


@pytest.mark.parametrize("argv,error", [
    (["--operator-env", "NOEQUALS"], "KEY=VALUE"),
    (["--kubeconfig", "k", "--postgres", "hostonly"], "HOST:PORT"),
    (["--namespace", "team"], "--namespace only apply with --kubeconfig"),
    (["--postgres", "db:5432", "--broker-url", "redis://x"],
     "--broker-url, --postgres only apply with --kubeconfig"),
])
def test_parse_args_rejects_malformed_options(argv: list[str], error: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert error in capsys.readouterr().err


def test_parse_args_accepts_the_local_and_cluster_forms() -> None:
    assert parse_args([]).kubeconfig is None and parse_args(["--keep"]).keep
    args = parse_args(["--kubeconfig", "k", "--namespace", "team", "--postgres", "db:5432"])
    assert args.namespace == "team" and args.postgres == "db:5432"


def test_project_version_matches_pyproject() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project_version() == project["version"]
