"""`resultstore-operator`: Kopf with our handlers, namespaces, liveness, metrics and webhook.

Wraps `kopf.run` rather than `kopf run <file>` so that the handler module, the watched
namespaces and the peering mode come from one place (OperatorSettings, read once here) and
the optional parts (the injection webhook, the stock-mode rollout) plug in through their
`register(registry=...)` functions when their modules are installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .settings import ENV_PREFIX, OperatorSettings, SettingsError, parse_listen_address

log = logging.getLogger("resultstore.operator")

#: Optional modules with a `register(registry=..., [operator_settings=...])` hook.
PLUGIN_MODULES = ("resultstore_operator.webhook", "resultstore_operator.rollout")


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
                        help="do not load the webhook/rollout modules")
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


def load_plugins(registry: Any, settings: OperatorSettings) -> list[str]:
    """Import the optional modules and let them add their handlers to our registry."""
    loaded = []
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        register = getattr(module, "register", None)
        if register is None:
            continue
        try:
            register(registry=registry, operator_settings=settings)
        except TypeError:
            register(registry=registry)
        loaded.append(name.rsplit(".", 1)[-1])
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args, dict(os.environ))
    except SettingsError as exc:
        print(f"resultstore-operator: {exc}", file=sys.stderr)
        return 2

    import kopf

    from . import handlers, metrics

    kopf.configure(verbose=args.verbose or settings.log_level == "DEBUG", debug=args.debug,
                   log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("resultstore").setLevel(settings.log_level)
    if not (args.verbose or args.debug):
        # Kopf logs every timer tick ("Timer 'tick' succeeded") at INFO; with hundreds of
        # stores that drowns our own action lines, which already say what happened.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    metrics.register(registry, settings)
    plugins = [] if args.no_plugins else load_plugins(registry, settings)
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
