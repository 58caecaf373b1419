"""Synthetic trace stores for the app and viz tests (no model, no torch): written through `TraceStore.append`.

`make_store(path)` writes a small store with:

* run 1 ``synthetic: baseline`` — complete, with router logits; four labels (python, math, english, multilingual), texts with
  multibyte characters, a ``<script>`` token and newlines; 4 MoE layers with the model's own ids 1..4
  (layer 0 is "dense"), 8 experts, top-2; a few capacity drops (expert -1) at layer 1;
* run 2 ``synthetic: steered`` — complete, the same tokens with expert 3 disabled at layer 2
  (``parent_run_id = 1`` and an intervention spec), so Compare has a real pair;
* run 3 ``synthetic: failed`` — status ``failed`` with an error message and a few rows;
* run 4 ``synthetic: interrupted`` — status ``recording`` (what a crash leaves);
* run 5 ``synthetic: another model`` — complete, three documents routed over 16 experts (Compare refuses it).

Routing is drawn from label- and token-dependent preferences with some carry-over between consecutive
tokens, so every analysis has structure to find. ``scale="demo"`` writes a store the size of the demo
trace (five labels, 16 experts, ~144k tokens per run) for first-render timings.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from moelens.store import TraceStore

LABELS = ("python", "math", "english", "multilingual")

TEXTS: dict[str, list[str]] = {
    "python": [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
        "for i in range(10):\n    print(i, i * i)\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
        "html = '<script>alert(1)</script>' if unsafe else '<b>ok</b>'\n",
    ],
    "math": [
        "12 + 35 = 47\n81 - 19 = 62\n7 * 8 = 56\n",
        "gcd(84, 36) = 12\n144 / 12 = 12 remainder 0\n",
        "solve 3x + 4 = 19: x = 5\n2^10 = 1024\n",
        "1/2 + 1/3 = 5/6\n(4 + 5) * 3 = 27\n",
    ],
    "english": [
        "The Python Software Foundation is a non-profit organisation devoted to the language.",
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
        "A list is a mutable sequence; a tuple cannot be changed after it is created.",
        "Use <script> tags with care & escape \"quotes\" in attributes.",
    ],
    "multilingual": [
        "Veuillez saisir un nom d'utilisateur valide. Ce champ est obligatoire.",
        "Привет, мир! Пожалуйста, введите правильное имя пользователя.",
        "日本語のテキスト：ユーザー名を入力してください。🙂",
        "Bitte geben Sie einen gültigen Benutzernamen ein. Größe: 5 µm.",
    ],
}

_TOKEN_RE = re.compile(r"\s*[^\s\w]|\s*\w+|\s+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Exact split: the pieces concatenate back to ``text``."""
    pieces = _TOKEN_RE.findall(text)
    assert "".join(pieces) == text
    return pieces


def _routing(
    rng: np.random.Generator,
    token_ids: np.ndarray,
    label_idx: np.ndarray,
    seq_start: np.ndarray,
    layers: list[int],
    n_experts: int,
    top_k: int,
    *,
    noise_seed: int,
    disable: dict[int, int] | None = None,
    drops_layer: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(layer, rank, expert, weight) per token (flattened token-major: token, layer, rank)."""
    n = len(token_ids)
    E = n_experts
    vocab_bias_rng = np.random.default_rng(1234)
    n_vocab = int(token_ids.max()) + 1 if n else 1
    experts = np.empty((n, len(layers), top_k), dtype=np.int16)
    weights = np.empty((n, len(layers), top_k), dtype=np.float32)
    noise_rng = np.random.default_rng(noise_seed)
    n_labels = int(label_idx.max()) + 1 if n else 1
    for li, layer in enumerate(layers):
        label_pref = vocab_bias_rng.normal(0, 1.0, size=(n_labels, E))
        for lab in range(n_labels):  # one strongly preferred expert per label and layer
            label_pref[lab, (lab * 3 + layer) % E] += 2.5
        token_pref = vocab_bias_rng.normal(0, 1.2, size=(n_vocab, E))
        load = np.linspace(0.8, -0.8, E)  # uneven global load
        scores = label_pref[label_idx] + token_pref[token_ids] + load + noise_rng.gumbel(size=(n, E))
        # Carry-over: consecutive tokens of a sequence share part of their scores.
        carried = scores.copy()
        for t in range(1, n):
            if not seq_start[t]:
                carried[t] = 0.6 * scores[t] + 0.4 * carried[t - 1]
        if disable and layer in disable:
            carried[:, disable[layer]] = -np.inf
        order = np.argsort(-carried, axis=1)[:, :top_k]
        top = np.take_along_axis(carried, order, axis=1)
        w = np.exp(top - top[:, :1])
        w = w / w.sum(axis=1, keepdims=True)
        experts[:, li, :] = order
        weights[:, li, :] = w
        if drops_layer is not None and layer == drops_layer and top_k > 1:
            drop = rng.random(n) < 0.02
            experts[drop, li, top_k - 1] = -1
            weights[drop, li, top_k - 1] = 0.0
    layer_col = np.broadcast_to(np.array(layers, dtype=np.int16)[None, :, None], experts.shape)
    rank_col = np.broadcast_to(np.arange(top_k, dtype=np.uint8)[None, None, :], experts.shape)
    return layer_col.reshape(-1), rank_col.reshape(-1), experts.reshape(-1), weights.reshape(-1)


def _write_run(
    store: TraceStore,
    name: str,
    docs: list[tuple[str, str]],
    vocab: dict[str, int],
    *,
    layers: list[int],
    n_experts: int,
    top_k: int,
    status: str,
    noise_seed: int = 7,
    disable: dict[int, int] | None = None,
    parent: int | None = None,
    error: str | None = None,
    drops_layer: int | None = None,
    chunk_tokens: int = 200_000,
    logits: bool = False,
) -> int:
    rng = np.random.default_rng(noise_seed)
    intervention = None
    if disable:
        intervention = {"disable": [[int(k), int(v)] for k, v in disable.items()]}
    run = store.create_run(
        "synthetic-moe",
        name=name,
        model_type="synthetic",
        n_layers=max(layers) + 1,
        moe_layers=layers,
        n_experts=n_experts,
        top_k=top_k,
        n_shared_experts=0,
        routing_function="softmax_topk",
        dtype="float32",
        device="cpu",
        parent_run_id=parent,
        intervention=intervention,
        metadata={"fixture": "tests/app_fixtures.py"},
    )
    store.append(
        run,
        {
            "layers": {
                "layer": layers,
                "block": layers,
                "module": [f"model.layers.{i}.mlp.gate" for i in layers],
                "kind": ["moe"] * len(layers),
                "n_experts": [n_experts] * len(layers),
                "top_k": [top_k] * len(layers),
                "has_shared_expert": [False] * len(layers),
            }
        },
    )
    label_index = {lab: i for i, lab in enumerate(sorted({d[0] for d in docs}))}
    seq_rows = {k: [] for k in ("seq_id", "label", "source", "prompt_len", "n_tokens", "text")}
    tok_seq, tok_pos, tok_id, tok_text, tok_label, seq_start = [], [], [], [], [], []
    for seq_id, (label, text) in enumerate(docs):
        pieces = tokenize(text)
        seq_rows["seq_id"].append(seq_id)
        seq_rows["label"].append(label)
        seq_rows["source"].append("tests/app_fixtures.py")
        seq_rows["prompt_len"].append(len(pieces))
        seq_rows["n_tokens"].append(len(pieces))
        seq_rows["text"].append(text)
        for pos, piece in enumerate(pieces):
            tok_seq.append(seq_id)
            tok_pos.append(pos)
            tok_id.append(vocab.setdefault(piece, len(vocab)))
            tok_text.append(piece)
            tok_label.append(label_index[label])
            seq_start.append(pos == 0)
    token_ids = np.array(tok_id, dtype=np.int64)
    layer_col, rank_col, expert_col, weight_col = _routing(
        rng,
        token_ids,
        np.array(tok_label),
        np.array(seq_start),
        layers,
        n_experts,
        top_k,
        noise_seed=noise_seed,
        disable=disable,
        drops_layer=drops_layer,
    )
    per_token = len(layers) * top_k
    seq_arr = np.repeat(np.array(tok_seq, dtype=np.int32), per_token)
    pos_arr = np.repeat(np.array(tok_pos, dtype=np.int32), per_token)
    n = len(tok_seq)
    store.append(
        run,
        {
            "sequences": seq_rows,
            "tokens": {
                "seq_id": np.array(tok_seq, dtype=np.int32),
                "pos": np.array(tok_pos, dtype=np.int32),
                "token_id": token_ids.astype(np.int32),
                "token": tok_text,
                "phase": ["prompt"] * n,
            },
        },
    )
    step = chunk_tokens * per_token
    for start in range(0, len(seq_arr), step):
        sl = slice(start, start + step)
        store.append(
            run,
            {
                "routing": {
                    "seq_id": seq_arr[sl],
                    "pos": pos_arr[sl],
                    "layer": layer_col[sl],
                    "rank": rank_col[sl],
                    "expert": expert_col[sl],
                    "weight": weight_col[sl],
                }
            },
        )
    if logits:  # router logits consistent with the routing: chosen experts score highest, in rank order
        chosen = expert_col.reshape(n, len(layers), top_k)
        z = rng.normal(0, 1, size=(n, len(layers), n_experts)).astype(np.float32)
        for r in range(top_k):
            e = chosen[:, :, r]
            ok = e >= 0
            np.put_along_axis(z, np.where(ok, e, 0)[..., None], np.where(ok, 6.0 - r, z[..., :1].squeeze(-1))[..., None], axis=-1)
        store.append(run, {"router_logits": {
            "seq_id": np.repeat(np.array(tok_seq, dtype=np.int32), len(layers)),
            "pos": np.repeat(np.array(tok_pos, dtype=np.int32), len(layers)),
            "layer": np.tile(np.array(layers, dtype=np.int32), n),
            "logits": list(z.reshape(n * len(layers), n_experts)),
        }})
    if status in ("complete", "failed"):
        store.finish_run(run, status, error=error)
    return run


def _demo_docs(seed: int = 0, n_tokens: int = 144_000, seq_len: int = 256) -> list[tuple[str, str]]:
    """Word-salad documents over five labels, about ``n_tokens`` tokens in sequences of ~``seq_len``."""
    rng = np.random.default_rng(seed)
    words = {
        "python": ["def", " return", " self", ".", "(", ")", ":", "\n", "    ", " if", " for", " in", " import", " x", " =", " None", "_"],
        "c": ["static", " int", " *", "(", ")", ";", "{", "}", "\n", " return", " NULL", " Py_DECREF", " if", " ->", " char"],
        "english": [" the", " of", " and", " a", " to", " is", " software", " license", " you", " may", ",", ".", " that", " with"],
        "math": [" 1", " 2", " 3", " 4", " 5", " 7", " 9", " +", " -", " *", " =", "\n", " /", " gcd"],
        "multilingual": [" le", " la", " die", " der", " и", " в", " не", " utilisateur", " Benutzer", " пользователя", " é", " ü"],
    }
    docs = []
    per_label = -(-n_tokens // (len(words) * seq_len))
    for label, vocab in words.items():
        for _ in range(per_label):
            toks = rng.choice(vocab, size=seq_len)
            docs.append((label, "".join(str(t) for t in toks)))
    return docs


def make_store(path: str | Path, *, scale: str = "small") -> dict:
    """Write the fixture store at ``path`` and return ``{"path", "runs": {name: id}, ...}``.

    ``scale="small"``: four labels, 16 hand-written documents, 8 experts (fast; used by the tests).
    ``scale="demo"``: five labels, ~144k tokens per run, 16 experts (timing runs only).
    """
    path = Path(path)
    store = TraceStore(path)
    vocab: dict[str, int] = {}
    if scale == "small":
        docs = [(label, text) for label in LABELS for text in TEXTS[label]]
        layers, E, k = [1, 2, 3, 4], 8, 2
    elif scale == "demo":
        docs = _demo_docs()
        layers, E, k = [0, 1, 2, 3], 16, 2
    else:
        raise ValueError(f"scale must be 'small' or 'demo', not {scale!r}")
    common = dict(layers=layers, n_experts=E, top_k=k)
    runs = {}
    runs["baseline"] = _write_run(store, "synthetic: baseline", docs, vocab, status="complete", drops_layer=layers[0],
                                  logits=scale == "small", **common)
    runs["steered"] = _write_run(
        store,
        "synthetic: steered (L2·E3 off)" if scale == "small" else "synthetic: steered (L1·E3 off)",
        docs,
        vocab,
        status="complete",
        disable={layers[1]: 3},
        parent=runs["baseline"],
        **common,
    )
    if scale == "small":
        runs["failed"] = _write_run(
            store, "synthetic: failed", docs[:2], vocab, status="failed", error="KeyboardInterrupt at chunk 1", **common
        )
        runs["interrupted"] = _write_run(store, "synthetic: interrupted", docs[:1], vocab, status="recording", **common)
        runs["other_model"] = _write_run(store, "synthetic: another model (16 experts)", docs[:3], vocab,
                                         status="complete", layers=layers, n_experts=16, top_k=k)
    return {"path": path, "runs": runs, "layers": layers, "n_experts": E, "top_k": k, "labels": sorted({d[0] for d in docs})}


def make_empty_store(path: str | Path) -> Path:
    """A valid store with no runs."""
    TraceStore(path)
    return Path(path)


if __name__ == "__main__":  # python tests/app_fixtures.py OUT.duckdb [small|demo]
    import sys

    out = make_store(sys.argv[1], scale=sys.argv[2] if len(sys.argv) > 2 else "small")
    print(out)
