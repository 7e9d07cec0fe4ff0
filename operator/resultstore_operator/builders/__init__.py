"""Pure builders: desired Kubernetes objects, SQL and status from typed inputs.

Nothing in this package performs I/O or reads the clock; callers pass `now` and whatever
they read, so every builder is unit-tested with plain data.
"""
