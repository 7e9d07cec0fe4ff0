"""Deletion: what `deletionPolicy` says, applied only to objects carrying our marker.

The plan is builders.marker.plan_teardown's; this module observes (the inventory), applies
it, and reports. A database that cannot be cleaned up blocks the deletion with a condition
and an Event naming the annotation that lets it go without the cleanup.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from resultstore_backend.schema import TableNames

from .. import database as dbio
from ..builders import conditions as c
from ..builders import marker as m
from ..builders import reasons as r
from ..builders import rotation as rot
from ..builders.names import role_base, role_names
from ..spec import ANNOTATION_SKIP_DB_CLEANUP, ResultStoreSpec, SpecError, parse_spec
from .reconcile import Reconciler
from .run import Run, StoreError


def finalize(rec: Reconciler, body: Mapping[str, Any], now: datetime) -> None:
    """Clean up the store's database objects (or leave them, as annotated)."""
    meta = body.get("metadata") or {}
    obj = rec.kube.read_store(meta["namespace"], meta["name"]) or body
    run = Run(rec.kube, obj, now)
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
    rec.kube.patch_status(run.namespace, run.name, {"phase": r.PHASE_DELETING})
    try:
        _clean_up(rec, run, spec)
    except (StoreError, dbio.DatabaseError) as exc:
        message = (f"cannot clean up the database: {exc.message} (annotate with "
                   f"{ANNOTATION_SKIP_DB_CLEANUP}=\"true\" to delete without it)")
        if run.failure_changed(r.DELETION_BLOCKED, message, r.READY):
            run.event("Warning", r.DELETION_BLOCKED, message)
        run.cond(r.READY, False, r.DELETION_BLOCKED, message)
        merged = c.merge_conditions(run.conditions, run.updates)
        rec.kube.patch_status(run.namespace, run.name, {"conditions": merged})
        raise


def _clean_up(rec: Reconciler, run: Run, spec: ResultStoreSpec) -> None:
    creds = rot.CredentialState.from_status(run.status)
    base = creds.role_base if creds else role_base(run.namespace, run.name, run.uid)
    roles = role_names(base)
    names = TableNames(spec.schema, spec.tables.task_table, spec.tables.group_table)
    owner = m.Owner(run.namespace, run.name, run.uid)
    admin = rec.read_admin(run, spec)
    target = rec.target(spec, rec.read_ca(run, spec), run.status)
    with rec.database.session(target, admin, owner) as db:
        # Only what carries this store's marker is touched (builders.marker). A store
        # deleted before its first reconcile after an upgrade claims its unmarked objects
        # first, with the same proof of authorship as a reconcile.
        inventory = db.inventory(spec.schema, roles)
        claim = m.assess(owner, inventory, names.all_tables(), names.all_sequences(),
                         spec.schema_policy, legacy=True)
        if claim.conflict is None and claim.to_mark and creds is not None and \
                rec.proves_authorship(run, target, creds):
            db.mark(claim.to_mark, spec.schema)
            run.event("Normal", r.OBJECTS_MARKED, "ownership marker written on "
                      + ", ".join(f"{k.lower()} {n}" for k, n in claim.to_mark))
            inventory = db.inventory(spec.schema, roles)
        plan = m.plan_teardown(owner, inventory)
        if spec.deletion_policy == "Delete":
            _drop(run, db, plan, spec.schema, names)
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


def _drop(run: Run, db: dbio.Session, plan: m.Teardown, schema: str,
          names: TableNames) -> None:
    for role in plan.roles:
        db.terminate_sessions(role)
    for role in plan.roles:
        db.remove_role(role, names)
    db.teardown(plan, schema)
    dropped = ([f"schema {schema}"] if plan.drop_schema else []) + [
        f"{len(plan.tables)} tables", f"{len(plan.sequences)} sequences",
        "roles " + (", ".join(plan.roles) or "(none)")]
    run.event("Normal", r.CLEANUP_DROPPED, "deletionPolicy Delete: dropped " + "; ".join(dropped))
