"""Recording end to end on real tiny models into real DuckDB files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from moelens import TraceStore
from moelens.adapters import RoutingCapture, find_routers
from moelens.errors import InputError
from moelens.recording import Document, read_paths
from moelens.recording.record import record
from moelens.tiny import tiny_model, tiny_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé façade — naïve café 😀 and 中文 too",
    "1 + 2 = 3; 4 * 5 = 20",
    "short",
]


@pytest.fixture(scope="module")
def mixtral():
    model, _ = tiny_model("mixtral", seed=0)
    return model, tiny_tokenizer(model.config.vocab_size)


def _routing(store: TraceStore, run: int) -> pd.DataFrame:
    return store.query("SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE run_id = ? "
                       "ORDER BY seq_id, pos, layer, rank", [run])


def test_records_every_token_with_exact_text(store, mixtral) -> None:
    model, tok = mixtral
    run = record(model, tok, TEXTS, store=store, labels=["code", "prose", "multi", "math", "prose"], batch_size=2,
                 progress=False)
    info = store.run(run)
    assert info["status"] == "complete" and info["model_type"] == "mixtral" and info["top_k"] == 2
    seqs = store.sequences(run)
    assert seqs["text"].tolist() == TEXTS and seqs["label"].tolist() == ["code", "prose", "multi", "math", "prose"]
    tokens = store.tokens(run)
    for seq_id, text in enumerate(TEXTS):
        seq_tokens = tokens[tokens.seq_id == seq_id]
        assert "".join(seq_tokens["token"]) == text  # exact, multibyte-safe
        assert seq_tokens["token_id"].tolist() == tok(text)["input_ids"]
    routing = _routing(store, run)
    layers = [s.layer for s in find_routers(model).sites]
    assert len(routing) == len(tokens) * len(layers) * 2
    w = routing["weight"].to_numpy().reshape(-1, 2)
    assert (w[:, 0] >= w[:, 1]).all()  # rank 0 = largest gate weight
    assert store.layers(run)["layer"].tolist() == layers


def test_padding_is_never_stored_and_batching_changes_nothing(tmp_path, mixtral) -> None:
    model, tok = mixtral
    batched = TraceStore(tmp_path / "a.duckdb")
    single = TraceStore(tmp_path / "b.duckdb")
    ra = record(model, tok, TEXTS, store=batched, batch_size=5, progress=False)
    rb = record(model, tok, TEXTS, store=single, batch_size=1, progress=False)
    ta, tb = batched.tokens(ra), single.tokens(rb)
    pd.testing.assert_frame_equal(ta, tb)
    assert len(ta) == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    a, b = _routing(batched, ra), _routing(single, rb)
    assert a[["seq_id", "pos", "layer", "rank", "expert"]].equals(b[["seq_id", "pos", "layer", "rank", "expert"]])
    np.testing.assert_allclose(a["weight"], b["weight"], atol=1e-5)


def test_stored_routing_is_what_the_experts_received(store, mixtral) -> None:
    model, tok = mixtral
    info = find_routers(model)
    received: dict[int, list] = {}
    handles = [site.experts.register_forward_pre_hook(
        lambda mod, args, layer=site.layer: received.setdefault(layer, []).append((args[1].clone(), args[2].clone())))
        for site in info.sites]
    try:
        run = record(model, tok, TEXTS[:1], store=store, progress=False)
    finally:
        for h in handles:
            h.remove()
    routing = _routing(store, run)
    for layer, [(idx, w)] in received.items():
        got = routing[routing.layer == layer]
        expert = got["expert"].to_numpy().reshape(-1, 2)
        weight = got["weight"].to_numpy().reshape(-1, 2)
        order = torch.argsort(-w, dim=1, stable=True)
        assert np.array_equal(expert, torch.gather(idx, 1, order).numpy())
        assert np.array_equal(weight, torch.gather(w, 1, order).float().numpy())


def test_outputs_identical_and_hooks_removed(store, mixtral) -> None:
    model, tok = mixtral
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    before = model(ids).logits
    record(model, tok, TEXTS, store=store, progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(ids).logits, before)


def test_generate_recording_equals_forward_recording(store, mixtral) -> None:
    model, tok = mixtral
    gen_run = record(model, tok, ["def f(x):", "The fox"], store=store, generate=6, progress=False)
    tokens = store.tokens(gen_run)
    seqs = store.sequences(gen_run)
    assert (seqs["prompt_len"] < seqs["n_tokens"]).all()
    assert set(tokens["phase"]) == {"prompt", "generated"}
    finals = [tokens[tokens.seq_id == s]["token_id"].tolist() for s in seqs["seq_id"]]
    fwd_run = record(model, tok, finals, store=store, progress=False)
    a, b = _routing(store, gen_run), _routing(store, fwd_run)
    assert a[["seq_id", "pos", "layer", "rank", "expert"]].equals(b[["seq_id", "pos", "layer", "rank", "expert"]])
    np.testing.assert_allclose(a["weight"], b["weight"], atol=1e-6)
    gen_pred = tokens.dropna(subset=["predicted_id"])
    fwd_pred = store.tokens(fwd_run).set_index(["seq_id", "pos"]).loc[list(zip(gen_pred.seq_id, gen_pred.pos))]
    assert gen_pred["predicted_id"].astype(int).tolist() == fwd_pred["predicted_id"].astype(int).tolist()
    for s, seq in seqs.iterrows():
        assert "".join(tokens[tokens.seq_id == seq.seq_id]["token"]) == seq.text


def test_predicted_ids_are_the_argmax(store, mixtral) -> None:
    model, tok = mixtral
    run = record(model, tok, TEXTS[1], store=store, progress=False)
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    expected = model(ids).logits.argmax(-1)[0].tolist()
    assert store.tokens(run)["predicted_id"].tolist() == expected


def test_limits_and_chunking(store, mixtral) -> None:
    model, tok = mixtral
    long_text = "abc def ghi " * 40
    n = len(tok(long_text)["input_ids"])
    run = record(model, tok, long_text, store=store, seq_len=32, progress=False)
    seqs = store.sequences(run)
    assert seqs["n_tokens"].max() == 32 and seqs["n_tokens"].sum() == n
    assert "".join(seqs["text"]) == long_text
    run = record(model, tok, [long_text] * 3, store=store, seq_len=32, max_tokens=70, progress=False)
    assert store.sequences(run)["n_tokens"].tolist() == [32, 32, 6]
    run = record(model, tok, [long_text] * 3, store=store, seq_len=32, max_sequences=2, progress=False)
    assert len(store.sequences(run)) == 2


def test_bounded_flushes_keep_everything(store, mixtral) -> None:
    model, tok = mixtral
    run = record(model, tok, TEXTS * 4, store=store, batch_size=2, flush_tokens=16, progress=False)
    assert store.runs()["n_tokens"].iloc[-1] == sum(len(tok(t)["input_ids"]) for t in TEXTS * 4)
    n_layers = len(find_routers(model).sites)
    assert len(_routing(store, run)) == store.runs()["n_tokens"].iloc[-1] * n_layers * 2


def test_logits_are_optional(store, mixtral) -> None:
    model, tok = mixtral
    run = record(model, tok, TEXTS[1], store=store, progress=False)
    assert store.query("SELECT count(*) AS n FROM router_logits WHERE run_id = ?", [run])["n"][0] == 0
    run = record(model, tok, TEXTS[1], store=store, logits=True, progress=False)
    logits = store.query("SELECT layer, logits FROM router_logits WHERE run_id = ? ORDER BY layer, pos", [run])
    assert len(logits) == len(tok(TEXTS[1])["input_ids"]) * len(find_routers(model).sites)
    assert all(len(row) == 8 for row in logits["logits"])


def test_empty_input_creates_no_run(store, mixtral) -> None:
    model, tok = mixtral
    with pytest.raises(InputError, match="nothing to record"):
        record(model, tok, [""], store=store, progress=False)
    assert store.runs().empty


def test_interrupted_recording_is_marked_failed(store, mixtral) -> None:
    model, tok = mixtral

    def stream():
        yield from TEXTS[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(model, tok, stream(), store=store, batch_size=1, progress=False)
    info = store.runs().iloc[-1]
    assert info["status"] == "failed"
    assert "Ctrl-C" in store.run(int(info["run_id"]))["error"]
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_when_forward_raises(mixtral) -> None:
    model, _ = mixtral
    with pytest.raises(IndexError):
        with RoutingCapture(model):
            model(torch.tensor([[10_000]]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_record_without_tokenizer_from_ids(store, mixtral) -> None:
    model, _ = mixtral
    run = record(model, None, [[5, 6, 7, 8], [9, 10]], store=store, progress=False)
    tokens = store.tokens(run)
    assert tokens["token_id"].tolist() == [5, 6, 7, 8, 9, 10] and tokens["token"].isna().all()


def test_input_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("plain text file", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}", "dom": "x" if i else "y"}) for i in range(3)))
    pd.DataFrame({"body": ["row one", "row two"], "dom": ["p", "q"]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"body": ["pq one"], "dom": ["r"]}).to_parquet(tmp_path / "d.parquet")
    folder = tmp_path / "corpus"
    (folder / "code").mkdir(parents=True)
    (folder / "prose").mkdir()
    (folder / "code" / "x.py").write_text("x = 1")
    (folder / "prose" / "y.txt").write_text("Hello.")
    docs = list(read_paths([tmp_path / "a.txt"]))
    assert docs == [Document(text="plain text file", source=str(tmp_path / "a.txt"))]
    docs = list(read_paths([tmp_path / "b.jsonl", tmp_path / "c.csv", tmp_path / "d.parquet"], text_field="body",
                           label_field="dom"))
    assert [d.text for d in docs] == ["doc 0", "doc 1", "doc 2", "row one", "row two", "pq one"]
    assert [d.label for d in docs] == ["y", "x", "x", "p", "q", "r"]
    docs = list(read_paths([folder]))
    assert [(d.text, d.label) for d in docs] == [("x = 1", "code"), ("Hello.", "prose")]
    with pytest.raises(InputError, match="does not exist"):
        list(read_paths([tmp_path / "missing.txt"]))
    with pytest.raises(InputError, match="no field 'text'"):
        list(read_paths([tmp_path / "b.jsonl"]))
    with pytest.raises(InputError, match="no input"):
        list(read_paths([]))


def test_routing_columns_sort_unsorted_slots_and_drop_padding() -> None:
    from moelens.adapters import RouterCall
    from moelens.recording.batch import RowMap, routing_columns

    experts = torch.tensor([[3, 1], [0, 2], [5, 4]])
    weights = torch.tensor([[0.2, 0.7], [0.5, 0.5], [0.9, 0.1]])  # unsorted row, a tie, a sorted row
    rows = RowMap(seq_id=np.array([0, 0, 1], np.int32), pos=np.array([0, 1, 0], np.int32), keep=np.array([True, True, False]))
    call = RouterCall(layer=3, experts=experts, weights=weights, logits=None, shared_gate=torch.tensor([0.1, 0.2, 0.3]))
    cols = routing_columns([call], rows)
    r = cols["routing"]
    assert r["expert"].tolist() == [1, 3, 0, 2] and r["rank"].tolist() == [0, 1, 0, 1]
    assert r["weight"].tolist() == pytest.approx([0.7, 0.2, 0.5, 0.5]) and set(r["layer"]) == {3}
    assert r["seq_id"].tolist() == [0, 0, 0, 0] and r["pos"].tolist() == [0, 0, 1, 1]
    assert cols["shared_experts"]["gate"].tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(RuntimeError, match="routed 6 token rows"):
        routing_columns([call, call], rows)
