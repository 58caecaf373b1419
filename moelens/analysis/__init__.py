"""Routing scores from the literature as pure functions of stored routing.

Every score is ``score(source, run=None, **params) -> pandas.DataFrame`` where ``source`` is a
`TraceStore` (with ``run`` = run id) or a `RoutingData`; results are tidy (long) tables whose
``df.attrs["params"]`` names the score, run, phase and parameters. Each score is a `Chunked` map → merge →
finish over batches of whole sequences (`iter_batches`), so a run of any size streams through in bounded
memory; ``engine="ray"`` maps the shards of a partitioned Parquet store on Ray. `summarize` stores the
derived summaries that the count-based scores finish from. Definitions, edge cases and references:
each function's docstring, which cites its paper (arXiv id) and reference code. `SCORES` / `run_score` list and run them by
name. No torch, transformers or streamlit here; umap and numba are imported only by the functions that
need them.
"""

from moelens.analysis.agreement import run_agreement
from moelens.analysis.chunked import Chunked, Context, NeedsFullPass, compute, compute_partial
from moelens.analysis.coactivation import coactivation
from moelens.analysis.committee import audit_committee, committee_lists, committee_lists_from_long, committee_share, standing_committee
from moelens.analysis.data import PHASES, RoutingData
from moelens.analysis.domain import domain_specialization, domain_summary
from moelens.analysis.importance import easy_ep, ean, esft, frequency, man, reap
from moelens.analysis.experts_per_token import experts_per_token
from moelens.analysis.load import expert_load, layer_balance, shared_expert_stats
from moelens.analysis.loading import clear_cache
from moelens.analysis.maps import expert_map, expert_profiles, token_map
from moelens.analysis.npmi import npmi, npmi_combined
from moelens.analysis.registry import SCORES, ParamSpec, ScoreSpec, run_score
from moelens.analysis.repetition import repetition
from moelens.analysis.risk import risk_difference
from moelens.analysis.router_stats import router_stats, router_token_stats
from moelens.analysis.sch import sch
from moelens.analysis.srp import srp
from moelens.analysis.stream import iter_batches
from moelens.analysis.summaries import summarize
from moelens.analysis.synthetic import synthetic, write_run
from moelens.analysis.transitions import cross_layer_consistency, cross_layer_transitions
from moelens.analysis.vocabulary import expert_top_tokens, vocabulary_by_expert, vocabulary_specialization

__all__ = [
    "easy_ep",
    "ean",
    "esft",
    "frequency",
    "man",
    "reap",
    "PHASES",
    "Chunked",
    "Context",
    "SCORES",
    "ParamSpec",
    "RoutingData",
    "ScoreSpec",
    "audit_committee",
    "clear_cache",
    "coactivation",
    "committee_lists",
    "committee_lists_from_long",
    "committee_share",
    "NeedsFullPass",
    "compute",
    "compute_partial",
    "cross_layer_consistency",
    "cross_layer_transitions",
    "domain_specialization",
    "domain_summary",
    "experts_per_token",
    "expert_load",
    "expert_map",
    "expert_profiles",
    "expert_top_tokens",
    "iter_batches",
    "layer_balance",
    "npmi",
    "npmi_combined",
    "repetition",
    "risk_difference",
    "router_stats",
    "router_token_stats",
    "run_agreement",
    "run_score",
    "sch",
    "shared_expert_stats",
    "srp",
    "standing_committee",
    "summarize",
    "synthetic",
    "token_map",
    "vocabulary_by_expert",
    "vocabulary_specialization",
    "write_run",
]
