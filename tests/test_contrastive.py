"""SCMoE self-contrast decoding (arXiv:2405.14507) and the one-ranked-expert routing its weak model uses."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from moelens import TraceStore
from moelens.adapters import RoutingCapture, find_routers
from moelens.errors import InputError, SteeringError
from moelens.steering import SteeringSpec, contrastive_generate, steer
from moelens.steering.contrastive import contrast_scores
from moelens.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["the quick brown", "2 + 2 = "]


@functools.cache
def model_for(model_type: str) -> Any:
    return tiny_model(model_type)[0]


def greedy(model: Any, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tiny_tokenizer()(prompt)["input_ids"]])
    model.generation_config.eos_token_id = None  # decode exactly n tokens, as stop_at_eos=False does
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss", "llama4_text", "dbrx", "qwen2_moe"])
def test_beta_zero_is_greedy_decoding_token_for_token(model_type: str) -> None:
    model = model_for(model_type)
    out = contrastive_generate(model, tiny_tokenizer(), PROMPTS, beta=0.0, max_new_tokens=10, stop_at_eos=False)
    assert out["new_ids"].tolist() == [greedy(model, p, 10) for p in PROMPTS]
    contrasted = contrastive_generate(model, tiny_tokenizer(), PROMPTS, beta=0.5, max_new_tokens=10, stop_at_eos=False)
    assert contrasted["n_new"].tolist() == [10, 10]


def probs_to_logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows).log()


def test_contrast_rule_two_steps_by_hand() -> None:
    """Step 1 picks token 1 where greedy picks 0; step 2 masks token 3, which would win unrestricted."""
    beta, alpha = 0.5, 0.2
    step1 = contrast_scores(probs_to_logits([0.5, 0.3, 0.15, 0.05]), probs_to_logits([0.6, 0.1, 0.2, 0.1]), beta, alpha)[0]
    expected1 = [1.5 * math.log(0.5) - 0.5 * math.log(0.6), 1.5 * math.log(0.3) - 0.5 * math.log(0.1),
                 1.5 * math.log(0.15) - 0.5 * math.log(0.2)]  # -0.784, -0.655, -2.041; p=0.05 < 0.2 * 0.5 masked
    assert step1[:3].tolist() == pytest.approx(expected1, abs=1e-5) and step1[3] == -math.inf
    assert int(step1.argmax()) == 1
    strong2, weak2 = probs_to_logits([0.7, 0.2, 0.05, 0.05]), probs_to_logits([0.4, 0.4, 0.199999, 1e-6])
    step2 = contrast_scores(strong2, weak2, beta, alpha)[0]
    assert step2[0] == pytest.approx(1.5 * math.log(0.7) - 0.5 * math.log(0.4), abs=1e-5)  # -0.077
    assert step2[2:].tolist() == [-math.inf, -math.inf] and int(step2.argmax()) == 0
    unrestricted = contrast_scores(strong2, weak2, beta, alpha=1e-9)[0]
    assert int(unrestricted.argmax()) == 3  # 1.5 ln 0.05 - 0.5 ln 1e-6 = +2.41
    assert torch.equal(contrast_scores(strong2, weak2, 0.0, alpha).argmax(-1), strong2.argmax(-1))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "llama4_text", "jetmoe"])
def test_only_rank_routes_each_token_to_its_r_th_expert(model_type: str) -> None:
    model = model_for(model_type)
    ids = torch.arange(3, 27).view(2, 12)
    info = find_routers(model)
    with steer(model, only_rank=2), torch.inference_mode():
        with RoutingCapture(model, find_routers(model), logits=True) as capture:
            model(input_ids=ids)
            calls = {c.layer: c for c in capture.pop()}
    for site in info.sites:
        if site.fixed_k:
            continue
        call = calls[site.layer]  # its logits are this layer's, under the steered earlier layers
        second = torch.topk(call.logits, 2).indices[:, 1:2]  # softmax and sigmoid are monotone in the logits
        if site.correction_bias is not None:  # ranked by the biased score, within the 2 best groups of 2 experts
            biased = (call.logits.sigmoid() + site.correction_bias).view(-1, 4, 2)
            best_groups = biased.sum(-1).topk(2).indices  # the sum of a 2-expert group's top-2 is its sum
            keep = torch.zeros(biased.shape[:2], dtype=torch.bool).scatter_(1, best_groups, True)
            second = biased.masked_fill(~keep[..., None], -math.inf).view(-1, 8).topk(2).indices[:, 1:2]
        assert call.experts.shape[1] == 1 and torch.equal(call.experts, second), site.name
        if model_type in ("mixtral", "jetmoe"):  # renormalised over one expert
            assert torch.allclose(call.weights, torch.ones(24, 1))
        if model_type == "qwen2_moe":  # no renormalisation: its softmax probability
            assert torch.allclose(call.weights, torch.softmax(call.logits, -1).gather(1, second), atol=1e-6)


def test_recorded_strong_routing(tmp_path) -> None:
    model, store = model_for("mixtral"), TraceStore(tmp_path / "t.duckdb")
    out = contrastive_generate(model, tiny_tokenizer(), PROMPTS, weak=3, beta=0.5, max_new_tokens=6, store=store,
                               stop_at_eos=False)
    run_id = int(out["run_id"][0])
    run = store.run(run_id)
    assert run["status"] == "complete" and run["intervention"]["version"] == 1
    assert run["metadata"]["decoding"]["method"] == "scmoe" and run["metadata"]["decoding"]["weak"]["only_rank"] == [[-1, 3]]
    tokens = store.query("SELECT seq_id, phase, count(*) AS n FROM tokens WHERE run_id = ? GROUP BY ALL ORDER BY ALL", [run_id])
    assert tokens[tokens["phase"] == "generated"]["n"].tolist() == [6, 6]
    routing = store.query("SELECT count(*) AS n FROM routing WHERE run_id = ?", [run_id])["n"][0]
    assert routing == tokens["n"].sum() * 2 * 2  # every token, both layers, k = 2 (the strong routing)
    text = store.query("SELECT text FROM sequences WHERE run_id = ? ORDER BY seq_id", [run_id])["text"].tolist()
    assert text == [p + c for p, c in zip(PROMPTS, out["completion"])]


def test_bad_arguments() -> None:
    model = model_for("mixtral")
    for kwargs, error, message in [(dict(weak=0), SteeringError, "rank"), (dict(weak=SteeringSpec()), SteeringError, "differ"),
                                   (dict(beta=-1), InputError, "beta"), (dict(alpha=0), InputError, "alpha"),
                                   (dict(weak={"only_rank": 9}), SteeringError, "between 1 and 8")]:
        with pytest.raises(error, match=message):
            contrastive_generate(model, tiny_tokenizer(), PROMPTS, max_new_tokens=2, **kwargs)
    with pytest.raises(SteeringError, match="sparsemixer"):
        contrastive_generate(model_for("phimoe"), tiny_tokenizer(), PROMPTS, max_new_tokens=2)


def test_cli_decode(tmp_path) -> None:
    import json

    from test_cli import moelens  # the command line in-process, as the CLI tests run it

    def cli(*args: str) -> tuple[int, str]:
        proc = moelens(*args, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    db = tmp_path / "t.duckdb"
    code, out = cli("decode", "tiny:mixtral", "-t", "the quick", "-t", "2 + 2", "--scmoe", "--beta", "0.5", "-n", "4",
                    "--db", str(db), "-f", "json")
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["scmoe"] and len(result["outputs"]) == 2 and all(o["n_new"] <= 4 for o in result["outputs"])
    assert TraceStore(db).run(result["run_id"])["metadata"]["decoding"]["beta"] == 0.5
    code, out = cli("decode", "tiny:mixtral", "-t", "abc", "--top-p", "0.5", "--k-max", "3", "-n", "3", "-f", "json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["strong"]["top_p"] == [[-1, 0.5]]
    code, out = cli("decode", "tiny:phimoe", "-t", "abc", "--top-k", "1")
    assert code == 1 and "sparsemixer" in out and "Traceback" not in out
    code, out = cli("decode", "tiny:mixtral")
    assert code == 1 and "no prompts" in out
