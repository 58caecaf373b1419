"""Batched generation and the background writer, on real tiny models into real DuckDB files.

Batched generation (left-padded prompts, rows stopping at their own EOS) must store exactly what generating
each prompt alone stores, on every architecture that generates; the writer thread must change nothing, bound
its queue and hand its errors to the caller.
"""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pandas as pd
import pytest

from moelens import TraceStore
from moelens.errors import InputError
from moelens.recording import record as record_module
from moelens.recording.batch import generation_rows
from moelens.recording.record import record
from moelens.recording.writer import BackgroundWriter, RunWriter
from moelens.tiny import TINY_MODEL_TYPES, tiny_model, tiny_tokenizer

PROMPTS = ["def f(x):", "The quick brown fox jumps", "a b", "1 + 2 ="]
N_NEW = 6
CAUSAL = [t for t in TINY_MODEL_TYPES if t != "switch_transformers"]
KEYS = ["seq_id", "pos", "layer", "rank"]


@functools.cache
def model_for(model_type: str):
    return tiny_model(model_type)[0]


def _table(store: TraceStore, table: str, run: int, order: list[str]) -> pd.DataFrame:
    return store.query(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ? ORDER BY {', '.join(order)}", [run])


def assert_same_run(store: TraceStore, a: int, b: int, *, tables: tuple[str, ...] = ()) -> None:
    """Same tokens, texts and routing (weights to 1e-6), plus the float tables named in ``tables``."""
    pd.testing.assert_frame_equal(store.tokens(a), store.tokens(b))
    sa, sb = store.sequences(a), store.sequences(b)
    cols = ["seq_id", "prompt_len", "n_tokens", "text", "label", "source"]
    pd.testing.assert_frame_equal(sa[cols], sb[cols])
    ra, rb = _table(store, "routing", a, KEYS), _table(store, "routing", b, KEYS)
    assert len(ra) and ra[[*KEYS, "expert"]].equals(rb[[*KEYS, "expert"]])
    np.testing.assert_allclose(ra["weight"], rb["weight"], atol=1e-6)
    for table, keys, value in (("router_logits", KEYS[:3], "logits"), ("expert_contributions", KEYS, "norm"),
                               ("block_residuals", KEYS[:3], "cos")):
        if table in tables:
            ta, tb = _table(store, table, a, keys), _table(store, table, b, keys)
            assert len(ta) and ta[keys].equals(tb[keys])
            np.testing.assert_allclose(np.stack(ta[value]).astype(float), np.stack(tb[value]).astype(float), atol=1e-5)


def _early_eos(store: TraceStore, model, tok) -> int:
    """An id one prompt generates early and another never does, so one row stops before the others."""
    probe = record(model, tok, PROMPTS, store=store, generate=N_NEW, batch_size=1, progress=False)
    tokens = store.tokens(probe)
    generated = tokens[tokens.phase == "generated"]
    for seq_id, rows in generated.groupby("seq_id"):
        for token in rows["token_id"].tolist()[1:-1]:
            if any(token not in other["token_id"].tolist() for s, other in generated.groupby("seq_id") if s != seq_id):
                return int(token)
    pytest.skip("no token ends one continuation early and spares another")


@pytest.mark.parametrize("model_type", CAUSAL)
def test_batched_generation_equals_one_prompt_at_a_time(tmp_path, model_type: str) -> None:
    model, tok = model_for(model_type), tiny_tokenizer()
    store = TraceStore(tmp_path / "t.duckdb")
    eos = _early_eos(store, model, tok)
    settings = {"max_new_tokens": N_NEW, "eos_token_id": eos}
    alone = record(model, tok, PROMPTS, store=store, generate=settings, batch_size=1, progress=False)
    batched = record(model, tok, PROMPTS, store=store, generate=settings, batch_size=3, progress=False)
    assert store.run(batched)["metadata"]["generate_batch_size"] == 3
    new = (store.sequences(alone)["n_tokens"] - store.sequences(alone)["prompt_len"]).tolist()
    assert min(new) < N_NEW and max(new) == N_NEW  # one row stopped at its EOS, another ran to the end
    assert_same_run(store, alone, batched)
    tokens = store.tokens(batched)
    assert (tokens.groupby("seq_id")["token"].agg("".join) == store.sequences(batched)["text"]).all()


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_batched_generation_with_logits_and_contributions(tmp_path, model_type: str) -> None:
    model, tok = model_for(model_type), tiny_tokenizer()
    store = TraceStore(tmp_path / "t.duckdb")
    kw = dict(store=store, generate=N_NEW, logits=True, contributions=True, progress=False)
    alone = record(model, tok, PROMPTS, batch_size=1, **kw)
    batched = record(model, tok, PROMPTS, batch_size=4, **kw)
    assert_same_run(store, alone, batched, tables=("router_logits", "expert_contributions", "block_residuals"))


def test_generation_rows_map_padding_and_finished_rows_away() -> None:
    rows = generation_rows(10, prompt_lens=[2, 3], width=3, n_generated=[1, 2], n_steps=2)
    kept = list(zip(rows.seq_id[rows.keep].tolist(), rows.pos[rows.keep].tolist()))
    # prompt forward (row 0 has one pad on the left), then step 1 for both rows, step 2 only for row 1
    assert kept == [(10, 0), (10, 1), (11, 0), (11, 1), (11, 2), (10, 2), (11, 3), (11, 4)]
    assert len(rows.seq_id) == 2 * 3 + 2 * 2


def test_settings_that_see_the_padding_generate_one_prompt_at_a_time(store) -> None:
    model, tok = model_for("mixtral"), tiny_tokenizer()
    run = record(model, tok, PROMPTS[:2], store=store, generate={"max_length": 30}, batch_size=4, progress=False)
    assert store.run(run)["metadata"]["generate_batch_size"] == 1  # a padded batch would cut the short prompt's
    alone = record(model, tok, PROMPTS[:2], store=store, generate={"max_length": 30}, batch_size=1, progress=False)
    assert_same_run(store, alone, run)
    with pytest.raises(InputError, match="num_beams"):
        record(model, tok, PROMPTS, store=store, generate={"max_new_tokens": 2, "num_beams": 2}, progress=False)


# -- the writer thread -----------------------------------------------------------------------------------


@pytest.mark.parametrize("generate", [None, 4])
def test_writer_thread_changes_nothing(store, generate) -> None:
    model, tok = model_for("qwen2_moe"), tiny_tokenizer()  # shared-expert gates too
    kw = dict(store=store, batch_size=2, generate=generate, logits=True, flush_tokens=8, progress=False)
    inline = record(model, tok, PROMPTS * 2, max_pending=0, **kw)
    threaded = record(model, tok, PROMPTS * 2, max_pending=2, **kw)
    assert_same_run(store, inline, threaded, tables=("router_logits",))
    pd.testing.assert_frame_equal(_table(store, "shared_experts", inline, KEYS[:3]),
                                  _table(store, "shared_experts", threaded, KEYS[:3]))


@pytest.mark.parametrize("max_pending", [0, 2])
def test_error_while_building_columns_fails_the_run(store, monkeypatch, max_pending) -> None:
    model, tok = model_for("mixtral"), tiny_tokenizer()
    calls = []

    def broken(*args, **kwargs):
        calls.append(threading.current_thread().name)
        raise ValueError("column building broke")

    monkeypatch.setattr(record_module, "routing_columns", broken)
    with pytest.raises(ValueError, match="column building broke"):
        record(model, tok, PROMPTS * 3, store=store, batch_size=1, max_pending=max_pending, progress=False)
    run = store.runs().iloc[-1]
    assert run["status"] == "failed" and "column building broke" in store.run(int(run["run_id"]))["error"]
    assert calls == ["moelens-writer" if max_pending else "MainThread"]  # the first failure stops the writing
    assert store.tokens(int(run["run_id"])).empty
    assert not any(t.name == "moelens-writer" for t in threading.enumerate())  # joined
    assert all(not m._forward_hooks for m in model.modules())


def test_interrupt_with_jobs_queued_fails_the_run_and_joins(store) -> None:
    model, tok = model_for("mixtral"), tiny_tokenizer()

    def stream():
        yield from PROMPTS * 2
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(model, tok, stream(), store=store, batch_size=1, max_pending=4, progress=False)
    assert store.runs().iloc[-1]["status"] == "failed"
    assert not any(t.name == "moelens-writer" for t in threading.enumerate())


def test_queue_bound_blocks_the_submitter(store) -> None:
    run = store.create_run("synthetic")
    release, started = threading.Event(), threading.Event()
    submitted: list[int] = []

    def job(i: int):
        def run_it():
            if i == 0:
                started.set()
                release.wait(10)
            return {"sequences": {"seq_id": np.array([i], np.int32)}}, 1, 1
        return run_it

    with BackgroundWriter(RunWriter(store, run), max_pending=2) as background:
        def submit_all():
            for i in range(6):
                background.submit(job(i))
                submitted.append(i)

        submitter = threading.Thread(target=submit_all)
        submitter.start()
        assert started.wait(10)
        time.sleep(0.3)
        assert len(submitted) == 3  # one job running, two queued, the fourth submit waits
        release.set()
        submitter.join(10)
    assert submitted == list(range(6)) and background.writer.n_sequences == 6
