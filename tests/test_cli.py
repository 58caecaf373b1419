"""The `moelens` command line as a user runs it, in-process (one real subprocess checks the entry point)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import duckdb
import pytest

from moelens.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def moelens(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``moelens ARGS`` in this process; returns the exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_console_script_reports_errors_without_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moelens.cli", "runs", "--db", str(tmp_path / "none.duckdb")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1 and "No trace store" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    db = tmp_path_factory.mktemp("cli") / "t.duckdb"
    data = db.parent / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "domain": d}) for t, d in
                              [("def f(x): return x", "code"), ("Hello there, world.", "prose"), ("1 + 1 = 2", "math")]))
    proc = moelens("record", "tiny:mixtral", str(data), "--label-field", "domain", "--text", "extra text",
                   "--label", "misc", "--db", str(db), "--name", "first")
    assert "run 1 complete" in proc.stdout
    return db


def test_record_runs_show_export_delete(recorded, tmp_path) -> None:
    db = str(recorded)
    runs = json.loads(moelens("runs", "--db", db, "--format", "json").stdout)
    assert runs[0]["run_id"] == 1 and runs[0]["status"] == "complete" and runs[0]["n_sequences"] == 4
    assert runs[0]["labels"] == "misc"  # --label applies to every input
    shown = json.loads(moelens("show", "1", "--db", db, "--format", "json").stdout)
    assert shown["run"]["model"] == "tiny:mixtral" and len(shown["layers"]) == 2
    assert "layers" in moelens("show", "1", "--db", db).stdout
    assert "expert_counts" in shown["summaries"] and "expert_counts" in moelens("show", "1", "--db", db).stdout  # record summarises
    pq = str(tmp_path / "pq")
    moelens("export", "1", "--parquet", pq, "--db", db, "--shards", "2")
    moelens("record", "tiny:olmoe", "--text", "second run", "--db", db)
    moelens("export", "2", "--parquet", pq, "--db", db)  # a second run into the same folder keeps the first
    assert [r["run_id"] for r in json.loads(moelens("runs", "--db", pq, "--format", "json").stdout)] == [1, 2]
    proc = moelens("export", "1", "--parquet", pq, "--db", db, check=False)
    assert proc.returncode == 1 and "already holds run 1" in proc.stderr and "--overwrite" in proc.stderr
    moelens("export", "1", "--parquet", pq, "--db", db, "--overwrite")
    proc = moelens("export", "1", "--parquet", db, "--db", db, check=False)
    assert proc.returncode == 1 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    back = str(tmp_path / "back.duckdb")
    assert "run 2 -> run 1" in moelens("import", pq, "--run", "2", "--db", back).stdout
    assert "run 1 -> run 2" in moelens("import", pq, "--run", "1", "--db", back).stdout
    assert json.loads(moelens("show", "2", "--db", back, "--format", "json").stdout)["layers"] == shown["layers"]
    moelens("delete", "2", "--yes", "--db", db)
    assert [r["run_id"] for r in json.loads(moelens("runs", "--db", db, "--format", "json").stdout)] == [1]


def test_csv_output(recorded) -> None:
    out = moelens("runs", "--db", str(recorded), "--format", "csv").stdout
    assert out.splitlines()[0].startswith("run_id,name,model")


@pytest.mark.parametrize("command", [[], ["record"], ["runs"], ["show"], ["export"], ["import"], ["delete"], ["analyze"], ["demo"], ["app"]])
def test_help(command) -> None:
    out = moelens(*command, "--help").stdout
    assert "Usage" in out


def test_bad_inputs_fail_clearly_and_lose_nothing(recorded, tmp_path) -> None:
    db = str(recorded)
    before = recorded.read_bytes()
    proc = moelens("show", "99", "--db", db, check=False)
    assert proc.returncode == 1 and "No run 99" in proc.stderr and "Traceback" not in proc.stderr
    proc = moelens("record", "tiny:mixtral", str(tmp_path / "missing.txt"), "--db", db, check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = moelens("record", "tiny:mixtral", "--text", "", "--db", db, check=False)
    assert proc.returncode == 1 and "nothing to record" in proc.stderr
    proc = moelens("record", "tiny:mixtral", "--db", db, check=False)
    assert proc.returncode == 1 and "nothing to record" in proc.stderr
    proc = moelens("runs", "--db", str(tmp_path / "none.duckdb"), check=False)
    assert proc.returncode == 1 and "No trace store" in proc.stderr
    assert json.loads(moelens("runs", "--db", db, "--format", "json").stdout)[0]["status"] == "complete"
    assert len(recorded.read_bytes()) == len(before)


def test_non_moe_model_lists_supported_types(tmp_path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    proc = moelens("record", str(tmp_path / "dense"), "--text", "hi", "--db", str(tmp_path / "t.duckdb"), check=False)
    assert proc.returncode == 1 and "mixtral" in proc.stderr and "Traceback" not in proc.stderr
    proc = moelens("record", str(tmp_path / "no-such-model"), "--text", "hi", "--db", str(tmp_path / "t.duckdb"), check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_corrupt_and_newer_stores(tmp_path, recorded) -> None:
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"garbage" * 1000)
    proc = moelens("runs", "--db", str(junk), check=False)
    assert proc.returncode == 1 and "trace store" in proc.stderr
    newer = tmp_path / "newer.duckdb"
    newer.write_bytes(recorded.read_bytes())
    con = duckdb.connect(str(newer))
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    proc = moelens("record", "tiny:mixtral", "--text", "x", "--db", str(newer), check=False)
    assert proc.returncode == 1 and "newer" in proc.stderr
    con = duckdb.connect(str(newer), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    con.close()


def test_analyze_lists_and_computes_scores(recorded) -> None:
    db = str(recorded)
    assert "srp" in moelens("analyze", "--list", "--format", "csv").stdout
    rows = json.loads(moelens("analyze", "expert_load", "--run", "1", "--db", db, "--format", "json").stdout)
    assert {r["layer"] for r in rows} == {0, 1} and abs(sum(r["share"] for r in rows if r["layer"] == 0) - 1) < 1e-6
    csv_out = moelens("analyze", "srp", "--db", db, "-p", "segment_lengths=[2]", "--format", "csv").stdout
    assert csv_out.splitlines()[0].startswith("layer,m,srp")
    proc = moelens("analyze", "no_such_score", "--db", db, check=False)
    assert proc.returncode == 1 and "unknown score" in proc.stderr


def test_runs_table_fits_80_columns(tmp_path) -> None:
    from app_fixtures import make_store

    db = make_store(tmp_path / "f.duckdb")["path"]
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "moelens.cli", "runs", "--db", str(db)], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "e+0" not in out and "<NA>" not in out and "nan" not in out
    row = next(line for line in lines if "synthetic: steered" in line)
    assert "│      1 │" in row and "284" in row  # the parent id and an integer token count
    assert next(line for line in lines if "synthetic: baseline" in line).rstrip("│ ").endswith("-")  # no parent
