"""Kopf handlers: read the ResultStore, call the builders, apply; nothing else.

One idempotent `reconcile` converges everything a store needs (schema, roles, grants,
Secret, CronJob, rotation, status). Kopf calls it on create/resume/spec change/rotate
request; a per-store timer calls it again for drift checks, rotation progress (draining)
and retries with exponential backoff. A per-store asyncio lock serialises these callers, and
each reconcile re-reads the object from the API, so a decision is never taken on a stale
status (rotation state lives there and must be exact after a crash).

Blocking I/O (PostgreSQL, the Kubernetes client) runs in a bounded thread pool; the event
loop only schedules. Errors become conditions with distinct reasons and Warning Events, never
carrying a password; an invalid spec is a PermanentError until the spec changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf

from resultstore_backend.schema import TableNames

from . import database as dbio
from . import metrics
from .builders import conditions as c
from .builders import marker as m
from .builders import reasons as r
from .builders import rotation as rot
from .builders.cronjob import CleanupPolicy, check_cleanup_job, cronjob_manifest
from .builders.names import cronjob_name, role_base, role_names, secret_name
from .builders.ownership import (
    ADMIN_CREDENTIALS_LABEL,
    SECRET_WATCH_SELECTOR,
    admin_secret_opted_in,
    certificates_only,
    foreign_owner,
    owner_reference,
    same_object,
)
from .builders.scram import generate_password, scram_verifier
from .builders.secret import (
    candidate_password,
    decode_data,
    secret_manifest,
    secret_matches,
    secret_values,
    trusted_password,
)
from .kube import Kube, KubeError, NotOwnedError, new_api_client
from .settings import OperatorSettings
from .spec import (
    ANNOTATION_ROTATE,
    ANNOTATION_SKIP_DB_CLEANUP,
    GROUP,
    PLURAL,
    VERSION,
    ResultStoreSpec,
    SpecError,
    parse_spec,
)

log = logging.getLogger("resultstore.operator")

FINALIZER = f"{GROUP}/finalizer"
T = TypeVar("T")


class StoreError(Exception):
    """A reconcile failure with a reason for the conditions (message is password-free)."""

    def __init__(self, reason: str, message: str,
                 affects: tuple[str, ...] = (r.SCHEMA_READY, r.CREDENTIALS_READY)) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.affects = affects


@dataclass
class ObjectState:
    """In-memory bookkeeping per store (lost on restart, which only costs one extra check)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failures: int = 0
    next_attempt: float = 0.0
    last_full: float = 0.0
    invalid_generation: int | None = None
    # A change handler (create/resume/spec/rotate) has run: until then the timer leaves the
    # store alone, so a new store is attempted once (by create), not by a racing tick too.
    handled: bool = False


def _now() -> datetime:
    return datetime.now(UTC)


def _admin_hint(reason: str) -> str:
    return {
        r.ADMIN_SECRET_MISSING: "create the Secret named by spec.database.adminSecretRef",
        r.ADMIN_AUTH_FAILED: "check the admin Secret's username and password",
        r.DATABASE_UNREACHABLE: "check spec.database.host/port and the network",
        r.ADMIN_CANNOT_CREATE_ROLE: "grant CREATEROLE to the admin role",
        r.INSUFFICIENT_PRIVILEGE: "grant the admin role CREATE on the database",
        r.ADMIN_SECRET_NOT_OPTED_IN: f"label the Secret {ADMIN_CREDENTIALS_LABEL}=true if it "
                                     f"is meant for the operator",
    }.get(reason, "")


class _Run:
    """One reconcile's view of the object plus the status and events it produces."""

    def __init__(self, kube: Kube, obj: Mapping[str, Any], now: datetime) -> None:
        self.kube = kube
        self.obj = obj
        self.now = now
        meta = obj.get("metadata") or {}
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.uid: str = meta["uid"]
        self.generation: int | None = meta.get("generation")
        self.annotations: Mapping[str, str] = meta.get("annotations") or {}
        self.status: Mapping[str, Any] = obj.get("status") or {}
        self.updates: list[c.Condition] = []
        self.patch: dict[str, Any] = {}
        self.owner = owner_reference(self.name, self.uid)

    def cond(self, type_: str, ok: bool | str, reason: str, message: str) -> None:
        self.updates.append(c.condition(type_, ok, reason, message, self.generation, self.now))

    def event(self, type_: str, reason: str, message: str) -> None:
        log.log(logging.WARNING if type_ == "Warning" else logging.INFO,
                "%s/%s: %s: %s", self.namespace, self.name, reason, message)
        self.kube.post_event(self.obj, type_, reason, message)

    def failure_changed(self, reason: str, message: str, type_: str) -> bool:
        old = c.get_condition(self.status.get("conditions"), type_)
        return old is None or old.get("reason") != reason or old.get("message") != message

    def persist_credentials(self, state: rot.CredentialState) -> None:
        """Write rotation state right away: the next step must survive a crash."""
        self.kube.patch_status(self.namespace, self.name, {"credentials": state.to_status()})
        self.patch["credentials"] = state.to_status()

    def finish(self, rotation_phase: str | None) -> None:
        merged = c.merge_conditions(self.status.get("conditions"), self.updates)
        ready = c.ready_condition(merged, self.generation, self.now)
        merged = c.merge_conditions(merged, [ready])
        old_ready = c.get_condition(self.status.get("conditions"), r.READY)
        new_ready = c.get_condition(merged, r.READY) or ready
        self.patch.update({
            "conditions": merged,
            "phase": c.phase_for(merged, rotation_phase),
            "observedGeneration": self.generation,
        })
        self.kube.patch_status(self.namespace, self.name, self.patch)
        if old_ready is None or old_ready.get("status") != new_ready.get("status"):
            if new_ready.get("status") == "True":
                self.event("Normal", r.READY_REASON, "result store is ready")
            elif old_ready is not None and old_ready.get("status") == "True":
                self.event("Warning", str(new_ready.get("reason")),
                           f"result store is no longer ready: {new_ready.get('message')}")


class Controller:
    """Owns the per-store state, the thread pool and the API client of one operator."""

    def __init__(self, settings: OperatorSettings, kube: Kube | None = None) -> None:
        self.settings = settings
        self._kube = kube
        self.executor = ThreadPoolExecutor(max_workers=settings.workers,
                                           thread_name_prefix="reconcile")
        self.states: dict[str, ObjectState] = {}

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube(new_api_client())
        return self._kube

    def state_for(self, uid: str) -> ObjectState:
        state = self.states.get(uid)
        if state is None:
            state = self.states[uid] = ObjectState()
        return state

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn, *args)

    # --- async entry points (called by Kopf) ------------------------------------------------

    async def reconcile(self, body: Mapping[str, Any], why: str, handler: str) -> None:
        """Change handlers: converge now; an invalid spec fails permanently (until edited).

        `handler` is the Kopf handler id, the `handler` label of the reconcile metrics."""
        meta = body.get("metadata") or {}
        state = self.state_for(meta["uid"])
        async with state.lock:
            state.handled = True
            error = await self._reconcile_locked(state, meta["namespace"], meta["name"], why,
                                                 handler)
        if error is not None:
            raise kopf.PermanentError(f"invalid spec: {error}")

    async def _reconcile_locked(self, state: ObjectState, namespace: str, name: str,
                                why: str, handler: str) -> SpecError | None:
        """Run one reconcile; transient failures schedule a retry with backoff (the timer
        performs it), so there is exactly one retry mechanism."""
        started = time.monotonic()
        try:
            await self._in_thread(self.reconcile_sync, namespace, name, why)
        except Exception as exc:
            metrics.record_reconcile(handler, exc, time.monotonic() - started)
            return self._reconcile_failed(state, namespace, name, exc)
        metrics.record_reconcile(handler, None, time.monotonic() - started)
        state.failures = 0
        state.invalid_generation = None
        state.last_full = time.monotonic()
        log.debug("%s/%s reconciled (%s) in %.3fs", namespace, name, why,
                  time.monotonic() - started)
        return None

    def _reconcile_failed(self, state: ObjectState, namespace: str, name: str,
                          exc: Exception) -> SpecError | None:
        """Book-keeping after a failed reconcile: an invalid spec is returned (the caller
        fails permanently); anything else schedules a retry with backoff."""
        if isinstance(exc, SpecError):
            state.failures = 0
            return exc
        state.failures += 1
        delay = self.settings.backoff(state.failures)
        state.next_attempt = time.monotonic() + delay
        if isinstance(exc, StoreError | KubeError | dbio.DatabaseError):
            log.warning("%s/%s: reconcile failed (%s: %s), retrying in %.0fs", namespace,
                        name, exc.__class__.__name__, getattr(exc, "reason", "-"), delay)
        else:
            log.error("%s/%s: unexpected reconcile error, retrying in %.0fs", namespace,
                      name, delay, exc_info=exc)
        return None

    async def tick(self, body: Mapping[str, Any]) -> None:
        """The per-store timer: decide cheaply from the cached body whether work is due."""
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return
        state = self.state_for(meta["uid"])
        if state.lock.locked() or not state.handled:
            return
        if state.invalid_generation is not None and \
                state.invalid_generation == meta.get("generation"):
            return
        mono = time.monotonic()
        if state.failures:
            due = mono >= state.next_attempt
        else:
            due = self._work_due(body, state, mono)
        if due:
            async with state.lock:
                await self._reconcile_locked(state, meta["namespace"], meta["name"], "timer",
                                             "timer")

    def _work_due(self, body: Mapping[str, Any], state: ObjectState, mono: float) -> bool:
        if mono - state.last_full >= self.settings.drift_interval:
            return True
        status = body.get("status") or {}
        creds = rot.CredentialState.from_status(status)
        if creds is None:
            return True
        if creds.phase != rot.STABLE:
            return True
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        request = annotations.get(ANNOTATION_ROTATE)
        if request and request != creds.handled_rotate_request:
            return True
        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError:
            return False
        due = rot.next_rotation_due(creds, spec.credentials)
        return due is not None and _now() >= due

    async def finalize(self, body: Mapping[str, Any], retry: int) -> None:
        meta = body.get("metadata") or {}
        state = self.state_for(meta["uid"])
        async with state.lock:
            started = time.monotonic()
            try:
                await self._in_thread(self.finalize_sync, dict(body))
            except Exception as exc:
                metrics.record_reconcile("finalize", exc, time.monotonic() - started)
                if not isinstance(exc, StoreError | KubeError | dbio.DatabaseError):
                    raise
                raise kopf.TemporaryError(
                    f"database cleanup failed ({getattr(exc, 'reason', 'error')}); set the "
                    f"annotation {ANNOTATION_SKIP_DB_CLEANUP}=\"true\" to delete without it",
                    delay=self.settings.backoff(retry + 1)) from None
            metrics.record_reconcile("finalize", None, time.monotonic() - started)
        self.states.pop(meta["uid"], None)

    # --- synchronous work (runs in the thread pool) -----------------------------------------

    def reconcile_sync(self, namespace: str, name: str, why: str) -> None:
        obj = self.kube.read_store(namespace, name)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            return
        run = _Run(self.kube, obj, _now())
        run.patch["secretName"] = secret_name(name)
        run.patch["cronJobName"] = cronjob_name(name)
        try:
            spec = parse_spec(obj.get("spec") or {})
            # Policy before anything is touched: a refused cleanup pod means no CronJob,
            # no schema, no role (CleanupJobRefused is a SpecError: permanent until edited).
            check_cleanup_job(spec.cleanup_job, self.cleanup_policy)
        except SpecError as exc:
            self._report_invalid(run, exc)
            self.state_for(run.uid).invalid_generation = run.generation
            raise
        creds = rot.CredentialState.from_status(run.status)
        try:
            self._check_secret_owned(run)
            creds = self._converge_database(run, spec, creds)
            # The CronJob last: its pods mount `<store>-resultstore`, so it is created or
            # changed only once that Secret is ours and current. A refused store (foreign
            # Secret, ownership conflict, admin Secret not opted in...) gets none, and a
            # failing database leaves an existing one as it was.
            self._ensure_cronjob(run, spec)
        except (StoreError, KubeError, dbio.DatabaseError) as exc:
            self._report_failure(run, exc)
            run.finish(creds.phase if creds else None)
            raise
        run.finish(creds.phase if creds else None)

    def _report_invalid(self, run: _Run, exc: SpecError) -> None:
        message = str(exc)
        reason = str(getattr(exc, "reason", r.INVALID_SPEC))
        if run.failure_changed(reason, message, r.SCHEMA_READY):
            run.event("Warning", reason, message)
        for type_ in r.COMPONENT_CONDITIONS:
            run.cond(type_, False, reason, message)
        run.finish(None)

    def _report_failure(self, run: _Run, exc: Exception) -> None:
        if isinstance(exc, StoreError | dbio.DatabaseError):
            reason, message = exc.reason, exc.message
            affects = exc.affects if isinstance(exc, StoreError) else (
                r.SCHEMA_READY, r.CREDENTIALS_READY)
        elif isinstance(exc, NotOwnedError):  # replaced by a foreign Secret mid-reconcile
            reason, message, affects = r.SECRET_NOT_OWNED, str(exc), (r.CREDENTIALS_READY,)
        else:
            reason, message, affects = r.KUBERNETES_ERROR, str(exc), (r.CREDENTIALS_READY,)
        hint = _admin_hint(reason)
        full = f"{message} ({hint})" if hint else message
        if run.failure_changed(reason, full, affects[0]):
            run.event("Warning", reason, full)
        for type_ in affects:
            run.cond(type_, False, reason, full)
        if reason in (r.DATABASE_UNREACHABLE, r.ADMIN_AUTH_FAILED):
            run.patch["database"] = {"reachable": False, "lastCheckTime": c.timestamp(run.now)}

    # --- pieces of a reconcile ------------------------------------------------------------------

    @property
    def cleanup_policy(self) -> CleanupPolicy:
        s = self.settings
        return CleanupPolicy(s.cleanup_image, s.cleanup_image_pull_policy,
                             s.cleanup_image_allowlist, s.cleanup_allow_service_account)

    def _check_secret_owned(self, run: _Run) -> None:
        """A Secret of our name that this store does not control stops the reconcile before
        the database or the CronJob is touched (no password is set for a Secret we may not
        write, and no cleanup pod mounts someone else's Secret)."""
        # Metadata only: a foreign Secret's data is none of the operator's business.
        head = self.kube.read_secret_metadata(run.namespace, secret_name(run.name))
        problem = foreign_owner({**head, "kind": "Secret"}, run.uid) if head is not None \
            else None
        if problem is None:
            return
        schema = c.get_condition(run.status.get("conditions"), r.SCHEMA_READY)
        affects = ((r.CREDENTIALS_READY,) if schema and schema.get("status") == "True"
                   else (r.SCHEMA_READY, r.CREDENTIALS_READY))
        raise StoreError(r.SECRET_NOT_OWNED, problem, affects)

    def _ensure_cronjob(self, run: _Run, spec: ResultStoreSpec) -> None:
        desired = cronjob_manifest(run.name, run.namespace, run.owner, spec,
                                   self.settings.cleanup_image,
                                   self.settings.cleanup_image_pull_policy)
        try:
            action, _live = self.kube.apply_cronjob(desired)
        except NotOwnedError as exc:
            run.cond(r.CLEANUP_SCHEDULED, False, r.CRONJOB_NOT_OWNED, str(exc))
            if run.failure_changed(r.CRONJOB_NOT_OWNED, str(exc), r.CLEANUP_SCHEDULED):
                run.event("Warning", r.CRONJOB_NOT_OWNED, str(exc))
            return
        except KubeError as exc:
            run.cond(r.CLEANUP_SCHEDULED, False, r.CRONJOB_FAILED, str(exc))
            if run.failure_changed(r.CRONJOB_FAILED, str(exc), r.CLEANUP_SCHEDULED):
                run.event("Warning", r.CRONJOB_FAILED, str(exc))
            return
        existed_before = bool(run.status.get("cronJobName")) and c.get_condition(
            run.status.get("conditions"), r.CLEANUP_SCHEDULED) is not None
        if action == "created":
            if existed_before:
                run.event("Warning", r.CRONJOB_CREATED,
                          f"CronJob {desired['metadata']['name']} was missing; recreated")
            else:
                run.event("Normal", r.CRONJOB_CREATED,
                          f"created CronJob {desired['metadata']['name']} "
                          f"({spec.retention.schedule})")
        elif action == "updated":
            run.event("Normal", r.CRONJOB_UPDATED,
                      f"CronJob {desired['metadata']['name']} brought to the spec "
                      f"(schedule {spec.retention.schedule}, batch size "
                      f"{spec.retention.batch_size})")
        run.cond(r.CLEANUP_SCHEDULED, True, r.CRONJOB_READY,
                 f"cleanup runs on schedule {spec.retention.schedule!r}")

    def _read_admin(self, run: _Run, spec: ResultStoreSpec) -> dbio.Credentials:
        """The admin credentials, from a Secret that opted in; its data is not even fetched
        before the label is seen on its metadata (PartialObjectMetadata)."""
        ref = spec.database.admin_secret
        missing = StoreError(r.ADMIN_SECRET_MISSING,
                             f"admin Secret {ref.name!r} not found in namespace "
                             f"{run.namespace!r}")
        not_opted_in = StoreError(
            r.ADMIN_SECRET_NOT_OPTED_IN,
            f"Secret {ref.name!r} is not labelled {ADMIN_CREDENTIALS_LABEL}=\"true\"; the "
            f"operator reads no Secret that has not opted in as admin credentials")
        head = self.kube.read_secret_metadata(run.namespace, ref.name)
        if head is None:
            raise missing
        if not admin_secret_opted_in(head):
            raise not_opted_in
        secret = self.kube.read_secret(run.namespace, ref.name)
        if secret is None:
            raise missing
        if not admin_secret_opted_in(secret) or not same_object(head, secret):
            raise not_opted_in  # relabelled or replaced in between: its data is dropped
        values = decode_data(secret.get("data"))
        username = values.get(ref.username_key, "")
        password = values.get(ref.password_key, "")
        if not username or not password:
            raise StoreError(r.ADMIN_SECRET_INVALID,
                             f"admin Secret {ref.name!r} lacks the keys "
                             f"{ref.username_key!r} and {ref.password_key!r}")
        return dbio.Credentials(username, password)

    def _read_ca(self, run: _Run, spec: ResultStoreSpec) -> str | None:
        ref = spec.database.ca_secret
        if ref is None:
            return None
        secret = self.kube.read_secret(run.namespace, ref.name)
        values = decode_data((secret or {}).get("data"))
        if not values.get(ref.key):
            raise StoreError(r.CA_SECRET_MISSING,
                             f"CA Secret {ref.name!r} with key {ref.key!r} not found")
        # Only certificates pass: the CA is copied into the binding Secret, so a key naming
        # some other value (a private key, a password) must not travel that way.
        pem = certificates_only(values[ref.key])
        if pem is None:
            raise StoreError(r.CA_SECRET_INVALID,
                             f"key {ref.key!r} of Secret {ref.name!r} holds no PEM "
                             f"certificate; its content is not used")
        return pem

    def _target(self, spec: ResultStoreSpec, ca: str | None,
                status: Mapping[str, Any] | None = None) -> dbio.Target:
        """The admin connection's target; TLS is pinned once an admin session used it
        (`status.database.tls`), so `prefer` cannot be downgraded afterwards."""
        db = spec.database
        pinned = ((status or {}).get("database") or {}).get("tls") is True
        return dbio.Target(db.host, db.port, db.name, db.ssl_mode, ca,
                           self.settings.db_connect_timeout, tls_pinned=pinned)

    def _assess(self, run: _Run, spec: ResultStoreSpec, db: dbio.AdminSession,
                target: dbio.Target, names: TableNames, creds: rot.CredentialState,
                owner: m.Owner) -> m.Assessment:
        """Ownership before anything is touched: refuse (StoreError) or say what to mark.

        A store provisioned before markers existed sees its own objects unmarked; they are
        claimed only with proof of authorship (`_proves_authorship`), never by name alone.
        """
        inventory = db.inventory(spec.schema, role_names(creds.role_base))
        tables, sequences = names.all_tables(), names.all_sequences()
        result = m.assess(owner, inventory, tables, sequences, spec.schema_policy)
        conflict = result.conflict
        if conflict is not None and conflict.legacy_fixable and \
                self._proves_authorship(run, target, creds):
            result = m.assess(owner, inventory, tables, sequences, spec.schema_policy,
                              legacy=True)
            conflict = result.conflict
        if conflict is not None:
            reason = (r.SCHEMA_NOT_EMPTY if conflict.kind == m.CONFLICT_FOREIGN_SCHEMA
                      else r.OWNERSHIP_CONFLICT)
            raise StoreError(reason, conflict.message)
        return result

    def _proves_authorship(self, run: _Run, target: dbio.Target,
                           creds: rot.CredentialState) -> bool:
        """This store provisioned its objects before markers existed (operator upgrade).

        All of: its status records a migrated schema and its roles; its Secret is owned by
        this very object (ownerReference uid) and unmodified (our data hash); and that
        Secret's password logs in as the recorded active role. Two legacy stores that
        shared a role cannot both pass: only one Secret holds the role's current password.
        """
        if run.status.get("schemaVersion") is None or not run.status.get("credentials"):
            return False
        live = self.kube.read_secret(run.namespace, secret_name(run.name))
        refs = ((live or {}).get("metadata") or {}).get("ownerReferences") or []
        if not any(ref.get("uid") == run.uid for ref in refs):
            return False
        password = trusted_password(live, creds.active_role)
        if password is None:
            return False
        return dbio.check_login(target, dbio.Credentials(creds.active_role, password))

    def _converge_database(self, run: _Run, spec: ResultStoreSpec,
                           creds: rot.CredentialState | None) -> rot.CredentialState:
        admin = self._read_admin(run, spec)
        ca = self._read_ca(run, spec)
        target = self._target(spec, ca, run.status)
        names = TableNames(spec.schema, spec.tables.task_table, spec.tables.group_table)
        owner = m.Owner(run.namespace, run.name, run.uid)
        new_store = creds is None
        if creds is None:
            # A recorded base is never recomputed: stores from before role names carried
            # the store's identity keep theirs (names.legacy_role_base).
            creds = rot.initial_state(role_base(run.namespace, run.name, run.uid), run.now,
                                      run.annotations.get(ANNOTATION_ROTATE))
            run.persist_credentials(creds)
        with dbio.AdminSession(target, admin, owner) as db:
            was_unreachable = (run.status.get("database") or {}).get("reachable") is False
            run.patch["database"] = {"reachable": True, "lastCheckTime": c.timestamp(run.now),
                                     "tls": db.tls_in_use}
            if was_unreachable:
                run.event("Normal", r.DATABASE_REACHABLE, "database is reachable again")
            db.check_capabilities(spec.schema)
            assessment = self._assess(run, spec, db, target, names, creds, owner)
            before, version = db.migrate(names, assessment)
            if assessment.to_mark:
                run.event("Normal", r.OBJECTS_MARKED,
                          "ownership marker written on " + ", ".join(
                              f"{kind.lower()} {name}" for kind, name in assessment.to_mark))
            if before != version:
                run.event("Normal", r.SCHEMA_MIGRATED,
                          f"schema {spec.schema} migrated from version {before} to {version}")
            run.patch["schemaVersion"] = version
            run.cond(r.SCHEMA_READY, True, r.SCHEMA_MIGRATED,
                     f"schema {spec.schema} at version {version}")
            creds = self._converge_credentials(run, spec, db, target, names, creds, ca,
                                               new_store, assessment.schema_ours)
            last = db.last_cleanup_run(names)
        if last is not None:
            run.patch["lastCleanup"] = {
                "startedAt": c.timestamp(last.started_at),
                "finishedAt": c.timestamp(last.started_at) if last.duration_seconds < 1
                else c.timestamp(datetime.fromtimestamp(
                    last.started_at.timestamp() + last.duration_seconds, UTC)),
                "succeeded": last.success,
                "deleted": last.rows_deleted,
                "message": (f"deleted {last.rows_deleted} rows in "
                            f"{last.duration_seconds:.1f}s") if last.success
                else (last.error or "failed")[:1024],
            }
        return creds

    def _converge_credentials(self, run: _Run, spec: ResultStoreSpec, db: dbio.AdminSession,
                              target: dbio.Target, names: TableNames,
                              creds: rot.CredentialState, ca: str | None,
                              new_store: bool, schema_ours: bool = True
                              ) -> rot.CredentialState:
        schema = spec.schema
        managed = role_names(creds.role_base)
        secret_ref = secret_name(run.name)
        live = self.kube.read_secret(run.namespace, secret_ref)
        request = run.annotations.get(ANNOTATION_ROTATE)

        # Step 1: start a rotation when requested or due.
        why = rot.rotation_request(creds, spec.credentials, request, run.now)
        if why is not None:
            creds = rot.start_rotation(creds, run.now, request)
            run.persist_credentials(creds)
            trigger = "requested" if why == rot.REQUEST_ANNOTATION else "scheduled"
            metrics.record_rotation_started(trigger)
            run.event("Normal", r.ROTATION_STARTED,
                      f"rotating credentials ({trigger}): next role {creds.next_role}")

        # Step 2: prepare the next role and switch the Secret to it.
        if creds.phase == rot.ROTATING and creds.next_role:
            next_role = creds.next_role
            password = candidate_password(live, next_role)
            if password is not None and db.role_state(next_role)[0] and dbio.check_login(
                    target, dbio.Credentials(next_role, password)):
                verifier = None  # resumed after the Secret was written: keep that password
            else:
                password = generate_password()
                verifier = scram_verifier(password)
            db.ensure_role(next_role, verifier, schema)
            db.sync_privileges(names, [creds.active_role, next_role], managed, schema_ours)
            run.cond(r.CREDENTIALS_ROTATING, True, r.NEXT_ROLE_READY,
                     f"role {next_role} prepared")
            run.event("Normal", r.NEXT_ROLE_READY,
                      f"role {next_role} prepared with a new password")
            desired = secret_manifest(run.name, run.namespace, run.owner,
                                      secret_values(spec, next_role, password, ca))
            if not secret_matches(live, desired):
                self.kube.put_secret(desired, live)
            live = desired
            creds = rot.secret_switched(creds, run.now, spec.credentials.drain_timeout)
            run.persist_credentials(creds)
            run.event("Normal", r.SECRET_SWITCHED,
                      f"Secret {secret_ref} now uses role {next_role}; draining "
                      f"{creds.previous_role}")

        # Step 3: the active role and the Secret match the spec (also the drift check).
        active = creds.active_role
        exists, _ = db.role_state(active)
        password = trusted_password(live, active)
        reset_reason = ""
        generated = False
        if password is None:
            candidate = candidate_password(live, active)
            if candidate and exists and dbio.check_login(
                    target, dbio.Credentials(active, candidate)):
                password = candidate
            else:
                password, generated = generate_password(), True
                if live is None and not new_store:
                    reset_reason = "the Secret was deleted"
                elif live is not None:
                    reset_reason = "the Secret's password was changed"
        # A known-good password is kept (workers hold it); a new one, or a role that has to
        # be (re)created, gets the verifier.
        verifier = scram_verifier(password) if (generated or not exists) else None
        created = db.ensure_role(active, verifier, schema)
        if created:
            run.event("Normal", r.ROLE_CREATED, f"login role {active} created")
        granted = [active]
        if creds.phase == rot.DRAINING and creds.previous_role:
            granted.append(creds.previous_role)
        changes = db.sync_privileges(names, granted, managed, schema_ours)
        if changes and not created and not new_store:
            run.event("Warning", r.PRIVILEGES_RESTORED,
                      "privileges drifted and were restored: " + "; ".join(changes)[:900])
        desired = secret_manifest(run.name, run.namespace, run.owner,
                                  secret_values(spec, active, password, ca))
        if not secret_matches(live, desired):
            action = self.kube.put_secret(desired, live)
            if reset_reason:
                run.event("Warning", r.PASSWORD_RESET,
                          f"{reset_reason}; role {active} got a new password and Secret "
                          f"{secret_ref} was restored")
            elif action == "created":
                run.event("Normal", r.SECRET_CREATED,
                          f"created Secret {secret_ref} for role {active}")
            else:
                old = decode_data((live or {}).get("data"))
                new = decode_data(desired["data"])
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                tampered = [k for k in changed
                            if k not in ("engine_options.json", "celery.json")]
                kind = "Warning" if tampered else "Normal"
                reason = r.SECRET_RESTORED if tampered else r.SECRET_UPDATED
                run.event(kind, reason,
                          f"Secret {secret_ref} updated (keys: {', '.join(changed)})")
        run.cond(r.CREDENTIALS_READY, True, r.ROLE_READY,
                 f"role {active} can log in; Secret {secret_ref} is current")

        # Step 4: drain and remove the previous role.
        if creds.phase == rot.DRAINING and creds.previous_role:
            previous = creds.previous_role
            sessions = db.session_count(previous)
            if rot.drain_finished(creds, sessions, run.now, self.settings.rotation_grace):
                if sessions:
                    killed = db.terminate_sessions(previous)
                    run.event("Warning", r.SESSIONS_TERMINATED,
                              f"drainTimeout passed: terminated {killed} sessions of role "
                              f"{previous}")
                dropped = db.remove_role(previous, names)
                run.event("Normal", r.PREVIOUS_ROLE_REMOVED,
                          f"role {previous} {'dropped' if dropped else 'disabled (NOLOGIN)'}")
                creds = rot.finish_rotation(creds, run.now)
                run.persist_credentials(creds)
                metrics.record_rotation_completed()
                run.cond(r.CREDENTIALS_ROTATING, False, r.ROTATION_COMPLETE,
                         f"rotated to role {creds.active_role}")
                run.event("Normal", r.ROTATION_COMPLETE,
                          f"credential rotation complete: active role {creds.active_role}")
            else:
                deadline = c.timestamp(creds.drain_deadline) if creds.drain_deadline else "-"
                run.cond(r.CREDENTIALS_ROTATING, True, r.DRAINING,
                         f"waiting for {sessions} sessions of role {previous} to end and "
                         f"for workers to reload the Secret (at most until {deadline})")
        elif c.get_condition(run.status.get("conditions"), r.CREDENTIALS_ROTATING) is None:
            run.cond(r.CREDENTIALS_ROTATING, False, r.ROTATION_IDLE, "no rotation in progress")
        return creds

    # --- deletion ------------------------------------------------------------------------------

    def finalize_sync(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        obj = self.kube.read_store(meta["namespace"], meta["name"]) or body
        run = _Run(self.kube, obj, _now())
        if run.annotations.get(ANNOTATION_SKIP_DB_CLEANUP, "").lower() == "true":
            run.event("Normal", r.CLEANUP_SKIPPED,
                      f"{ANNOTATION_SKIP_DB_CLEANUP} is set: schema and roles left untouched")
            return
        try:
            spec = parse_spec(obj.get("spec") or {})
        except SpecError as exc:
            run.event("Warning", r.CLEANUP_SKIPPED,
                      f"invalid spec, nothing was provisioned to clean up: {exc}")
            return
        self.kube.patch_status(run.namespace, run.name, {"phase": r.PHASE_DELETING})
        creds = rot.CredentialState.from_status(run.status)
        base = creds.role_base if creds else role_base(run.namespace, run.name, run.uid)
        roles = role_names(base)
        names = TableNames(spec.schema, spec.tables.task_table, spec.tables.group_table)
        owner = m.Owner(run.namespace, run.name, run.uid)
        try:
            admin = self._read_admin(run, spec)
            target = self._target(spec, self._read_ca(run, spec), run.status)
            with dbio.AdminSession(target, admin, owner) as db:
                # Only what carries this store's marker is touched (builders.marker). A store
                # deleted before its first reconcile after an upgrade claims its unmarked
                # objects first, with the same proof of authorship as a reconcile.
                inventory = db.inventory(spec.schema, roles)
                claim = m.assess(owner, inventory, names.all_tables(), names.all_sequences(),
                                 spec.schema_policy, legacy=True)
                if claim.conflict is None and claim.to_mark and creds is not None and \
                        self._proves_authorship(run, target, creds):
                    db.mark(claim.to_mark, spec.schema)
                    run.event("Normal", r.OBJECTS_MARKED, "ownership marker written on "
                              + ", ".join(f"{k.lower()} {n}" for k, n in claim.to_mark))
                    inventory = db.inventory(spec.schema, roles)
                plan = m.plan_teardown(owner, inventory)
                if spec.deletion_policy == "Delete":
                    for role in plan.roles:
                        db.terminate_sessions(role)
                    for role in plan.roles:
                        db.remove_role(role, names)
                    db.teardown(plan, spec.schema)
                    dropped = ([f"schema {spec.schema}"] if plan.drop_schema else []) + [
                        f"{len(plan.tables)} tables", f"{len(plan.sequences)} sequences",
                        "roles " + (", ".join(plan.roles) or "(none)")]
                    run.event("Normal", r.CLEANUP_DROPPED,
                              "deletionPolicy Delete: dropped " + "; ".join(dropped))
                else:
                    for role in plan.roles:
                        db.disable_login(role)
                    run.event("Normal", r.CLEANUP_RETAINED,
                              f"deletionPolicy Retain: schema {spec.schema} kept; roles "
                              f"{', '.join(plan.roles) or '(none)'} can no longer log in")
                if plan.kept:
                    run.event("Normal", r.CLEANUP_KEPT,
                              "left untouched (not created by this ResultStore): "
                              + "; ".join(plan.kept)[:900])
        except (StoreError, dbio.DatabaseError) as exc:
            message = (f"cannot clean up the database: {exc.message} (annotate with "
                       f"{ANNOTATION_SKIP_DB_CLEANUP}=\"true\" to delete without it)")
            if run.failure_changed(r.DELETION_BLOCKED, message, r.READY):
                run.event("Warning", r.DELETION_BLOCKED, message)
            run.cond(r.READY, False, r.DELETION_BLOCKED, message)
            merged = c.merge_conditions(run.status.get("conditions"), run.updates)
            self.kube.patch_status(run.namespace, run.name, {"conditions": merged})
            raise


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Our finalizer/annotation names, and Events only from explicit posts."""
    kopf_settings.persistence.finalizer = FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    kopf_settings.posting.level = logging.WARNING
    # The ResultStore CRD is installed before the operator (manifests/chart): no need to
    # watch CRDs, which would only need a cluster-wide RBAC grant for nothing.
    kopf_settings.scanning.disabled = True
    # Secrets are watched (rollout.py) with a server-side selector: only our own binding
    # Secrets reach this process, never the data of any other Secret of the namespace.
    selectors = getattr(kopf_settings.watching, "label_selectors", None)
    if selectors is not None:
        selectors[("v1", "secrets")] = SECRET_WATCH_SELECTOR
    else:  # kopf < 1.45: the watch filters client-side only
        log.warning("this kopf has no server-side label selectors: the Secret watch "
                    "receives every Secret of the watched namespaces")
    kopf_settings.execution.max_workers = settings.workers
    kopf_settings.watching.server_timeout = 300
    kopf_settings.networking.request_timeout = 60


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings,
             controller: Controller | None = None) -> Controller:
    """Register the ResultStore handlers on `registry` with intervals from `settings`."""
    ctl = controller or Controller(settings)
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry, id="resultstore-configure")
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, ctl.settings)
        # Load credentials now, so that a bad kubeconfig fails at start-up.
        log.debug("API client ready: %s", ctl.kube.api is not None)

    @kopf.on.login(registry=registry, id="resultstore-login")
    def _login(**kwargs: Any) -> Any:
        # A private registry has no default login handler: use the kubernetes client's
        # loading rules (in-cluster service account, else KUBECONFIG), like our own calls.
        return kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry, id="resultstore-cleanup")
    def _cleanup(**_: Any) -> None:
        ctl.executor.shutdown(wait=False, cancel_futures=True)

    @kopf.on.resume(*resource, registry=registry, id="resume")
    async def _resume(body: kopf.Body, **_: Any) -> None:
        await ctl.reconcile(body, "resume", "resume")

    @kopf.on.create(*resource, registry=registry, id="create")
    async def _create(body: kopf.Body, **_: Any) -> None:
        await ctl.reconcile(body, "create", "create")

    @kopf.on.update(*resource, registry=registry, id="spec", field="spec")
    async def _update(body: kopf.Body, **_: Any) -> None:
        await ctl.reconcile(body, "spec changed", "spec")

    @kopf.on.field(*resource, registry=registry, id="rotate",
                   field=("metadata", "annotations", ANNOTATION_ROTATE))
    async def _rotate(body: kopf.Body, new: Any, **_: Any) -> None:
        if new:
            await ctl.reconcile(body, "rotation requested", "rotate")

    @kopf.timer(*resource, registry=registry, id="tick", interval=settings.tick_interval,
                sharp=False)
    async def _tick(body: kopf.Body, **_: Any) -> None:
        await ctl.tick(body)

    @kopf.on.event(*resource, registry=registry, id="observe")
    def _observe(body: kopf.Body, event: kopf.RawEvent, **_: Any) -> None:
        # Every watch event carries the whole object: the store gauges follow the API.
        metrics.observe_store(body, event.get("type"))

    @kopf.on.delete(*resource, registry=registry, id="finalize")
    async def _delete(body: kopf.Body, retry: int, **_: Any) -> None:
        await ctl.finalize(body, retry)

    return ctl
