"""Is the bundled demo model's routing meaningful? Held-out loss and per-layer routing scores vs random init.

Runs the shipped model, its early checkpoint and the same architecture at several random-init seeds over
the shipped held-out corpus (256-token windows, fp32 on CPU), and writes
``benchmarks/results/demo_quality.md``. Exits non-zero if the trained model fails the bar of issue #7:
beat every random seed on MI(domain; top-1)/H(domain) and on the domains' JS divergence in every layer,
with no dead expert.

    python benchmarks/demo_quality.py [--seeds 1 2 3 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moelens.analysis import RoutingData, domain_summary
from moelens.demo import DEMO_EARLY_DIR, DEMO_MODEL_DIR, DOMAINS, load_corpus
from moelens.demo.model import new_model

WINDOW = 256
BATCH = 16
RESULTS = Path(__file__).resolve().parent / "results" / "demo_quality.md"


@dataclass
class Windows:
    """Held-out token windows: ids per window and its domain."""

    ids: list[list[int]]
    domains: list[str]


@dataclass
class Captured:
    """One model's pass over the windows, as flat per-token arrays sorted by (window, position)."""

    experts: np.ndarray  # int16[L, T, k], rank order as the router returned it
    weights: np.ndarray  # float32[L, T, k]
    seq_id: np.ndarray  # int32[T]
    pos: np.ndarray  # int32[T]
    token_id: np.ndarray  # int32[T]
    labels: list[str]  # [T]
    nll: np.ndarray  # float64[T]; NaN at each window's last token (no next token)


def heldout_windows(tokenizer) -> Windows:
    """Each held-out document cut into consecutive 256-token windows (a last short piece is kept)."""
    ids, domains = [], []
    for doc in load_corpus("heldout"):
        toks = tokenizer(doc["text"], verbose=False)["input_ids"]
        for start in range(0, len(toks) - 1, WINDOW):
            ids.append(toks[start : start + WINDOW])
            domains.append(doc["domain"])
    return Windows(ids, domains)


def batches(windows: Windows) -> Iterator[list[int]]:
    """Runs of up to BATCH consecutive windows of equal length: batched without padding, order kept."""
    batch: list[int] = []
    for i, ids in enumerate(windows.ids):
        if batch and (len(batch) == BATCH or len(ids) != len(windows.ids[batch[0]])):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def capture(model: PreTrainedModel, windows: Windows) -> Captured:
    """Forward every window; read top-k ids and weights from a hook on each layer's router.

    Router rows are ``b * S + s``, so concatenating the batches in order gives tokens sorted by
    (window, position).
    """
    model.eval()
    layers = model.model.layers
    grabbed: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _i, out, li=li: grabbed[li].append((out[2], out[1])))
        for li, layer in enumerate(layers)
    ]
    nll_parts = []
    try:
        with torch.no_grad():
            for batch in batches(windows):
                x = torch.tensor([windows.ids[i] for i in batch])
                logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
                nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
                nll_parts.append(torch.cat([nll, torch.full((len(batch), 1), float("nan"))], 1).reshape(-1))
    finally:
        for h in hooks:
            h.remove()
    lens = [len(ids) for ids in windows.ids]
    seq_id = np.repeat(np.arange(len(lens)), lens).astype(np.int32)
    return Captured(
        experts=np.stack([torch.cat([g[0] for g in per]).numpy() for per in grabbed]).astype(np.int16),
        weights=np.stack([torch.cat([g[1] for g in per]).float().numpy() for per in grabbed]),
        seq_id=seq_id,
        pos=np.concatenate([np.arange(n) for n in lens]).astype(np.int32),
        token_id=np.concatenate(windows.ids).astype(np.int32),
        labels=[windows.domains[i] for i in seq_id],
        nll=torch.cat(nll_parts).double().numpy(),
    )


def heldout_loss(cap: Captured) -> dict[str, float]:
    """Mean next-token NLL (nats) per domain, and the unweighted mean over domains."""
    labels = np.asarray(cap.labels)
    out = {d: float(np.nanmean(cap.nll[labels == d])) for d in DOMAINS}
    out["mean"] = float(np.mean([out[d] for d in DOMAINS]))
    return out


def routing_scores(cap: Captured, n_experts: int) -> pd.DataFrame:
    """Per-layer domain scores from moelens.analysis (the one place the metrics are defined)."""
    data = RoutingData.from_arrays(
        cap.experts,
        cap.weights,
        n_experts=n_experts,
        seq_id=cap.seq_id,
        pos=cap.pos,
        token_id=cap.token_id,
        labels=cap.labels,
    )
    return domain_summary(data)


def load_shipped(path: Path) -> PreTrainedModel:
    """The shipped bf16 weights upcast to fp32: bf16 matmuls are ~10x slower on CPU, the values identical."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def fmt_range(values: list[float], digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}-{hi:.{digits}f}"


METRICS = [
    ("mi_ratio", "MI(domain; top-1 expert) / H(domain)"),
    ("js_bits", "mean pairwise JS divergence of domain load vectors (bits)"),
    ("purity", "mean expert purity (chance .20)"),
    ("max_spec", "max domain specialization (uniform k/E = .125)"),
    ("dead_experts", "dead experts (of 16)"),
    ("same_top1", "consecutive same top-1 (1/E = .0625)"),
    ("sum_sq_top1", "i.i.d. expectation sum(q^2) of top-1 shares"),
]


def report(
    losses: dict[str, dict[str, float]], scores: dict[str, pd.DataFrame], seeds: list[int], seconds: float
) -> tuple[str, bool]:
    """The markdown report and whether the trained model passes the bar."""
    rand = [f"random seed {s}" for s in seeds]
    lines = ["# Demo model quality (held-out corpus)", ""]
    lines += [
        (
            f"Generated by `benchmarks/demo_quality.py` in {seconds:.0f} s: shipped model (`moelens/demo/model`), "
            f"its early checkpoint (`moelens/demo/checkpoints/early`) and the same architecture at random-init "
            f"seeds {seeds}; held-out documents cut into 256-token windows; fp32 on CPU (weights upcast from the "
            "shipped bf16)."
        ),
        "",
        "## Held-out loss (nats/token)",
        "",
        "| model | " + " | ".join(DOMAINS) + " | mean |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for name, loss in losses.items():
        lines.append(f"| {name} | " + " | ".join(f"{loss[d]:.3f}" for d in (*DOMAINS, "mean")) + " |")
    n_layers = len(scores["trained"])
    lines += [
        "",
        "## Routing per layer",
        "",
        "| metric | model | " + " | ".join(f"L{i}" for i in range(n_layers)) + " |",
        "|---|---|" + "---|" * n_layers,
    ]
    for key, title in METRICS:
        digits = 0 if key == "dead_experts" else 2
        for name in ("trained", "early"):
            vals = scores[name][key].tolist()
            lines.append(f"| {title} | {name} | " + " | ".join(f"{v:.{digits}f}" for v in vals) + " |")
        per_layer = [fmt_range([scores[r][key].iloc[li] for r in rand], digits) for li in range(n_layers)]
        lines.append(f"| {title} | random ({len(seeds)} seeds, range) | " + " | ".join(per_layer) + " |")
    checks = []
    for key in ("mi_ratio", "js_bits"):
        best_random = np.max([scores[r][key].to_numpy() for r in rand], axis=0)
        ok = bool(np.all(scores["trained"][key].to_numpy() > best_random))
        margin = ", ".join(f"{t:.2f} vs {r:.2f}" for t, r in zip(scores["trained"][key], best_random))
        checks.append((f"trained beats every random seed on {key} in every layer ({margin})", ok))
    dead = int(scores["trained"]["dead_experts"].sum())
    checks.append((f"trained model has no dead expert ({dead} dead)", dead == 0))
    lines += ["", "## Checks (issue #7)", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    return "\n".join(lines) + "\n", all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    windows = heldout_windows(tokenizer)
    models = {"trained": lambda: load_shipped(DEMO_MODEL_DIR), "early": lambda: load_shipped(DEMO_EARLY_DIR)}
    models.update({f"random seed {s}": (lambda s=s: new_model(s)) for s in args.seeds})
    losses, scores = {}, {}
    for name, make in models.items():
        t0 = time.perf_counter()
        model = make()
        cap = capture(model, windows)
        losses[name] = heldout_loss(cap)
        scores[name] = routing_scores(cap, model.config.num_experts)
        print(f"{name}: {len(cap.seq_id):,} tokens, loss {losses[name]['mean']:.3f} ({time.perf_counter() - t0:.0f} s)")
    text, ok = report(losses, scores, args.seeds, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
