"""The synchronous reconcile of one ResultStore: read it, call the builders, apply.

It runs in the controller's thread pool. Order matters and is the point of this module:
the spec is validated and the Secret's ownership checked before anything is touched; the
database (schema, roles, grants, Secret) converges inside one admin session; the CronJob,
whose pods mount the Secret, comes last, so a refused store gets none and a failing database
leaves an existing one as it was. Failures become conditions and Warning Events (never with
a password) and are raised again, for the controller's backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from resultstore_backend.schema import TableNames

from .. import database as dbio
from ..builders import conditions as c
from ..builders import connections as cb
from ..builders import credentials as cp
from ..builders import marker as m
from ..builders import reasons as r
from ..builders import rotation as rot
from ..builders.cronjob import (
    CleanupPolicy,
    check_cleanup_job,
    cronjob_event,
    cronjob_manifest,
)
from ..builders.names import cronjob_name, role_base, role_names, secret_name
from ..builders.ownership import (
    ADMIN_CREDENTIALS_LABEL,
    admin_secret_opted_in,
    certificates_only,
    same_object,
)
from ..builders.secret import decode_data, trusted_password
from ..kube import KubeError, NotOwnedError
from ..settings import OperatorSettings
from ..spec import ANNOTATION_ROTATE, ResultStoreSpec, SpecError, parse_spec
from .credentials import Convergence
from .run import Run, StoreApi, StoreError

#: the errors a reconcile reports and retries (anything else is a bug, logged with a trace)
RECONCILE_ERRORS = (StoreError, KubeError, dbio.DatabaseError)


class AdminSecrets:
    """Admin credentials already read, by Secret and the exact version read (uid and
    resourceVersion): a reconcile still reads the Secret's metadata (the opt-in label, the
    version), but its data only when that version was not read before. One GET per
    reconcile less (1000 of a burst of 1000 stores that share one admin Secret).

    Any change of the Secret (data, labels, a replacement) changes its resourceVersion or
    uid, so a stale entry is never used; entries of versions no longer current are replaced.
    Shared by the reconcile threads: single dict operations only.
    """

    def __init__(self) -> None:
        self._by_secret: dict[tuple[str, str, str, str], tuple[str, str, dbio.Credentials]] = {}

    def get(self, key: tuple[str, str, str, str], head: Mapping[str, Any]
            ) -> dbio.Credentials | None:
        uid, version = _version_of(head)
        found = self._by_secret.get(key)
        if found is None or not uid or not version or found[:2] != (uid, version):
            return None
        return found[2]

    def put(self, key: tuple[str, str, str, str], secret: Mapping[str, Any],
            credentials: dbio.Credentials) -> None:
        uid, version = _version_of(secret)
        if uid and version:
            self._by_secret[key] = (uid, version, credentials)


def _version_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")


class Reconciler:
    """The API client, the database and the settings one reconcile works with."""

    def __init__(self, settings: OperatorSettings, kube: StoreApi,
                 database: dbio.Database, admin_secrets: AdminSecrets | None = None) -> None:
        self.settings = settings
        self.kube = kube
        self.database = database
        self.admin_secrets = admin_secrets if admin_secrets is not None else AdminSecrets()

    @property
    def cleanup_policy(self) -> CleanupPolicy:
        s = self.settings
        return CleanupPolicy(s.cleanup_image, s.cleanup_image_pull_policy,
                             s.cleanup_image_allowlist, s.cleanup_allow_service_account,
                             s.cleanup_allow_host_network)

    def reconcile(self, namespace: str, name: str, now: datetime,
                  invalid: Callable[[str, int | None], None]) -> None:
        """Converge the store; an invalid spec is reported, `invalid(uid, generation)`
        called and the SpecError raised (permanent until the spec changes)."""
        obj = self.kube.read_store(namespace, name)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            return
        run = Run(self.kube, obj, now)
        run.patch["secretName"] = secret_name(name)
        run.patch["cronJobName"] = cronjob_name(name)
        try:
            spec = parse_spec(obj.get("spec") or {})
            # Policy before anything is touched: a refused cleanup pod means no CronJob,
            # no schema, no role (CleanupJobRefused is a SpecError: permanent until edited).
            check_cleanup_job(spec.cleanup_job, self.cleanup_policy)
        except SpecError as exc:
            self._report_invalid(run, exc)
            invalid(run.uid, run.generation)
            raise
        creds = rot.CredentialState.from_status(run.status)
        try:
            self._check_secret_owned(run)
            creds = self._converge_database(run, spec, creds)
            self._ensure_cronjob(run, spec)
        except RECONCILE_ERRORS as exc:
            self._report_failure(run, exc)
            run.finish(creds.phase if creds else None)
            raise
        run.finish(creds.phase if creds else None)

    # --- reporting -------------------------------------------------------------------------

    def _report_invalid(self, run: Run, exc: SpecError) -> None:
        message = str(exc)
        reason = str(getattr(exc, "reason", r.INVALID_SPEC))
        if run.failure_changed(reason, message, r.SCHEMA_READY):
            run.event("Warning", reason, message)
        for type_ in r.COMPONENT_CONDITIONS:
            run.cond(type_, False, reason, message)
        run.finish(None)

    def _report_failure(self, run: Run, exc: Exception) -> None:
        if isinstance(exc, StoreError | dbio.DatabaseError):
            reason, message = exc.reason, exc.message
            affects = exc.affects if isinstance(exc, StoreError) else (
                r.SCHEMA_READY, r.CREDENTIALS_READY)
        elif isinstance(exc, NotOwnedError):  # replaced by a foreign Secret mid-reconcile
            reason, message, affects = r.SECRET_NOT_OWNED, str(exc), (r.CREDENTIALS_READY,)
        else:
            reason, message, affects = r.KUBERNETES_ERROR, str(exc), (r.CREDENTIALS_READY,)
        full = c.failure_message(reason, message)
        if run.failure_changed(reason, full, affects[0]):
            run.event("Warning", reason, full)
        for type_ in affects:
            run.cond(type_, False, reason, full)
        if reason in (r.DATABASE_UNREACHABLE, r.ADMIN_AUTH_FAILED):
            run.patch["database"] = {"reachable": False, "lastCheckTime": c.timestamp(run.now)}

    # --- Kubernetes inputs -----------------------------------------------------------------

    def _check_secret_owned(self, run: Run) -> None:
        # Metadata only: a foreign Secret's data is none of the operator's business.
        head = self.kube.read_secret_metadata(run.namespace, secret_name(run.name))
        run.secret_absent = head is None
        refused = cp.refusal(head, run.uid, run.conditions)
        if refused is not None:
            raise StoreError(refused.reason, refused.message, refused.affects)

    def read_admin(self, run: Run, spec: ResultStoreSpec) -> dbio.Credentials:
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
        key = (run.namespace, ref.name, ref.username_key, ref.password_key)
        known = self.admin_secrets.get(key, head)
        if known is not None:
            return known
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
        credentials = dbio.Credentials(username, password)
        self.admin_secrets.put(key, secret, credentials)
        return credentials

    def read_ca(self, run: Run, spec: ResultStoreSpec) -> str | None:
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

    def target(self, spec: ResultStoreSpec, ca: str | None,
               status: Mapping[str, Any] | None = None) -> dbio.Target:
        """The admin connection's target; TLS is pinned once an admin session used it
        (`status.database.tls`), so `prefer` cannot be downgraded afterwards."""
        db = spec.database
        pinned = ((status or {}).get("database") or {}).get("tls") is True
        return dbio.Target(db.host, db.port, db.name, db.ssl_mode, ca,
                           self.settings.db_connect_timeout, tls_pinned=pinned)

    # --- the database ----------------------------------------------------------------------

    def _assess(self, run: Run, spec: ResultStoreSpec, db: dbio.Session,
                target: dbio.Target, names: TableNames, creds: rot.CredentialState,
                owner: m.Owner) -> m.Assessment:
        """Ownership before anything is touched: refuse (StoreError) or say what to mark.

        A store provisioned before markers existed sees its own objects unmarked; they are
        claimed only with proof of authorship (`proves_authorship`), never by name alone.
        """
        inventory = db.inventory(spec.schema, role_names(creds.role_base))
        tables, sequences = names.all_tables(), names.all_sequences()
        result = m.assess(owner, inventory, tables, sequences, spec.schema_policy)
        conflict = result.conflict
        if conflict is not None and conflict.legacy_fixable and \
                self.proves_authorship(run, target, creds):
            result = m.assess(owner, inventory, tables, sequences, spec.schema_policy,
                              legacy=True)
            conflict = result.conflict
        if conflict is not None:
            reason = (r.SCHEMA_NOT_EMPTY if conflict.kind == m.CONFLICT_FOREIGN_SCHEMA
                      else r.OWNERSHIP_CONFLICT)
            raise StoreError(reason, conflict.message)
        return result

    def proves_authorship(self, run: Run, target: dbio.Target,
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
        return self.database.check_login(target,
                                         dbio.Credentials(creds.active_role, password))

    def _converge_database(self, run: Run, spec: ResultStoreSpec,
                           creds: rot.CredentialState | None) -> rot.CredentialState:
        admin = self.read_admin(run, spec)
        ca = self.read_ca(run, spec)
        target = self.target(spec, ca, run.status)
        names = TableNames(spec.schema, spec.tables.task_table, spec.tables.group_table)
        owner = m.Owner(run.namespace, run.name, run.uid)
        new_store = creds is None
        if creds is None:
            # A recorded base is never recomputed: stores from before role names carried
            # the store's identity keep theirs (names.legacy_role_base).
            creds = rot.initial_state(role_base(run.namespace, run.name, run.uid), run.now,
                                      run.annotations.get(ANNOTATION_ROTATE))
            # Written with the rest of the status at the end (`run.finish`, also after a
            # failure), not in a patch of its own before: nothing of it needs to survive a
            # crash in between. The role base is derived from the store's identity again,
            # the next attempt finds the role it created marked as its own, and with no
            # Secret written yet no worker holds a password a reset would replace. One
            # status patch (and one watch event for Kopf to process) less per new store.
            run.patch["credentials"] = creds.to_status()
        with self.database.session(target, admin, owner) as db:
            was_unreachable = (run.status.get("database") or {}).get("reachable") is False
            run.patch["database"] = {"reachable": True, "lastCheckTime": c.timestamp(run.now),
                                     "tls": db.tls_in_use}
            if was_unreachable:
                run.event("Normal", r.DATABASE_REACHABLE, "database is reachable again")
            db.check_capabilities(spec.schema)
            assessment = self._assess(run, spec, db, target, names, creds, owner)
            self._migrate(run, spec, db, names, assessment)
            creds = Convergence(run, db, self.database, target, names,
                                assessment.schema_ours, self.settings.rotation_grace
                                ).converge(spec, creds, ca, new_store)
            self._observe_connections(run, spec, db, creds)
            last = db.last_cleanup_run(names)
        if last is not None:
            run.patch["lastCleanup"] = last_cleanup_status(last)
        return creds

    def _observe_connections(self, run: Run, spec: ResultStoreSpec, db: dbio.Session,
                             creds: rot.CredentialState) -> None:
        """status.connections and the ConnectionBudget condition, from pg_stat_activity read
        on every reconcile (the timer's drift check included). A failed read is reported
        Unknown, not as a failed reconcile: the store itself was converged."""
        try:
            usage = db.connection_usage(role_names(creds.role_base))
        except dbio.DatabaseError as exc:
            run.cond(r.CONNECTION_BUDGET, "Unknown", r.CONNECTIONS_UNOBSERVED, exc.message)
            return
        previous = c.get_condition(run.conditions, r.CONNECTION_BUDGET)
        decision = cb.budget(usage, spec.connections.limit,
                             str(previous.get("reason")) if previous else None, run.now)
        run.patch["connections"] = decision.status
        run.cond(r.CONNECTION_BUDGET, *decision.condition)
        if decision.event is not None:
            run.event(*decision.event)

    def _migrate(self, run: Run, spec: ResultStoreSpec, db: dbio.Session, names: TableNames,
                 assessment: m.Assessment) -> None:
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

    # --- the CronJob -----------------------------------------------------------------------

    def _ensure_cronjob(self, run: Run, spec: ResultStoreSpec) -> None:
        """Last: its pods mount `<store>-resultstore`, so it is created or changed only once
        that Secret is ours and current."""
        desired = cronjob_manifest(run.name, run.namespace, run.owner, spec,
                                   self.settings.cleanup_image,
                                   self.settings.cleanup_image_pull_policy)
        try:
            action, _live = self.kube.apply_cronjob(desired)
        except KubeError as exc:
            reason = r.CRONJOB_NOT_OWNED if isinstance(exc, NotOwnedError) else r.CRONJOB_FAILED
            run.cond(r.CLEANUP_SCHEDULED, False, reason, str(exc))
            if run.failure_changed(reason, str(exc), r.CLEANUP_SCHEDULED):
                run.event("Warning", reason, str(exc))
            return
        existed_before = bool(run.status.get("cronJobName")) and c.get_condition(
            run.conditions, r.CLEANUP_SCHEDULED) is not None
        event = cronjob_event(action, existed_before, desired["metadata"]["name"], spec)
        if event is not None:
            run.event(*event)
        run.cond(r.CLEANUP_SCHEDULED, True, r.CRONJOB_READY,
                 f"cleanup runs on schedule {spec.retention.schedule!r}")


def last_cleanup_status(last: dbio.CleanupRun) -> dict[str, Any]:
    """`status.lastCleanup` from the cleanup job's own record of its last run."""
    finished = last.started_at if last.duration_seconds < 1 else datetime.fromtimestamp(
        last.started_at.timestamp() + last.duration_seconds, UTC)
    return {
        "startedAt": c.timestamp(last.started_at),
        "finishedAt": c.timestamp(finished),
        "succeeded": last.success,
        "deleted": last.rows_deleted,
        "message": (f"deleted {last.rows_deleted} rows in {last.duration_seconds:.1f}s")
        if last.success else (last.error or "failed")[:1024],
    }
