"""Benchmark: stock Celery `db+` backend vs Redis vs the resultstore backend.

Run it with `.venv/bin/python -m bench` (see bench/README.md). One run starts one private
durable PostgreSQL and one Redis, measures every backend on them and prints one table.
"""
