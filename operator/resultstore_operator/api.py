"""The Kubernetes API's words the operator uses: group, version, kinds, plurals, Secret types,
label and annotation keys, content types. One definition each (docs/CONTRACTS.md names them).

Why a module of its own at the bottom of the operator, and not inside the `kube` package:
the pure modules (spec, crd, injection, builders) need these words, and importing any
submodule of `kube` runs `kube/__init__`, which loads the API client. Here nothing is
imported at all, so every layer may use it (the import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

# --- the ResultStore resource ------------------------------------------------------------------

GROUP = "resultstore.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ResultStore"
PLURAL = "resultstores"
SINGULAR = "resultstore"
SHORT_NAMES = ("rstore",)

# --- other kinds and resources we read or write -----------------------------------------------

CORE_VERSION = "v1"
EVENT_KIND = "Event"
POD_KIND = "Pod"
WORKLOAD_PLURALS = ("deployments", "statefulsets", "daemonsets")
ADMISSION_REVIEW_VERSION = "admission.k8s.io/v1"
WEBHOOK_CONFIGURATION_VERSION = "admissionregistration.k8s.io/v1"
WEBHOOK_CONFIGURATION_KIND = "MutatingWebhookConfiguration"

# --- Secret types ------------------------------------------------------------------------------

#: The binding Secret the operator writes (Service Binding's well-known type for PostgreSQL).
BINDING_SECRET_TYPE = "servicebinding.io/postgresql"
#: The webhook's serving certificate Secret.
TLS_SECRET_TYPE = "kubernetes.io/tls"

# --- labels ------------------------------------------------------------------------------------

#: On a pod (template): the ResultStore whose Secret the webhook injects.
INJECT_LABEL = f"{GROUP}/inject"
#: On an admin Secret: the opt-in without which the operator never reads its data.
ADMIN_CREDENTIALS_LABEL = f"{GROUP}/admin-credentials"
#: On every object the operator writes for a store.
LABEL_STORE = f"{GROUP}/store"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
#: Set by the API server on every Namespace (the webhook's namespaceSelector).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# --- annotations -------------------------------------------------------------------------------

#: On a ResultStore: rotate the credentials now (any new value).
ANNOTATION_ROTATE = f"{GROUP}/rotate"
#: On a ResultStore: delete it without touching the database.
ANNOTATION_SKIP_DB_CLEANUP = f"{GROUP}/skip-database-cleanup"
#: On the binding Secret: a hash of its data, and the role it carries.
ANNOTATION_DATA_HASH = f"{GROUP}/data-hash"
ANNOTATION_ROLE = f"{GROUP}/role"
#: On a pod: which containers get the store, the mode, whether to replace a user's variable,
#: and (written by the webhook) the store injected.
CONTAINERS_ANNOTATION = f"{GROUP}/containers"
MODE_ANNOTATION = f"{GROUP}/mode"
OVERRIDE_ENV_ANNOTATION = f"{GROUP}/override-env"
STATUS_ANNOTATION = f"{GROUP}/injected"
#: On a workload, a label (so the watch selects it on the server): roll it when its store's
#: Secret changes; on its pod template, an annotation: the hash.
ROLLOUT_LABEL = f"{GROUP}/rollout"
ROLLOUT_SELECTOR = f"{ROLLOUT_LABEL}=true"
HASH_ANNOTATION = f"{GROUP}/secret-hash"

# --- how we talk to the API server ---------------------------------------------------------------

#: Field manager of server-side apply, and the Events' reporting component.
FIELD_MANAGER = "resultstore-operator"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
#: Ask the API server for an object's metadata only (no `data` leaves the server).
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
