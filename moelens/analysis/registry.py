"""The catalogue of scores, so the CLI (``moelens analyze SCORE``) and the app can list them, show their
help and parameters, and run any of them by name without knowing each signature."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from moelens.analysis.agreement import run_agreement
from moelens.analysis.coactivation import VARIANTS, coactivation
from moelens.analysis.committee import ECI_VARIANTS, UNITS, committee_share, standing_committee
from moelens.analysis.domain import domain_specialization, domain_summary
from moelens.analysis.load import expert_load, layer_balance, shared_expert_stats
from moelens.analysis.maps import PROFILES, expert_map, token_map
from moelens.analysis.npmi import npmi, npmi_combined
from moelens.analysis.repetition import repetition
from moelens.analysis.risk import risk_difference
from moelens.analysis.router_stats import router_stats, router_token_stats
from moelens.analysis.sch import LEVELS as SCH_LEVELS
from moelens.analysis.sch import sch
from moelens.analysis.srp import LEVELS as SRP_LEVELS
from moelens.analysis.srp import srp
from moelens.analysis.transitions import cross_layer_consistency, cross_layer_transitions
from moelens.analysis.vocabulary import TARGETS, expert_top_tokens, vocabulary_by_expert, vocabulary_specialization
from moelens.errors import InputError


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a front end may expose. ``kind``: int, float, str, bool, ints (comma list) or json."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    def parse(self, text: str) -> Any:
        """The typed value of a command-line string."""
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "bool":
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("1", "true", "yes")
            if self.kind == "ints":
                return tuple(int(v) for v in text.split(",") if v.strip())
            if self.kind == "json":
                return json.loads(text)
        except ValueError as exc:
            raise InputError(f"--{self.name.replace('_', '-')}: cannot read {text!r} as {self.kind}") from exc
        if self.choices and text not in self.choices:
            raise InputError(f"--{self.name.replace('_', '-')} must be one of {list(self.choices)}, not {text!r}")
        return text


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score: ``function(store_or_data, run, **params) -> DataFrame``."""

    name: str
    function: Callable[..., pd.DataFrame]
    help: str
    reference: str
    params: tuple[ParamSpec, ...] = ()
    needs: str = ""  #: what the run must have beyond routing (labels, logits, a second run...)

    def parse(self, values: Mapping[str, str]) -> dict[str, Any]:
        """Typed keyword arguments from ``{param: command-line string}``."""
        known = {p.name: p for p in self.params}
        unknown = set(values) - set(known)
        if unknown:
            raise InputError(f"{self.name} has no parameter(s) {sorted(unknown)}; it takes {sorted(known)}")
        return {k: known[k].parse(v) for k, v in values.items()}


_PHASE = ParamSpec("phase", "str", None, "only 'prompt' or 'generated' tokens (default: both pooled)", ("prompt", "generated"))
_BY_LABEL = ParamSpec("by_label", "bool", False, "one row group per sequence label")
_TARGET = ParamSpec("target", "str", "input", "token paired with each position's routing", TARGETS)
_MIN_COUNT = ParamSpec("min_count", "int", 10, "only token ids seen at least this often (1 = the reference)")
_NORMALIZE = ParamSpec("normalize", "bool", False, "rescale p_x to (p - k/E) / (1 - k/E)")
_TOKENS = ParamSpec("tokens", "ints", None, "token ids of the predicate, e.g. 17,42")
_REGEX = ParamSpec("regex", "str", None, "regex searched in each token's text")
_LABEL = ParamSpec("label", "str", None, "sequence label as the predicate")
_LAYER = ParamSpec("layer", "int", None, "one layer id (default: all)")
_COMMITTEE = (
    ParamSpec("eci", "str", "minmax", "Expert Contribution Index variant", ECI_VARIANTS),
    ParamSpec("list_length", "int", None, "top-K list length per domain (default: the layer's k)"),
    ParamSpec("presence_ratio", "float", 0.8, "share of domains a candidate must appear in"),
    ParamSpec("unit", "str", "last_prompt_token", "what Stage I profiles", UNITS),
)

_ENTRIES = (
    ScoreSpec("expert_load", expert_load, "Routed-slot count, activation rate, load and gate share per (layer, expert).",
              "load statistics (Switch Transformers, arXiv 2101.03961)", (_PHASE, _BY_LABEL)),
    ScoreSpec("layer_balance", layer_balance, "Load entropy, effective experts, max/mean, MaxVio, CV, dead experts per layer.",
              "load statistics; MaxVio: arXiv 2408.15664", (_PHASE,)),
    ScoreSpec("shared_expert_stats", shared_expert_stats, "Shared-expert gate mean/std/min/max per layer.",
              "[moelens]", (_PHASE,), needs="shared experts"),
    ScoreSpec("domain_specialization", domain_specialization,
              "Share of each label's tokens routed to each expert, vs k/E, lift and smoothed log-ratio.",
              "OLMoE, arXiv 2409.02060 §5",
              (_PHASE, ParamSpec("top1", "bool", False, "first choice only (baseline 1/E)"),
               ParamSpec("pseudocount", "float", 1.0, "smoothing of the log-ratio")), needs="labels"),
    ScoreSpec("domain_summary", domain_summary,
              "Per layer: MI(label; top-1)/H, JS divergence, purity, max spec, dead experts, same-top-1 vs Σq².",
              "OLMoE arXiv 2409.02060 §5; Mixtral arXiv 2401.04088", (_PHASE,), needs="labels"),
    ScoreSpec("vocabulary_specialization", vocabulary_specialization,
              "Mean over token ids of the share routed to their most frequent expert, per layer.",
              "OLMoE, arXiv 2409.02060 §5", (_PHASE, _TARGET, _MIN_COUNT, _NORMALIZE)),
    ScoreSpec("vocabulary_by_expert", vocabulary_by_expert, "Vocabulary specialization credited to each expert.",
              "OLMoE, arXiv 2409.02060 §5", (_PHASE, _TARGET, _MIN_COUNT, _NORMALIZE)),
    ScoreSpec("expert_top_tokens", expert_top_tokens, "An expert's most frequent tokens with example contexts.",
              "[moelens]",
              (ParamSpec("layer", "int", None, "layer id (required)"), ParamSpec("expert", "int", None, "expert id (required)"),
               ParamSpec("n", "int", 20, "number of tokens"), ParamSpec("n_contexts", "int", 3, "contexts per token"),
               _TARGET, _PHASE), needs="layer and expert"),
    ScoreSpec("coactivation", coactivation, "P(j | i), Jaccard and nPMI of expert pairs within a layer.",
              "OLMoE, arXiv 2409.02060 §5",
              (_PHASE, ParamSpec("variant", "str", "all", "all pairs, or OLMoE adjacent-pair (figure reproduction)",
                                 tuple(VARIANTS)))),
    ScoreSpec("cross_layer_transitions", cross_layer_transitions, "Expert → next-layer expert flows.",
              "[moelens]", (_PHASE, ParamSpec("top1", "bool", True, "first choices only (else all slot pairs)"))),
    ScoreSpec("cross_layer_consistency", cross_layer_consistency,
              "How much one layer's first choice determines the next layer's.", "[moelens]", (_PHASE,)),
    ScoreSpec("repetition", repetition, "Consecutive-token first-choice and any-overlap repetition with baselines.",
              "Mixtral, arXiv 2401.04088, Table 5", (_PHASE, _BY_LABEL, ParamSpec("seed", "int", 0, "permutation baseline seed"))),
    ScoreSpec("srp", srp, "Segment Routing best Performance for segment lengths m.", "Liang et al., arXiv 2505.16056 (moe-lrc)",
              (_PHASE, ParamSpec("segment_lengths", "ints", (4, 16, 64, 256), "segment lengths m"),
               ParamSpec("level", "str", "layer", "aggregation level", SRP_LEVELS), _BY_LABEL)),
    ScoreSpec("sch", sch, "Segment Cache best Hit rate and LRU for every cache size.", "Liang et al., arXiv 2505.16056 (moe-lrc)",
              (_PHASE, ParamSpec("lookahead", "ints", (4, 16, 64, 256), "lookahead lengths m"),
               ParamSpec("level", "str", "layer", "one cache per layer or for the model", SCH_LEVELS),
               ParamSpec("lru", "bool", True, "include the LRU baseline"),
               ParamSpec("sample_every", "int", None, "use every n-th sequence (default: all within the time budget)"))),
    ScoreSpec("run_agreement", run_agreement, "Top-1 agreement and top-k overlap with a second run (router saturation).",
              "OLMoE, arXiv 2409.02060 §5 (router saturation)", (ParamSpec("run_b", "int", None, "the run to compare with (required)"), _PHASE),
              needs="a second, token-aligned run"),
    ScoreSpec("standing_committee", standing_committee, "CommitteeAudit: experts every domain ranks high.",
              "CommitteeAudit, arXiv 2601.03425", (*_COMMITTEE, _PHASE), needs="labels"),
    ScoreSpec("committee_share", committee_share, "The standing committee's share of routing per label.",
              "moelens, after CommitteeAudit (arXiv 2601.03425)", (ParamSpec("unit", "str", "token", "which tokens", UNITS), _PHASE), needs="labels"),
    ScoreSpec("npmi", npmi, "nPMI between a token predicate and each expert, ranked.", "RICE, arXiv 2505.14681 (estimator as summarised)",
              (_TOKENS, _REGEX, _LABEL, _LAYER, _PHASE), needs="one of tokens / regex / label"),
    ScoreSpec("npmi_combined", npmi_combined, "RICE-style weighted sum of nPMI over several predicates.",
              "RICE, arXiv 2505.14681 (estimator as summarised)",
              (ParamSpec("targets", "json", None, 'e.g. [[1, {"regex": "<think>"}], [-1, {"regex": "</think>"}]]'), _LAYER, _PHASE),
              needs="targets"),
    ScoreSpec("risk_difference", risk_difference, "SteerMoE risk difference between two behaviours, ranked by |RD|.",
              "SteerMoE, arXiv 2509.09660",
              (ParamSpec("label_a", "str", None, "behaviour 1 label"), ParamSpec("label_b", "str", None, "behaviour 2 label"),
               ParamSpec("run_b", "int", None, "behaviour 2 from this run"), ParamSpec("equalize", "bool", False, "same token count"),
               _PHASE), needs="two labels or a second run"),
    ScoreSpec("expert_map", expert_map, "UMAP of (layer, expert) label or token profiles.", "[moelens]",
              (ParamSpec("profile", "str", "label", "what places an expert", PROFILES), ParamSpec("seed", "int", 0, "UMAP seed"), _PHASE)),
    ScoreSpec("token_map", token_map, "UMAP of router-logit vectors of sampled tokens at one layer.", "[moelens]",
              (ParamSpec("layer", "int", None, "layer id (required)"), ParamSpec("max_tokens", "int", 5000, "tokens sampled"),
               ParamSpec("seed", "int", 0, "sampling and UMAP seed"), _PHASE), needs="router logits"),
    ScoreSpec("router_stats", router_stats, "Router entropy, top-1/top-2 margin and near-ties per layer.",
              "StableMoE arXiv 2204.08396; Switch arXiv 2101.03961",
              (ParamSpec("near_tie", "float", 0.02, "probability margin below which a token is a near-tie"), _PHASE),
              needs="router logits"),
    ScoreSpec("router_token_stats", router_token_stats, "Router entropy, margin and near-tie of every token at one layer.",
              "StableMoE arXiv 2204.08396",
              (ParamSpec("layer", "int", None, "layer id (required)"), ParamSpec("seq_id", "int", None, "one sequence"),
               ParamSpec("near_tie", "float", 0.02, "near-tie margin"), _PHASE), needs="router logits"),
)  # fmt: skip

#: Every score by name.
SCORES: dict[str, ScoreSpec] = {spec.name: spec for spec in _ENTRIES}


def run_score(store: Any, run: int | None, name: str, **params: Any) -> pd.DataFrame:
    """Run a registered score on a store's run (or on a `RoutingData` with ``run=None``). ``run_b`` of
    `run_agreement` is the second run of the same store."""
    if name not in SCORES:
        raise InputError(f"unknown score {name!r}; scores are: {', '.join(SCORES)}")
    if name == "run_agreement":
        if params.get("run_b") is None:
            raise InputError("run_agreement needs run_b (the run to compare with)")
        return run_agreement(store, run, store, params.pop("run_b"), **params)
    return SCORES[name].function(store, run, **params)
