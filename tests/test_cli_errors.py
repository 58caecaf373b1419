"""Every command-line mistake gets one clear line on stderr and exit code 1, never a traceback or a silent empty
table; and ``moelens analyze SCORE --help`` documents every parameter of every score."""

from __future__ import annotations

import shutil
import time

import pytest
from safetensors.torch import load_file, save_file
from test_cli import moelens

from moelens.analysis.registry import SCORES
from moelens.tiny import tiny_model, tiny_tokenizer


def fails(*args: str, expect: str) -> str:
    """Run ``moelens ARGS``; it must exit 1 with a single ``error:`` line (the last) that contains ``expect``."""
    proc = moelens(*args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert expect in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Run 1 labelled, runs 2 and 3 unlabelled over different texts (no token in common with each other)."""
    db = str(tmp_path_factory.mktemp("errors") / "e.duckdb")
    moelens("record", "tiny:mixtral", "--text", "def f(x): return x", "--label", "code", "--db", db, "--logits")
    moelens("record", "tiny:mixtral", "--text", "abc abc abc", "--db", db)
    moelens("record", "tiny:mixtral", "--text", "xyz xyz xyz", "--db", db)
    return db


def test_parameter_typo_suggests_the_name(store) -> None:
    fails("analyze", "npmi", "-p", "lable=code", "--db", store, expect="did you mean label?")


def test_parameter_value_of_the_wrong_type(store) -> None:
    fails("analyze", "srp", "-p", "segment_lengths=four", "--db", store, expect="segment_lengths=four: expected integers")
    fails("analyze", "srp", "-p", "level=modle", "--db", store, expect="did you mean model?")
    fails("analyze", "srp", "-p", "segment_lengths", "--db", store, expect="key=value")


def test_json_list_values_still_read(store) -> None:
    out = moelens("analyze", "srp", "--run", "1", "-p", "segment_lengths=[2]", "--db", store, "--format", "csv").stdout
    assert out.splitlines()[0].startswith("layer,m,srp") and len(out.splitlines()) > 1


def test_unknown_tiny_model_type_is_one_line() -> None:
    line = fails("record", "tiny:mixtrall", "--text", "hi", expect="did you mean tiny:mixtral?")
    assert len(line) < 400


def test_unknown_score_suggests_the_name(store) -> None:
    fails("analyze", "tokn_map", "--db", store, expect="did you mean token_map?")


def test_export_onto_an_existing_file_is_refused(store, tmp_path) -> None:
    target = tmp_path / "out.parquet"
    target.write_bytes(b"keep me")
    fails("export", "1", "--parquet", str(target), "--db", store, expect="is a file")
    assert target.read_bytes() == b"keep me"


def test_missing_required_parameter(store) -> None:
    fails("analyze", "token_map", "--run", "1", "--db", store, expect="token_map needs -p layer=")
    fails("analyze", "run_agreement", "--run", "2", "--db", store, expect="needs -p run_b=")


def test_label_score_on_an_unlabelled_run(store) -> None:
    fails("analyze", "domain_specialization", "--run", "2", "--db", store, expect="run 2 has none")
    assert moelens("analyze", "domain_specialization", "--run", "1", "--db", store, "--format", "csv").stdout.count("\n") > 1


def test_label_filter(store) -> None:
    every = moelens("analyze", "expert_load", "--run", "1", "--db", store, "--format", "csv").stdout
    assert moelens("analyze", "expert_load", "--run", "1", "--label", "code", "--db", store, "--format", "csv").stdout == every
    pruned = moelens("analyze", "frequency", "--run", "1", "-l", "code", "--db", store, "--format", "csv").stdout  # its own label=
    assert pruned == moelens("analyze", "frequency", "--run", "1", "-p", "label=code", "--db", store, "--format", "csv").stdout
    fails("analyze", "layer_balance", "--run", "1", "--label", "kode", "--db", store, expect="has no label 'kode'; its labels are ['code']")
    fails("analyze", "domain_specialization", "--run", "1", "--label", "code", "--db", store, expect="compares sequence labels")
    fails("analyze", "router_token_stats", "--run", "1", "-p", "layer=0", "-p", "seq_id=0", "--label", "code", "--db", store,
          expect="takes no label filter")


def test_run_agreement_without_shared_tokens(store) -> None:
    fails("analyze", "run_agreement", "--run", "2", "-p", "run_b=3", "--db", store, expect="share no tokens")
    out = moelens("analyze", "run_agreement", "--run", "2", "-p", "run_b=2", "--db", store, "--format", "csv").stdout
    assert out.splitlines()[1].split(",")[2] == "1.0"  # a run agrees with itself: top1_agreement 1


def test_uncached_hub_id_fails_at_once(tmp_path) -> None:
    start = time.monotonic()
    fails("record", "some-org/not-cached-model", "--text", "hi", "--db", str(tmp_path / "t.duckdb"),
          expect="some-org/not-cached-model")
    assert time.monotonic() - start < 5


def test_random_router_needs_the_flag(tmp_path) -> None:
    model, _ = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "full")
    tiny_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "broken")
    weights = load_file(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith("mlp.gate.weight")},
              tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    db = str(tmp_path / "t.duckdb")
    fails("record", str(tmp_path / "broken"), "--text", "hi", "--db", db, expect="--allow-random-router")
    assert "run 1 complete" in moelens("record", str(tmp_path / "broken"), "--text", "hi", "--db", db,
                                       "--allow-random-router").stdout


@pytest.mark.parametrize("score", list(SCORES))
def test_score_help_lists_every_parameter(score) -> None:
    spec = SCORES[score]
    out = moelens("analyze", score, "--help").stdout
    assert out.startswith(f"{score}: ") and spec.reference in out
    for p in spec.params:
        assert p.name in out and p.kind in out
        for choice in p.choices or ():
            assert choice in out


def test_analyze_help_still_describes_the_command() -> None:
    assert "--param" in moelens("analyze", "--help").stdout
    assert "SCORE --help" in moelens("analyze", "--list").stdout


def test_scores_on_data_the_run_lacks(store) -> None:
    fails("analyze", "shared_expert_stats", "--run", "1", "--db", store, expect="has no shared-expert gates")
    fails("analyze", "expert_load", "--run", "1", "-p", "phase=generated", "--db", store, expect="no generated tokens")
