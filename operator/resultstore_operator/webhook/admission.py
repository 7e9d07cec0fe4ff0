"""Admission reviews, pure: what a genuine review looks like, what we read from it, what we
answer, and how a store's object becomes the lookup the injection plan needs.

Why the shape check (issue 14): the endpoint is reachable by whatever can open a TCP
connection to it. A review that is not shaped exactly like the API server's (AdmissionReview
v1, a Pod CREATE in the request's namespace, with userInfo) is answered, allowed and
unchanged, but never mutated and never produces an Event (see events.py).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..api import ADMISSION_REVIEW_VERSION, CORE_VERSION, POD_KIND
from ..injection import InjectionPlan, StoreLookup, StoreState
from ..views import condition, meta, section

_REVIEW_UID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                         r"[0-9a-fA-F]{12}$")
POD_GVK = {"group": "", "version": CORE_VERSION, "kind": POD_KIND}
POD_RESOURCE = {"group": "", "version": CORE_VERSION, "resource": "pods"}
#: Characters of one admission warning (the API server truncates longer ones).
MAX_WARNING = 240


def review_problem(review: Mapping[str, Any]) -> str | None:
    """Why `review` is not a pod admission the API server would send us; None when it is.

    Shape only (the API server always sends all of it): AdmissionReview admission.k8s.io/v1,
    a UUID request uid, kind Pod / resource pods (v1), operation CREATE, a namespace that the
    object does not contradict, and the requesting user. A review failing this is answered
    (allowed, unchanged) but never mutated and never produces an Event.
    """
    if review.get("apiVersion") != ADMISSION_REVIEW_VERSION or \
            review.get("kind") != "AdmissionReview":
        return "not an admission.k8s.io/v1 AdmissionReview"
    request = section(review, "request")
    if not _REVIEW_UID.fullmatch(str(request.get("uid") or "")):
        return "request.uid is not a UUID"
    if request.get("kind") != POD_GVK or request.get("resource") != POD_RESOURCE:
        return "not a v1 Pod request"
    if request.get("subResource"):
        return "a subresource request"
    if request.get("operation") != "CREATE":
        return "not a CREATE"
    namespace = request.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        return "request.namespace missing"
    if meta(section(request, "object")).namespace not in ("", namespace):
        return "the pod's namespace differs from the request's"
    user = request.get("userInfo")
    if not isinstance(user, Mapping) or not user.get("username"):
        return "request.userInfo missing"
    return None


@dataclass(frozen=True)
class AdmissionRequest:
    """The parts of an AdmissionReview v1 request the webhook uses.

    ``problem`` is :func:`review_problem`'s verdict: set, the review is answered unchanged.
    """

    uid: str
    namespace: str
    operation: str
    kind: str
    pod: Mapping[str, Any]
    dry_run: bool = False
    problem: str | None = None

    @classmethod
    def from_review(cls, review: Any) -> AdmissionRequest:
        if not isinstance(review, Mapping):
            raise ValueError("AdmissionReview must be an object")
        request = review.get("request")
        if not isinstance(request, Mapping) or not request.get("uid"):
            raise ValueError("AdmissionReview without request.uid")
        pod = request.get("object") or {}
        if not isinstance(pod, Mapping):
            raise ValueError("request.object must be an object")
        return cls(
            uid=str(request["uid"]),
            namespace=str(request.get("namespace") or ""),
            operation=str(request.get("operation") or ""),
            kind=str(section(request, "kind").get("kind") or ""),
            pod=pod,
            dry_run=bool(request.get("dryRun")),
            problem=review_problem(review),
        )


def review_response(uid: str, plan: InjectionPlan) -> dict[str, Any]:
    """The AdmissionReview v1 answer: always allowed, with the JSONPatch when there is one."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if plan.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(plan.patch).encode()).decode()
    if plan.warnings:
        # Warnings are shown by kubectl; one line each, bounded (the API server truncates).
        response["warnings"] = [
            ("resultstore: " + w.replace("\n", " "))[:MAX_WARNING] for w in plan.warnings
        ]
    return {"apiVersion": ADMISSION_REVIEW_VERSION, "kind": "AdmissionReview",
            "response": response}


def store_lookup_from_object(obj: Mapping[str, Any] | None) -> StoreLookup:
    """Readiness from a ResultStore object: its ``Ready`` condition must be ``True``."""
    if obj is None:
        return StoreLookup(StoreState.MISSING)
    if meta(obj).deletion_timestamp:
        return StoreLookup(StoreState.NOT_READY, "being deleted")
    ready = condition(obj, "Ready")
    if ready is None:
        return StoreLookup(StoreState.NOT_READY, "no Ready condition yet")
    if ready.get("status") == "True":
        return StoreLookup(StoreState.READY)
    reason = str(ready.get("reason") or "")
    return StoreLookup(StoreState.NOT_READY, f"Ready={ready.get('status')}"
                       + (f", reason {reason}" if reason else ""))


_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,62}$")
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def pod_description(pod: Mapping[str, Any]) -> str:
    """How a message names the admitted pod: its controller (a pod a controller creates has
    no name yet at admission) or its own name.

    Only what has the syntax of a Kubernetes kind and name is quoted: the text came with
    the review, and a review sent straight to the port must not put words of its own into
    an Event of the victim namespace (the API server would never send anything else)."""
    m = meta(pod)
    for ref in m.owner_references:
        if ref.get("controller") and ref.get("name"):
            kind, name = str(ref.get("kind")), str(ref.get("name"))
            if _KIND.fullmatch(kind) and _OBJECT_NAME.fullmatch(name):
                return f"a pod of {kind} {name}"
            return "a pod"
    if _OBJECT_NAME.fullmatch(m.name):
        return f"pod {m.name}"
    if not m.name and _OBJECT_NAME.fullmatch(m.generate_name.rstrip("-")):
        return f"pod {m.generate_name}*"
    return "a pod"


def pod_display(pod: Mapping[str, Any]) -> str:
    """The pod as our own log lines name it (its name, or its generateName and `*`)."""
    m = meta(pod)
    return m.name or m.generate_name + "*"
