"""SCMoE self-contrast decoding: contrast the model's normal routing with a weak routing of the same model.

Shi et al. 2024, "Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by Self-Contrast"
(arXiv:2405.14507): at every step take the next-token log-probabilities under the "strong" routing (the model as
it is) and under a "weak" one (by default each token routed to its rank-2 expert only), and pick greedily from

    (1 + beta) * log p_strong - beta * log p_weak,   restricted to tokens with p_strong >= alpha * max p_strong.

The restriction keeps the contrast from promoting tokens the strong model finds implausible; beta = 0 is greedy
decoding. Each routing keeps its own KV cache: the weak model's cache holds keys/values computed under weak routing
in every layer, so the two forwards are two consistent models that share weights, not one model with two heads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from moelens.adapters import RoutingCapture, find_routers
from moelens.errors import InputError, SteeringError
from moelens.recording.batch import RowMap, routing_columns
from moelens.recording.inputs import documents
from moelens.recording.record import _sequence_columns, _token_columns, cache_keyword, layer_rows, output_cache, run_fields
from moelens.recording.tokenize import decoded_texts, make_chunk
from moelens.recording.tokenize import Chunk, chunk_documents
from moelens.recording.writer import RunWriter
from moelens.steering.context import steer
from moelens.steering.experiment import _text
from moelens.adapters import unwrap
from moelens.steering.spec import SteeringSpec


def contrast_scores(strong_logits: torch.Tensor, weak_logits: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """SCMoE scores of the next token, ``-inf`` outside the plausible set ``p_strong >= alpha * max p_strong``."""
    strong = torch.log_softmax(strong_logits.float(), dim=-1)
    weak = torch.log_softmax(weak_logits.float(), dim=-1)
    scores = (1 + beta) * strong - beta * weak if beta else strong
    implausible = strong < math.log(alpha) + strong.max(dim=-1, keepdim=True).values
    return scores.masked_fill(implausible, float("-inf"))


def weak_spec(weak: int | SteeringSpec | dict | str) -> SteeringSpec:
    """The weak routing: an int r is "each token's rank-r expert only" (SCMoE's rank-k routing); else any spec."""
    if isinstance(weak, bool) or (isinstance(weak, int) and weak < 1):
        raise SteeringError(f"weak must be a rank (1, 2, ...) or a SteeringSpec, got {weak!r}")
    spec = SteeringSpec(only_rank=weak) if isinstance(weak, int) else SteeringSpec.build(weak)
    if spec.is_empty:
        raise SteeringError("the weak routing must differ from the model's own (an empty spec contrasts a model with itself)")
    return spec


def contrastive_generate(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    *,
    weak: int | SteeringSpec | dict | str = 2,
    strong: SteeringSpec | dict | str | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    max_new_tokens: int = 64,
    stop_at_eos: bool = True,
    store: Any = None,
    name: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Decode every prompt with SCMoE; one row per prompt: ``prompt``, ``completion``, ``new_ids``, ``stop``.

    ``weak`` is a rank r (the weak model routes each token to the expert its router ranks r-th) or any
    `SteeringSpec`; ``strong`` optionally steers the strong model too (default: unchanged). ``beta = 0`` is greedy
    decoding token for token. With ``store``, the strong routing of every prompt and generated token is recorded
    as one run (``intervention`` = the strong spec, ``metadata.decoding`` = method, beta, alpha and the weak spec);
    the returned frame has its ``run_id`` column.
    """
    if beta < 0 or not 0 < alpha <= 1:
        raise InputError(f"SCMoE needs beta >= 0 and 0 < alpha <= 1, got beta={beta}, alpha={alpha}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    module = unwrap(model)
    if find_routers(module).is_encoder_decoder:
        raise SteeringError("contrastive_generate decodes decoder-only models")
    weak_routing = weak_spec(weak)
    strong_routing = SteeringSpec.build(strong)
    docs = list(documents(prompts))
    chunks = list(chunk_documents(docs, tokenizer, 1 << 30))
    if not chunks or any(not c.ids for c in chunks):
        raise InputError("contrastive_generate needs non-empty prompts")
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    if eos is None and stop_at_eos:
        eos = getattr(module.config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    writer = _open_run(module, store, strong_routing, weak_routing, beta, alpha, max_new_tokens, name)
    rows = []
    try:
        with torch.inference_mode():
            for chunk in tqdm(chunks, desc="scmoe", unit="prompt", disable=not progress):
                new_ids, stop, calls, predicted = _decode(module, chunk.ids, strong_routing, weak_routing, beta, alpha,
                                                         max_new_tokens, eos_ids)
                if writer is not None:
                    _write(writer, tokenizer, chunk, new_ids, calls, predicted)
                rows.append({"prompt": chunk.text, "completion": _text(tokenizer, new_ids), "new_ids": new_ids,
                             "n_new": len(new_ids), "stop": stop})
        if writer is not None:
            writer.flush()
    except BaseException as exc:
        if writer is not None:
            writer.store.finish_run(writer.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    frame = pd.DataFrame(rows)
    frame["run_id"] = None if writer is None else writer.run_id
    if writer is not None:
        writer.store.finish_run(writer.run_id, "complete")
    return frame


def _decode(module: Any, prompt: list[int], strong: SteeringSpec, weak: SteeringSpec, beta: float, alpha: float,
            max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], str, list, list[int]]:
    """One prompt: ``(new ids, why it stopped, strong router calls in order, strong argmax per step)``."""
    device = next(module.parameters()).device
    with steer(module, strong):
        strong_info = find_routers(module)  # the strong routing's k, for decoding its router outputs
    step_ids = torch.tensor([prompt], device=device)
    caches: dict[str, Any] = {"strong": None, "weak": None}
    cache_name = cache_keyword(module)
    calls: list = []
    predicted: list[int] = []
    new_ids: list[int] = []

    def forward(which: str, ids: torch.Tensor) -> torch.Tensor:
        spec = strong if which == "strong" else weak
        with steer(module, spec):
            if which == "strong":
                with RoutingCapture(module, strong_info) as capture:
                    out = module(input_ids=ids, **{cache_name: caches[which]}, use_cache=True)
                calls.extend(capture.pop())
            else:
                out = module(input_ids=ids, **{cache_name: caches[which]}, use_cache=True)
        caches[which] = output_cache(out)
        return out.logits[:, -1]

    stop = "length"
    for _ in range(max_new_tokens):
        strong_logits = forward("strong", step_ids)
        predicted.append(int(strong_logits.argmax(-1)))
        weak_logits = forward("weak", step_ids) if beta else strong_logits
        token = int(contrast_scores(strong_logits, weak_logits, beta, alpha).argmax(-1))
        new_ids.append(token)
        step_ids = torch.tensor([[token]], device=device)
        if token in eos_ids:
            stop = "eos"
            break
    predicted.append(int(forward("strong", step_ids).argmax(-1)))  # routes the last new token too
    return new_ids, stop, calls, predicted


def _open_run(module: Any, store: Any, strong: SteeringSpec, weak: SteeringSpec, beta: float, alpha: float,
              max_new_tokens: int, name: str | None) -> RunWriter | None:
    if store is None:
        return None
    from moelens.store import TraceStore

    store = store if isinstance(store, TraceStore) else TraceStore(store)
    with steer(module, strong):  # the layers table shows the strong routing's k
        info = find_routers(module)
    decoding = {"method": "scmoe", "reference": "arXiv:2405.14507", "beta": beta, "alpha": alpha,
                "weak": weak.to_dict(), "max_new_tokens": max_new_tokens}
    run_id = store.create_run(
        getattr(module.config, "_name_or_path", None) or type(module).__name__,
        name=name or f"scmoe beta={beta:g} alpha={alpha:g} weak: {weak.describe()}",
        **run_fields(module, info),
        intervention=strong.to_dict(),
        metadata={"decoding": decoding, "generate": {"max_new_tokens": max_new_tokens, "decoding": "scmoe"}},
    )
    store.append(run_id, {"layers": layer_rows(info)})
    return RunWriter(store, run_id)


def _write(writer: RunWriter, tokenizer: Any, chunk: Chunk, new_ids: list[int], calls: list, predicted: list[int]) -> None:
    """The prompt and its continuation as one sequence, with the strong routing of every token."""
    seq_id, n_prompt = writer.n_sequences, len(chunk.ids)
    n_total = n_prompt + len(new_ids)
    rows = RowMap(seq_id=np.full(n_total, seq_id, dtype=np.int32), pos=np.arange(n_total, dtype=np.int32),
                  keep=np.ones(n_total, dtype=bool))
    tables = routing_columns(calls, rows)
    pred = np.full(n_total, -1, dtype=np.int64)
    pred[n_prompt - 1:] = predicted[: n_total - n_prompt + 1]
    ids = [*chunk.ids, *new_ids]
    if tokenizer is None:
        new_tokens, new_special = [None] * len(new_ids), [None] * len(new_ids)
    else:  # spans of decode(prompt + generated), the convention of every recording
        new_tokens, new_special = decoded_texts(tokenizer, ids, start=n_prompt)
    full = make_chunk(ids, [*chunk.tokens, *new_tokens], [*(chunk.special or [None] * n_prompt), *new_special],
                      label=chunk.label, source=chunk.source)
    tables["tokens"] = _token_columns([full], seq_id, predicted=pa.array(pred, mask=pred < 0, type=pa.int32()),
                                      phase=["prompt"] * n_prompt + ["generated"] * len(new_ids))
    tables["sequences"] = _sequence_columns([full], seq_id, prompt_lens=[n_prompt])
    writer.add(tables, n_tokens=n_total, n_sequences=1)
