"""Spec builders (from scores, random controls), `run_experiment` and the `moelens steer` command on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from moelens import TraceStore
from moelens.errors import InputError, SteeringError
from moelens.steering import SteeringSpec, random_like, random_spec, run_experiment, spec_from_scores
from moelens.cli.steer import steer as steer_command
from moelens.tiny import tiny_model, tiny_tokenizer

LAYOUT = {0: 8, 1: 8, 3: 16}


def scores() -> pd.DataFrame:
    rows = [(layer, e, label, float(layer * 100 + e) if label == "a" else float(-e))
            for layer, n in LAYOUT.items() for e in range(n) for label in ("a", "b")]
    df = pd.DataFrame(rows, columns=["layer", "expert", "label", "npmi"])
    df.loc[(df.layer == 3) & (df.expert == 15), "npmi"] = np.nan
    return df


def test_spec_from_scores() -> None:
    df = scores()
    assert spec_from_scores(df, 3, score_col="npmi", label="a").disable == ((3, 12), (3, 13), (3, 14))
    per_layer = spec_from_scores(df, 1, score_col="npmi", label="a", per_layer=True, action="force")
    assert per_layer.force == ((0, 7), (1, 7), (3, 14))
    low = spec_from_scores(df, 2, score_col="npmi", label="b", largest=False, action="boost", value=-2.0)
    assert low.boost == (((3, 13), -2.0), ((3, 14), -2.0))  # NaN (3, 15) skipped
    assert spec_from_scores(df.rename(columns={"npmi": "score"}), 1, label="a").disable == ((3, 14),)
    with pytest.raises(SteeringError, match="score_col=one of"):
        spec_from_scores(df, 2)
    with pytest.raises(SteeringError, match="several rows per"):
        spec_from_scores(df, 40, score_col="npmi")
    with pytest.raises(SteeringError, match="needs value"):
        spec_from_scores(df, 2, score_col="npmi", label="a", action="gate_scale")
    with pytest.raises(SteeringError, match="no rows with label"):
        spec_from_scores(df, 2, score_col="npmi", label="c")


def test_random_spec_and_random_like() -> None:
    a, b = random_spec(LAYOUT, 5, seed=1), random_spec(LAYOUT, 5, seed=1)
    assert a == b and len(a.disable) == 5 and a != random_spec(LAYOUT, 5, seed=2)
    excluded = [(0, e) for e in range(8)]
    assert all(layer != 0 for layer, _ in random_spec(LAYOUT, 20, exclude=excluded).disable)
    assert [layer for layer, _ in random_spec(LAYOUT, {1: 2, 3: 3}).disable] == [1, 1, 3, 3, 3]
    with pytest.raises(SteeringError, match="cannot draw"):
        random_spec(LAYOUT, {0: 9})

    spec = SteeringSpec(disable=[(0, 1), (0, 2), (3, 4)], force=[(1, 0)], boost={(3, 5): 1.5, (3, 6): -1.0},
                        gate_scale={(1, 3): 8.0}, top_k={1: 3}, mode="zero")
    for seed in range(4):
        control = random_like(spec, LAYOUT, seed)
        assert not control.pairs() & spec.pairs()
        assert len({*control.disable, *control.force, *(p for p, _ in control.boost), *(p for p, _ in control.gate_scale)}) == 7
        assert sorted(layer for layer, _ in control.disable) == [0, 0, 3]
        assert [layer for layer, _ in control.force] == [1]
        assert sorted(v for _, v in control.boost) == [-1.0, 1.5] and {p[0] for p, _ in control.boost} == {3}
        assert [(p[0], v) for p, v in control.gate_scale] == [(1, 8.0)]
        assert control.top_k == spec.top_k and control.mode == "zero"
    assert random_like(spec, LAYOUT, 0) != random_like(spec, LAYOUT, 1)


TEXTS = [
    {"text": "the cat sat on the mat and the dog sat on the log. " * 2, "label": "prose"},
    {"text": "12 + 30 = 42; 7 * 6 = 42; 84 / 2 = 42; " * 2, "label": "math"},
    {"text": "a quick brown fox jumps over the lazy dog. " * 2, "label": "prose"},
]


def test_run_experiment_records_runs_and_measures_effects(tmp_path) -> None:
    model = tiny_model("olmoe")[0]
    store = TraceStore(tmp_path / "e.duckdb")
    spec = SteeringSpec(disable=[(0, 1), (1, 5)])
    result = run_experiment(model, tiny_tokenizer(), spec, TEXTS, store=store, n_random=2, generate=4, seq_len=128,
                            batch_size=2)

    assert list(result.loss["variant"].unique()) == ["steered", "random:0", "random:1"]
    assert set(result.loss["label"]) == {"prose", "math"}
    tokens = result.tokens
    assert np.allclose(tokens["delta_logprob"], tokens["logprob"] - tokens["logprob_base"])
    assert (tokens["kl"] >= -1e-6).all() and (tokens.groupby("variant")["kl"].mean() > 0).all()
    assert result.loss.groupby("label")["loss_base"].nunique().eq(1).all()  # one baseline for every variant
    assert set(result.routing["layer"]) == {0, 1} and result.routing["share_changed"].between(0, 1).all()
    assert (result.control["n_random"] == 2).all()
    # the permutation p-value, by hand from the controls' loss changes: (1 + #controls >= steered) / (1 + n)
    for _, row in result.control.iterrows():
        group = result.loss[result.loss["label"] == row["label"]]
        random = group.loc[group["variant"] != "steered", "delta_loss"].to_numpy()
        assert row["p_perm"] == pytest.approx((1 + (random >= row["delta_loss"]).sum()) / 3)
        assert 1 / 3 <= row["p_perm"] <= 1
    assert list(result.summary()["label"]) == ["prose", "math"]
    assert len(result.generations) == 3 and set(result.generations.columns) >= {"prompt", "baseline", "steered"}
    assert [len(c.disable) for c in result.controls] == [2, 2]

    runs = store.runs().set_index("run_id")
    steered_runs = [result.steered_run, *result.control_runs]
    assert runs.loc[steered_runs, "parent_run_id"].eq(result.baseline_run).all()
    assert pd.isna(runs.loc[result.baseline_run, "parent_run_id"])
    assert SteeringSpec.from_json(runs.loc[result.steered_run, "intervention"]) == spec
    hits = store.query("SELECT count(*) AS n FROM routing WHERE run_id = ? AND weight != 0 AND "
                       "((layer = 0 AND expert = 1) OR (layer = 1 AND expert = 5))", [result.steered_run])
    assert hits["n"].iloc[0] == 0


def test_an_empty_spec_changes_nothing_in_an_experiment() -> None:
    result = run_experiment(tiny_model("mixtral")[0], tiny_tokenizer(), SteeringSpec(), TEXTS[:2], n_random=1)
    assert (result.tokens["delta_logprob"] == 0).all() and (result.tokens["kl"] == 0).all()
    assert (result.routing["share_changed"] == 0).all()


def test_run_experiment_refuses_bad_input() -> None:
    model, tokenizer = tiny_model("mixtral")[0], tiny_tokenizer()
    with pytest.raises(InputError, match="nothing to evaluate"):
        run_experiment(model, tokenizer, {"disable": [[0, 1]]}, ["a"], n_random=0)
    with pytest.raises(SteeringError, match="no expert 9"):
        run_experiment(model, tokenizer, {"disable": [[0, 9]]}, ["abc"], n_random=0)


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("steer")(steer_command)
    app.command("noop")(lambda: None)  # a second command keeps `steer` a sub-command, as in moelens
    return app


def test_cli_steer(tmp_path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"disable": ["0:1"]}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat\n\n2 + 2 =\n")
    args = ["steer", "tiny:mixtral", "--spec", str(spec_file), "--disable", "1:2", "--boost", "0:3=0.5",
            "--prompts", str(prompts), "--text", "hello world, hello steering", "--generate", "3", "--n-random", "1",
            "--db", str(tmp_path / "c.duckdb"), "--format", "json"]
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["spec"]["disable"] == [[0, 1], [1, 2]] and out["spec"]["boost"] == [[0, 3, 0.5]]
    assert len(out["generations"]) == 3 and out["runs"]["controls"]
    assert len(TraceStore(tmp_path / "c.duckdb").runs()) == 3

    # --no-save: the same report, no run recorded, no store created
    nosave = tmp_path / "nosave.duckdb"
    result = CliRunner().invoke(cli(), [*args[:-4], "--db", str(nosave), "--no-save", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["runs"] == {"baseline": None, "steered": None, "controls": []} and len(out["summary"]) == 1
    assert not nosave.exists()

    for bad, error, message in [
        (["--disable", "1-2", "--text", "x y"], SteeringError, "LAYER:EXPERT"),
        (["--boost", "1:2", "--text", "x y"], SteeringError, "LAYER:EXPERT=VALUE"),
        (["--disable", "0:1"], InputError, "no inputs"),
        (["--text", "x y"], SteeringError, "nothing to steer"),
        (["--spec", str(tmp_path / "missing.json"), "--text", "x"], InputError, "does not exist"),
    ]:
        result = CliRunner().invoke(cli(), ["steer", "tiny:mixtral", *bad, "--db", str(tmp_path / "c.duckdb")])
        assert isinstance(result.exception, error) and message in str(result.exception), (bad, result.exception)


def test_spec_from_scores_knows_each_analysis_ranking_column() -> None:
    import pandas as pd

    from moelens.steering import spec_from_scores

    df = pd.DataFrame({"layer": [0, 1, 1], "expert": [2, 3, 4], "npmi": [0.1, 0.9, 0.5], "n_x": [9, 1, 5]})
    df.attrs["params"] = {"score": "npmi"}
    assert spec_from_scores(df, n=2).disable == ((1, 3), (1, 4))
