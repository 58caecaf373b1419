"""Many workers, one run: Ray actors each recording a shard of one Parquet-dataset run, on a local Ray cluster
started here (2 CPUs), with a real tiny transformers model. Equal row for row to a single-process recording."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from moelens import TraceStore  # noqa: E402
from moelens.errors import InputError, MoelensError  # noqa: E402
from moelens.recording.distributed import record_distributed, split_contiguous  # noqa: E402

MODEL = "tiny:mixtral"
TEXTS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4) for i in range(10)]
LABELS = [("even" if i % 2 == 0 else "odd") for i in range(10)]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _single(tmp_path, **kwargs) -> tuple[TraceStore, int]:
    from moelens.cli.common import resolve_model
    from moelens.recording.record import record

    model, tok, _ = resolve_model(MODEL)
    store = TraceStore(tmp_path / "single.duckdb")
    return store, record(model, tok, TEXTS, labels=LABELS, store=store, progress=False, **kwargs)


def _rows(store: TraceStore, table: str, run: int, keys: str):
    return store.query(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ? ORDER BY {keys}", [run])


PROMPTS = [f"prompt {i}: " + "the quick brown fox " * (1 + i % 3) for i in range(7)]


def _same_run(store: TraceStore, run: int, single: TraceStore, single_run: int) -> None:
    """Row for row: tokens, sequences and layers exactly, routing exactly but for float rounding of the weights."""
    for table, keys in (("routing", "seq_id, pos, layer, rank"), ("tokens", "seq_id, pos"), ("sequences", "seq_id"),
                        ("layers", "layer")):
        got, want = _rows(store, table, run, keys), _rows(single, table, single_run, keys)
        assert len(got) == len(want) > 0, table
        exact = [c for c in want.columns if c != "weight"]
        assert got[exact].equals(want[exact]), table
        if "weight" in want:
            assert (got["weight"] - want["weight"]).abs().max() < 1e-5


def test_split_contiguous_balances_tokens_and_keeps_every_sequence():
    assert split_contiguous([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert split_contiguous([10, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert split_contiguous([5], 3) == [(0, 1)]  # never an empty shard
    parts = split_contiguous([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert parts[0][0] == 0 and parts[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_two_workers_equal_one_process_row_for_row(cluster, tmp_path):
    single, single_run = _single(tmp_path, seq_len=16, batch_size=3)
    run = record_distributed(MODEL, TEXTS, tmp_path / "ds", workers=2, labels=LABELS, seq_len=16, batch_size=3, progress=False)
    store = TraceStore(tmp_path / "ds")
    info = store.run(run)
    assert info["status"] == "complete" and store.shard_ids(run) == [0, 1] and info["n_shards"] == 2
    assert all(store.shard_done(run, s) for s in (0, 1))
    _same_run(store, run, single, single_run)
    seqs = _rows(store, "sequences", run, "seq_id")
    assert list(seqs.seq_id) == list(range(len(seqs)))  # global, unique, in input order
    want_info = single.run(single_run)
    assert [info[f] for f in ("model_type", "n_experts", "top_k", "revision")] == [want_info[f] for f in ("model_type", "n_experts", "top_k", "revision")]
    assert list(info["moe_layers"]) == list(want_info["moe_layers"])


def test_two_workers_generate_like_one_process(cluster, tmp_path):
    """Batched generation on each worker: prompt tokens once, generated tokens once, no padding rows, global ids."""
    from moelens.cli.common import resolve_model
    from moelens.recording.record import record

    model, tok, _ = resolve_model(MODEL)
    single = TraceStore(tmp_path / "single.duckdb")
    single_run = record(model, tok, PROMPTS, store=single, generate=5, batch_size=3, progress=False)
    run = record_distributed(MODEL, PROMPTS, tmp_path / "ds", workers=2, generate=5, batch_size=3, progress=False)
    store = TraceStore(tmp_path / "ds")
    info = store.run(run)
    assert info["status"] == "complete" and store.shard_ids(run) == [0, 1]
    _same_run(store, run, single, single_run)
    tokens, seqs = _rows(store, "tokens", run, "seq_id, pos"), _rows(store, "sequences", run, "seq_id")
    assert list(seqs.seq_id) == list(range(len(PROMPTS)))
    assert not tokens.duplicated(["seq_id", "pos"]).any()
    per_seq = tokens.groupby("seq_id").agg(n=("pos", "size"), last=("pos", "max"),
                                           generated=("phase", lambda p: int((p == "generated").sum())))
    assert (per_seq.n == seqs.set_index("seq_id").n_tokens).all() and (per_seq.last == per_seq.n - 1).all()
    assert (per_seq.n - per_seq.generated == seqs.set_index("seq_id").prompt_len).all()
    assert (per_seq.generated > 0).all() and (per_seq.generated <= 5).all()
    routed = store.query("SELECT count(DISTINCT (seq_id, pos)) AS n FROM routing WHERE run_id = ?", [run]).n[0]
    assert routed == len(tokens)  # every stored token routed once, no padding row
    assert info["metadata"]["generate"] == {"max_new_tokens": 5, "do_sample": False}
    assert info["metadata"]["generate_batch_size"] == single.run(single_run)["metadata"]["generate_batch_size"] == 3


def test_generation_on_an_encoder_decoder_is_refused_before_a_run_exists(cluster, tmp_path):
    with pytest.raises(InputError, match="decoder-only"):
        record_distributed("tiny:switch_transformers", PROMPTS, tmp_path / "ds", workers=1, generate=3, progress=False)
    assert TraceStore(tmp_path / "ds").runs().empty


def test_cli_generates_with_two_workers(tmp_path):
    """The documented command: prompts from a file, two local workers, batched generation; equal to one process."""
    from moelens.cli.common import resolve_model
    from moelens.recording.record import record

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"text": "{p}", "label": "l{i % 2}"}}\n' for i, p in enumerate(PROMPTS)))
    proc = _run_cli(["record", MODEL, str(data), "--db", str(tmp_path / "ds"), "--workers", "2", "--generate", "4",
                     "--batch-size", "3"])
    assert proc.returncode == 0, proc.stderr
    model, tok, _ = resolve_model(MODEL)
    single = TraceStore(tmp_path / "single.duckdb")
    from moelens.recording.inputs import read_paths

    single_run = record(model, tok, read_paths([data]), store=single, generate=4, batch_size=3, progress=False)
    store = TraceStore(tmp_path / "ds")
    [run] = store.runs().run_id.tolist()
    assert store.run(run)["status"] == "complete" and store.shard_ids(run) == [0, 1]
    _same_run(store, run, single, single_run)


def test_a_killed_worker_fails_the_run_and_leaves_its_shard_unfinished(cluster, tmp_path):
    texts = TEXTS * 30  # long enough that shard 1 is still recording when it is killed
    with pytest.raises(MoelensError, match="worker for shard 1 failed"):
        record_distributed(MODEL, texts, tmp_path / "ds", workers=2, seq_len=16, batch_size=1, progress=False,
                           on_dispatch=lambda actors: ray.kill(actors[1]))
    store = TraceStore(tmp_path / "ds")
    [run] = store.runs().run_id.tolist()
    info = store.run(run)
    assert info["status"] == "failed" and "shard 1" in info["error"]
    assert not store.shard_done(run, 1)  # whatever shard 1 wrote before it died carries no completion marker


def test_a_worker_that_raises_fails_the_run_with_its_reason(cluster, tmp_path):
    with pytest.raises(MoelensError, match="worker for shard .* failed: TypeError"):
        record_distributed(MODEL, TEXTS, tmp_path / "ds", workers=2, seq_len=16, progress=False, flush_tokens="x")
    store = TraceStore(tmp_path / "ds")
    info = store.run(store.runs().run_id.iloc[0])
    assert info["status"] == "failed" and "TypeError" in info["error"]
    assert not any(store.shard_done(info["run_id"], s) for s in store.shard_ids(info["run_id"]))


def test_more_workers_than_the_cluster_can_place_is_refused(cluster, tmp_path):
    with pytest.raises(InputError, match="--workers 3 needs 3 CPUs .* has 2"):
        record_distributed(MODEL, TEXTS, tmp_path / "ds", workers=3, progress=False)
    assert TraceStore(tmp_path / "ds").runs().empty  # refused before a run exists


def test_workers_refuse_a_duckdb_file(tmp_path):
    with pytest.raises(InputError, match="Parquet dataset folder"):
        record_distributed(MODEL, TEXTS, tmp_path / "x.duckdb", workers=2)


def test_cli_errors_are_one_line(tmp_path):
    for model, argv, expected in (
        (MODEL, ["--db", str(tmp_path / "x.duckdb")], "Parquet dataset folder"),
        (MODEL, ["--db", str(tmp_path / "ds"), "--address", "127.0.0.1:1"], "cannot reach a Ray cluster"),
        (MODEL, ["--db", str(tmp_path / "ds2"), "--engine", "dask"], "--engine"),
        ("tiny:nonexistent", ["--db", str(tmp_path / "ds3")], "tiny:nonexistent: unknown model type"),  # raised in the actor
    ):
        proc = _run_cli(["record", model, "--text", "hello", "--workers", "1", *argv])
        assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _run_cli(argv):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "moelens.cli", *argv], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "COLUMNS": "200"})
