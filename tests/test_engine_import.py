"""Serving-engine traces (vLLM, SGLang, TensorRT-LLM) imported as runs: files written in each engine's documented
shape from a real recording of a tiny model, so the expected routing is known position for position."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from moelens.adapters import find_routers
from moelens.analysis import run_agreement
from moelens.errors import InputError
from moelens.recording.engines import import_engine_file, layout_model, teacher_force
from moelens.recording.record import record
from moelens.store import TraceStore
from moelens.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["the cat sat on", "MoE routing, please", "x"]
NEW = 4


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A generation run of a tiny DeepSeek-V3 with one dense block (block 0), so layer ids are 1 and 2 of 3."""
    model, _ = tiny_model("deepseek_v3", num_hidden_layers=3, first_k_dense_replace=1)
    tok = tiny_tokenizer(model.config.vocab_size)
    store = TraceStore(tmp_path_factory.mktemp("engine") / "t.duckdb")
    run = record(model, tok, PROMPTS, store=store, generate=NEW, progress=False)
    info = find_routers(model)
    k = info.top_k
    routing = store.routing(run)
    tokens = store.tokens(run)
    seqs = []
    for seq_id, part in tokens.groupby("seq_id"):
        ids = part.sort_values("pos")["token_id"].tolist()
        n_prompt = int((part["phase"] == "prompt").sum())
        r = routing[routing.seq_id == seq_id].sort_values(["pos", "layer", "rank"])
        grid = r["expert"].to_numpy().reshape(len(ids), len(info.sites), k)  # [pos, moe layer, rank]
        seqs.append({"ids": ids, "prompt_len": n_prompt, "grid": grid})
    return {"model": model, "tok": tok, "store": store, "run": run, "info": info, "seqs": seqs, "k": k}


def _all_blocks(grid: np.ndarray, blocks: list[int], n_blocks: int) -> np.ndarray:
    """The older engine shape: every block on the layer axis, dense blocks as zero rows."""
    out = np.zeros((grid.shape[0], n_blocks, grid.shape[2]), dtype=grid.dtype)
    out[:, blocks] = grid
    return out


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _vllm_records(seqs, *, b64: bool, all_blocks: tuple[list[int], int] | None):
    out = []
    for i, s in enumerate(seqs):
        grid = s["grid"] if all_blocks is None else _all_blocks(s["grid"], *all_blocks)
        P = s["prompt_len"]
        prompt, gen = grid[:P], grid[P:-1]  # the last generated token is never fed back

        def enc(a):
            a = a.astype(np.int16)
            return {"data": base64.b64encode(a.tobytes()).decode(), "shape": list(a.shape), "dtype": "int16"} if b64 else a.tolist()

        out.append({"request_id": str(i), "prompt_token_ids": s["ids"][:P], "prompt_routed_experts": enc(prompt),
                    "outputs": [{"index": 0, "token_ids": s["ids"][P:], "routed_experts": enc(gen)}], "label": f"L{i % 2}"})
    return out


def _expected(store, run, drop_last=True):
    df = store.routing(run)
    if drop_last:
        last = store.tokens(run).groupby("seq_id")["pos"].max()
        df = df[df.pos != df.seq_id.map(last)]
    return df.sort_values(["seq_id", "pos", "layer", "rank"])[["seq_id", "pos", "layer", "rank", "expert"]].reset_index(drop=True)


@pytest.mark.parametrize("variant", ["lists", "base64", "all_blocks"])
def test_vllm_import_matches_the_recording(recorded, tmp_path, variant):
    info = recorded["info"]
    blocks = ([s.block for s in info.sites], info.n_layers) if variant == "all_blocks" else None
    path = _write(tmp_path / "vllm.jsonl", _vllm_records(recorded["seqs"], b64=variant == "base64", all_blocks=blocks))
    store = recorded["store"]
    run = import_engine_file(path, "vllm", store=store, info=info, tokenizer=recorded["tok"], model_name="tiny:deepseek_v3",
                             engine_version="0.21.0", progress=False)
    got = _expected(store, run, drop_last=False)
    want = _expected(store, recorded["run"])
    assert got.astype("int64").equals(want.astype("int64"))
    assert store.query("SELECT count(*) AS n FROM routing WHERE run_id = ? AND weight IS NOT NULL", [run])["n"][0] == 0
    meta = store.run(run)["metadata"]
    assert meta["engine"] == "vllm" and meta["engine_version"] == "0.21.0"
    assert set(store.query("SELECT DISTINCT layer FROM routing WHERE run_id = ?", [run])["layer"]) == {1, 2}
    # token text and phases are those of the recording
    a, b = store.tokens(run), store.tokens(recorded["run"])
    assert a["token"].tolist() == b["token"].tolist() and a["phase"].tolist() == b["phase"].tolist()
    assert sorted(store.sequences(run)["label"]) == ["L0", "L0", "L1"]


def test_sglang_import(recorded, tmp_path):
    info = recorded["info"]
    records = []
    for s in recorded["seqs"]:
        grid = _all_blocks(s["grid"], [x.block for x in info.sites], info.n_layers)[:-1].astype("<i4")  # seq_len - 1 rows
        P = s["prompt_len"]
        records.append({"input_ids": s["ids"][:P], "output_ids": s["ids"][P:],
                        "meta_info": {"routed_experts": base64.b64encode(grid.tobytes()).decode()}})
    store = recorded["store"]
    run = import_engine_file(_write(tmp_path / "sg.jsonl", records), "sglang", store=store, info=info,
                             tokenizer=recorded["tok"], model_name="m", progress=False)
    assert _expected(store, run, drop_last=False).astype("int64").equals(_expected(store, recorded["run"]).astype("int64"))


def test_trtllm_import_and_teacher_force_agreement(recorded, tmp_path):
    info = recorded["info"]
    records = [{"prompt_token_ids": s["ids"][:s["prompt_len"]],
                "outputs": [{"token_ids": s["ids"][s["prompt_len"]:], "routed_experts": s["grid"][:-1].tolist()}]}
               for s in recorded["seqs"]]
    store = recorded["store"]
    run = import_engine_file(_write(tmp_path / "trt.jsonl", records), "trtllm", store=store, info=info,
                             tokenizer=recorded["tok"], model_name="m", progress=False)
    forced = teacher_force(recorded["model"], recorded["tok"], store, run, progress=False)
    assert store.tokens(forced)["token_id"].tolist() == [t for s in recorded["seqs"] for t in s["ids"]]
    agreement = run_agreement(store, run, forced)
    assert (agreement["top1_agreement"] == 1.0).all()  # the same fp32 model routes the same tokens the same way
    assert _expected(store, forced).astype("int64").equals(_expected(store, run, drop_last=False).astype("int64"))
    assert store.run(forced)["metadata"]["teacher_forced_from"] == run and store.run(forced)["parent_run_id"] == run


def test_layout_from_config_alone_needs_no_weights():
    model = layout_model("tiny:deepseek_v3")
    assert next(model.parameters()).device.type == "meta"
    assert [s.layer for s in find_routers(model).sites] == [0, 1]


def test_bad_engine_files_get_one_clear_error(recorded, tmp_path):
    info, store, tok = recorded["info"], recorded["store"], recorded["tok"]
    n_before = len(store.runs())

    def run(records_or_text, fmt="vllm"):
        path = tmp_path / "bad.jsonl"
        path.write_text(records_or_text if isinstance(records_or_text, str) else "".join(json.dumps(r) + "\n" for r in records_or_text))
        return import_engine_file(path, fmt, store=store, info=info, tokenizer=tok, model_name="m", progress=False)

    good = _vllm_records(recorded["seqs"], b64=False, all_blocks=None)
    wrong_axis = json.loads(json.dumps(good[0]))
    wrong_axis["prompt_routed_experts"] = [row + row for row in wrong_axis["prompt_routed_experts"]]  # 4 layers
    wrong_axis["outputs"][0]["routed_experts"] = [row + row for row in wrong_axis["outputs"][0]["routed_experts"]]
    with pytest.raises(InputError, match="layer axis has 4 entries"):
        run([wrong_axis])
    out_of_range = json.loads(json.dumps(good[0]))
    out_of_range["prompt_routed_experts"][0][0][0] = 99
    with pytest.raises(InputError, match="expert id 99 .* out of range"):
        run([out_of_range])
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a JSON line"):
        run(json.dumps(good[0]) + "\n{oops\n")
    with pytest.raises(InputError, match="not a sglang request output"):
        run([{"output_ids": [1]}], fmt="sglang")
    with pytest.raises(InputError, match="does not exist"):
        import_engine_file(tmp_path / "missing.jsonl", "vllm", store=store, info=info, model_name="m")
    with pytest.raises(InputError, match="--format must be one of"):
        import_engine_file(tmp_path / "bad.jsonl", "tgi", store=store, info=info, model_name="m")
    runs = store.runs()
    assert (runs["status"].iloc[n_before:] == "failed").all()  # never a half-written run that looks complete


def test_cli_import_engine_with_teacher_force(tmp_path):
    """`moelens import-engine FILE --format vllm --model tiny:mixtral --teacher-force` as a user runs it."""
    from tests.test_cli import moelens

    model, _ = tiny_model("mixtral")  # what `tiny:mixtral` builds (seeded)
    tok = tiny_tokenizer(model.config.vocab_size)
    db = tmp_path / "cli.duckdb"
    store = TraceStore(db)
    run = record(model, tok, PROMPTS[:2], store=store, generate=NEW, progress=False)
    info = find_routers(model)
    seqs = []
    for seq_id, part in store.tokens(run).groupby("seq_id"):
        r = store.routing(run).query("seq_id == @seq_id").sort_values(["pos", "layer", "rank"])
        seqs.append({"ids": part["token_id"].tolist(), "prompt_len": int((part["phase"] == "prompt").sum()),
                     "grid": r["expert"].to_numpy().reshape(len(part), len(info.sites), info.top_k)})
    path = _write(tmp_path / "v.jsonl", _vllm_records(seqs, b64=True, all_blocks=None))
    proc = moelens("import-engine", str(path), "--format", "vllm", "--model", "tiny:mixtral", "--teacher-force",
                   "--engine-version", "0.21.0", "--db", str(db))
    assert "imported from vllm" in proc.stdout and "teacher-forced" in proc.stdout
    runs = TraceStore(db).runs()
    assert list(runs["status"]) == ["complete"] * 3 and runs["parent_run_id"].iloc[2] == 2
    bad = moelens("import-engine", str(path), "--format", "vllm", "--model", "tiny:mixtrall", "--db", str(db), check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr + bad.stdout
