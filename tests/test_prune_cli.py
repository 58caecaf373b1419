"""`moelens record --contributions`, `moelens analyze reap` and `moelens prune` as a user runs them."""

from __future__ import annotations

import json

from test_cli import moelens


def test_record_analyze_prune_evaluate(tmp_path) -> None:
    db = str(tmp_path / "t.duckdb")
    (tmp_path / "calib.txt").write_text("def f(x):\n    return x + 1\n" * 3)
    held = tmp_path / "held"
    for label, text in (("code", "def g(y):\n    return y * 2\n"), ("prose", "The dog ran in the park.\n")):
        (held / label).mkdir(parents=True)
        (held / label / "a.txt").write_text(text)
    moelens("record", "tiny:qwen3_moe", str(tmp_path / "calib.txt"), "--db", db, "--contributions")
    rows = json.loads(moelens("analyze", "reap", "--run", "1", "--db", db, "--format", "json").stdout)
    assert len(rows) == 16 and all(r["reap"] >= 0 for r in rows)
    out = tmp_path / "pruned"
    proc = moelens("prune", "tiny:qwen3_moe", "--run", "1", "--db", db, "--keep", "0.5", "--out", str(out),
                   "--evaluate", str(held), "--n-random", "2", "--format", "json")
    lines = proc.stdout.strip().splitlines()
    plan, result = json.loads(lines[0]), json.loads(lines[1])
    assert [r["kept"] for r in plan] == [4, 4] and (out / "config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_experts", config.get("num_local_experts")) == 4
    assert {r["method"] for r in result} == {"reap", "frequency", "random"}
    assert {r["label"] for r in result} == {"code", "prose", "all"}
    again = moelens("prune", "tiny:qwen3_moe", "--run", "1", "--db", db, "--out", str(out), check=False)
    assert again.returncode == 1 and "not empty" in again.stderr
    few = moelens("prune", "tiny:qwen3_moe", "--run", "1", "--db", db, "--keep", "0.1", check=False)
    assert few.returncode == 1 and "fewer than its top-k" in few.stderr and "Traceback" not in few.stderr
    other = moelens("prune", "tiny:olmoe", "--run", "1", "--db", db, check=False)
    assert other.returncode == 1 and "recorded from" in other.stderr
