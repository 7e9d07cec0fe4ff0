"""The binding Secret: every key of docs/CONTRACTS.md, rendered by the backend's own config module.

The operator never formats connection strings itself: `render_binding` (resultstore_backend)
is the single writer and `read_binding_dir` its reader, so the two cannot disagree. This
module only maps the typed spec onto a Binding and wraps the result in a Secret manifest.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from resultstore_backend.config import (
    KEY_PASSWORD,
    KEY_USERNAME,
    Binding,
    CelerySettings,
    EngineSettings,
    PoolerSettings,
    render_binding,
)

from ..api import ANNOTATION_DATA_HASH, ANNOTATION_ROLE
from ..api import BINDING_SECRET_TYPE as SECRET_TYPE
from ..spec import ResultStoreSpec
from .names import labels, secret_name


def engine_settings(spec: ResultStoreSpec) -> EngineSettings:
    eng = spec.engine
    return EngineSettings(
        pool_size=eng.pool_size,
        max_overflow=eng.max_overflow,
        pool_timeout=float(eng.pool_timeout),
        pool_recycle=int(eng.pool_recycle),
        pool_pre_ping=eng.pool_pre_ping,
        connect_timeout=max(1, int(eng.connect_timeout)),
        statement_timeout_ms=(None if eng.statement_timeout is None
                              else max(1, int(round(eng.statement_timeout * 1000)))),
        application_name=eng.application_name,
    )


def celery_settings(spec: ResultStoreSpec) -> CelerySettings:
    return CelerySettings(
        schema=spec.schema,
        task_table=spec.tables.task_table,
        group_table=spec.tables.group_table,
        extended=spec.extended_results,
        notifications=spec.notifications,
        expires=int(spec.retention.expires) if spec.retention.expires > 0 else None,
    )


def pooler_settings(spec: ResultStoreSpec) -> PoolerSettings | None:
    """spec.database.pooler as the Secret's pooler-* keys and pooled-uri (render_binding).

    The stock `result_backend` key keeps naming the server directly: a stock
    `db+postgresql+psycopg://` URL cannot switch psycopg's prepared statements off (a
    `prepare_threshold` query option reaches psycopg as a string and breaks every query),
    and PgBouncer refuses the `options` startup parameter that sets its search path. Stock
    clients that want the pooler build their URL from `pooled-uri` (docs/install.md).
    """
    pooler = spec.database.pooler
    if pooler is None:
        return None
    return PoolerSettings(host=pooler.host, port=pooler.port, mode=pooler.mode,
                          prepared_statements=pooler.prepared_statements)


def binding_for(spec: ResultStoreSpec, username: str, password: str,
                ca_cert: str | None = None) -> Binding:
    db = spec.database
    return Binding(
        host=db.host,
        port=db.port,
        database=db.name,
        username=username,
        password=password,
        sslmode=db.ssl_mode,
        engine=engine_settings(spec),
        celery=celery_settings(spec),
        ca_cert=ca_cert,
        pooler=pooler_settings(spec),
    )


def secret_values(spec: ResultStoreSpec, username: str, password: str,
                  ca_cert: str | None = None) -> dict[str, str]:
    """Every Secret key, rendered by the backend's config module (the single writer)."""
    return render_binding(binding_for(spec, username, password, ca_cert))


def encode_data(values: Mapping[str, str]) -> dict[str, str]:
    """Secret `data` (base64) from plain strings; exact, so comparisons need no decoding."""
    return {k: base64.b64encode(v.encode()).decode("ascii") for k, v in sorted(values.items())}


def decode_data(data: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (data or {}).items():
        try:
            out[key] = base64.b64decode(value).decode()
        except (ValueError, UnicodeDecodeError):
            out[key] = ""
    return out


def data_hash(data: Mapping[str, str]) -> str:
    """Digest of the encoded data: detects tampering without keeping the password elsewhere.

    It is stored as an annotation on the Secret itself, so it reveals nothing to anyone who
    could not already read the Secret.
    """
    canonical = json.dumps(dict(sorted(data.items())), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def secret_manifest(store: str, namespace: str, owner: Mapping[str, Any],
                    values: Mapping[str, str]) -> dict[str, Any]:
    data = encode_data(values)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": secret_name(store),
            "namespace": namespace,
            "labels": labels(store, "binding"),
            "annotations": {
                ANNOTATION_DATA_HASH: data_hash(data),
                ANNOTATION_ROLE: values.get(KEY_USERNAME, ""),
            },
            "ownerReferences": [dict(owner)],
        },
        "data": data,
    }


def secret_matches(actual: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """True when the live Secret already is what we would write (data, type, ownership)."""
    if not actual:
        return False
    if actual.get("type") != desired["type"]:
        return False
    if dict(actual.get("data") or {}) != desired["data"]:
        return False
    meta = actual.get("metadata") or {}
    live_labels = meta.get("labels") or {}
    if any(live_labels.get(k) != v for k, v in desired["metadata"]["labels"].items()):
        return False
    live_ann = meta.get("annotations") or {}
    if any(live_ann.get(k) != v for k, v in desired["metadata"]["annotations"].items()):
        return False
    owner_uids = {o.get("uid") for o in meta.get("ownerReferences") or []}
    return desired["metadata"]["ownerReferences"][0]["uid"] in owner_uids


def trusted_password(actual: Mapping[str, Any] | None, role: str) -> str | None:
    """The password in the live Secret if we wrote it for `role` and nobody changed it since.

    None means: the Secret is missing, belongs to another role, or was edited; the caller
    then verifies the password by logging in, or sets a fresh one.
    """
    if not actual:
        return None
    values = decode_data(actual.get("data"))
    if values.get(KEY_USERNAME) != role or not values.get(KEY_PASSWORD):
        return None
    ann = (actual.get("metadata") or {}).get("annotations") or {}
    if ann.get(ANNOTATION_DATA_HASH) != data_hash(dict(actual.get("data") or {})):
        return None
    return values[KEY_PASSWORD]


def candidate_password(actual: Mapping[str, Any] | None, role: str) -> str | None:
    """The password in the live Secret for `role`, trusted or not (to be verified)."""
    if not actual:
        return None
    values = decode_data(actual.get("data"))
    if values.get(KEY_USERNAME) != role:
        return None
    return values.get(KEY_PASSWORD) or None
