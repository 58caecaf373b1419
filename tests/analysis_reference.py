"""Deliberately simple, slow, per-token reference implementations of the routing scores,
written independently of `moelens.analysis` (plain Python lists, dicts and Counters; no shared helpers),
used as oracles by the property tests in ``tests/test_analysis_properties.py``.

A trace is a list of sequences; a sequence a list of `Tok`; ``Tok.slots[layer]`` the rank-ordered slots,
each ``(expert, weight)`` or None for a slot that is not routed (dropped or weight 0).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations


@dataclass
class Tok:
    token_id: int
    label: str | None
    slots: dict[int, list[tuple[int, float] | None]]
    predicted: int = -1
    phase: str = "prompt"
    text: str = ""


@dataclass
class Trace:
    n_experts: int
    top_k: int
    layers: list[int]
    seqs: list[list[Tok]] = field(default_factory=list)

    def tokens(self) -> list[Tok]:
        return [t for s in self.seqs for t in s]


def routed(tok: Tok, layer: int) -> list[int]:
    return [s[0] for s in tok.slots[layer] if s is not None]


def first(tok: Tok, layer: int) -> int | None:
    s = tok.slots[layer][0]
    return None if s is None else s[0]


def pairs(trace: Trace) -> list[tuple[Tok, Tok]]:
    return [(s[i], s[i + 1]) for s in trace.seqs for i in range(len(s) - 1)]


# -- load ---------------------------------------------------------------------------------------


def load(trace: Trace, layer: int) -> dict[str, float]:
    counts = [0] * trace.n_experts
    mass = [0.0] * trace.n_experts
    for tok in trace.tokens():
        for s in tok.slots[layer]:
            if s is not None:
                counts[s[0]] += 1
                mass[s[0]] += s[1]
    total = sum(counts) or 1  # callers compare shares only when something was routed
    E = trace.n_experts
    shares = [c / total for c in counts]
    h = -sum(f * math.log(f) for f in shares if f > 0)
    mean = total / E
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / E)
    return {
        "counts": counts,
        "mass": mass,
        "entropy": h,
        "norm_entropy": h / math.log(E),
        "max_mean": max(counts) / mean,
        "cv": std / mean,
        "dead": sum(c == 0 for c in counts),
    }


# -- domain -----------------------------------------------------------------------


def domain_spec(trace: Trace, layer: int, top1: bool = False) -> dict[tuple[str, int], float]:
    n_d: Counter[str] = Counter()
    hits: Counter[tuple[str, int]] = Counter()
    for tok in trace.tokens():
        if tok.label is None:
            continue
        n_d[tok.label] += 1
        chosen = ([first(tok, layer)] if first(tok, layer) is not None else []) if top1 else routed(tok, layer)
        for e in chosen:
            hits[(tok.label, e)] += 1
    return {(d, e): hits[(d, e)] / n_d[d] for d in n_d for e in range(trace.n_experts)}


def _entropy(ps: list[float], base: float = math.e) -> float:
    return -sum(p * math.log(p, base) for p in ps if p > 0)


def domain_summary(trace: Trace, layer: int) -> dict[str, float]:
    labelled = [t for t in trace.tokens() if t.label is not None]
    joint: Counter[tuple[str, int]] = Counter((t.label, first(t, layer)) for t in labelled if first(t, layer) is not None)
    n = sum(joint.values())
    pd_: Counter[str] = Counter()
    pe: Counter[int] = Counter()
    for (d, e), c in joint.items():
        pd_[d] += c
        pe[e] += c
    h_d = _entropy([c / n for c in pd_.values()])
    mi = sum(c / n * math.log((c / n) / ((pd_[d] / n) * (pe[e] / n))) for (d, e), c in joint.items())
    labels = sorted({t.label for t in labelled})
    load: dict[str, list[int]] = {d: [0] * trace.n_experts for d in labels}
    for t in labelled:
        for e in routed(t, layer):
            load[t.label][e] += 1
    dists = [[c / sum(v) for c in v] for v in load.values() if sum(v)]
    js = []
    for a, b in combinations(dists, 2):
        m = [(x + y) / 2 for x, y in zip(a, b)]
        js.append(_entropy(m, 2) - (_entropy(a, 2) + _entropy(b, 2)) / 2)
    spec = domain_spec(trace, layer)
    purities = []
    for e in range(trace.n_experts):
        col = [spec[(d, e)] for d in labels]
        if sum(col) > 0:
            purities.append(max(col) / sum(col))
    same = [first(a, layer) == first(b, layer) for a, b in pairs(trace) if first(a, layer) is not None and first(b, layer) is not None]
    q = Counter(first(t, layer) for t in trace.tokens() if first(t, layer) is not None)
    nq = sum(q.values())
    return {
        "mi_ratio": mi / h_d if h_d > 0 else math.nan,
        "js_bits": sum(js) / len(js) if js else math.nan,
        "purity": sum(purities) / len(purities) if purities else math.nan,
        "max_spec": max(spec.values()) if spec else math.nan,
        "same_top1": sum(same) / len(same) if same else math.nan,
        "sum_sq_top1": sum((c / nq) ** 2 for c in q.values()) if nq else math.nan,
    }


# -- vocabulary, OLMoE's Counter-based algorithm --------------------------------------------------


def vocabulary(trace: Trace, layer: int, target: str, min_count: int = 1) -> tuple[float, int, dict[int, tuple[float, int]]]:
    """(layer score, number of token ids, per expert (score, n token ids))."""
    lists: dict[int, list[int]] = {}
    occurrences: Counter[int] = Counter()
    for seq in trace.seqs:
        for i, tok in enumerate(seq):
            if target == "input":
                x = tok.token_id
            elif target == "next":
                if i + 1 >= len(seq):
                    continue
                x = seq[i + 1].token_id
            else:
                if tok.predicted < 0:
                    continue
                x = tok.predicted
            occurrences[x] += 1
            lists.setdefault(x, []).extend(routed(tok, layer))
    p: dict[int, float] = {}
    credited: dict[int, int] = {}
    for x, ids in lists.items():
        if occurrences[x] < min_count:
            continue
        top = Counter(ids).most_common(1)
        p[x] = top[0][1] / occurrences[x] if top else 0.0
        if top:
            credited[x] = top[0][0]
        else:
            credited[x] = 0
    per_expert: dict[int, tuple[float, int]] = {}
    for e in range(trace.n_experts):
        xs = [x for x in p if credited[x] == e]
        per_expert[e] = (sum(p[x] for x in xs) / len(xs) if xs else math.nan, len(xs))
    return (sum(p.values()) / len(p) if p else math.nan), len(p), per_expert


# -- co-activation and transitions ---------------------------------------------------------------


def coactivation(trace: Trace, layer: int, adjacent: bool = False) -> tuple[Counter[int], Counter[tuple[int, int]]]:
    n: Counter[int] = Counter()
    nij: Counter[tuple[int, int]] = Counter()
    for tok in trace.tokens():
        ids = routed(tok, layer)
        n.update(ids)
        pairs_ = list(zip(ids, ids[1:])) if adjacent else list(combinations(ids, 2))
        for a, b in pairs_:
            nij[(a, b)] += 1
            nij[(b, a)] += 1
    return n, nij


def transitions(trace: Trace, layer: int, next_layer: int) -> Counter[tuple[int, int]]:
    return Counter(
        (first(t, layer), first(t, next_layer))
        for t in trace.tokens()
        if first(t, layer) is not None and first(t, next_layer) is not None
    )


def consistency(trace: Trace, layer: int, next_layer: int) -> dict[str, float]:
    c = transitions(trace, layer, next_layer)
    n = sum(c.values())
    a: Counter[int] = Counter()
    b: Counter[int] = Counter()
    for (x, y), v in c.items():
        a[x] += v
        b[y] += v
    mi = sum(v / n * math.log2((v / n) / ((a[x] / n) * (b[y] / n))) for (x, y), v in c.items())
    best: dict[int, int] = {}
    for (x, _), v in c.items():
        best[x] = max(best.get(x, 0), v)
    return {"mi_bits": mi, "predictability": sum(best.values()) / n, "baseline": max(b.values()) / n, "h_next": _entropy([v / n for v in b.values()], 2)}


# -- repetition -----------------------------------------------------------------------------------


def repetition(trace: Trace, layer: int) -> tuple[float, float]:
    f, o = [], []
    for a, b in pairs(trace):
        if first(a, layer) is not None and first(b, layer) is not None:
            f.append(first(a, layer) == first(b, layer))
        if routed(a, layer) and routed(b, layer):
            o.append(bool(set(routed(a, layer)) & set(routed(b, layer))))
    return (sum(f) / len(f) if f else math.nan), (sum(o) / len(o) if o else math.nan)


# -- SRP (micro aggregation per layer) ----------------------------------------------------------


def srp(trace: Trace, layer: int | list[int], m: int, expert: int | None = None, label: object = "any") -> tuple[float, int, float]:
    """(SRP, θ*, ρ̂) by enumerating every window and every θ; cells pooled over ``layer`` (one or several),
    optionally one ``expert`` and sequences whose label is ``label``."""
    layers = [layer] if isinstance(layer, int) else layer
    experts = range(trace.n_experts) if expert is None else [expert]
    cells = []
    for seq in trace.seqs:
        if label != "any" and seq[0].label != label:
            continue
        for s in range(len(seq) - m + 1):
            for lay in layers:
                c = Counter(e for tok in seq[s : s + m] for e in routed(tok, lay))
                cells.extend(c.get(e, 0) for e in experts)
    if not cells:
        return math.nan, -1, math.nan
    act = sum(cells)
    best, theta, pred_best = -1.0, 0, 0
    for th in range(m + 1):
        tp = sum(c for c in cells if c >= th)
        pred = m * sum(1 for c in cells if c >= th)
        f1 = 2 * tp / max(pred + act, 1)
        if f1 > best:
            best, theta, pred_best = f1, th, pred
    return best, theta, (pred_best / act if act else 0.0)


# -- SCH / LRU as a literal list simulation -------------------------------------------------


def cache_curve(seq: list[list[int]], E: int, m: int | None) -> list[float] | None:
    """Hit rates for C = 1..E of one sequence of rank-ordered id lists; m=None is LRU."""
    stack: list[int] = []
    stamp: dict[int, int] = {}
    clock = 0
    hits = [0] * E
    n_acc = 0
    future: Counter[int] = Counter()
    if m is not None:
        for ids in seq[:m]:
            future.update(ids)

    def priority(y: int) -> tuple[int, int]:
        return (future[y], stamp[y]) if m is not None else (0, stamp[y])

    for i, ids in enumerate(seq):
        positions = list(stack)
        distinct = len(stack)
        for e in ids:
            n_acc += 1
            if e in positions:
                hits[positions.index(e)] += 1
            else:
                hits[distinct] += 1
                distinct += 1
        for e in ids:
            p = stack.index(e) if e in stack else len(stack)
            above = stack[:p]
            below = stack[p + 1 :] if e in stack else []
            new = [e]
            if above:
                carry = above[0]
                for y in above[1:]:
                    if priority(y) > priority(carry):
                        new.append(y)
                    else:
                        new.append(carry)
                        carry = y
                new.append(carry)
            stack = new + below
            clock += 1
            stamp[e] = clock
            if m is not None:
                future[e] -= 1
        if m is not None and i + m < len(seq):
            future.update(seq[i + m])
    if n_acc == 0:
        return None
    out, run = [], 0
    for h in hits:
        run += h
        out.append(run / n_acc)
    return out


def sch(trace: Trace, layer: int | None, m: int | None) -> list[float]:
    """Mean per-sequence curve of one layer's cache, or (layer=None) of one cache for all layers with ids
    offset by layer position × E and each token's lists concatenated in layer order."""
    E = trace.n_experts if layer is not None else trace.n_experts * len(trace.layers)

    def accesses(tok: Tok) -> list[int]:
        if layer is not None:
            return routed(tok, layer)
        return [i * trace.n_experts + e for i, lay in enumerate(trace.layers) for e in routed(tok, lay)]

    curves = [c for seq in trace.seqs if (c := cache_curve([accesses(t) for t in seq], E, m)) is not None]
    return [sum(c[i] for c in curves) / len(curves) for i in range(E)] if curves else []


# -- agreement -----------------------------------------------------------------------------------


def agreement(a: Trace, b: Trace, layer: int) -> tuple[float, float]:
    """Trace b has the same sequences and tokens as a (routing may differ)."""
    top1, overlap = [], []
    for sa, sb in zip(a.seqs, b.seqs):
        for ta, tb in zip(sa, sb):
            if first(ta, layer) is not None and first(tb, layer) is not None:
                top1.append(first(ta, layer) == first(tb, layer))
            overlap.append(len(set(routed(ta, layer)) & set(routed(tb, layer))) / a.top_k)
    return (sum(top1) / len(top1) if top1 else math.nan), sum(overlap) / len(overlap)


# -- nPMI and risk difference ----------------------------------------------------------


def npmi(trace: Trace, layer: int, matches) -> dict[int, float]:
    toks = trace.tokens()
    T = len(toks)
    n_x = sum(1 for t in toks if matches(t))
    out = {}
    for e in range(trace.n_experts):
        n_e = sum(1 for t in toks if e in routed(t, layer))
        n_xe = sum(1 for t in toks if matches(t) and e in routed(t, layer))
        if n_x == 0 or n_e == 0:
            out[e] = math.nan
        elif n_xe == 0:
            out[e] = -1.0
        elif n_xe == T:
            out[e] = 1.0
        else:
            pxy = n_xe / T
            out[e] = math.log2(pxy / ((n_x / T) * (n_e / T))) / -math.log2(pxy)
    return out


def risk_difference(trace: Trace, layer: int, label_a: str, label_b: str) -> dict[int, float]:
    ta = [t for t in trace.tokens() if t.label == label_a]
    tb = [t for t in trace.tokens() if t.label == label_b]
    return {
        e: sum(e in routed(t, layer) for t in ta) / len(ta) - sum(e in routed(t, layer) for t in tb) / len(tb)
        for e in range(trace.n_experts)
    }


# -- tokens of an expert, committee share ----------------------------------------------------------------


def top_tokens(trace: Trace, layer: int, expert: int) -> Counter[int]:
    return Counter(t.token_id for t in trace.tokens() if expert in routed(t, layer))


def committee_share(trace: Trace, layer: int, members: set[int]) -> dict[str, tuple[float, float]]:
    """label -> (share of routed slots, share of gate mass) going to ``members``, over all tokens."""
    out = {}
    for label in sorted({t.label for t in trace.tokens() if t.label}):
        slots = [s for t in trace.tokens() if t.label == label for s in t.slots[layer] if s is not None]
        n = len(slots)
        mass = sum(w for _, w in slots)
        out[label] = (
            sum(1 for e, _ in slots if e in members) / n if n else math.nan,
            sum(w for e, w in slots if e in members) / mass if mass else math.nan,
        )
    return out


# -- CommitteeAudit --------------------------------------------------------------------------------


def eci(units: list[list[tuple[int, float] | None]], E: int, variant: str) -> list[float]:
    """ECI per expert over units (each a list of slots) by building the dense weight matrix W."""
    N = len(units)
    W = [[0.0] * E for _ in range(N)]
    for x, slots in enumerate(units):
        for s in slots:
            if s is not None:
                W[x][s[0]] = s[1]
    out = []
    for i in range(E):
        col = [W[x][i] for x in range(N)]
        f = sum(1 for x, slots in enumerate(units) if any(s is not None and s[0] == i for s in slots)) / N
        if variant == "frequency":
            out.append(f)
        elif variant == "expected":
            out.append(sum(col) / N)
        else:
            lo, hi = min(col), max(col)
            out.append(sum((w - lo) / (hi - lo + 1e-6) for w in col) / N * f)
    return out


def audit(lists: dict[str, list[tuple[int, float]]], presence_ratio: float, pool: int) -> dict[str, object]:
    """One layer of the Stage III audit from {domain: [(expert, value), ...]} (all lists of length K)."""
    D = len(lists)
    K = len(next(iter(lists.values())))
    experts = sorted({e for lst in lists.values() for e, _ in lst})
    stats = {}
    for e in experts:
        ranks, total, present = [], 0.0, 0
        for lst in lists.values():
            ids = [x for x, _ in lst]
            if e in ids:
                ranks.append(ids.index(e) + 1)
                total += lst[ids.index(e)][1]
                present += 1
            else:
                ranks.append(K + 1)
        mu = sum(ranks) / D
        stats[e] = (mu, sum((r - mu) ** 2 for r in ranks) / D, present, total / D)
    need = math.ceil(presence_ratio * D - 1e-9)
    cand = [e for e in experts if stats[e][2] >= need] or [e for e in experts if stats[e][2] == max(s[2] for s in stats.values())]
    committee = [
        e for e in cand
        if not any(stats[o][0] <= stats[e][0] and stats[o][1] <= stats[e][1] and (stats[o][0] < stats[e][0] or stats[o][1] < stats[e][1]) for o in cand)
    ]  # fmt: skip
    mass = sum(sum(v for _, v in lst) for lst in lists.values()) / D
    coverage = sum(stats[e][3] for e in committee) / mass if mass > 0 else 0.0
    size = len(committee)
    full = coverage >= 1 - 1e-12  # float noise in the sums
    ratio = (coverage / size) / ((1 - coverage) / (pool - size)) if 0 < size < pool and not full else (math.inf if 0 < size < pool else 1.0)
    return {"committee": sorted(committee, key=lambda e: (stats[e][0], stats[e][1], e)), "coverage": coverage, "ratio": ratio}
