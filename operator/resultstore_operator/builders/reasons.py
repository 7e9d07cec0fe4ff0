"""Condition types, reasons and phases: the vocabulary users see in status and Events.

Every failure mode the issue names has its own reason so that `kubectl get rstore` tells an
operator *what* to fix (the Secret, the password, the network, the role's privileges)
without reading logs.
"""

from __future__ import annotations

# condition types
READY = "Ready"
SCHEMA_READY = "SchemaReady"
CREDENTIALS_READY = "CredentialsReady"
CLEANUP_SCHEDULED = "CleanupScheduled"
CREDENTIALS_ROTATING = "CredentialsRotating"
#: not a component of Ready: a store at its connection limit still works (workers retry)
CONNECTION_BUDGET = "ConnectionBudget"
COMPONENT_CONDITIONS = (SCHEMA_READY, CREDENTIALS_READY, CLEANUP_SCHEDULED)

# failure reasons (status False, Warning events)
INVALID_SPEC = "InvalidSpec"
ADMIN_SECRET_MISSING = "AdminSecretMissing"
ADMIN_SECRET_INVALID = "AdminSecretInvalid"
CA_SECRET_MISSING = "CASecretMissing"
ADMIN_AUTH_FAILED = "AdminAuthFailed"
DATABASE_UNREACHABLE = "DatabaseUnreachable"
ADMIN_CANNOT_CREATE_ROLE = "AdminCannotCreateRole"
INSUFFICIENT_PRIVILEGE = "InsufficientPrivilege"
MIGRATION_FAILED = "MigrationFailed"
SCHEMA_TOO_NEW = "SchemaTooNew"
CRONJOB_FAILED = "CronJobFailed"
# Kubernetes ownership and policy (issue 14): objects not ours are left alone and reported
SECRET_NOT_OWNED = "SecretNotOwned"
CRONJOB_NOT_OWNED = "CronJobNotOwned"
ADMIN_SECRET_NOT_OPTED_IN = "AdminSecretNotOptedIn"
CA_SECRET_INVALID = "CASecretInvalid"
CLEANUP_JOB_REFUSED = "CleanupJobNotAllowed"
KUBERNETES_ERROR = "KubernetesError"
DATABASE_ERROR = "DatabaseError"
DELETION_BLOCKED = "DeletionBlocked"
# ownership (builders.marker): a PostgreSQL object of ours is marked by another store or
# by nobody; an existing schema holds objects this store did not create
OWNERSHIP_CONFLICT = "OwnershipConflict"
SCHEMA_NOT_EMPTY = "SchemaNotEmpty"
# the server asked for a non-SCRAM password exchange, or TLS it had offered went missing
INSECURE_CONNECTION = "InsecureConnection"
PENDING = "Pending"

# success / progress reasons
READY_REASON = "Ready"
SCHEMA_MIGRATED = "SchemaMigrated"
ROLE_READY = "RoleReady"
CRONJOB_READY = "CronJobReady"
ROTATION_IDLE = "Idle"
ROTATION_STARTED = "RotationStarted"
NEXT_ROLE_READY = "NextRoleReady"
SECRET_SWITCHED = "SecretSwitched"
DRAINING = "DrainingPreviousRole"
ROTATION_COMPLETE = "RotationComplete"
# ConnectionBudget (builders.connections): True/WithinLimit, False/NearLimit (>= 80 %),
# False/Exhausted (100 %); Unknown/ConnectionsUnobserved when it could not be read
WITHIN_LIMIT = "WithinLimit"
NEAR_LIMIT = "NearLimit"
EXHAUSTED = "Exhausted"
CONNECTIONS_UNOBSERVED = "ConnectionsUnobserved"

# event-only reasons (actions)
SECRET_CREATED = "SecretCreated"
SECRET_UPDATED = "SecretUpdated"
SECRET_RESTORED = "SecretRestored"
PASSWORD_RESET = "PasswordReset"
CRONJOB_CREATED = "CronJobCreated"
CRONJOB_UPDATED = "CronJobUpdated"
ROLE_CREATED = "RoleCreated"
PRIVILEGES_RESTORED = "PrivilegesRestored"
PREVIOUS_ROLE_REMOVED = "PreviousRoleRemoved"
SESSIONS_TERMINATED = "SessionsTerminated"
DATABASE_REACHABLE = "DatabaseReachable"
CLEANUP_RETAINED = "DataRetained"
CLEANUP_DROPPED = "SchemaDropped"
CLEANUP_SKIPPED = "DatabaseCleanupSkipped"
OBJECTS_MARKED = "OwnershipMarked"
CLEANUP_KEPT = "ForeignObjectsKept"

# phases
PHASE_PENDING = "Pending"
PHASE_PROVISIONING = "Provisioning"
PHASE_READY = "Ready"
PHASE_ROTATING = "Rotating"
PHASE_FAILED = "Failed"
PHASE_DELETING = "Deleting"
