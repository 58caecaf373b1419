"""The bundled demo: shipped corpus, model and early checkpoint load offline and are what the builders make."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path

import pytest

from moelens.demo import DATA_DIR, DEMO_EARLY_DIR, DEMO_MODEL_DIR, DOMAINS, load_corpus
from moelens.demo.corpus import MANIFEST, collect_domain, domain_entry, split_docs, write_corpus
from moelens.demo.documents import DomainDocs
from moelens.demo.multilingual import find_django_wheel, po_msgstrs

MANIFEST_DATA = json.loads((DATA_DIR / MANIFEST).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rebuilt() -> dict[str, DomainDocs | str]:
    """Each domain rebuilt from this machine's sources, or the reason it cannot be compared."""
    out: dict[str, DomainDocs | str] = {}
    for domain in DOMAINS:
        wheel = None
        if domain == "multilingual":
            wheel = find_django_wheel()
            if wheel is None:
                out[domain] = "Django 5.2.19 wheel not available offline (python -m moelens.demo.corpus fetches it)"
                continue
        dd = collect_domain(domain, django_wheel=wheel)
        if dd.inputs_sha256 != MANIFEST_DATA["domains"][domain]["inputs_sha256"]:
            out[domain] = f"{domain} sources on this machine differ from the ones the shipped corpus was built from"
            continue
        out[domain] = dd
    return out


def _tiny_forward(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok("def add(a, b):\n    return a + b  # 2 + 3 = 5, Привет", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return tok, model, logits


def test_shipped_model_loads_offline_and_gives_finite_logits() -> None:
    import torch

    tok, model, logits = _tiny_forward(DEMO_MODEL_DIR)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == ("olmoe", 4, 16, 2)
    assert len(tok) == cfg.vocab_size == logits.shape[-1] == 4096
    assert tok.eos_token_id == cfg.eos_token_id == 0 and tok.pad_token_id == cfg.pad_token_id == 1
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size <= 10 * 2**20


def test_early_checkpoint_loads_and_differs_from_final() -> None:
    import torch

    _, _, logits = _tiny_forward(DEMO_EARLY_DIR)
    assert torch.isfinite(logits).all()
    steps = json.loads((DEMO_MODEL_DIR / "training.json").read_text())["steps"]
    early_step = json.loads((DEMO_EARLY_DIR / "training.json").read_text())["step"]
    assert 0.10 * steps <= early_step <= 0.20 * steps
    assert (DEMO_EARLY_DIR / "tokenizer.json").read_bytes() == (DEMO_MODEL_DIR / "tokenizer.json").read_bytes()


def test_shipped_corpus_matches_manifest() -> None:
    for name, info in MANIFEST_DATA["files"].items():
        packed = (DATA_DIR / name).read_bytes()
        assert hashlib.sha256(packed).hexdigest() == info["sha256"], name
        assert hashlib.sha256(gzip.decompress(packed)).hexdigest() == info["content_sha256"], name
    assert tuple(MANIFEST_DATA["domains"]) == tuple(sorted(DOMAINS))


def test_load_corpus_has_every_domain_in_both_splits() -> None:
    for split in ("train", "heldout"):
        docs = load_corpus(split)
        assert {d["domain"] for d in docs} == set(DOMAINS), split
        assert all({"id", "domain", "text", "source", "license"} <= d.keys() for d in docs)
        assert len({(d["domain"], d["id"]) for d in docs}) == len(docs)
    train_ids = {(d["domain"], d["id"]) for d in load_corpus("train")}
    assert not train_ids & {(d["domain"], d["id"]) for d in load_corpus("heldout")}
    with pytest.raises(ValueError):
        load_corpus("test")


@pytest.mark.parametrize("domain", DOMAINS)
def test_builder_reproduces_domain_records(domain: str, rebuilt: dict[str, DomainDocs | str]) -> None:
    dd = rebuilt[domain]
    if isinstance(dd, str):
        pytest.skip(dd)
    assert domain_entry(dd) == MANIFEST_DATA["domains"][domain]


def test_builder_reproduces_shipped_files_byte_for_byte(rebuilt: dict, tmp_path: Path) -> None:
    missing = [reason for reason in rebuilt.values() if isinstance(reason, str)]
    if missing:
        pytest.skip("; ".join(missing))
    manifest = write_corpus([rebuilt[d] for d in DOMAINS], tmp_path)
    for name, info in MANIFEST_DATA["files"].items():
        assert manifest["files"][name]["content_sha256"] == info["content_sha256"], name
    if zlib.ZLIB_RUNTIME_VERSION != MANIFEST_DATA["built_with"]["zlib"]:
        pytest.skip(f"zlib {zlib.ZLIB_RUNTIME_VERSION} here, {MANIFEST_DATA['built_with']['zlib']} built the files")
    for name in (*MANIFEST_DATA["files"], MANIFEST):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_every_language_has_heldout_text() -> None:
    langs = {d["id"].split("/")[0] for d in load_corpus("heldout") if d["domain"] == "multilingual"}
    assert len(langs) == 10


def test_po_msgstrs_reads_plurals_continuations_and_escapes() -> None:
    po = (
        'msgid ""\nmsgstr ""\n"Language: de\\n"\n\n'
        'msgid "one"\nmsgid_plural "many"\nmsgstr[0] "eins"\nmsgstr[1] "viele"\n\n'
        'msgid "long"\nmsgstr ""\n"zwei "\n"Zeilen \\"x\\"\\n"\n\n'
        'msgid "untranslated"\nmsgstr ""\n\n#~ msgid "old"\n#~ msgstr "alt"\n'
    )
    assert po_msgstrs(po) == ["eins", "viele", 'zwei Zeilen "x"\n']


def test_split_gives_every_group_heldout_text() -> None:
    from moelens.demo.documents import Document

    docs = [Document(f"d{i}", "multilingual", "s", "l", "t", group="xx") for i in range(3)]
    split = split_docs(docs)
    assert len(split["heldout"]) >= 1 and len(split["heldout"]) + len(split["train"]) == 3


def test_train_demo_writes_loadable_folders(tmp_path: Path) -> None:
    from moelens.demo.train import train_demo

    docs = [d for domain in DOMAINS for d in [x for x in load_corpus("heldout") if x["domain"] == domain][:3]]
    report = train_demo(tmp_path, steps=2, early_step=1, progress=False, docs=docs)
    assert report.tokens_seen == 2 * 16 * 256 and len(report.lm_loss) == 2
    for folder in (tmp_path / "model", tmp_path / "checkpoints" / "early"):
        _, _, logits = _tiny_forward(folder)
        assert logits.isfinite().all()
