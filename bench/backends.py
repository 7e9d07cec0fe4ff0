"""The backends under test, each one entry: adding a backend is adding an entry here.

An entry knows its result_backend URL, whether it is installed, and the few storage-level
hooks the harness needs outside the timed paths: where its rows live (to generate expired
rows with one INSERT ... SELECT generate_series, and to read the last header's date_done for
the chord test). Everything timed goes through the Celery API only.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from bench.services import BenchServices

STOCK_DB = "bench_stock"
RESULTSTORE_DB = "bench_rs"
RESULTSTORE_SCHEMA = "bench_results"
DATABASES = [STOCK_DB, RESULTSTORE_DB]
REDIS_BACKEND_DB = 1
BROKER_DB = 2


@dataclass(frozen=True)
class AppSpec:
    """What a job process needs to build the same Celery app; JSON so it crosses exec()."""

    backend: str
    result_backend: str
    broker_url: str
    queue: str = "bench"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AppSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class SqlStorage:
    """Where a PostgreSQL backend keeps task rows (stock-compatible layout)."""

    dsn: str
    admin_dsn: str
    schema: str  # "public" for stock
    task_table: str = "celery_taskmeta"
    task_sequence: str = "task_id_sequence"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackendEntry:
    key: str
    label: str
    app: AppSpec
    sql: SqlStorage | None  # None: not stored in PostgreSQL (Redis)
    redis_db_url: str | None  # the Redis backend's own database, for date_done reads
    available: bool
    unavailable_reason: str = ""

    @property
    def has_cleanup(self) -> bool:
        """Redis expires keys itself; only the SQL stores need a cleanup run."""
        return self.sql is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "label": self.label, "available": self.available,
            "unavailable_reason": self.unavailable_reason,
            "result_backend": _redact(self.app.result_backend),
        }


def _redact(url: str) -> str:
    """Drop the password from a URL before it reaches output (conventions: no secrets)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def resultstore_available() -> tuple[bool, str]:
    """The backend is 'landed' once its Celery entry point class imports."""
    try:
        module = importlib.import_module("resultstore_backend.backend")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not landed yet"
        return False, f"resultstore_backend.backend does not import ({type(exc).__name__})"
    if not hasattr(module, "ResultStoreBackend"):
        return False, "resultstore_backend.backend has no ResultStoreBackend yet"
    return True, ""


#: the resultstore backend with its LISTEN/NOTIFY push waits turned off (URL parameter):
#: measured beside the default (on) where notifications could cost something
NOTIFY_OFF_KEY = "resultstore_off"


def notify_setting_available() -> bool:
    """Whether this backend version has the notifications on/off setting."""
    try:
        config = importlib.import_module("resultstore_backend.config")
    except Exception:  # noqa: BLE001 - not landed: no variant
        return False
    fields = getattr(config.StoreConfig, "__dataclass_fields__", {})
    return "notifications" in fields


def notify_off_entry(entry: BackendEntry) -> BackendEntry | None:
    """The notifications-off twin of the resultstore entry (same database and schema)."""
    if entry.key != "resultstore" or not entry.available or not notify_setting_available():
        return None
    url = entry.app.result_backend
    url += ("&" if "?" in url else "?") + "notify=false"
    return BackendEntry(
        key=NOTIFY_OFF_KEY, label="resultstore (notify=false)",
        app=AppSpec(entry.app.backend, url, entry.app.broker_url, "bench-rs-off"),
        sql=entry.sql, redis_db_url=None, available=True,
    )


def build_entries(services: BenchServices, wanted: tuple[str, ...]) -> list[BackendEntry]:
    broker = services.redis.db_url(BROKER_DB)
    entries: list[BackendEntry] = []
    if "stock" in wanted:
        entries.append(BackendEntry(
            key="stock",
            label="stock db+",
            app=AppSpec("stock", "db+" + services.sa_url(STOCK_DB), broker, "bench-stock"),
            sql=SqlStorage(services.dsn(STOCK_DB), services.admin_dsn(STOCK_DB), "public"),
            redis_db_url=None,
            available=True,
        ))
    if "redis" in wanted:
        url = services.redis.db_url(REDIS_BACKEND_DB)
        entries.append(BackendEntry(
            key="redis", label="redis", app=AppSpec("redis", url, broker, "bench-redis"),
            sql=None, redis_db_url=url, available=True,
        ))
    if "resultstore" in wanted:
        ok, why = resultstore_available()
        url = (
            "resultstore+" + services.sa_url(RESULTSTORE_DB) + f"?schema={RESULTSTORE_SCHEMA}"
        )
        entries.append(BackendEntry(
            key="resultstore", label="resultstore",
            app=AppSpec("resultstore", url, broker, "bench-rs"),
            sql=SqlStorage(services.dsn(RESULTSTORE_DB), services.admin_dsn(RESULTSTORE_DB),
                           RESULTSTORE_SCHEMA),
            redis_db_url=None, available=ok, unavailable_reason=why,
        ))
    return entries
