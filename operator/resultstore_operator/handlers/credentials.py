"""Credential convergence as observe -> plan -> apply (the plan: builders.credentials).

Three steps, each deciding from what it just observed, because each depends on the last:
whether a rotation starts (status and annotation only), then the roles and the Secret
(the live Secret and what PostgreSQL says about the role and the Secret's password), then
the drain of the previous role (its session count, read once the Secret was switched).
Rotation state is persisted after every step that changes it, so a crash anywhere resumes
from the status alone.
"""

from __future__ import annotations

from resultstore_backend.schema import TableNames

from .. import database as dbio
from .. import metrics
from ..builders import credentials as cp
from ..builders import reasons as r
from ..builders import rotation as rot
from ..builders.names import role_names, secret_name
from ..builders.scram import generate_password, scram_verifier
from ..spec import ANNOTATION_ROTATE, ResultStoreSpec
from .run import Run


class Convergence:
    """The credential part of one reconcile, inside its admin session."""

    def __init__(self, run: Run, db: dbio.Session, database: dbio.Database,
                 target: dbio.Target, names: TableNames, schema_ours: bool,
                 grace: float) -> None:
        self.run = run
        self.db = db
        self.database = database
        self.target = target
        self.names = names
        self.schema_ours = schema_ours
        self.grace = grace
        #: the CONNECTION LIMIT every role this convergence ensures gets (-1: none)
        self.limit = -1

    def converge(self, spec: ResultStoreSpec, creds: rot.CredentialState, ca: str | None,
                 new_store: bool) -> rot.CredentialState:
        run = self.run
        self.limit = spec.connections.role_limit
        creds = self._start_rotation(spec, creds)
        store = cp.Store(run.name, run.namespace, run.uid, spec, ca)
        plan = cp.plan(store, self.observe(creds, new_store), run.now, generate_password())
        managed = role_names(creds.role_base)
        if plan.switch is not None:
            self._switch(plan.switch, spec.schema, managed, store)
        self._converge(plan.converge, spec.schema, managed, store)
        return self._drain(plan.credentials)

    def observe(self, creds: rot.CredentialState, new_store: bool) -> cp.Observation:
        """The live Secret, whether the role exists, and (only when our hash cannot vouch
        for it) whether the Secret's password logs in."""
        run = self.run
        # A new store's Secret was just seen absent (its metadata): no second read for it.
        live = None if run.secret_absent else run.kube.read_secret(run.namespace,
                                                                   secret_name(run.name))
        role = cp.role_to_observe(creds)
        exists = self.db.role_state(role)[0]
        password = cp.password_to_verify(creds, live)
        logs_in = None
        if password is not None and exists:
            logs_in = self.database.check_login(self.target, dbio.Credentials(role, password))
        return cp.Observation(creds, live, cp.RoleReport(exists, logs_in), new_store)

    def _start_rotation(self, spec: ResultStoreSpec,
                        creds: rot.CredentialState) -> rot.CredentialState:
        run = self.run
        request = run.annotations.get(ANNOTATION_ROTATE)
        why = rot.rotation_request(creds, spec.credentials, request, run.now)
        if why is None:
            return creds
        creds = rot.start_rotation(creds, run.now, request)
        run.persist_credentials(creds)
        trigger = "requested" if why == rot.REQUEST_ANNOTATION else "scheduled"
        metrics.record_rotation_started(trigger)
        run.event("Normal", r.ROTATION_STARTED,
                  f"rotating credentials ({trigger}): next role {creds.next_role}")
        return creds

    def _ensure(self, role: cp.RolePlan, schema: str) -> None:
        verifier = scram_verifier(role.password) if role.needs_verifier else None
        self.db.ensure_role(role.role, verifier, schema, self.limit)

    def _write(self, write: cp.SecretWrite | None) -> None:
        if write is None:
            return
        self.run.kube.put_secret(write.desired, write.live)
        if write.event is not None:
            self.run.event(write.event.type, write.event.reason, write.event.message)

    def _switch(self, switch: cp.Switch, schema: str, managed: tuple[str, str],
                store: cp.Store) -> None:
        run = self.run
        next_role = switch.role.role
        self._ensure(switch.role, schema)
        self.db.sync_privileges(self.names, switch.granted, managed, self.schema_ours)
        run.cond(r.CREDENTIALS_ROTATING, True, r.NEXT_ROLE_READY, f"role {next_role} prepared")
        run.event("Normal", r.NEXT_ROLE_READY, f"role {next_role} prepared with a new password")
        self._write(switch.write)
        run.persist_credentials(switch.switched)
        run.event("Normal", r.SECRET_SWITCHED,
                  f"Secret {store.secret} now uses role {next_role}; draining "
                  f"{switch.switched.previous_role}")

    def _converge(self, step: cp.Converge, schema: str, managed: tuple[str, str],
                  store: cp.Store) -> None:
        run = self.run
        active = step.role.role
        if step.secret_first:
            self._write(step.write)
        self._ensure(step.role, schema)
        if step.role_created:
            run.event("Normal", r.ROLE_CREATED, f"login role {active} created")
        changes = self.db.sync_privileges(self.names, step.granted, managed, self.schema_ours)
        if changes and step.report_drift:
            run.event("Warning", r.PRIVILEGES_RESTORED,
                      "privileges drifted and were restored: " + "; ".join(changes)[:900])
        if not step.secret_first:
            self._write(step.write)
        run.cond(r.CREDENTIALS_READY, True, r.ROLE_READY,
                 f"role {active} can log in; Secret {store.secret} is current")

    def _drain(self, creds: rot.CredentialState) -> rot.CredentialState:
        run = self.run
        previous = cp.draining(creds)
        sessions = self.db.session_count(previous) if previous else 0
        step = cp.drain(creds, sessions, run.now, self.grace, run.conditions)
        if previous and step.remove:
            if step.terminate:
                killed = self.db.terminate_sessions(previous)
                run.event("Warning", r.SESSIONS_TERMINATED,
                          f"drainTimeout passed: terminated {killed} sessions of role "
                          f"{previous}")
            dropped = self.db.remove_role(previous, self.names)
            run.event("Normal", r.PREVIOUS_ROLE_REMOVED,
                      f"role {previous} {'dropped' if dropped else 'disabled (NOLOGIN)'}")
        if step.finished is not None:
            creds = step.finished
            run.persist_credentials(creds)
            metrics.record_rotation_completed()
        if step.condition is not None:
            run.cond(r.CREDENTIALS_ROTATING, *step.condition)
        if step.finished is not None:
            run.event("Normal", r.ROTATION_COMPLETE,
                      f"credential rotation complete: active role {creds.active_role}")
        return creds
