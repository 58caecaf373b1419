"""The catalogue of scores, so the CLI (``moelens analyze SCORE``) and the app can list them, show their
help and parameters, and run any of them by name without knowing each signature."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from moelens.analysis.agreement import run_agreement
from moelens.analysis.coactivation import VARIANTS, coactivation
from moelens.analysis.committee import ECI_VARIANTS, UNITS, committee_share, standing_committee
from moelens.analysis.domain import domain_specialization, domain_summary
from moelens.analysis.importance import ESFT_BY, GATES, easy_ep, ean, esft, frequency, man, reap
from moelens.analysis.experts_per_token import BY as EPT_BY
from moelens.analysis.experts_per_token import experts_per_token
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
from moelens.analysis.chunked import HOW_OPTIONS
from moelens.errors import InputError, did_you_mean


#: What each parameter kind takes on the command line, for help and error messages.
KIND_HELP = {
    "int": "an integer", "float": "a number", "str": "a text", "bool": "true or false",
    "ints": "integers separated by commas, e.g. 4,16", "json": "a JSON value",
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a front end may expose. ``kind``: int, float, str, bool, ints (comma list) or json."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    required: bool = False

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
            if self.kind == "ints":  # 4,16 or the JSON list [4, 16]
                return tuple(int(v) for v in text.strip("[]() ").split(",") if v.strip())
            if self.kind == "json":
                return json.loads(text)
        except ValueError as exc:
            raise InputError(f"{self.name}={text}: expected {KIND_HELP[self.kind]}") from exc
        if self.choices and text not in self.choices:
            raise InputError(f"{self.name}={text}: must be one of {', '.join(self.choices)}"
                             f"{did_you_mean(text, self.choices)}")
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
        self.check_names(values)
        known = {p.name: p for p in self.params}
        return {k: known[k].parse(v) for k, v in values.items()}

    def check_names(self, values: Mapping[str, Any]) -> None:
        """Refuse a parameter this score does not take, naming the closest one it does."""
        known = [p.name for p in self.params]
        for name in values:
            if name not in known:
                raise InputError(f"{self.name} has no parameter {name!r}{did_you_mean(name, known)}; "
                                 f"it takes {', '.join(known) or 'none'}")

    def missing(self, values: Mapping[str, Any]) -> list[ParamSpec]:
        """The required parameters that ``values`` leaves out."""
        return [p for p in self.params if p.required and values.get(p.name) is None]


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
    ScoreSpec("experts_per_token", experts_per_token,
              "Routed experts per token (dynamic top-p compute): distribution and mean per layer, label or position.",
              "Huang et al. 2024, arXiv:2403.07652",
              (_PHASE, ParamSpec("by", "str", "layer", "group tokens by layer only, label or position", EPT_BY))),
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
              (ParamSpec("layer", "int", None, "layer id", required=True), ParamSpec("expert", "int", None, "expert id", required=True),
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
              "Mixtral, arXiv 2401.04088, Table 5", (_PHASE, _BY_LABEL, ParamSpec("seed", "int", 0, "permutation baseline seed"),
               ParamSpec("permutation", "bool", True, "permutation baselines (need a pass over the routing)"))),
    ScoreSpec("srp", srp, "Segment Routing best Performance for segment lengths m.", "Liang et al., arXiv 2505.16056 (moe-lrc)",
              (_PHASE, ParamSpec("segment_lengths", "ints", (4, 16, 64, 256), "segment lengths m"),
               ParamSpec("level", "str", "layer", "aggregation level", SRP_LEVELS), _BY_LABEL)),
    ScoreSpec("sch", sch, "Segment Cache best Hit rate and LRU for every cache size.", "Liang et al., arXiv 2505.16056 (moe-lrc)",
              (_PHASE, ParamSpec("lookahead", "ints", (4, 16, 64, 256), "lookahead lengths m"),
               ParamSpec("level", "str", "layer", "one cache per layer or for the model", SCH_LEVELS),
               ParamSpec("lru", "bool", True, "include the LRU baseline"),
               ParamSpec("sample_every", "int", None, "use every n-th sequence (default: all within the time budget)"))),
    ScoreSpec("run_agreement", run_agreement, "Top-1 agreement and top-k overlap with a second run (router saturation).",
              "OLMoE, arXiv 2409.02060 §5 (router saturation)", (ParamSpec("run_b", "int", None, "the run to compare with", required=True), _PHASE),
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
    ScoreSpec("reap", reap, "REAP pruning saliency: mean over routed tokens of gate x expert output norm.",
              "REAP, arXiv 2510.13999 (CerebrasResearch/reap)",
              (ParamSpec("gate", "str", "used", "the model's weights, or softmax of the logits (renormalised)", GATES),
               _PHASE, _LABEL), needs="contributions (and logits for a softmax gate)"),
    ScoreSpec("ean", ean, "EAN: summed expert output norm over routed tokens.", "REAP, arXiv 2510.13999",
              (_PHASE, _LABEL), needs="contributions"),
    ScoreSpec("man", man, "MAN: mean expert output norm over routed tokens.", "arXiv 2606.15716", (_PHASE, _LABEL),
              needs="contributions"),
    ScoreSpec("frequency", frequency, "Pruning baseline: routed-slot count (or gate mass) per expert.",
              "frequency baseline, REAP arXiv 2510.13999",
              (ParamSpec("weighted", "bool", False, "rank by gate mass instead of count"), _PHASE, _LABEL)),
    ScoreSpec("easy_ep", easy_ep, "EASY-EP: gate x output norm x max(1 - cos(x, x + r), 0), summed.",
              "EASY-EP, arXiv 2504.06792", (_PHASE, _LABEL), needs="contributions"),
    ScoreSpec("esft", esft, "ESFT gate / token relevance with the cumulative top-p keep rule.",
              "ESFT, arXiv 2407.01906 (deepseek-ai/ESFT)",
              (ParamSpec("by", "str", "gate", "which relevance ranks", ESFT_BY),
               ParamSpec("top_p", "float", 0.2, "keep until the cumulative relevance reaches this"), _PHASE, _LABEL)),
    ScoreSpec("expert_map", expert_map, "UMAP of (layer, expert) label or token profiles.", "[moelens]",
              (ParamSpec("profile", "str", "label", "what places an expert", PROFILES), ParamSpec("seed", "int", 0, "UMAP seed"), _PHASE)),
    ScoreSpec("token_map", token_map, "UMAP of router-logit vectors of sampled tokens at one layer.", "[moelens]",
              (ParamSpec("layer", "int", None, "layer id", required=True), ParamSpec("max_tokens", "int", 5000, "tokens sampled"),
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
    `run_agreement` is the second run of the same store.

    Checked first, each with one message that says what to do: the score and parameter names, required
    parameters, and labels for scores that compare labels (which would otherwise return an empty table)."""
    if name not in SCORES:
        raise InputError(f"unknown score {name!r}{did_you_mean(name, SCORES)}; scores are: {', '.join(SCORES)}")
    spec = SCORES[name]
    how = {k: params.pop(k) for k in HOW_OPTIONS if k in params}  # engine options, not score parameters
    spec.check_names(params)
    if how.get("only_label") is not None:
        _label_filter(spec, params, how)
    if missing := spec.missing(params):
        raise InputError(f"{name} needs {', '.join(f'{p.name} ({p.help})' for p in missing)}")
    _check_data(store, run, spec, params)
    if name == "run_agreement":
        run_b = params.pop("run_b")
        df = run_agreement(store, run, store, run_b, **params, **how)
        if df.empty or not (df["n_tokens"] > 0).any():
            raise InputError(f"runs {run} and {run_b} share no tokens (same sequence, position and token id) in a "
                             "common layer: compare runs recorded over the same inputs with the same tokenizer")
        return df
    return spec.function(store, run, **params, **how)


def takes_how(function: Callable[..., Any]) -> bool:
    """Whether a score function accepts the options of `HOW_OPTIONS` (the pass budget, progress, a label filter)."""
    sig = inspect.signature(function)
    return "max_pass_slots" in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _label_filter(spec: ScoreSpec, params: dict[str, Any], how: dict[str, Any]) -> None:
    """Route ``only_label`` to the score: the pruning scores take it as their own ``label`` filter; a score that
    compares labels, or one without the pass options, is refused (one label leaves nothing to compare)."""
    if spec.needs in ("labels", "two labels or a second run"):
        raise InputError(f"{spec.name} compares sequence labels: a label filter leaves one; leave it out")
    if takes_how(spec.function):
        return
    if "label" in inspect.signature(spec.function).parameters and params.get("label") is None:
        params["label"] = how.pop("only_label")
        return
    raise InputError(f"{spec.name} takes no label filter; leave it out")


def _check_data(source: Any, run: int | None, spec: ScoreSpec, params: Mapping[str, Any]) -> None:
    """Refuse a run that lacks what the score reads, which would otherwise give an empty or all-NaN table."""
    where = "the data" if run is None else f"run {run}"
    if spec.needs == "labels" and not _exists(source, run, "sequences", "label IS NOT NULL", label=True):
        raise InputError(f"{spec.name} compares sequence labels, and {where} has none: record with --label/--label-field "
                         "(or labels=...), or pick a labelled run")
    if run is None:
        return
    row = source.run(int(run))
    if row.get("status") == "incomplete":
        raise InputError(f"run {run} is incomplete ({row.get('error')}): restore or re-record the missing shard, "
                         "or pick a complete run (moelens runs)")
    if spec.needs == "shared experts" and not _exists(source, run, "shared_experts", "true"):
        raise InputError(f"{spec.name}: run {run} has no shared-expert gates (its model has no shared experts)")
    phase = params.get("phase")
    if phase is not None and not _exists(source, run, "tokens", "phase = ?", phase):
        hint = " (record with --generate N for generated tokens)" if phase == "generated" else ""
        raise InputError(f"run {run} has no {phase} tokens{hint}; leave out phase to use all tokens")


def _exists(source: Any, run: int | None, table: str, condition: str, *args: Any, label: bool = False) -> bool:
    """Whether the run has a row of ``table`` meeting ``condition`` (a `RoutingData` answers for labels only)."""
    if run is None:
        labels = getattr(source, "label", None)
        return not label or labels is None or bool((labels >= 0).any())
    found = source.query(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE run_id = ? AND {condition}) AS found", [int(run), *args])
    return bool(found["found"].iloc[0])
