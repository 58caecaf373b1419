"""The read-only SQL console (app/workbench/sql_console.py) on a real store: SELECT and WITH run with bound
parameters and a row cap; writes, file access and anything but one SELECT are refused and change nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app_fixtures import make_store
from moelens import TraceStore
from moelens.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))
from workbench import sql_console  # noqa: E402

sys.path.remove(str(ROOT / "app"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("sql") / "s.duckdb")["path"]


def test_select_with_parameters_and_row_cap(store: Path) -> None:
    rows, cut = sql_console.run_query(store, "SELECT run_id, status FROM runs WHERE run_id = ?", [2])
    assert rows.to_dict("records") == [{"run_id": 2, "status": "complete"}] and not cut
    rows, cut = sql_console.run_query(store, "WITH r AS (SELECT * FROM routing WHERE run_id = $run) "
                                             "SELECT layer, count(*) AS n FROM r GROUP BY layer ORDER BY layer;",
                                      {"run": 1})
    assert rows["layer"].tolist() == [1, 2, 3, 4] and (rows["n"] > 0).all()
    rows, cut = sql_console.run_query(store, "SELECT * FROM tokens", limit=7)
    assert len(rows) == 7 and cut
    for name, (sql, params) in sql_console.EXAMPLES.items():  # every shipped example runs
        sql_console.run_query(store, sql, sql_console.parse_params(params))
    assert {"runs", "routing", "tokens"} <= set(sql_console.schema(store)["table"])


@pytest.mark.parametrize("sql", [
    "INSERT INTO runs (run_id) VALUES (99)",
    "DROP TABLE routing",
    "DELETE FROM tokens",
    "UPDATE runs SET status = 'failed'",
    "COPY runs TO '/tmp/moelens_leak.csv'",
    "ATTACH '/tmp/other.duckdb' AS o",
    "PRAGMA enable_profiling",
    "SET threads = 1",
    "CREATE TABLE x AS SELECT 1",
    "SELECT 1; DROP TABLE runs",
    "EXPLAIN SELECT 1",
])
def test_writes_and_other_statements_are_refused(store: Path, sql: str) -> None:
    before = TraceStore(store, read_only=True).runs()
    with pytest.raises(InputError):
        sql_console.run_query(store, sql)
    assert TraceStore(store, read_only=True).runs().equals(before)


def test_file_access_and_bad_input_are_refused(store: Path) -> None:
    with pytest.raises(InputError, match="(?i)external|permission|disabled"):
        sql_console.run_query(store, "SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(InputError, match="write a SELECT"):
        sql_console.check("  ;  ")
    with pytest.raises(InputError, match="JSON"):
        sql_console.parse_params("[1,")
    with pytest.raises(InputError, match="Binder|Parser|Catalog"):
        sql_console.run_query(store, "SELECT nope FROM runs")
