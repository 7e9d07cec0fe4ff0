"""The one error family of every Kubernetes call the operator makes.

Why one family: handlers, the webhook, the rollout and the TLS keeper used to catch the
client's `ApiException` and compare `status == 404` each in its own way. Every call now goes
through :func:`api_errors`, which turns the client's exception into a member of this family,
so a caller says what it means (`except NotFound`) and `transient` tells it whether a retry
may help. The message names the call and the API's answer, never a request body (a Secret's
data never reaches an exception).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager


class KubeError(Exception):
    """An API call failed; `transient` tells the caller whether a retry may help."""

    def __init__(self, message: str, status: int | None = None,
                 transient: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


class NotFound(KubeError):
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeError):
    """409: AlreadyExists, or a resourceVersion / uid precondition failed (re-read, retry)."""


class Forbidden(KubeError):
    """401 or 403: our credentials or RBAC do not allow the call."""


class Unavailable(KubeError):
    """No answer, 429 or 5xx: the API server is down, overloaded or timed out."""


class NotOwnedError(KubeError):
    """An object of the name we manage exists but is not ours: it is left as it was.

    Not transient in the retry sense (waiting does not help), but the operator re-checks on
    its timer so that deleting the foreign object lets it create its own.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, status=None, transient=False)


def _family(status: int | None) -> type[KubeError]:
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status in (401, 403):
        return Forbidden
    if status is None or status == 429 or status >= 500:
        return Unavailable
    return KubeError


def is_transient(status: int | None) -> bool:
    """Whether waiting may help: no status, a conflict, throttling or a server error."""
    return status is None or status in (409, 429) or status >= 500


def from_api_exception(exc: Exception, what: str) -> KubeError:
    """The family member for the client's exception; the message says `what` was called."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or exc.__class__.__name__
    detail = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            detail = str(json.loads(body).get("message", ""))
        except (ValueError, AttributeError, TypeError):
            detail = ""
    msg = f"{what}: API answered {status} {reason}"
    if detail:
        msg += f": {detail}"
    return _family(status)(msg, status=status, transient=is_transient(status))


@contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Run a client call, turning its `ApiException` into this family (chained to nothing:
    the client's exception carries the request's headers)."""
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        raise from_api_exception(exc, what) from None
