"""celery-resultstore: a fast, Kubernetes-friendly Celery result backend for PostgreSQL.

This package's ``__init__`` deliberately imports nothing: the operator imports
``resultstore_backend.schema`` and ``resultstore_backend.config`` without
Celery, and Celery loads ``resultstore_backend.backend:ResultStoreBackend``
through the ``resultstore`` entry point.
"""

__all__: list[str] = []
