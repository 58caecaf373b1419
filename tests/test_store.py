"""The trace store: round trip, run lifecycle, bad files, locking, export."""

from __future__ import annotations

import subprocess
import sys
import time

import duckdb
import numpy as np
import pandas as pd
import pytest

from moelens import TraceStore
from moelens.errors import (
    RunNotFoundError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreVersionError,
)
from moelens.store.schema import SCHEMA_VERSION


def _routing(n_tokens: int, k: int = 2, layer: int = 0) -> dict:
    return {
        "seq_id": np.zeros(n_tokens * k, dtype=np.int32),
        "pos": np.repeat(np.arange(n_tokens), k),
        "layer": np.full(n_tokens * k, layer),
        "rank": np.tile(np.arange(k), n_tokens),
        "expert": np.arange(n_tokens * k) % 8,
        "weight": np.linspace(0, 1, n_tokens * k),
    }


def test_round_trip(store: TraceStore) -> None:
    run = store.create_run("m", model_type="mixtral", n_experts=8, top_k=2, metadata={"note": "x"})
    store.append(run, {
        "routing": _routing(5),
        "tokens": {"seq_id": [0] * 5, "pos": range(5), "token_id": [3, 4, 5, 6, 7], "token": ["a", "é", "😀", " ", "<"],
                   "phase": ["prompt"] * 5, "predicted_id": [4, 5, 6, 7, 8]},
        "sequences": {"seq_id": [0], "label": ["code"], "source": ["s"], "prompt_len": [5], "n_tokens": [5], "text": ["aé😀 <"]},
    })
    store.finish_run(run)
    info = store.run(run)
    assert info["status"] == "complete" and info["metadata"] == {"note": "x"} and info["schema_version"] == SCHEMA_VERSION
    routing = store.query("SELECT * FROM routing WHERE run_id = ? ORDER BY pos, rank", [run])
    assert len(routing) == 10 and routing["expert"].tolist() == list(range(8)) + [0, 1]
    assert str(routing["rank"].dtype) == "uint8" and str(routing["expert"].dtype) == "int16"
    assert store.tokens(run)["token"].tolist() == ["a", "é", "😀", " ", "<"]
    runs = store.runs()
    assert runs.loc[0, "n_tokens"] == 5 and runs.loc[0, "labels"] == "code"
    reopened = TraceStore(store.path, read_only=True)
    assert reopened.run(run)["model"] == "m"


def test_append_is_all_or_nothing(store: TraceStore) -> None:
    run = store.create_run("m")
    bad = {"routing": _routing(3), "tokens": {"seq_id": [0], "pos": [0], "token_id": ["not-an-int"]}}
    with pytest.raises(Exception):
        store.append(run, bad)
    assert store.query("SELECT count(*) AS n FROM routing")["n"][0] == 0


def test_run_ids_and_delete(store: TraceStore) -> None:
    a, b = store.create_run("a"), store.create_run("b")
    assert (a, b) == (1, 2)
    store.append(b, {"routing": _routing(4)})
    store.delete_run(a)
    assert store.runs()["run_id"].tolist() == [b]
    assert store.query("SELECT count(*) AS n FROM routing WHERE run_id = ?", [b])["n"][0] == 8
    with pytest.raises(RunNotFoundError, match=r"No run 1 .*Runs in this store: \[2\]"):
        store.run(a)


def test_failed_run_is_never_complete(store: TraceStore) -> None:
    run = store.create_run("m")
    assert store.run(run)["status"] == "recording"
    store.finish_run(run, "failed", error="interrupted (Ctrl-C)")
    info = store.run(run)
    assert info["status"] == "failed" and "Ctrl-C" in info["error"]
    assert store.runs(status="complete").empty


def test_missing_corrupt_and_newer_files(tmp_path) -> None:
    with pytest.raises(StoreNotFoundError, match="moelens demo"):
        TraceStore(tmp_path / "nope.duckdb", read_only=True)
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorruptError):
        TraceStore(junk)
    assert junk.read_bytes().startswith(b"this is not a database")  # left untouched
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (x INT)")
    con.close()
    with pytest.raises(StoreCorruptError, match="not a moelens trace store"):
        TraceStore(other)
    newer = tmp_path / "newer.duckdb"
    store = TraceStore(newer)
    run = store.create_run("keep-me")
    con = duckdb.connect(str(newer))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(StoreVersionError, match="newer"):
        TraceStore(newer)
    con = duckdb.connect(str(newer), read_only=True)
    assert con.execute("SELECT model FROM runs WHERE run_id = ?", [run]).fetchone()[0] == "keep-me"
    con.close()
    with pytest.raises(StoreError, match="folder"):
        TraceStore(tmp_path)


def test_read_only_refuses_writes(store: TraceStore) -> None:
    ro = TraceStore(store.path, read_only=True)
    with pytest.raises(StoreError, match="read-only"):
        ro.create_run("m")


def _hold_lock(path, seconds: float) -> subprocess.Popen:
    """Another process that holds the file's write lock for ``seconds`` (returns once it holds it)."""
    code = ("import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(float(sys.argv[2])); con.close()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_waits_for_another_writer_then_reports_lock(store: TraceStore) -> None:
    holder = _hold_lock(store.path, 1.0)
    started = time.monotonic()
    run = TraceStore(store.path, lock_timeout=20).create_run("after-wait")  # waits for the lock, then writes
    assert run == 1 and time.monotonic() - started > 0.3
    holder.wait(30)
    holder = _hold_lock(store.path, 3.0)
    with pytest.raises(StoreLockedError, match="locked by another process"):
        TraceStore(store.path, lock_timeout=0.5).create_run("too-soon")
    holder.wait(30)
    assert store.runs()["model"].tolist() == ["after-wait"]


def test_export_parquet(store: TraceStore, tmp_path) -> None:
    run = store.create_run("m")
    store.append(run, {"routing": _routing(6)})
    paths = store.export_parquet(run, tmp_path / "out")
    assert {p.relative_to(tmp_path / "out").as_posix() for p in paths} == {
        f"runs/run_id={run}/run.parquet", f"routing/run_id={run}/shard=0/part-00000.parquet"}
    back = pd.read_parquet(tmp_path / "out" / "routing")  # a hive-partitioned dataset any Parquet reader opens
    assert len(back) == 12 and set(back["run_id"].astype(int)) == {run} and set(back["shard"].astype(int)) == {0}


def test_routing_rows_and_shared_session(store: TraceStore) -> None:
    run = store.create_run("m")
    store.append(run, {"routing": _routing(3)})
    rows = store.routing(run, seq_id=0)
    assert len(rows) == 6 and rows["pos"].tolist() == [0, 0, 1, 1, 2, 2]
    assert store.routing(run, seq_id=5).empty
    with store.session() as shared:
        with shared.connect() as a, shared.connect() as b:
            assert a is b  # one connection for every read in the block
        assert shared.run(run)["model"] == "m" and len(shared.routing(run)) == 6
    assert store._session is None


def test_arrow_query(store: TraceStore) -> None:
    run = store.create_run("m")
    store.append(run, {"routing": _routing(2)})
    table = store.arrow("SELECT expert FROM routing WHERE run_id = ? ORDER BY pos, rank", [run])
    assert table.column("expert").to_pylist() == [0, 1, 2, 3]


def test_batch_shares_one_connection_and_other_threads_keep_their_own(store: TraceStore, monkeypatch) -> None:
    """A recording's start and end go through one connection; a writer thread inside a batch uses its own, and
    everything is committed when the block ends."""
    import threading

    opened = []
    real = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *a, **k: opened.append(threading.get_ident()) or real(*a, **k))
    with store.batch():
        run = store.create_run("m", n_experts=4, top_k=1)
        store.append(run, {"layers": {"layer": [0], "block": [0], "n_experts": [4], "top_k": [1]}})
        with store.batch():  # nested: the same connection
            store.update_run(run, metadata={"n": 1})
        worker = threading.Thread(target=lambda: store.append(run, {"tokens": {"seq_id": [0], "pos": [0], "token_id": [3]}}))
        worker.start()
        worker.join()
        store.finish_run(run)
        assert store.run(run)["status"] == "complete"
    assert opened == [threading.get_ident(), worker.ident]
    fresh = TraceStore(store.path, read_only=True)
    assert fresh.run(run)["metadata"] == {"n": 1} and len(fresh.layers(run)) == 1 and len(fresh.tokens(run)) == 1
