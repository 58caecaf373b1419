"""Recording with real tokenizers (Mixtral's SentencePiece, Mistral's tekken BPE, the demo BPE) on hub-style folders.

Every stored sequence must spell its text exactly from its token texts, whatever the tokenizer, the input form
(text, ids, chat) or the run kind (forward, generation); see `moelens.recording.tokenize` for the convention.
"""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest
import torch

from moelens import TraceStore
from moelens.demo import DEMO_MODEL_DIR
from moelens.errors import InputError
from moelens.recording.loading import load_model
from moelens.recording.record import record
from moelens.recording.tokenize import aligned, encode_text
from moelens.tiny import tiny_model
from real_tokenizers import mixtral_folder, tekken_folder
from test_cli import moelens

HARD_TEXTS = [
    "The capital of France is Paris.",
    "Emoji 👨\u200d👩\u200d👧 family, flags 🇫🇷🇯🇵 and 𝔘 (four bytes).",
    "中文和日本語のテキスト。",
    "مرحبا بالعالم، هذا نص عربي.",
    "tabs\there\tand\r\nCRLF\r\nlines",
    "double  spaces   and trailing  ",
    "def add(a, b):\n    if a:\n        return a + b\n\treturn b\n",
    unicodedata.normalize("NFD", "Café naïve résumé Ångström"),
    "  leading spaces",
]


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return mixtral_folder(tmp_path_factory.mktemp("mixtral-8x7b-tiny"))


@pytest.fixture(scope="session")
def tekken_dir(tmp_path_factory):
    return tekken_folder(tmp_path_factory.mktemp("mistral-tekken-tiny"))


@pytest.fixture(scope="session")
def mixtral(mixtral_dir):
    return load_model(mixtral_dir)


@pytest.fixture(scope="session")
def tekken(tekken_dir):
    """The hub layout (tekken.json + tokenizer.json) loads as MistralCommonBackend: no offsets."""
    return load_model(tekken_dir)


@pytest.fixture(scope="session")
def pairs(mixtral, mixtral_dir, tekken, tekken_dir):
    """(model, tokenizer) for every tokenizer kind: offsets (fast) and no offsets (Python SentencePiece,
    MistralCommonBackend), SentencePiece and byte-level BPE."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    sp = SentencePieceBackend(vocab_file=str(mixtral_dir / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>")
    return {
        "mixtral-fast": mixtral,
        "mixtral-sentencepiece": (mixtral[0], sp),
        "tekken-fast": (tekken[0], AutoTokenizer.from_pretrained(tekken_dir, mistral_format=False)),
        "tekken-mistral-common": tekken,
        "demo-bpe": load_model(DEMO_MODEL_DIR),
    }


def _joined(store: TraceStore, run: int):
    return store.query(
        "SELECT s.seq_id, s.source, s.text, string_agg(t.token, '' ORDER BY t.pos) AS joined, "
        "count(*) FILTER (WHERE t.special IS NOT NULL AND t.token <> '') AS special_with_text "
        "FROM sequences s JOIN tokens t USING (run_id, seq_id) WHERE s.run_id = ? GROUP BY ALL ORDER BY s.seq_id",
        [run])


KINDS = ["mixtral-fast", "mixtral-sentencepiece", "tekken-fast", "tekken-mistral-common", "demo-bpe"]


@pytest.mark.parametrize("kind", KINDS)
def test_token_texts_spell_the_text_exactly(kind, pairs, tmp_path) -> None:
    model, tok = pairs[kind]
    store = TraceStore(tmp_path / "t.duckdb")
    # seq_len 5 puts chunk boundaries everywhere, including between one character's byte pieces
    run = record(model, tok, HARD_TEXTS, store=store, seq_len=5, batch_size=4, progress=False)
    rows = _joined(store, run)
    assert (rows["joined"] == rows["text"]).all() and (rows["special_with_text"] == 0).all()
    if kind == "mixtral-fast":  # some chunk starts inside a character: its first byte pieces spell nothing
        starts = store.query("SELECT token, special FROM tokens WHERE run_id = ? AND pos = 0", [run])
        assert ((starts["token"] == "") & starts["special"].isna()).any()
    for i, text in enumerate(HARD_TEXTS):  # the chunks of a document spell the document
        chunks = rows[rows["source"].str.fullmatch(rf"text\[{i}\](#\d+)?")]
        assert "".join(chunks["text"]) == text, (kind, text)
    # --max-tokens cuts the last sequence; its text is still what its tokens spell (no "<s>")
    cut = record(model, tok, HARD_TEXTS, store=store, seq_len=64, max_tokens=23, progress=False)
    rows = _joined(store, cut)
    assert (rows["joined"] == rows["text"]).all() and not rows["text"].str.contains("<s>").any()
    assert store.query("SELECT count(*) AS n FROM tokens WHERE run_id = ?", [cut])["n"][0] == 23


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_and_byte_pieces_follow_one_convention(kind, pairs, tmp_path) -> None:
    """The text path (offsets or not) and pre-tokenized ids (decoding, as generation) give each id the same text."""
    model, tok = pairs[kind]
    store = TraceStore(tmp_path / "t.duckdb")
    # decoding cannot give back an NFD input, nor (legacy SentencePiece) a text's first space
    texts = [t for t in HARD_TEXTS if unicodedata.is_normalized("NFC", t) and not t.startswith(" ")]
    by_text = record(model, tok, texts, store=store, progress=False)
    ids = [tok(t)["input_ids"] for t in texts]
    by_ids = record(model, tok, ids, store=store, progress=False)
    a, b = store.tokens(by_text), store.tokens(by_ids)
    assert a["token_id"].tolist() == b["token_id"].tolist()
    assert a["token"].tolist() == b["token"].tolist() and a["special"].tolist() == b["special"].tolist()
    assert not a["token"].str.contains("\ufffd").any()
    bos = tok.bos_token_id
    first = a[a.pos == 0]
    if ids[0][0] == bos:  # the tokenizer adds BOS: it spells nothing and is named
        assert (first["token"] == "").all() and (first["special"] == tok.convert_ids_to_tokens(bos)).all()
    assert ((a["special"].notna()) <= (a["token"] == "")).all()


def test_mixtral_byte_fallback_and_bos_exactly(mixtral) -> None:
    _, tok = mixtral
    ids, tokens, special = encode_text(tok, "x 𝔘y")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁x", "▁", "<0xF0>", "<0x9D>", "<0x94>", "<0x98>", "y"]
    assert tokens == ["", "x", " ", "𝔘", "", "", "", "y"]  # the first byte piece carries the character
    assert special == ["<s>", None, None, None, None, None, None, None]
    # a special token written in the text is read as that token, and spells nothing like any special token;
    # legacy SentencePiece starts a word after it ("▁b"), which the original text does not have
    ids, tokens, special = encode_text(tok, "a</s>b")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁a", "</s>", "▁b"]
    assert tokens == ["", "a", "", "b"] and special == ["<s>", None, "</s>", None]


def test_nfd_text_under_an_nfc_normaliser(tekken_dir) -> None:
    """Byte-level BPE with an NFC normaliser (as Qwen's): tokens cover the original NFD characters."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tekken_dir, mistral_format=False)
    tok.backend_tokenizer.normalizer = normalizers.NFC()
    text = unicodedata.normalize("NFD", "Café résumé, Ångström")
    ids, tokens, _ = encode_text(tok, text)
    assert ids == tok(unicodedata.normalize("NFC", text))["input_ids"]  # the normaliser did compose the input
    assert "".join(tokens) == text and any("\u0301" in t for t in tokens)


def test_generated_text_is_its_span_in_the_decoding(mixtral, tmp_path) -> None:
    """'...is' + ' Paris' (the leading space kept), a four-byte character, and EOS as a named special token;
    the generate arguments are objects (GenerationConfig, logits processor, stopping criteria)."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    model, tok = mixtral
    forced = [tok.convert_tokens_to_ids(t) for t in ["▁Paris", ".", "▁", "<0xF0>", "<0x9D>", "<0x94>", "<0x98>", "</s>"]]

    class ForceTokens(LogitsProcessor):
        def __init__(self, ids: list[int], prompt_len: int):
            self.ids, self.prompt_len = ids, prompt_len

        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, -float("inf"))
            out[:, self.ids[input_ids.shape[1] - self.prompt_len]] = 0
            return out

    class StopAtLength(StoppingCriteria):
        def __init__(self, length: int):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    prompt = "The capital of France is"
    n_prompt = len(tok(prompt)["input_ids"])
    store = TraceStore(tmp_path / "g.duckdb")
    run = record(model, tok, prompt, store=store, progress=False, generate={
        "generation_config": GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=2),
        "logits_processor": LogitsProcessorList([ForceTokens(forced, n_prompt)]),
        "stopping_criteria": StoppingCriteriaList([StopAtLength(64)]),
    })
    tokens = store.tokens(run)
    gen = tokens[tokens.phase == "generated"]
    assert gen["token_id"].tolist() == forced
    assert gen["token"].tolist() == [" Paris", ".", " ", "𝔘", "", "", "", ""]
    assert [s if isinstance(s, str) else None for s in gen["special"]] == [None] * 7 + ["</s>"]
    ids = tokens["token_id"].tolist()
    full, head = tok.decode(ids, skip_special_tokens=True), tok.decode(ids[:n_prompt], skip_special_tokens=True)
    assert "".join(gen["token"]) == full[len(head):]
    assert store.sequences(run)["text"][0] == "The capital of France is Paris. 𝔘" == "".join(tokens["token"])
    summary = json.dumps(store.run(run)["metadata"]["generate"])
    assert "GenerationConfig" in summary and "ForceTokens(" in summary and "StopAtLength(length=64)" in summary
    # in float32 the cached generation routes exactly as one forward over the final sequence
    fwd = record(model, tok, [ids], store=store, progress=False)
    q = "SELECT pos, layer, rank, expert, weight FROM routing WHERE run_id = ? ORDER BY pos, layer, rank"
    a, b = store.query(q, [run]), store.query(q, [fwd])
    assert a[["pos", "layer", "rank", "expert"]].equals(b[["pos", "layer", "rank", "expert"]])
    np.testing.assert_allclose(a["weight"], b["weight"], atol=1e-6)


def test_pre_tokenized_ids_decode_with_context(mixtral, tmp_path) -> None:
    _, tok = mixtral
    text = "naïve 中文 😀 𝔘 and a tab\tend"
    store = TraceStore(tmp_path / "i.duckdb")
    run = record(mixtral[0], tok, [tok(text)["input_ids"]], store=store, progress=False)
    tokens = store.tokens(run)
    assert store.sequences(run)["text"][0] == text == "".join(tokens["token"])
    assert not tokens["token"].str.contains("\ufffd").any()
    assert tokens["token"].tolist() == encode_text(tok, text)[1]


def test_chat_template_without_a_second_bos(mixtral, tekken, tmp_path) -> None:
    model, tok = mixtral
    store = TraceStore(tmp_path / "c.duckdb")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Capital of France?"}]
    run = record(model, tok, ["What is 2 + 2?", {"messages": messages}], store=store, chat=True, progress=False)
    tokens, seqs = store.tokens(run), store.sequences(run)
    first = tokens[tokens.seq_id == 0]
    assert first["token_id"].tolist() == tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                                                 tokenize=True)["input_ids"]
    assert (tokens["token_id"] == tok.bos_token_id).sum() == 2 and (tokens[tokens.pos == 0]["special"] == "<s>").all()
    second = tokens[tokens.seq_id == 1]
    # legacy SentencePiece reads the "[INST]" after "</s>" as "▁[": the text says what the model was given
    assert seqs["text"].tolist() == ["[INST] What is 2 + 2? [/INST]",
                                     "[INST] Hi [/INST]Hello! [INST] Capital of France? [/INST]"]
    assert seqs["text"][1] == tok.decode(second["token_id"].tolist(), skip_special_tokens=True)
    assert second["special"].tolist().count("</s>") == 1 and second["special"].tolist().count("<s>") == 1  # the assistant turn's EOS, named, spelling nothing
    # the same input ids given pre-tokenized (apply_chat_template's BatchEncoding) record the same tokens
    again = record(model, tok, tok.apply_chat_template(messages, tokenize=True), store=store, progress=False)
    assert store.tokens(again)["token"].tolist() == second["token"].tolist()
    # tekken: [INST] and [/INST] are control tokens, named in `special`
    run = record(tekken[0], tekken[1], "What is 2 + 2?", store=store, chat=True, progress=False)
    t = store.tokens(run)
    assert t["special"].dropna().tolist() == ["<s>", "[INST]", "[/INST]"]
    assert store.sequences(run)["text"][0] == "What is 2 + 2?"
    # plain text without the tokenizer's BOS
    run = record(model, tok, "What is 2 + 2?", store=store, add_special_tokens=False, progress=False)
    assert tok.bos_token_id not in store.tokens(run)["token_id"].tolist()


def test_chat_errors_are_one_line(mixtral, tmp_path) -> None:
    store = TraceStore(tmp_path / "e.duckdb")
    demo_model, demo_tok = load_model(DEMO_MODEL_DIR)
    with pytest.raises(InputError, match="chat template"):
        record(demo_model, demo_tok, "hi", store=store, chat=True, progress=False)
    with pytest.raises(InputError, match="roles must alternate"):
        record(*mixtral, {"messages": [{"role": "assistant", "content": "x"}]}, store=store, chat=True, progress=False)
    with pytest.raises(InputError, match="chat=True"):
        record(*mixtral, {"messages": [{"role": "user", "content": "x"}]}, store=store, progress=False)
    assert store.runs().empty


def test_cli_records_hub_folders_chat_and_counts_empty_documents(mixtral_dir, tekken_dir, tmp_path) -> None:
    db = str(tmp_path / "cli.duckdb")
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Bonjour 😀"}], "label": "fr"},
        {"text": "", "label": "empty"},
        {"text": "Plain text as one user turn", "label": "en"},
    ]) + "\n")
    out = moelens("record", str(mixtral_dir), str(data), "--chat", "--label-field", "label", "--db", db)
    assert "skipped 1 empty document" in out.stdout
    store = TraceStore(db, read_only=True)
    assert store.run(1)["metadata"]["empty_documents"] == 1 and store.run(1)["metadata"]["chat"] is True
    assert store.sequences(1)["text"].tolist() == ["[INST] Bonjour 😀 [/INST]", "[INST] Plain text as one user turn [/INST]"]
    out = moelens("record", str(tekken_dir), "--text", "Hello  world\r\n😀", "--text", "", "--no-add-special-tokens",
                  "--db", db)
    assert "skipped 1 empty document" in out.stdout
    tokens = TraceStore(db, read_only=True).tokens(2)
    assert "".join(tokens["token"]) == "Hello  world\r\n😀" and tokens["special"].isna().all()


def test_tokenizer_larger_than_the_embedding_is_refused_before_recording(mixtral, tmp_path) -> None:
    store = TraceStore(tmp_path / "v.duckdb")
    model, tok = mixtral
    kept = record(model, tok, "an earlier run", store=store, progress=False)
    small, _ = tiny_model("mixtral")  # 128 embedding rows
    with pytest.raises(InputError, match="32000 token ids but the model's embedding has 128 rows"):
        record(small, tok, "Paris", store=store, progress=False)
    with pytest.raises(InputError, match="token id 500 is outside"):
        record(small, None, [[1, 2, 500]], store=store, progress=False)
    runs = store.runs()
    assert runs["run_id"].tolist() == [kept] and runs["status"].tolist() == ["complete"]
    # ids out of range after the first sequence: the run is marked failed with that line, earlier runs stay
    with pytest.raises(InputError, match="token id 999"):
        record(small, None, [[1, 2], [3, 999]], store=store, batch_size=1, progress=False)
    runs = store.runs()
    assert runs["status"].tolist() == ["complete", "failed"] and "token id 999" in store.run(2)["error"]


def test_store_written_before_the_special_column_gains_it(mixtral, tmp_path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    TraceStore(path)
    with duckdb.connect(str(path)) as con:  # a version-1 file: before tokens.special
        con.execute("ALTER TABLE tokens DROP COLUMN special")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    run = record(*mixtral, "Paris", store=TraceStore(path), progress=False)
    assert TraceStore(path, read_only=True).tokens(run)["special"].tolist()[0] == "<s>"


def test_alignment_by_hand_and_on_random_strings() -> None:
    assert aligned(["Tabs", "<0x09>", "here"], "Tabs\there") == ["Tabs", "\t", "here"]
    assert aligned(["Caf", "é"], "Cafe\u0301") == ["Caf", "e\u0301"]
    assert aligned(["<0xF0><0x9F>", "<0x98><0x80>", "!"], "😀!") == ["😀", "", "!"]
    assert aligned(["a", "b"], "a b") == ["a ", "b"]  # an insertion goes to the token before it
    assert aligned(["x", "yz"], "xyz") == ["x", "yz"] and aligned([], "") == []
    rng = random.Random(0)
    alphabet = "ab \t\ne\u0301é😀"
    for _ in range(300):
        target = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        noisy = "".join(c if rng.random() > 0.2 else rng.choice(["", "<0x09>", c + c, "é"]) for c in target)
        cuts = sorted(rng.sample(range(len(noisy) + 1), k=min(len(noisy) + 1, rng.randint(1, 8))))
        pieces = [noisy[a:b] for a, b in zip([0, *cuts], [*cuts, len(noisy)])]
        out = aligned(pieces, target)
        assert "".join(out) == target and len(out) == len(pieces)
        if "".join(pieces) == target:
            assert out == pieces


def test_empty_documents_are_counted_not_recorded_as_a_lone_bos(mixtral, tmp_path) -> None:
    store = TraceStore(tmp_path / "m.duckdb")
    run = record(*mixtral, ["", "x", {"text": ""}], store=store, progress=False)
    assert store.run(run)["metadata"]["empty_documents"] == 2 and store.sequences(run)["text"].tolist() == ["x"]
    run = record(*mixtral, ["", "x", {"messages": []}], store=store, chat=True, progress=False)
    assert store.run(run)["metadata"]["empty_documents"] == 2
    with pytest.raises(InputError, match="skipped 2 empty documents"):
        record(*mixtral, ["", ""], store=store, progress=False)
