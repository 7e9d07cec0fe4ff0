from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from resultstore_backend.cleanup import last_run, run_cleanup
from resultstore_backend.schema import TableNames, migrate


def test_cleanup_batches_and_records(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/c.db")
    names = TableNames()
    with engine.connect() as conn:
        migrate(conn, names)
    with engine.begin() as conn:
        for i in range(12):
            conn.execute(sa.text(
                "INSERT INTO celery_taskmeta (task_id, status, date_done) VALUES "
                "(:t, 'SUCCESS', '2000-01-01 00:00:00.000000')"), {"t": f"o{i}"})
        conn.execute(sa.text(
            "INSERT INTO celery_taskmeta (task_id, status, date_done) VALUES "
            "('fresh', 'SUCCESS', '2999-01-01 00:00:00.000000')"))
    report = run_cleanup(engine, names, expires=3600, batch_size=5)
    assert report.success and report.tasks_deleted == 12 and report.batches >= 3
    run = last_run(engine, names)
    assert run is not None and run["rows_deleted"] == 12 and run["success"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT task_id FROM celery_taskmeta")).all() == [("fresh",)]


def test_cleanup_error_is_reported(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/empty.db")
    report = run_cleanup(engine, TableNames(), expires=10)
    assert not report.success and report.error
