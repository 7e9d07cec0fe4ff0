"""``resultstore`` command line: ``cleanup`` (the CronJob), ``migrate`` and ``check``.

Errors are printed as one line naming what is at fault in the terms the user gave (the
Secret file with ``--config-dir``, the host:port or SQLite file with ``--url``; never a
password) and turn into a non-zero exit status, one per cause so that scripts can tell
them apart (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

from .cleanup import DEFAULT_BATCH_SIZE, DEFAULT_PENDING_HORIZON, run_cleanup
from .config import ConfigError, DirectorySource, StoreConfig, parse_backend_url, redact
from .engine import EngineHolder, classify_connect_error
from .schema import SCHEMA_VERSION, current_version, migrate

__all__ = ["EXIT_CODES", "main"]

EXIT_OK = 0
#: bad configuration, cannot connect, or the cleanup failed
EXIT_ERROR = 1
#: bad command line (argparse's own code)
EXIT_USAGE = 2
#: the store's tables are missing or older than this code: run ``resultstore migrate``
EXIT_NOT_MIGRATED = 3
#: the store was migrated by a newer version of this package
EXIT_NEWER = 4

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_ERROR: "bad configuration, cannot connect, or the cleanup failed",
    EXIT_USAGE: "bad command line",
    EXIT_NOT_MIGRATED: "the tables are missing or older than this code: run `resultstore "
                       "migrate`",
    EXIT_NEWER: "the tables were migrated by a newer version of celery-resultstore",
}


def _source(args: argparse.Namespace) -> DirectorySource | StoreConfig:
    if args.config_dir:
        return DirectorySource(Path(args.config_dir))
    return parse_backend_url(args.url)


def _holder(args: argparse.Namespace) -> EngineHolder:
    return EngineHolder(_source(args), create_tables=False)


def _missing_sqlite_file(config: StoreConfig) -> str | None:
    """The path of a SQLite database that does not exist (in a directory that does).

    Opening it would create an empty file, so that a typo in ``check`` or ``cleanup``
    leaves a stray database behind; these commands say "not migrated" instead. A missing
    directory is left to the connect error, which names it.
    """
    path = config.url.database if config.is_sqlite else None
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    file = Path(path)
    return path if file.parent.is_dir() and not file.exists() else None


def _not_migrated(command: str, config: StoreConfig) -> int | None:
    """Exit status (and message) when the store has no tables at all, else None."""
    path = _missing_sqlite_file(config)
    if path is None:
        return None
    print(f"resultstore {command}: {config.describe()}: not migrated: no SQLite database at "
          f"{path}, run `resultstore migrate`", file=sys.stderr)
    return EXIT_NOT_MIGRATED


def _cmd_cleanup(args: argparse.Namespace) -> int:
    holder = _holder(args)
    config = holder.config
    missing = _not_migrated("cleanup", config)
    if missing is not None:
        return missing
    expires = args.expires if args.expires is not None else config.expires
    if expires is None and not args.config_dir:
        expires = 86400
    try:
        engine = holder.engine()
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            version = current_version(conn, config.names)
    except sa.exc.DBAPIError as exc:
        raise classify_connect_error(exc, config) from None
    if version == 0:
        # nothing to delete, and "no such table" would read like a broken store; a
        # store at another version is still cleaned (an upgrade rolls out gradually)
        holder.dispose()
        problem = schema_problem(version)
        assert problem is not None
        print(f"resultstore cleanup: {config.describe()}: {problem[1]}", file=sys.stderr)
        return problem[0]
    report = run_cleanup(engine, config.names, expires=expires,
                         pending_horizon=args.pending_horizon, batch_size=args.batch_size)
    holder.dispose()
    print(
        f"deleted {report.rows_deleted} rows (tasks={report.tasks_deleted} "
        f"groups={report.groups_deleted} chords={report.chords_deleted} "
        f"unready={report.unready_deleted}) in {report.duration_seconds:.2f}s"
    )
    if report.error:
        print(f"resultstore cleanup: error: {redact(report.error, config.password)}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    holder = _holder(args)
    config = holder.config
    try:
        with holder.engine().connect().execution_options(
                isolation_level="SERIALIZABLE" if config.is_sqlite else "READ COMMITTED") as conn:
            version = migrate(conn, config.names)
    except sa.exc.OperationalError as exc:
        raise classify_connect_error(exc, config) from None
    print(f"schema {config.names.schema or '(default)'} at version {version}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    holder = _holder(args)
    config = holder.config
    missing = _not_migrated("check", config)
    if missing is not None:
        return missing
    try:
        with holder.engine().connect() as conn:
            version = current_version(conn, config.names)
    except sa.exc.OperationalError as exc:
        raise classify_connect_error(exc, config) from None
    where = f"{config.describe()} schema {config.names.schema or '(default)'}"
    problem = schema_problem(version)
    if problem is None:
        print(f"ok: {where} at version {version}")
        return EXIT_OK
    print(f"resultstore check: {where}: {problem[1]}", file=sys.stderr)
    return problem[0]


def schema_problem(version: int, *, code_version: int = SCHEMA_VERSION
                   ) -> tuple[int, str] | None:
    """What is wrong with a store at schema ``version`` for this code: (exit code, text).

    None when the versions match. Pure, so that each case is tested without a database.
    """
    if version == code_version:
        return None
    if version == 0:
        return EXIT_NOT_MIGRATED, "not migrated: schema version 0, run `resultstore migrate`"
    if version < code_version:
        return EXIT_NOT_MIGRATED, (f"schema version {version} is older than this code's "
                                   f"{code_version}: run `resultstore migrate`")
    return EXIT_NEWER, (f"schema version {version} is newer than this code's "
                        f"{code_version}: upgrade celery-resultstore")


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status:\n" + "\n".join(f"  {code}  {text}"
                                            for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="resultstore", description="Celery result store tables: cleanup, migrate, check.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_source(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--config-dir", help="mounted result-store Secret directory")
        group.add_argument("--url", help="backend URL (postgresql://...?schema=, sqlite:///...)")

    p = sub.add_parser("cleanup", help="delete expired results in batches")
    add_source(p)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--expires", type=int, default=None,
                   help="seconds after completion (default: celery.json result_expires)")
    p.add_argument("--pending-horizon", type=int, default=DEFAULT_PENDING_HORIZON,
                   help="delete never-ready rows untouched this many seconds (0: keep)")
    p.set_defaults(func=_cmd_cleanup)

    p = sub.add_parser("migrate", help="create or upgrade the tables")
    add_source(p)
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("check", help="connect and report the schema version",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source(p)
    p.set_defaults(func=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) <= 0:
        print("resultstore: error: --batch-size must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"resultstore {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
