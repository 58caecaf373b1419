"""The two store layouts (DuckDB file, partitioned Parquet dataset) behind one contract; schema migration;
derived summaries; run versions; export/import. Real files and real datasets throughout."""

from __future__ import annotations

import hashlib
import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelens import TraceStore
from moelens.errors import RunNotFoundError, StoreCorruptError, StoreError, StoreVersionError
from moelens.store.dataset import DatasetStore
from moelens.store.schema import RUN_TABLES, SCHEMA_VERSION

# -- a run that fills every table ---------------------------------------------------------------------


def _fill(store: TraceStore, n_seq: int = 6, seq_len: int = 5, layers=(1, 3), k: int = 2, seed: int = 0, **fields) -> int:
    """A run with rows in every per-run table (sequences of unequal length, two MoE layers, k = 2)."""
    rng = np.random.default_rng(seed)
    run = store.create_run("toy/model", model_type="mixtral", n_experts=8, top_k=k, metadata={"seed": seed}, **fields)
    lens = [seq_len + (s % 3) for s in range(n_seq)]
    seq = np.repeat(np.arange(n_seq), lens)
    pos = np.concatenate([np.arange(n) for n in lens])
    T = len(seq)
    slot_seq, slot_pos = np.repeat(seq, len(layers) * k), np.repeat(pos, len(layers) * k)
    slot_layer = np.tile(np.repeat(layers, k), T)
    slot_rank = np.tile(np.arange(k), T * len(layers))
    tok_layer_seq, tok_layer_pos = np.repeat(seq, len(layers)), np.repeat(pos, len(layers))
    tok_layer = np.tile(layers, T)
    store.append(run, {"layers": {"layer": list(layers), "block": list(layers), "module": [f"model.layers.{i}.mlp" for i in layers],
                                  "kind": ["moe"] * len(layers), "n_experts": [8] * len(layers), "top_k": [k] * len(layers),
                                  "has_shared_expert": [True] * len(layers)}})
    store.append(run, {
        "sequences": {"seq_id": np.arange(n_seq), "label": [["code", "prose", None][s % 3] for s in range(n_seq)],
                      "source": ["t"] * n_seq, "prompt_len": lens, "n_tokens": lens, "text": [f"text é {s}" for s in range(n_seq)]},
        "tokens": {"seq_id": seq, "pos": pos, "token_id": rng.integers(0, 50, T), "token": [f"t{i}😀" for i in range(T)],
                   "phase": ["prompt"] * T, "predicted_id": rng.integers(0, 50, T)},
        "routing": {"seq_id": slot_seq, "pos": slot_pos, "layer": slot_layer, "rank": slot_rank,
                    "expert": rng.integers(-1, 8, len(slot_seq)), "weight": rng.random(len(slot_seq))},
        "router_logits": {"seq_id": tok_layer_seq, "pos": tok_layer_pos, "layer": tok_layer,
                          "logits": [list(rng.random(8).astype(np.float32)) for _ in tok_layer]},
        "shared_experts": {"seq_id": tok_layer_seq, "pos": tok_layer_pos, "layer": tok_layer, "gate": rng.random(len(tok_layer))},
        "expert_contributions": {"seq_id": slot_seq, "pos": slot_pos, "layer": slot_layer, "rank": slot_rank,
                                 "norm": rng.random(len(slot_seq))},
        "block_residuals": {"seq_id": tok_layer_seq, "pos": tok_layer_pos, "layer": tok_layer, "cos": rng.random(len(tok_layer))},
    })
    store.finish_run(run)
    return run


def _rows(store: TraceStore, table: str, run: int) -> pd.DataFrame:
    """A table's rows of one run without the run id, in a canonical order."""
    return store.query(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ? ORDER BY ALL", [run]).reset_index(drop=True)


@pytest.fixture(params=["duckdb", "parquet"])
def any_store(request, tmp_path) -> TraceStore:
    """An empty store in either layout."""
    if request.param == "duckdb":
        return TraceStore(tmp_path / "t.duckdb")
    return TraceStore(tmp_path / "ds", layout="parquet")


# -- both layouts, one contract -----------------------------------------------------------------------


def test_dataset_answers_like_the_file(tmp_path) -> None:
    file = TraceStore(tmp_path / "t.duckdb")
    run = _fill(file)
    file.export_parquet(run, tmp_path / "ds", shards=3)
    ds = TraceStore(tmp_path / "ds")
    assert isinstance(ds, DatasetStore) and isinstance(ds, TraceStore)
    assert ds.shard_ids(run) == [0, 1, 2] and file.shard_ids(run) == [0]
    pd.testing.assert_frame_equal(ds.runs(), file.runs())
    assert ds.run(run) == {**file.run(run), "n_shards": 3}  # the dataset knows how many shards make the run whole
    pd.testing.assert_frame_equal(ds.layers(run), file.layers(run))
    pd.testing.assert_frame_equal(ds.sequences(run), file.sequences(run))
    pd.testing.assert_frame_equal(ds.tokens(run), file.tokens(run))
    pd.testing.assert_frame_equal(ds.tokens(run, 2), file.tokens(run, 2))
    pd.testing.assert_frame_equal(ds.routing(run), file.routing(run))
    pd.testing.assert_frame_equal(ds.routing(run, 4), file.routing(run, 4))
    sql = "SELECT layer, expert, count(*) AS n, sum(weight) AS mass FROM routing WHERE run_id = ? GROUP BY ALL ORDER BY ALL"
    pd.testing.assert_frame_equal(ds.query(sql, [run]), file.query(sql, [run]))
    assert ds.arrow("SELECT * FROM routing ORDER BY ALL").schema == file.arrow("SELECT * FROM routing ORDER BY ALL").schema
    with ds.session() as shared, shared.connect() as a, shared.connect() as b:
        assert a is b


def test_analysis_reads_a_dataset_like_the_file(tmp_path) -> None:
    from moelens.analysis import expert_load

    file = TraceStore(tmp_path / "t.duckdb")
    run = _fill(file)
    file.export_parquet(run, tmp_path / "ds", shards=2)
    pd.testing.assert_frame_equal(expert_load(TraceStore(tmp_path / "ds"), run, by_label=True),
                                  expert_load(file, run, by_label=True), check_like=True)


def test_export_import_round_trip_every_table(tmp_path) -> None:
    src = TraceStore(tmp_path / "a.duckdb")
    _fill(src, seed=1)
    run = _fill(src, seed=2, parent_run_id=1, intervention={"disable": [[1, 3]]})
    src.write_summary(run, "load", pa.table({"layer": pa.array([1, 3], pa.int16()), "count": [5, 7]}))
    src.write_summary(run, "empty", pa.table({"x": pa.array([], pa.float64())}))
    files = src.export_parquet(run, tmp_path / "ds", shards=2)
    assert files and all(f.exists() and f.suffix == ".parquet" for f in files)
    dst = TraceStore(tmp_path / "b.duckdb")
    dst.create_run("already-there")  # so the imported run gets a new id
    assert dst.import_parquet(tmp_path / "ds") == {run: 2}
    for table in RUN_TABLES:
        pd.testing.assert_frame_equal(_rows(dst, table, 2), _rows(src, table, run), obj=table)
        assert len(_rows(src, table, run)), table
    a, b = src.run(run), dst.run(2)
    assert b["parent_run_id"] is None  # its parent was not imported with it
    assert {k: v for k, v in a.items() if k not in ("run_id", "parent_run_id")} == {
        k: v for k, v in b.items() if k not in ("run_id", "parent_run_id")}
    assert dst.summary_names(2) == {"load", "empty"}
    assert dst.read_summary(2, "load").equals(src.read_summary(run, "load"))
    assert dst.read_summary(2, "empty").num_rows == 0


def test_export_rows_are_sorted_within_a_shard_and_sequences_stay_whole(tmp_path) -> None:
    src = TraceStore(tmp_path / "a.duckdb")
    run = _fill(src, n_seq=9)
    src.export_parquet(run, tmp_path / "ds", shards=3)
    ds = TraceStore(tmp_path / "ds")
    seen: dict[int, int] = {}
    for shard in ds.shard_ids(run):
        (path,) = ds.shard_files("routing", run, shard)
        rows = pq.read_table(path).to_pandas()
        keys = rows[["seq_id", "pos", "layer", "rank"]]
        assert keys.equals(keys.sort_values(list(keys.columns)).reset_index(drop=True))
        assert "run_id" not in rows.columns and pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        for s in rows["seq_id"].unique():
            assert seen.setdefault(int(s), shard) == shard
    assert sorted(seen) == list(range(9))


def test_two_exports_into_one_folder_and_refusals(tmp_path) -> None:
    src = TraceStore(tmp_path / "a.duckdb")
    a, b = _fill(src, seed=1), _fill(src, seed=2)
    src.export_parquet(a, tmp_path / "ds")
    src.export_parquet(b, tmp_path / "ds")
    ds = TraceStore(tmp_path / "ds")
    assert ds.runs()["run_id"].tolist() == [a, b]
    pd.testing.assert_frame_equal(_rows(ds, "routing", a), _rows(src, "routing", a))
    with pytest.raises(StoreError, match="already holds run 1.*--overwrite"):
        src.export_parquet(a, tmp_path / "ds")
    src.delete_run(a)
    c = _fill(src, seed=3)  # reuses no id: max + 1
    assert c == 3
    src.export_parquet(b, tmp_path / "ds", overwrite=True, shards=2)
    assert ds.shard_ids(b) == [0, 1] and ds.runs()["run_id"].tolist() == [a, b]
    pd.testing.assert_frame_equal(_rows(ds, "tokens", b), _rows(src, "tokens", b))
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(StoreError, match="is a file"):
        src.export_parquet(b, tmp_path / "file.txt")
    assert (tmp_path / "file.txt").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    with pytest.raises(StoreError, match="other files in it"):
        src.export_parquet(b, tmp_path / "other")
    with pytest.raises(RunNotFoundError):
        src.export_parquet(99, tmp_path / "ds")


def test_import_refusals(tmp_path) -> None:
    src = TraceStore(tmp_path / "a.duckdb")
    run = _fill(src)
    src.export_parquet(run, tmp_path / "ds")
    dst = TraceStore(tmp_path / "b.duckdb")
    with pytest.raises(RunNotFoundError, match="No run 7"):
        dst.import_parquet(tmp_path / "ds", [7])
    with pytest.raises(StoreError, match="No moelens dataset"):
        dst.import_parquet(tmp_path / "nothing-here")
    assert dst.runs().empty


# -- writing a dataset: shards, markers, atomic files --------------------------------------------------


def test_dataset_written_directly_by_shard_writers(tmp_path) -> None:
    driver = TraceStore(tmp_path / "ds", layout="parquet")
    run = driver.create_run("m", n_experts=4, top_k=1)
    worker0, worker1 = TraceStore(tmp_path / "ds"), TraceStore(tmp_path / "ds")  # e.g. two Ray actors
    rows = lambda s: {"routing": {"seq_id": [s, s], "pos": [1, 0], "layer": [0, 0], "rank": [0, 0], "expert": [s, 3], "weight": [1, 1]},
                      "tokens": {"seq_id": [s, s], "pos": [0, 1], "token_id": [7, 8]}}  # noqa: E731
    worker0.append(run, rows(0), shard=0)
    worker0.finish_shard(run, 0)
    worker1.append(run, rows(1), shard=1)
    (tmp_path / "ds" / "routing" / f"run_id={run}" / "shard=1" / ".abc.parquet.tmp").write_bytes(b"half a file")
    with pytest.raises(StoreError, match="shard 1 has rows but no completion marker"):
        driver.finish_run(run)
    assert driver.run(run)["status"] == "recording"  # a half-written shard never reads as complete
    assert driver.runs(status="complete").empty
    assert len(driver.routing(run)) == 4  # whole part files only: the .tmp leftover is never read
    worker1.finish_shard(run, 1)
    with pytest.raises(StoreError, match="already finished"):
        worker1.append(run, rows(1), shard=1)
    driver.finish_run(run)
    assert driver.run(run)["status"] == "complete" and driver.shard_ids(run) == [0, 1]
    assert driver.routing(run)["pos"].tolist() == [0, 1, 0, 1]
    marker = json.loads((tmp_path / "ds" / "runs" / f"run_id={run}" / "shard=1.done").read_text())
    assert marker["rows"] == {"tokens": 2, "routing": 2}


def test_a_run_with_an_expected_shard_count_completes_only_with_all_of_them(tmp_path) -> None:
    ds = TraceStore(tmp_path / "ds", layout="parquet")
    run = ds.create_run("m", n_shards=3)
    for shard in (0, 1):  # shard 2's worker never wrote a row: without the count nothing would be missing
        ds.append(run, {"tokens": {"seq_id": [shard], "pos": [0], "token_id": [1]}}, shard=shard)
        ds.finish_shard(run, shard)
    with pytest.raises(StoreError, match="shard 2 of its 3 shards has not finished"):
        ds.finish_run(run)
    assert ds.run(run)["status"] == "recording"
    ds.append(run, {"tokens": {"seq_id": [2], "pos": [0], "token_id": [1]}}, shard=2)
    ds.finish_run(run)  # this writer's own open shard is finished on the way
    assert ds.run(run)["status"] == "complete" and ds.run(run)["n_shards"] == 3


@pytest.fixture
def two_shard_dataset(tmp_path):
    """A complete run exported as 2 shards (the export records the count), and its dataset folder."""
    file = TraceStore(tmp_path / "t.duckdb")
    run = _fill(file)
    file.export_parquet(run, tmp_path / "ds", shards=2)
    ds = TraceStore(tmp_path / "ds", read_only=True)
    assert ds.run(run)["status"] == "complete" and ds.run(run)["n_shards"] == 2
    return tmp_path / "ds", run


def test_a_shard_deleted_after_the_run_finished_reads_incomplete(two_shard_dataset) -> None:
    import shutil

    folder, run = two_shard_dataset
    for table in RUN_TABLES:
        shutil.rmtree(folder / table / f"run_id={run}" / "shard=1", ignore_errors=True)
    (folder / "runs" / f"run_id={run}" / "shard=1.done").unlink()
    ds = TraceStore(folder, read_only=True)
    info = ds.run(run)
    assert info["status"] == "incomplete"
    assert info["error"].startswith(f"run {run}: shard 1 of 2 has no completion marker")
    assert ds.runs(status="complete").empty and ds.runs()["status"].tolist() == ["incomplete"]
    assert ds.run_version(run)[-1] == "incomplete"  # nothing derived from the complete run is reused
    assert ds.only_shard(0).run(run)["status"] == "incomplete"  # a worker reading shard 0 sees it too


def test_a_partial_copy_reads_incomplete(two_shard_dataset, tmp_path) -> None:
    """A copy that lost one part file (the markers came along) says which shard and table are short."""
    import shutil

    folder, run = two_shard_dataset
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (part,) = (copy / "routing" / f"run_id={run}" / "shard=0").glob("part-*.parquet")
    part.unlink()
    info = TraceStore(copy, read_only=True).run(run)
    assert info["status"] == "incomplete" and f"run {run}: shard 0 has 0 routing rows where it finished with" in info["error"]
    stray = copy / "tokens" / f"run_id={run}" / "shard=5"  # rows of a shard that is not the run's
    shutil.copytree(folder / "tokens" / f"run_id={run}" / "shard=0", stray)
    (copy / "runs" / f"run_id={run}" / "shard=5.done").write_text((folder / "runs" / f"run_id={run}" / "shard=0.done").read_text())
    part.parent.rmdir()
    shutil.copytree(folder / "routing" / f"run_id={run}" / "shard=0", part.parent)
    assert "shard 5 is not one of its 2 shards" in TraceStore(copy, read_only=True).run(run)["error"]
    assert TraceStore(folder, read_only=True).run(run)["status"] == "complete"  # the original is whole


def test_cli_says_an_incomplete_run_is_incomplete_in_one_line(two_shard_dataset) -> None:
    from typer.testing import CliRunner

    from moelens.cli import app

    folder, run = two_shard_dataset
    (folder / "runs" / f"run_id={run}" / "shard=0.done").unlink()
    runner = CliRunner()
    listed = runner.invoke(app, ["runs", "--db", str(folder)])
    assert listed.exit_code == 0 and "incomplete" in listed.output
    shown = runner.invoke(app, ["show", str(run), "--db", str(folder)], env={"COLUMNS": "300"})
    assert f"run {run} is incomplete" in shown.output and "shard 0 of 2 has no completion marker" in shown.output
    analysed = runner.invoke(app, ["analyze", "expert_load", "--db", str(folder)])
    assert analysed.exit_code == 1 and "no complete run" in str(analysed.exception)
    named = runner.invoke(app, ["analyze", "expert_load", "--db", str(folder), "--run", str(run)], env={"COLUMNS": "300"})
    assert named.exit_code == 1 and f"run {run} is incomplete (run {run}: shard 0 of 2" in named.output + str(named.exception)


def test_dataset_refuses_a_sequence_split_over_shards(tmp_path) -> None:
    ds = TraceStore(tmp_path / "ds", layout="parquet")
    run = ds.create_run("m")
    for shard in (0, 1):
        ds.append(run, {"tokens": {"seq_id": [5], "pos": [shard], "token_id": [1]}}, shard=shard)
    with pytest.raises(StoreError, match=r"sequences \[5\] have rows in more than one shard"):
        ds.finish_run(run)
    ds.finish_run(run, "failed", error="split sequence")
    assert ds.run(run)["status"] == "failed"


def test_dataset_single_writer_lifecycle_and_delete(tmp_path) -> None:
    ds = TraceStore(tmp_path / "ds", layout="parquet")
    a = _fill(ds, seed=1)
    b = _fill(ds, seed=2)
    assert (a, b) == (1, 2) and ds.runs()["status"].tolist() == ["complete", "complete"]
    ds.update_run(a, name="renamed", metadata={"x": 1})
    assert ds.run(a)["name"] == "renamed" and ds.run(a)["metadata"] == {"x": 1}
    ds.write_summary(a, "load", pa.table({"v": [1]}))
    ds.delete_run(a)
    assert ds.runs()["run_id"].tolist() == [b] and ds.query("SELECT count(*) AS n FROM routing WHERE run_id = 1")["n"][0] == 0
    assert ds.summary_names(a) == set() and not (tmp_path / "ds" / "summary_load" / "run_id=1").exists()
    with pytest.raises(RunNotFoundError):
        ds.run(a)
    ro = TraceStore(tmp_path / "ds", read_only=True)
    with pytest.raises(StoreError, match="read-only"):
        ro.create_run("m")
    with pytest.raises(StoreError, match="not SQL"):
        with ds.connect(write=True):
            pass


def test_dataset_newer_or_corrupt_marker_is_refused_untouched(tmp_path) -> None:
    ds = TraceStore(tmp_path / "ds", layout="parquet")
    _fill(ds)
    marker = tmp_path / "ds" / "moelens_dataset.json"
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "schema_version": SCHEMA_VERSION + 1}))
    before = marker.read_bytes()
    with pytest.raises(StoreVersionError, match="newer"):
        TraceStore(tmp_path / "ds")
    marker.write_text("{not json")
    with pytest.raises(StoreCorruptError, match="not a moelens dataset marker"):
        TraceStore(tmp_path / "ds")
    assert marker.read_text() == "{not json" and before != marker.read_bytes()
    with pytest.raises(StoreError, match="no moelens_dataset.json"):
        TraceStore(tmp_path)


# -- derived summaries --------------------------------------------------------------------------------


def test_summaries_write_read_replace_delete(any_store: TraceStore) -> None:
    a, b = _fill(any_store, seed=1), _fill(any_store, seed=2)
    assert any_store.read_summary(a, "expert_load") is None and any_store.summary_names(a) == set()
    first = pa.table({"layer": pa.array([1, 1, 3], pa.int16()), "expert": pa.array([0, 1, 0], pa.int16()),
                      "count": pa.array([4, 5, 6], pa.int64()), "gate_mass": [0.5, 1.5, 2.0]})
    any_store.write_summary(a, "expert_load", first)
    any_store.write_summary(b, "expert_load", first.slice(0, 1))
    assert any_store.read_summary(a, "expert_load").equals(first)
    replaced = pa.table({"layer": pa.array([3], pa.int16()), "expert": pa.array([7], pa.int16()),
                         "count": pa.array([9], pa.int64()), "gate_mass": [9.0], "label": ["code"]})
    any_store.write_summary(a, "expert_load", replaced)  # a later definition with one more column
    assert any_store.read_summary(a, "expert_load").equals(replaced)
    assert any_store.read_summary(b, "expert_load").equals(first.slice(0, 1))  # other runs' rows kept
    any_store.write_summary(a, "transitions", pa.table({"n": pa.array([], pa.int64())}))
    assert any_store.summary_names(a) == {"expert_load", "transitions"} and any_store.summary_names(b) == {"expert_load"}
    assert any_store.read_summary(a, "transitions").num_rows == 0  # materialised, empty: not None
    got = any_store.query("SELECT run_id, count(*) AS n FROM summary_expert_load GROUP BY run_id ORDER BY run_id")
    assert got["n"].tolist() == [1, 1]
    assert set(any_store.query("SELECT name FROM summaries WHERE run_id = ?", [a])["name"]) == {"expert_load", "transitions"}
    any_store.delete_run(a)
    assert any_store.summary_names(a) == set() and any_store.read_summary(b, "expert_load").num_rows == 1
    with pytest.raises(ValueError, match="identifier"):
        any_store.write_summary(b, "bad name; DROP TABLE runs", first)
    with pytest.raises(ValueError, match="run_id"):
        any_store.write_summary(b, "x", pa.table({"run_id": [1]}))
    with pytest.raises(RunNotFoundError):
        any_store.write_summary(42, "x", first)


def test_run_version_moves_when_the_run_finishes_not_when_another_is_recorded(any_store: TraceStore) -> None:
    run = any_store.create_run("m")
    any_store.append(run, {"tokens": {"seq_id": [0], "pos": [0], "token_id": [1]}})
    recording = any_store.run_version(run)
    any_store.append(run, {"tokens": {"seq_id": [1], "pos": [0], "token_id": [1]}})
    assert any_store.run_version(run) != recording  # rows still arriving: the key moves with them
    any_store.finish_run(run)
    done = any_store.run_version(run)
    assert done != recording and done[1:] == (run, done[2], "complete") and done[2] is not None
    _fill(any_store)  # another run recorded into the same store
    any_store.write_summary(run, "load", pa.table({"v": [1]}))
    assert any_store.run_version(run) == done
    assert TraceStore(any_store.path, read_only=True).run_version(run) == done
    with pytest.raises(RunNotFoundError):
        any_store.run_version(99)


# -- schema version 1 -> 2 ----------------------------------------------------------------------------

#: The version-1 layout exactly as moelens 0.1 wrote it (tiny fixture, independent of today's DDL).
V1_SQL = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE runs (run_id INTEGER PRIMARY KEY, name VARCHAR, model VARCHAR NOT NULL, model_type VARCHAR, revision VARCHAR,
    n_layers SMALLINT, moe_layers SMALLINT[], n_experts SMALLINT, top_k SMALLINT, n_shared_experts SMALLINT,
    routing_function VARCHAR, dtype VARCHAR, device VARCHAR, created_at TIMESTAMP DEFAULT current_timestamp,
    finished_at TIMESTAMP, status VARCHAR NOT NULL DEFAULT 'recording', error VARCHAR, parent_run_id INTEGER,
    intervention JSON, moelens_version VARCHAR, schema_version INTEGER, metadata JSON);
CREATE TABLE layers (run_id INTEGER NOT NULL, layer SMALLINT NOT NULL, block SMALLINT, module VARCHAR, kind VARCHAR,
    n_experts SMALLINT, top_k SMALLINT, has_shared_expert BOOLEAN);
CREATE TABLE sequences (run_id INTEGER NOT NULL, seq_id INTEGER NOT NULL, label VARCHAR, source VARCHAR, prompt_len INTEGER,
    n_tokens INTEGER, text VARCHAR);
CREATE TABLE tokens (run_id INTEGER NOT NULL, seq_id INTEGER NOT NULL, pos INTEGER NOT NULL, token_id INTEGER NOT NULL,
    token VARCHAR, phase VARCHAR, predicted_id INTEGER);
CREATE TABLE routing (run_id INTEGER NOT NULL, seq_id INTEGER NOT NULL, pos INTEGER NOT NULL, layer SMALLINT NOT NULL,
    rank UTINYINT NOT NULL, expert SMALLINT NOT NULL, weight FLOAT);
CREATE TABLE router_logits (run_id INTEGER NOT NULL, seq_id INTEGER NOT NULL, pos INTEGER NOT NULL, layer SMALLINT NOT NULL,
    logits FLOAT[]);
CREATE TABLE shared_experts (run_id INTEGER NOT NULL, seq_id INTEGER NOT NULL, pos INTEGER NOT NULL, layer SMALLINT NOT NULL,
    gate FLOAT);
INSERT INTO meta VALUES ('schema_version', '1'), ('created_by', 'moelens 0.1.0');
INSERT INTO runs (run_id, model, n_experts, top_k, status, finished_at, schema_version)
    VALUES (1, 'old/model', 4, 2, 'complete', TIMESTAMP '2026-11-01 10:00:00', 1);
INSERT INTO layers VALUES (1, 0, 0, 'model.layers.0.mlp', 'moe', 4, 2, false);
INSERT INTO sequences VALUES (1, 0, 'code', 's', 2, 2, 'ab');
INSERT INTO tokens VALUES (1, 0, 0, 10, 'a', 'prompt', 11), (1, 0, 1, 11, 'b', 'prompt', NULL);
INSERT INTO routing VALUES (1, 0, 0, 0, 0, 3, 0.75), (1, 0, 0, 0, 1, 1, 0.25), (1, 0, 1, 0, 0, 2, 0.5), (1, 0, 1, 0, 1, 0, 0.5);
"""


def _schema(path) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT table_name, column_name, data_type, ordinal_position FROM information_schema.columns "
                           "WHERE table_schema = 'main' ORDER BY ALL").fetchall()
    finally:
        con.close()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_v1_store_read_only_untouched_then_migrated_on_write(tmp_path) -> None:
    old = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(old))
    con.execute(V1_SQL)
    con.close()
    before = _digest(old)
    ro = TraceStore(old, read_only=True)  # readable as is: views stand in for the tables v2 added
    assert ro.run(1)["model"] == "old/model" and len(ro.routing(1)) == 4
    assert ro.summary_names(1) == set() and ro.read_summary(1, "load") is None
    assert ro.query("SELECT count(*) AS n FROM expert_contributions")["n"][0] == 0
    assert ro.run_version(1) == (str(old.resolve()), 1, "2026-11-01 10:00:00", "complete")
    assert _digest(old) == before  # nothing was written
    store = TraceStore(old)  # opened for writing: migrated in place
    store.append(1, {"expert_contributions": {"seq_id": [0], "pos": [0], "layer": [0], "rank": [0], "norm": [2.5]}})
    assert ro.query("SELECT norm FROM expert_contributions")["norm"].tolist() == [2.5]  # the reader sees the real table now
    fresh = TraceStore(tmp_path / "v2.duckdb")
    assert _schema(old) == _schema(fresh.path)
    assert store.query("SELECT value FROM meta WHERE key = 'schema_version'")["value"][0] == str(SCHEMA_VERSION)
    assert store.routing(1)["expert"].tolist() == [3, 1, 2, 0] and store.tokens(1)["token"].tolist() == ["a", "b"]
    store.write_summary(1, "load", pa.table({"v": [1]}))
    store.append(1, {"block_residuals": {"seq_id": [0], "pos": [0], "layer": [0], "cos": [0.9]}})
    migrated = _digest(old)
    TraceStore(old)  # a current store: opening again changes nothing
    assert _digest(old) == migrated and store.summary_names(1) == {"load"}


def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch) -> None:
    import moelens.store.store as store_module

    old = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(old))
    con.execute(V1_SQL)
    con.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, (2, "CREATE TABLE broken (x NOT_A_TYPE)")))
    with pytest.raises(StoreError, match=f"migrating schema 1 -> {SCHEMA_VERSION} failed.*left as it was"):
        TraceStore(old)
    monkeypatch.undo()
    assert TraceStore(old, read_only=True).query("SELECT value FROM meta WHERE key = 'schema_version'")["value"][0] == "1"
    assert "expert_contributions" not in {r[0] for r in _schema(old)}
