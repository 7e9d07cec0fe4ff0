"""Pre-rendered SQL of the backend's hot paths (pure: built from dialect + table names).

The hot path bypasses SQLAlchemy's ORM and statement compilation entirely: each
operation is one pre-rendered statement executed on a pooled DBAPI connection
in autocommit mode, which psycopg turns into a server-side prepared statement
after its first use. Every identifier is validated and quoted (TableNames).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .notify import PAYLOAD_TAG, channel_prefix, lock_key
from .schema import TableNames

READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
_READY_SQL = ", ".join(f"'{s}'" for s in READY_STATES)

#: task-table columns written by a store, in parameter order
TASK_COLUMNS = (
    "task_id", "status", "result", "date_done", "traceback", "children", "name", "args",
    "kwargs", "worker", "retries", "queue", "stamps", "updated_at", "group_id", "parent_id",
)
#: columns read back for a task meta, in order (after task_id in get_many)
META_COLUMNS = (
    "status", "result", "date_done", "traceback", "children", "name", "args", "kwargs",
    "worker", "retries", "queue", "stamps", "group_id", "parent_id",
)
#: added by schema version 2; a store still at version 1 is written without them and
#: read with NULL in their place (``statements(..., id_columns=False)``)
ID_COLUMNS = ("group_id", "parent_id")


@dataclass(frozen=True)
class Statements:
    dialect: str
    ph: str
    #: whether the statements write and read ID_COLUMNS (False: a version-1 store; the
    #: upsert then takes the first ``len(TASK_COLUMNS) - len(ID_COLUMNS)`` parameters)
    id_columns: bool
    #: the store's part of its notification channel names (notify.py)
    channel_prefix: str
    #: first key of the store's presence advisory locks (notify.lock_key)
    lock_key: int
    upsert_task: str
    #: PostgreSQL: the same upsert, plus ``pg_notify(channel, payload)`` of the row it
    #: really changed, in the same statement; the channel is the last parameter
    notify_upsert_task: str
    select_task: str
    select_many: str  # every state; same placeholder convention as select_many_ready
    select_many_ready: str  # PostgreSQL: one array parameter; SQLite: "{in}" placeholder
    task_exists: str
    delete_task: str
    upsert_group: str
    select_group: str
    delete_group: str
    reset_chord: str
    delete_chord_parts: str
    set_chord_size: str
    add_to_chord: str
    chord_part_return: str  # PostgreSQL only: insert part + count + claim in one statement
    insert_part: str
    bump_chord: str
    claim_chord: str
    select_chord: str
    select_parts: str

    def in_list(self, n: int) -> str:
        return ", ".join([self.ph] * n)


@lru_cache(maxsize=32)
def statements(dialect: str, names: TableNames, id_columns: bool = True) -> Statements:
    pg = dialect == "postgresql"
    ph = "%s" if pg else "?"
    task = names.qualified(names.task_table)
    group = names.qualified(names.group_table)
    chord = names.qualified(names.chord_table)
    parts = names.qualified(names.chord_part_table)
    written = TASK_COLUMNS if id_columns else tuple(
        c for c in TASK_COLUMNS if c not in ID_COLUMNS)
    cols = ", ".join(written)
    values = ", ".join([ph] * len(written))
    updates = ", ".join(f"{c} = excluded.{c}" for c in written if c != "task_id")
    meta_cols = ", ".join(c if id_columns or c not in ID_COLUMNS else f"NULL AS {c}"
                          for c in META_COLUMNS)
    if pg:
        task_seq = names.qualified(names.task_sequence).replace("'", "''")
        group_seq = names.qualified(names.group_sequence).replace("'", "''")
        insert_task = (
            f"INSERT INTO {task} AS t (id, {cols}) VALUES (nextval('{task_seq}'), {values})"
        )
        insert_group = (
            f"INSERT INTO {group} AS g (id, taskset_id, result, date_done) "
            f"VALUES (nextval('{group_seq}'), {ph}, {ph}, {ph})"
        )
        many_any = f"SELECT task_id, {meta_cols} FROM {task} WHERE task_id = ANY({ph})"
        many = f"{many_any} AND status IN ({_READY_SQL})"
    else:
        insert_task = f"INSERT INTO {task} AS t ({cols}) VALUES ({values})"
        insert_group = (
            f"INSERT INTO {group} AS g (taskset_id, result, date_done) VALUES ({ph}, {ph}, {ph})"
        )
        many_any = f"SELECT task_id, {meta_cols} FROM {task} WHERE task_id IN ({{in}})"
        many = f"{many_any} AND status IN ({_READY_SQL})"
    # A ready state is never replaced by a non-ready one, and nothing replaces
    # SUCCESS (a redelivered task must not overwrite its first result).
    upsert_task = (
        f"{insert_task} ON CONFLICT (task_id) DO UPDATE SET {updates} "
        f"WHERE t.status IS NULL OR (t.status <> 'SUCCESS' AND "
        f"(excluded.status IN ({_READY_SQL}) OR t.status NOT IN ({_READY_SQL})))"
    )
    # RETURNING yields a row only when the insert or the update really happened (not
    # when the WHERE above kept the old row), so only real changes notify, and only
    # when a session listens to the task's shard (the exclusive try of its presence
    # lock fails, see notify.py). The notification is sent at commit: with
    # autocommit, when this statement ends. Parameters after the upsert's own:
    # channel, lock key, shard.
    notify_upsert_task = (
        f"WITH u AS ({upsert_task} RETURNING t.task_id, t.status) "
        f"SELECT pg_notify({ph}, '{PAYLOAD_TAG}|' || u.status || '|' || u.task_id) FROM u "
        f"WHERE NOT pg_try_advisory_xact_lock({ph}::int4, {ph}::int4)"
    ) if pg else ""
    # The callback is claimed by the one statement that records the last
    # distinct part; the row lock serialises concurrent part returns.
    complete = "c.fired_at IS NULL AND c.size IS NOT NULL AND c.done + n.k >= c.size + c.extra"
    chord_part_return = (
        f"WITH ins AS (INSERT INTO {parts} (group_id, part, idx, task_id, status, result, "
        f"created_at) VALUES (%(gid)s, %(part)s, %(idx)s, %(tid)s, %(status)s, %(result)s, "
        f"%(now)s) ON CONFLICT DO NOTHING RETURNING 1), "
        f"n AS (SELECT count(*) AS k FROM ins) "
        f"UPDATE {chord} AS c SET "
        f"done = CASE WHEN c.fired_at IS NULL THEN c.done + n.k ELSE c.done END, "
        f"fired_at = CASE WHEN {complete} THEN %(now)s ELSE c.fired_at END, "
        f"claim = CASE WHEN {complete} THEN %(token)s ELSE c.claim END "
        f"FROM n WHERE c.group_id = %(gid)s "
        f"RETURNING c.size, c.extra, c.done, c.complex, "
        f"COALESCE(c.claim = %(token)s, false) AS claimed"
    ) if pg else ""
    return Statements(
        dialect=dialect,
        ph=ph,
        id_columns=id_columns,
        channel_prefix=channel_prefix(names),
        lock_key=lock_key(names),
        upsert_task=upsert_task,
        notify_upsert_task=notify_upsert_task,
        select_task=f"SELECT {meta_cols} FROM {task} WHERE task_id = {ph}",
        select_many=many_any,
        select_many_ready=many,
        task_exists=f"SELECT 1 FROM {task} WHERE task_id = {ph}",
        delete_task=f"DELETE FROM {task} WHERE task_id = {ph}",
        upsert_group=(
            f"{insert_group} ON CONFLICT (taskset_id) DO UPDATE SET "
            f"result = excluded.result, date_done = excluded.date_done"
        ),
        select_group=f"SELECT result, date_done FROM {group} WHERE taskset_id = {ph}",
        delete_group=f"DELETE FROM {group} WHERE taskset_id = {ph}",
        reset_chord=(
            f"INSERT INTO {chord} (group_id, size, extra, done, complex, fired_at, created_at) "
            f"VALUES ({ph}, NULL, 0, 0, {ph}, NULL, {ph}) ON CONFLICT (group_id) DO UPDATE SET "
            f"size = NULL, extra = 0, done = 0, complex = excluded.complex, fired_at = NULL, "
            f"claim = NULL, "
            f"created_at = excluded.created_at"
        ),
        delete_chord_parts=f"DELETE FROM {parts} WHERE group_id = {ph}",
        set_chord_size=(
            f"INSERT INTO {chord} (group_id, size, extra, done, complex, fired_at, created_at) "
            f"VALUES ({ph}, {ph}, 0, 0, {'false' if pg else '0'}, NULL, {ph}) "
            f"ON CONFLICT (group_id) DO UPDATE SET size = excluded.size"
        ),
        add_to_chord=f"UPDATE {chord} SET extra = extra + 1 WHERE group_id = {ph}",
        chord_part_return=chord_part_return,
        insert_part=(
            f"INSERT INTO {parts} (group_id, part, idx, task_id, status, result, created_at) "
            f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT DO NOTHING"
        ),
        bump_chord=(
            f"UPDATE {chord} SET done = done + {ph} WHERE group_id = {ph} AND fired_at IS NULL"
        ),
        claim_chord=(
            f"UPDATE {chord} SET fired_at = {ph}, claim = {ph} WHERE group_id = {ph} "
            f"AND fired_at IS NULL "
            f"AND size IS NOT NULL AND done >= size + extra"
        ),
        select_chord=f"SELECT size, extra, done, complex FROM {chord} WHERE group_id = {ph}",
        select_parts=(
            f"SELECT task_id, status, result FROM {parts} WHERE group_id = {ph} "
            f"ORDER BY idx ASC NULLS LAST, part"
        ),
    )
