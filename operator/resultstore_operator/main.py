"""`resultstore-operator`: Kopf with our handlers, namespaces, liveness, metrics and webhook.

Wraps `kopf.run` rather than `kopf run <file>` so that the handler module, the watched
namespaces and the peering mode come from one place (OperatorSettings, read once here).
Every part of the operator (the ResultStore handlers, the metrics endpoint, the injection
webhook, the stock-mode rollout) is registered here explicitly, through one signature
(`Part`): no module is discovered by import tricks, and an error inside a `register` is an
error, not a reason to call it again differently.
"""

from __future__ import annotations

import argparse
import logging
import os
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


#: Parts `--no-plugins` leaves out (the operator runs without them; tests use it).
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
    parser.add_argument("--peering", default=None,
                        help="Kopf peering name (default: standalone, one replica)")
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
    if args.peering is not None:
        overrides["peering_name"] = args.peering
    if args.liveness is not None:
        overrides["health_address"] = args.liveness
    if args.metrics is not None:
        parse_listen_address(f"--metrics (or {ENV_PREFIX}METRICS_ADDRESS)", args.metrics)
        overrides["metrics_address"] = args.metrics.strip()
    return settings.with_overrides(**overrides) if overrides else settings


def parts(with_optional: bool) -> list[tuple[str, Part]]:
    """The parts to register, by name, in order (imported here: Kopf loads only on run)."""
    from . import handlers, metrics, rollout, webhook

    every: list[tuple[str, Part]] = [
        ("handlers", handlers.register),
        ("metrics", metrics.register),
        ("webhook", webhook.register),
        ("rollout", rollout.register),
    ]
    return [(n, p) for n, p in every if with_optional or n not in OPTIONAL_PARTS]


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
        # Kopf logs every timer tick ("Timer 'tick' succeeded") at INFO; with hundreds of
        # stores that drowns our own action lines, which already say what happened.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    registry = kopf.OperatorRegistry()
    registered = []
    for name, register in parts(with_optional=not args.no_plugins):
        register(registry, settings)
        registered.append(name)
    plugins = [n for n in registered if n in OPTIONAL_PARTS]
    log.info("resultstore-operator starting: namespaces=%s standalone=%s plugins=%s "
             "metrics=%s", ",".join(settings.namespaces) or "*", settings.standalone,
             ",".join(plugins) or "-", settings.metrics_address or "-")
    kopf.run(
        registry=registry,
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        standalone=settings.standalone,
        peering_name=settings.peering_name or None,
        liveness_endpoint=settings.liveness_endpoint,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
