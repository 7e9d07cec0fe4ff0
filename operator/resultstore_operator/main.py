"""`resultstore-operator`: the webhook, metrics and probes on every replica; Kopf, with our
handlers, only on the replica that holds the Lease.

Wraps `kopf.operator` rather than `kopf run <file>` so that the handler module, the watched
namespaces and the leader election come from one place (OperatorSettings, read once here).
Every Kopf part of the operator (the ResultStore handlers, the watch timeouts, the stock-mode
rollout) is registered here explicitly, through one signature (`Part`): no module is
discovered by import tricks, and an error inside a `register` is an error, not a reason to
call it again differently. The services every replica runs whether it leads or not (the
injection webhook, the metrics endpoint, /healthz and /readyz) are started here too, before
the election, and stopped last (docs/ARCHITECTURE.md, "Leadership").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from .settings import ENV_PREFIX, OperatorSettings, SettingsError, parse_listen_address

log = logging.getLogger("resultstore.operator")



class Part(Protocol):
    """A part of the operator: adds its Kopf handlers to `registry`, configured by `settings`.

    (The handlers' `register` also returns its Controller; a Protocol's `None` return
    accepts that.)
    """

    def __call__(self, registry: Any, settings: OperatorSettings, /) -> object: ...


#: Parts and services `--no-plugins` leaves out (the operator runs without them; tests use
#: it): the rollout is a Kopf part, the webhook a service of every replica.
OPTIONAL_PARTS = ("webhook", "rollout")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="resultstore-operator",
        description="Run the ResultStore operator (Kopf) against the current kubeconfig or "
                    "in-cluster credentials. Settings come from RESULTSTORE_* variables; "
                    "flags override them.")
    parser.add_argument("-n", "--namespace", action="append", default=None,
                        help="watch this namespace (repeatable; default: "
                             "RESULTSTORE_WATCH_NAMESPACES, else all namespaces)")
    parser.add_argument("-A", "--all-namespaces", action="store_true",
                        help="watch all namespaces")
    parser.add_argument("--leader-election", dest="leader_election", default=None,
                        action=argparse.BooleanOptionalAction,
                        help="elect one reconciling replica by a Lease (default: "
                             "RESULTSTORE_LEADER_ELECTION, else off)")
    parser.add_argument("--liveness", default=None,
                        help="host:port of the /healthz endpoint ('' disables)")
    parser.add_argument("--metrics", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics "
                             "('' disables; default: RESULTSTORE_METRICS_ADDRESS)")
    parser.add_argument("--no-plugins", action="store_true",
                        help="run without the optional parts (the webhook, the rollout)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace, env: dict[str, str]) -> OperatorSettings:
    settings = OperatorSettings.from_env(env)
    overrides: dict[str, Any] = {}
    if args.all_namespaces:
        overrides["namespaces"] = ()
    elif args.namespace:
        overrides["namespaces"] = tuple(args.namespace)
    if args.leader_election is not None:
        from dataclasses import replace

        overrides["leader"] = replace(settings.leader, enabled=args.leader_election)
    if args.liveness is not None:
        overrides["health_address"] = args.liveness
    if args.metrics is not None:
        parse_listen_address(f"--metrics (or {ENV_PREFIX}METRICS_ADDRESS)", args.metrics)
        overrides["metrics_address"] = args.metrics.strip()
    return settings.with_overrides(**overrides) if overrides else settings


def parts(with_optional: bool) -> list[tuple[str, Part]]:
    """The Kopf parts to register, by name, in order (imported here: Kopf loads only on run).

    `watching` comes after `handlers`: its startup handler sets the watch timeouts last.
    """
    from . import handlers, rollout, watching

    every: list[tuple[str, Part]] = [
        ("handlers", handlers.register),
        ("watching", watching.register),
        ("rollout", rollout.register),
    ]
    return [(n, p) for n, p in every if with_optional or n not in OPTIONAL_PARTS]


class Replica:
    """One process's services, its side of the election and, while it leads, Kopf."""

    def __init__(self, settings: OperatorSettings, with_webhook: bool) -> None:
        from .elector import LeaderElector
        from .health import HealthServer
        from .kube import Kube, new_api_client
        from .metrics import METRICS, MetricsServer
        from .webhook import WebhookService

        self.settings = settings
        self.webhook = WebhookService(settings.webhook) if with_webhook else None
        self.elector = (LeaderElector(Kube(new_api_client()), settings.leader)
                        if settings.leader.enabled else None)
        self.keeping: asyncio.Future[None] | None = None
        self.servers: list[tuple[Any, str]] = []
        if settings.health_address:
            host, port = parse_listen_address(ENV_PREFIX + "HEALTH_ADDRESS",
                                              settings.health_address) or ("0.0.0.0", 8080)
            self.servers.append((HealthServer(host, port, self.status, self.ready),
                                 settings.health_address))
        listen = settings.metrics_listen
        if listen is not None:
            self.servers.append((MetricsServer(METRICS, listen[0], listen[1],
                                               settings.metrics_path),
                                 settings.metrics_address))

    def status(self) -> dict[str, Any]:
        return {"leader": self.elector.state if self.elector else "disabled",
                "webhook": self.webhook.state if self.webhook else "disabled"}

    def ready(self) -> bool:
        return self.webhook is None or self.webhook.ready

    async def start_services(self) -> bool:
        """Probes, metrics, webhook; False when a port cannot be bound (exit 2)."""
        for server, address in self.servers:
            try:
                await server.start()
            except OSError as exc:
                log.error("cannot serve on %s: %s", address, exc.strerror or exc)
                return False
        if self.webhook is not None:
            self.webhook.start()
        return True

    async def elect(self, stopping: asyncio.Event) -> bool:
        """Stand by until this replica leads (True) or is stopped first (False)."""
        if self.elector is None:
            return True
        self.elector.start_guard()
        acquiring = asyncio.ensure_future(self.elector.acquire())
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({acquiring, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not acquiring.done():
            acquiring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquiring
            log.info("stopped while standing by")
            return False
        acquiring.result()
        # Created before Kopf starts: Kopf leaves the tasks that predate it alone.
        self.keeping = asyncio.ensure_future(self.elector.keep())
        return True

    async def stop(self) -> None:
        """Release the Lease (Kopf has stopped), then stop the services."""
        if self.keeping is not None:
            self.keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.keeping
        if self.elector is not None:
            await self.elector.release()
        if self.webhook is not None:
            await self.webhook.stop()
        for server, _ in reversed(self.servers):
            await server.stop()


#: How long a stopping leader waits for handler threads still running after Kopf stopped.
DRAIN_SECONDS = 20.0


def drain(executors: Sequence[Any], timeout: float) -> bool:
    """Wait until every running handler thread of `executors` finished (True), or give up.

    Kopf stops its tasks, not the threads its sync handlers and our blocking I/O run in: a
    reconcile in flight would go on after Kopf returned. The Lease is released only once
    they are done; otherwise it is left to lapse (the standby then waits it out).
    """
    import threading

    done = threading.Event()

    def wait() -> None:
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)
        done.set()

    threading.Thread(target=wait, name="drain-handlers", daemon=True).start()
    return done.wait(timeout)


async def serve(settings: OperatorSettings, registry: Any, with_webhook: bool,
                executors: Sequence[Any] = ()) -> int:
    """Run the services of every replica; run Kopf while (and only while) this one leads.

    Order: probes, metrics and the webhook first (a standby serves admission); then the
    election; then Kopf. On SIGTERM: Kopf stops, its handler threads are drained while the
    Lease is still renewed, the Lease is released, the services stop last. A lost Lease
    never returns here: the elector ends the process (elector.py).
    """
    import kopf

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    replica = Replica(settings, with_webhook)
    pools: list[Any] = []
    try:
        if not await replica.start_services():
            return 2
        if not await replica.elect(stopping) or stopping.is_set():
            return 0
        # Kopf replaces our SIGTERM/SIGINT handlers with its own and returns once stopped.
        kopf_settings = kopf.OperatorSettings()
        pools = [kopf_settings.execution.executor, *executors]
        await kopf.operator(
            registry=registry,
            settings=kopf_settings,
            clusterwide=settings.clusterwide,
            namespaces=list(settings.namespaces),
            standalone=True,
            liveness_endpoint=None,
        )
        return 0
    finally:
        # Kopf stopped (or failed): no handler thread may outlive the Lease.
        if pools and not await asyncio.to_thread(drain, pools, DRAIN_SECONDS) \
                and replica.elector is not None:
            log.warning("handler threads still running %.0fs after Kopf stopped: the Lease "
                        "is left to lapse instead of being released", DRAIN_SECONDS)
            replica.elector.step_down("handlers did not finish in time")
        await replica.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args, dict(os.environ))
    except SettingsError as exc:
        print(f"resultstore-operator: {exc}", file=sys.stderr)
        return 2

    import kopf

    kopf.configure(verbose=args.verbose or settings.log_level == "DEBUG", debug=args.debug,
                   log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("resultstore").setLevel(settings.log_level)
    if not (args.verbose or args.debug):
        # Kopf logs every handler's success ("Handler 'observe' succeeded") at INFO; with
        # hundreds of stores that drowns our own action lines, which already say what
        # happened.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    registry = kopf.OperatorRegistry()
    registered = []
    executors = []
    for name, register in parts(with_optional=not args.no_plugins):
        part = register(registry, settings)
        registered.append(name)
        # The handlers' Controller runs the blocking I/O in its own pool: drained on stop.
        if hasattr(getattr(part, "executor", None), "shutdown"):
            executors.append(part.executor)  # type: ignore[attr-defined]
    plugins = [n for n in registered if n in OPTIONAL_PARTS]
    with_webhook = not args.no_plugins
    leader = settings.leader
    log.info("resultstore-operator starting: namespaces=%s leader-election=%s plugins=%s "
             "metrics=%s", ",".join(settings.namespaces) or "*",
             f"{leader.namespace}/{leader.lease_name} as {leader.identity}"
             if leader.enabled else "off",
             ",".join(plugins + (["webhook"] if with_webhook and settings.webhook.enabled
                                 else [])) or "-",
             settings.metrics_address or "-")
    return asyncio.run(serve(settings, registry, with_webhook, executors))


if __name__ == "__main__":
    raise SystemExit(main())
